"""The hub replay (bench/runner.py) on the micro-hub: budgets, lineages, thaws, regret."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
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


def test_placeholder_checkpoints_replay_a_weightless_method_exactly(hub: HubTable) -> None:
    """Without reading weights, a method makes the same decisions whether the hub's checkpoints or
    tiny stand-ins are saved; so it can replay a hub whose cache was never built. A method that
    reads weights is refused the stand-ins."""
    budget = 20
    real, _ = _run(hub, "dyhpo", budget)
    stand_in = Replay(hub, "dyhpo", 0, budget, placeholder_checkpoints=True).run()
    assert stand_in["checkpoints"] == "placeholder" and real["checkpoints"] == "hub"
    assert stand_in["final"]["n_thaws"] >= 1
    for key in ("config", "step", "trial", "best_val"):
        assert stand_in["trace"][key] == real["trace"][key], key
    assert [t["decision"] for t in stand_in["trials"]] == [t["decision"] for t in real["trials"]]
    with pytest.raises(ValueError, match="reads weights"):
        Replay(hub, "fms-gmn", 0, budget, placeholder_checkpoints=True)


def test_checkpoints_built_on_demand_are_the_table_s_and_replay_the_same(hub: HubTable, tmp_path) -> None:
    """A replay on an empty cache builds the zoo and only the configurations it visits, each file
    identical to the full build's (hash-checked), and decides exactly as on the full cache; a table
    whose hash disagrees with the rebuilt file stops the replay."""
    import json

    from bench.hubs.on_demand import OnDemandCache

    budget = 12
    full, _ = _run(hub, "fms-gmn-next", budget)
    empty = HubTable.load(hub.cache_dir / "table.json", tmp_path / "cache")
    lazy = Replay(empty, "fms-gmn-next", 0, budget, build_missing=True).run()
    for key in ("config", "step", "best_val"):
        assert lazy["trace"][key] == full["trace"][key], key
    visited = set(lazy["trace"]["config"])
    built = {int(p.name[1:]) for p in (tmp_path / "cache" / "configs").iterdir() if p.is_dir()}
    assert built == visited and lazy["built_on_demand"] == len(visited) < len(hub)
    assert all(empty.zoo_checkpoint_path(z["id"]).is_file() for z in hub.zoo)

    data = json.loads((hub.cache_dir / "table.json").read_text())
    data["configs"][5]["sha256"][3] = "0" * 12
    wrong = HubTable(data, tmp_path / "cache2")
    with OnDemandCache(wrong) as cache, pytest.raises(RuntimeError, match="differs from the table"):
        cache.ensure_config(5)


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



# --------------------------------------------------------------------------------------------------
# the Syne Tune driver (bench/synetune.py), with a scripted stand-in for the scheduler: Syne Tune
# itself lives in its own virtual environment


@dataclass
class _Suggestion:  # the fields of syne_tune.optimizer.scheduler.TrialSuggestion the driver reads
    spawn_new_trial_id: bool
    checkpoint_trial_id: int | None = None
    config: dict | None = None


@dataclass
class _Trial:
    trial_id: int
    config: dict


class ScriptedScheduler:
    """Starts grid rows 0, 1, 2, ... in turn, pauses every trial after ``every`` epochs and, on every
    other suggestion, resumes the oldest paused trial that has not finished."""

    def __init__(self, hub: HubTable, every: int = 2) -> None:
        self.hub, self.every = hub, every
        self.calls = 0
        self.reports: dict[int, list[int]] = defaultdict(list)  # trial id -> epochs reported
        self.completed: list[int] = []
        self.paused: list[int] = []

    def suggest(self, trial_id: int) -> _Suggestion:
        self.calls += 1
        if self.calls % 2 == 0 and self.paused:
            return _Suggestion(False, self.paused.pop(0))
        return _Suggestion(True, config={**self.hub.config(trial_id), "epochs": self.hub.n_epochs})

    def on_trial_add(self, trial: _Trial) -> None:
        assert trial.trial_id not in self.reports

    def on_trial_result(self, trial: _Trial, result: dict) -> str:
        self.reports[trial.trial_id].append(result["epoch"])
        if result["epoch"] % self.every == 0 and result["epoch"] < self.hub.n_epochs:
            self.paused.append(trial.trial_id)
            return "PAUSE"
        return "CONTINUE"

    def on_trial_complete(self, trial: _Trial, result: dict) -> None:
        assert result["epoch"] == self.hub.n_epochs
        self.completed.append(trial.trial_id)


def test_synetune_driver_resumes_paused_trials_where_they_stopped(hub: HubTable) -> None:
    from bench.synetune import drive

    budget = 3 * hub.n_epochs + 1
    scheduler = ScriptedScheduler(hub)
    d = drive(hub, scheduler, _Trial, budget)
    rec = d.record("scripted", "", 0)
    trace = rec["trace"]
    assert rec["final"]["epochs"] == budget == len(trace["epochs"])
    assert d.resumes > 0 and rec["final"]["n_thaws"] == d.resumes
    # each trial saw epochs 1, 2, 3, ... in order across its segments, and every epoch charged was reported
    for tid, epochs in scheduler.reports.items():
        assert epochs == list(range(1, len(epochs) + 1)), (tid, epochs)
        assert [s + 1 for c, s in zip(trace["config"], trace["step"]) if c == d.rows[tid]] == epochs
    assert scheduler.completed == [t for t, e in scheduler.reports.items() if len(e) == hub.n_epochs] != []
    assert rec["final"]["n_full_runs"] == len(scheduler.completed)
    assert rec["final"]["regret"] == pytest.approx(hub.best_accuracy() - max(trace["best_val"]))


def test_synetune_driver_refuses_what_the_grid_or_the_run_cannot_be(hub: HubTable) -> None:
    from bench.synetune import drive

    class OffGrid(ScriptedScheduler):
        def suggest(self, trial_id: int) -> _Suggestion:
            return _Suggestion(True, config={**self.hub.config(0), "lr": 0.123456})

    with pytest.raises(ValueError, match="not one of the grid's levels"):
        drive(hub, OffGrid(hub), _Trial, 4)

    class ResumesFinished(ScriptedScheduler):
        def suggest(self, trial_id: int) -> _Suggestion:
            return _Suggestion(True, config=self.hub.config(0)) if trial_id == 0 else _Suggestion(False, 0)

    with pytest.raises(RuntimeError, match="which has finished"):
        drive(hub, ResumesFinished(hub, every=hub.n_epochs + 1), _Trial, 3 * hub.n_epochs)


def test_report_writes_the_summary_tables_and_both_plots(hub: HubTable, tmp_path) -> None:
    import json

    from bench import report

    (tmp_path / "runs").mkdir()
    for method in ("random", "dyhpo-s16"):  # one method of the main plot, one variant
        for seed in (0, 1):
            rec, _ = _run(hub, method, 10, seed)
            (tmp_path / "runs" / f"{method}-s{seed}.json").write_text(json.dumps(rec))
    summary = report.write_report(tmp_path)
    assert set(summary["methods"]) == {"random", "dyhpo-s16"}
    assert summary["methods"]["random"]["seeds"] == [0, 1]
    for name in ("summary.json", "regret.png", "regret-all.png", "RESULTS.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "RESULTS.md").read_text()
    assert "](regret.png)" in text and "](regret-all.png)" in text
    assert report.plot(report.load_runs(tmp_path), summary, tmp_path / "main.png", report.MAIN) == ["random"]
