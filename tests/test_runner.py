"""The hub replay (bench/runner.py) on the micro-hub: budgets, lineages, thaws, regret."""

from __future__ import annotations

from collections import defaultdict
import math

import numpy as np
import pytest

import optuna_fms
from bench import methods
from bench.hubs.recipe import HubTable, build_micro_hub
from bench.runner import Replay, load_hub
from optuna_fms import lineage as lin_mod


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> HubTable:
    return build_micro_hub(tmp_path_factory.mktemp("micro"))


def _run(hub: HubTable, method: str, budget: int, seed: int = 0) -> tuple[dict, Replay]:
    replay = Replay(hub, method, seed, budget)
    return replay.run(), replay


def _check_accounting(hub: HubTable, rec: dict, budget: int) -> None:
    trials, trace = rec["trials"], rec["trace"]
    # the budget is spent exactly (the micro grid holds far more epochs than any budget here)
    assert rec["final"]["epochs"] == budget == len(trace["epochs"]) == sum(t["epochs_charged"] for t in trials)
    assert trace["epochs"] == list(range(1, budget + 1))
    # every charged epoch was reported, and nothing else
    for t in trials:
        assert t["steps"] == t["reported"], t
    # within a lineage, segments continue exactly where the previous one stopped: 0, 1, ..., k-1
    by_lineage: dict[int, list[int]] = defaultdict(list)
    for t in sorted(trials, key=lambda t: t["number"]):
        if t["thaw"]:
            assert t["steps"] == [] or t["steps"][0] == t["start_step"] == len(by_lineage[t["lineage"]]), t
        else:
            assert t["start_step"] == 0 and (t["steps"] == [] or t["steps"][0] == 0), t
        by_lineage[t["lineage"]] += t["steps"]
    for lineage, steps in by_lineage.items():
        assert steps == list(range(len(steps))), (lineage, steps)
        assert len(steps) <= hub.n_epochs
    # regret: >= 0, non-increasing, and the incumbent is the best charged (config, epoch) of the table
    regret = hub.best_accuracy() - np.array(trace["best_val"])
    assert (regret >= -1e-12).all() and (np.diff(regret) <= 1e-12).all()
    seen = [hub.curve(c)["val_acc"][s] for c, s in zip(trace["config"], trace["step"])]
    assert math.isclose(max(seen), rec["final"]["best_val"])
    assert math.isclose(rec["final"]["regret"], hub.best_accuracy() - max(seen))
    inc = rec["final"]["incumbent"]
    assert hub.curve(inc["config"])["val_acc"][inc["epoch"] - 1] == rec["final"]["best_val"]
    assert rec["final"]["inc_test"] == hub.curve(inc["config"])["test_acc"][inc["epoch"] - 1]
    assert np.isclose(trace["train_s"][-1], sum(hub.curve(c)["epoch_s"][s] for c, s in zip(trace["config"], trace["step"])))


@pytest.mark.parametrize("method,budget", [("random", 4), ("random", 20), ("tpe-hyperband", 20)])
def test_baselines_respect_the_budget(hub: HubTable, method: str, budget: int) -> None:
    rec, replay = _run(hub, method, budget)
    _check_accounting(hub, rec, budget)
    assert rec["final"]["n_thaws"] == 0
    # the study saw exactly the table's values
    for t in replay.study.trials:
        cid = t.user_attrs.get("bench:config")
        for step, v in t.intermediate_values.items():
            assert v == hub.curve(cid)["val_acc"][step]
    if budget < hub.n_epochs:  # the first run is cut mid-way: pruned, not finished
        assert replay.study.trials[0].user_attrs.get("bench:stopped") == "budget spent"


def test_fms_thaws_continue_and_never_recharge(hub: HubTable) -> None:
    budget = 20
    rec, replay = _run(hub, "dyhpo", budget)
    _check_accounting(hub, rec, budget)
    assert rec["final"]["n_thaws"] >= 1
    assert rec["tau"] is not None and rec["tau"]["n_partial"] >= 1
    # the study's own lineages agree with the runner's ledger, and every reported step has its checkpoint
    lins = {lin.id: lin for lin in optuna_fms.lineages(replay.study)}
    for lin in lins.values():
        cid = lin.trials[0].user_attrs["bench:config"]
        assert lin.curve == {s: hub.curve(cid)["val_acc"][s] for s in range(len(lin.curve))}
        assert [c.step for c in lin.checkpoints] == sorted(lin.curve)
    for t in rec["trials"]:
        if t["thaw"]:
            parent = replay.study.trials[t["number"]].system_attrs[lin_mod.PARENT]
            assert max(replay.study.trials[parent].intermediate_values) + 1 == t["start_step"]


def test_fms_with_weights_saves_graphs_and_pretrained(hub: HubTable) -> None:
    assert methods.reads_weights("fms-gmn") and not methods.reads_weights("dyhpo")
    budget = 10
    rec, replay = _run(hub, "fms-gmn", budget)
    _check_accounting(hub, rec, budget)
    pretrained = lin_mod.pretrained_records(replay.study)
    assert {v for (p, v) in pretrained if p == "model"} == set(hub.grid.levels["model"])
    assert all(r.has_graph for r in pretrained.values())
    records = [c for lin in optuna_fms.lineages(replay.study) for c in lin.checkpoints]
    assert len(records) == budget and all(c.has_graph for c in records)
    assert rec["overhead"]["pruner_total_s"] > 0


def test_load_hub_finds_a_micro_cache(hub: HubTable) -> None:
    again = load_hub(hub.cache_dir / "table.json")
    assert again.cache_dir == hub.cache_dir and again.checkpoint_path(0, 1).is_file()


def test_fms_reads_the_weights_of_mixed_architectures(tmp_path, caplog) -> None:
    """The arch micro-hub (CNN, ResNet, ViT, MLP): every checkpoint and pretrained start becomes a graph."""
    from bench.hubs.arch import recipe
    from bench.hubs.recipe import build

    hub = build(recipe(micro=True), tmp_path, tmp_path / "table.json", workers=2)
    families = {hub.zoo[hub.config(cid)["model"]]["arch"]["family"] for cid in range(len(hub))}
    assert families == {"gap_cnn", "resnet", "vit", "mlp"}
    with caplog.at_level("WARNING", logger="optuna_fms"):
        rec, replay = _run(hub, "fms-gmn", 24)
    _check_accounting(hub, rec, 24)
    assert not [r for r in caplog.records if "not featurized" in r.getMessage()]
    lineages = optuna_fms.lineages(replay.study)
    seen = {hub.zoo[lin.params["model"]]["arch"]["family"] for lin in lineages}
    assert len(seen) >= 3, seen
    assert all(c.has_graph for lin in lineages for c in lin.checkpoints)
    encoder = replay.study.sampler.policy._surrogate._model.extractor.weights
    assert len(encoder._cache) >= len(lineages)  # checkpoints of every architecture were embedded
