"""Tests of the ``tabular`` and ``tokens`` hubs (bench/hubs/tabular.py, tokens.py) on their micro variants."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

import torch

from bench.hubs import data, tabular, tokens
from bench.hubs.recipe import TABLE_DIR, HubTable, build, verify

HUBS = {"tabular": tabular, "tokens": tokens}


@pytest.fixture(scope="module", params=sorted(HUBS))
def micro(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, HubTable]:
    mod = HUBS[request.param]
    cache = tmp_path_factory.mktemp(request.param)
    return mod, build(mod.recipe(micro=True), cache, cache / "table.json", workers=2)


def test_micro_checkpoints_reproduce_the_table_and_rebuild_bit_identically(micro: tuple[ModuleType, HubTable]) -> None:
    mod, hub = micro
    split = mod.recipe(micro=True).target()
    assert split.x_val.dtype == (np.int64 if mod is tokens else np.float32)
    x, y = torch.from_numpy(split.x_val), torch.from_numpy(split.y_val)
    for cid in range(len(hub)):
        cur = hub.curve(cid)
        assert len(cur["val_acc"]) == hub.n_epochs == 4
        epoch = int(np.argmax(cur["val_acc"])) + 1
        model = hub.load_model(cid, epoch).eval()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).double().mean().item()
        assert acc == pytest.approx(cur["val_acc"][epoch - 1], abs=1e-5)
    assert verify(hub, rebuild=[len(hub) - 1], workers=1, recipe=mod.recipe(micro=True)) == []


def test_micro_pretraining_is_a_head_start(micro: tuple[ModuleType, HubTable]) -> None:
    _, hub = micro
    first = {}
    for c in hub.configs():
        first.setdefault(hub.zoo[c["model"]]["pretrain"]["epochs"] > 0, []).append(hub.curve(c["id"])["val_acc"][0])
    assert np.mean(first[True]) > np.mean(first[False])


@pytest.mark.parametrize("name", sorted(HUBS))
def test_full_recipe_is_the_documented_factorial(name: str) -> None:
    from bench.hubs.models import build_model
    from optuna_fms.graphs import build_graph, describe_architecture

    r = HUBS[name].recipe()
    assert (r.grid.size, len(r.zoo), r.n_epochs) == ({"tabular": 512, "tokens": 384}[name], 24, 12)
    assert [z["pretrain"]["epochs"] > 0 for z in r.zoo] == [True, False] * 12
    assert [z["arch"] for z in r.zoo[::2]] == [z["arch"] for z in r.zoo[1::2]]
    families = {z["arch"]["family"] for z in r.zoo}
    assert len(families) == 2 and len({z["arch"]["family"] for z in (r.zoo[m] for m in r.grid.levels["model"])}) == 2
    assert r.fingerprint() == HUBS[name].recipe().fingerprint()
    for spec in r.zoo[::2]:  # every zoo architecture is one the parameter-graph builder reads
        model = build_model(spec["arch"])
        assert build_graph(model.state_dict(), describe_architecture(model)).num_edges > 0


@pytest.mark.parametrize("name", sorted(HUBS))
def test_committed_table_matches_its_recipe_and_loads_by_name(name: str) -> None:
    from bench.hubs.on_demand import recipe_of
    from bench.runner import load_hub

    if not (TABLE_DIR / f"{name}.json").is_file():
        pytest.fail(f"bench/hubs/tables/{name}.json is not committed")
    hub = load_hub(name)
    assert recipe_of(hub).name == name and len(hub) == hub.grid.size
    acc = np.array([hub.curve(c)["val_acc"] for c in range(len(hub))])
    assert acc.shape == (hub.grid.size, 12) and acc.max() > acc[:, 0].min()


def test_tabular_target_keeps_the_teacher_patients_out() -> None:
    src, tgt = data.diabetes_source(3000), data.diabetes_target()
    assert tgt.sizes() == {"train": 120, "val": 120, "test": 80} and tgt.x_train.shape[1] == 10
    x, _, _, order = data._diabetes()
    teacher = {r.astype(np.float32).tobytes() for r in x[order[:data.DIABETES_TEACHER]]}
    target = {r.tobytes() for r in np.concatenate([tgt.x_train, tgt.x_val, tgt.x_test])}
    assert not teacher & target and len(target) == 320
    assert set(np.unique(src.y_train)) == {0, 1, 2} and np.array_equal(src.x_val, data.diabetes_source(3000).x_val)


def test_token_labels_follow_their_rules() -> None:
    src, tgt = data.tokens_source(3000), data.tokens_target()
    assert src.x_train.shape[1:] == tgt.x_train.shape[1:] == (data.TOKEN_LENGTH,)
    for seq, label in zip(src.x_val[:50].tolist(), src.y_val[:50].tolist()):
        counts = [seq.count(m) for m in range(4)]
        assert label == counts.index(max(counts))
    for seq, label in zip(tgt.x_val[:50].tolist(), tgt.y_val[:50].tolist()):
        after = [b for a, b in zip(seq, seq[1:]) if a == 4 and b < 4]
        counts = [after.count(m) for m in range(4)]
        assert after and label == counts.index(max(counts))
    assert np.array_equal(tgt.x_test, data.tokens_target().x_test)


def test_token_models_read_token_ids() -> None:
    from bench.hubs.models import build_model

    for spec in tokens.architectures().values():
        model = build_model(spec).eval()
        ids = torch.randint(0, data.TOKEN_VOCAB, (3, data.TOKEN_LENGTH))
        traced = torch.fx.symbolic_trace(model)
        assert model(ids).shape == (3, data.TOKEN_CLASSES) and torch.allclose(traced(ids), model(ids))
    with pytest.raises(ValueError, match="unknown norm"):
        build_model({"family": "mlp", "in_features": 4, "hidden": [4], "norm": "group"})



def test_summary_counts_peaks_that_fall_and_compares_pretrained_with_scratch() -> None:
    from bench.hubs.recipe import FORMAT, Grid

    grid = Grid.of(model=(0, 1), batch_size=(8,), lr=(0.1, 0.3), momentum=(0.9,), weight_decay=(0.0,),
                   freeze_backbone=(0,))
    curves = [[0.5, 0.8, 0.7], [0.6, 0.7, 0.8], [0.2, 0.4, 0.39], [0.3, 0.3, 0.3]]  # ids 0-1: model 0
    table = HubTable({
        "format": FORMAT, "hub": "toy", "grid": grid.to_json(), "n_epochs": 3,
        "zoo": [{"id": 0, "pretrain": {"epochs": 2}}, {"id": 1, "pretrain": {"epochs": 0}}],
        "data": {"target": {"n_classes": 10}},
        "configs": [{"id": i, "val_acc": c, "epoch_s": [0.1] * 3} for i, c in enumerate(curves)]})
    s = table.summary()
    assert s["frac_peak_before_last"] == 0.75  # configs 0, 2 and 3 (a flat curve peaks at epoch 1)
    assert s["frac_fall_over_0.02"] == 0.25 and s["frac_fall_over_0.05"] == 0.25
    assert s["pretrained_mean_val_acc_epoch1"] == 0.55 and s["scratch_mean_val_acc_epoch1"] == 0.25
    assert s["pretrained_max_val_acc"] == 0.8 and s["scratch_mean_best_val_acc"] == 0.35
