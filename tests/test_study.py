"""Whole studies: FMSSampler + FMSPruner on a tiny real fine-tune, on every storage kind."""

import math

import optuna
from optuna.artifacts import FileSystemArtifactStore
import pytest
import torch

import optuna_fms
from optuna_fms import lineage as lin_mod
from optuna_fms.engine.surrogate import FitSettings

from tasks import finetune_objective, optimize_until, uninterrupted_weights

EPOCHS = 6
FAST = FitSettings(full_steps=100, refine_steps=15)


def _sampler(**kwargs) -> optuna_fms.FMSSampler:
    return optuna_fms.FMSSampler(seed=0, n_startup_trials=4, pool_size=64, fit_settings=FAST, **kwargs)


def _assert_lineages_are_chains(study: optuna.Study) -> None:
    for lin in optuna_fms.lineages(study):
        numbers = [t.number for t in lin.trials]
        for prev, trial in zip(lin.trials, lin.trials[1:]):
            assert trial.system_attrs[lin_mod.PARENT] == prev.number, numbers
            assert trial.params == lin.trials[0].params
        assert sum(t.state == optuna.trial.TrialState.RUNNING for t in lin.trials) <= 1


def _has_finished_thaw(study: optuna.Study) -> bool:
    return any(lin.n_thaws and lin.state == "finished" for lin in optuna_fms.lineages(study))


def _n_thaws(study: optuna.Study) -> int:
    return sum(t.system_attrs.get(lin_mod.PARENT) is not None for t in study.trials)


def test_freeze_thaw_study_on_every_storage(storage, study_name, tmp_path) -> None:
    store = FileSystemArtifactStore(str(tmp_path)) if isinstance(storage, optuna.storages.RDBStorage) else None
    study = optuna.create_study(
        study_name=study_name, storage=storage, direction="maximize",
        sampler=_sampler(artifact_store=store), pruner=optuna_fms.FMSPruner(),
    )
    try:
        optimize_until(study, finetune_objective(EPOCHS), _has_finished_thaw, chunk=11, max_trials=66)
        lineages = optuna_fms.lineages(study)
        states = [lin.state for lin in lineages]
        assert states.count("frozen") >= 1, states
        thawed = [lin for lin in lineages if lin.n_thaws]
        assert thawed, states
        _assert_lineages_are_chains(study)
        for lin in thawed:
            assert lin.steps == list(range(len(lin.steps))), lin.steps  # steps continue the parent's
            assert lin.trials[1].user_attrs[lin_mod.USER_START_STEP] == len(lin.trials[0].intermediate_values)
        # A thawed lineage that ran to the end has exactly the weights of an uninterrupted run.
        done = [lin for lin in thawed if lin.state == "finished"]
        assert done
        for lin in done[:2]:
            last = optuna_fms.read_checkpoint(study, lin.checkpoints[-1], artifact_store=store)
            straight = uninterrupted_weights(lin.params, EPOCHS)
            assert all(torch.equal(last.state_dict[k], straight[k]) for k in straight)
        best = optuna_fms.best_lineage(study)
        assert best is not None and best.best(study.direction)[1] == max(
            v for lin in lineages for v in lin.curve.values()
        )
    finally:
        if isinstance(storage, optuna.storages.RDBStorage) and storage.url.startswith("postgresql"):
            optuna.delete_study(study_name=study_name, storage=storage)


def test_minimize_freezes_the_worst_and_best_lineage_is_the_lowest() -> None:
    task_objective = finetune_objective(EPOCHS)

    def loss(trial: optuna.Trial) -> float:
        real_report = trial.report
        trial.report = lambda value, step: real_report(1.0 - value, step)  # type: ignore[method-assign]
        return 1.0 - task_objective(trial)

    study = optuna.create_study(direction="minimize", sampler=_sampler(), pruner=optuna_fms.FMSPruner())
    optimize_until(study, loss, lambda s: _n_thaws(s) >= 1, chunk=9, max_trials=54)
    lineages = optuna_fms.lineages(study)
    assert any(lin.n_thaws for lin in lineages)
    best = optuna_fms.best_lineage(study)
    assert best.best(study.direction)[1] == min(v for lin in lineages for v in lin.curve.values())
    assert best.best(study.direction)[1] < 0.5


def test_nan_report_fails_that_lineage_only() -> None:
    objective = finetune_objective(EPOCHS)

    def sometimes_nan(trial: optuna.Trial) -> float:
        if trial.number == 3:  # a start-up trial: always a new configuration
            trial.suggest_categorical("model", ["good", "weak", "scratch"])
            trial.report(float("nan"), 0)
            assert trial.should_prune()
            raise optuna.TrialPruned()
        return objective(trial)

    study = optuna.create_study(direction="maximize", sampler=_sampler(), pruner=optuna_fms.FMSPruner())
    study.optimize(sometimes_nan, n_trials=14)
    by_root = {lin.id: lin for lin in optuna_fms.lineages(study)}
    assert by_root[3].state == "failed" and "nan" in by_root[3].failure
    assert all(lin.tail.system_attrs.get(lin_mod.PARENT) != 3 for lin in by_root.values())  # never thawed
    assert len(study.trials) == 14


def test_objective_without_checkpoints_still_works_and_warns_once(caplog) -> None:
    study = optuna.create_study(direction="maximize", sampler=_sampler(), pruner=optuna_fms.FMSPruner())
    with caplog.at_level("WARNING", logger="optuna_fms"):
        study.optimize(finetune_objective(EPOCHS, save=False), n_trials=10)
    warnings = [r for r in caplog.records if "before saving any checkpoint" in r.getMessage()]
    assert len(warnings) == 1
    assert all(lin.n_thaws == 0 for lin in optuna_fms.lineages(study))  # nothing to resume from
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)  # still stops runs


def test_fms_pruner_with_another_sampler_is_early_stopping() -> None:
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna_fms.FMSPruner(n_startup_trials=4, fit_settings=FAST),
    )
    study.optimize(finetune_objective(EPOCHS), n_trials=14)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    assert all(lin.n_thaws == 0 for lin in optuna_fms.lineages(study))
    # Start-up runs are never stopped early.
    assert all(len(t.intermediate_values) == EPOCHS for t in study.trials[:4])


def test_fms_sampler_without_pruner_warns_and_samples(caplog) -> None:
    study = optuna.create_study(direction="maximize", sampler=_sampler(), pruner=optuna.pruners.NopPruner())
    with caplog.at_level("WARNING", logger="optuna_fms"):
        study.optimize(finetune_objective(3), n_trials=8)
    assert sum("without FMSPruner" in r.getMessage() for r in caplog.records) == 1
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 8


def test_parallel_threads_never_run_one_lineage_twice(tmp_path) -> None:
    study = optuna.create_study(
        direction="maximize", storage=f"sqlite:///{tmp_path / 's.db'}",
        sampler=_sampler(), pruner=optuna_fms.FMSPruner(),
    )
    optimize_until(study, finetune_objective(EPOCHS), lambda s: _n_thaws(s) >= 2, chunk=8, max_trials=64, n_jobs=2)
    assert len(study.trials) % 8 == 0
    _assert_lineages_are_chains(study)
    parents = [t.system_attrs.get(lin_mod.PARENT) for t in study.trials]
    thawed = [p for p in parents if p is not None]
    assert len(thawed) >= 2 and len(thawed) == len(set(thawed))  # each frozen trial continued at most once


def test_claims_are_exclusive() -> None:
    study = optuna.create_study()
    parent = study.ask()
    study.tell(parent, 1.0)
    a, b = study.ask(), study.ask()
    assert lin_mod.claim(study, a._cached_frozen_trial, parent.number)
    assert not lin_mod.claim(study, b._cached_frozen_trial, parent.number)
    assert study._storage.get_trial(b._trial_id).system_attrs[lin_mod.CLAIM] is None


def test_search_space_change_mid_study(caplog) -> None:
    objective = finetune_objective(4)

    def changing(trial: optuna.Trial) -> float:
        if trial.number >= 8:
            trial.suggest_int("extra", 1, 3)
        return objective(trial)

    study = optuna.create_study(direction="maximize", sampler=_sampler(), pruner=optuna_fms.FMSPruner())
    study.optimize(changing, n_trials=16)
    assert len(study.trials) == 16
    assert all(t.state != optuna.trial.TrialState.FAIL for t in study.trials)


def test_retry_of_a_crashed_segment_continues_its_lineage(tmp_path) -> None:
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=60, grace_period=120,
        failed_trial_callback=None,
    )
    study = optuna.create_study(storage=storage, direction="maximize")
    first = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    optuna_fms.save_checkpoint(first, {"w": torch.ones(1)}, 0)
    first.report(0.3, 0)
    storage.set_trial_state_values(first._trial_id, optuna.trial.TrialState.FAIL)
    # What RetryHeartbeatStaleTrialCallback does: a WAITING copy pointing at the failed trial.
    retry = optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=first.params,
        distributions=first.distributions,
        system_attrs={**storage.get_trial(first._trial_id).system_attrs, "failed_trial": first.number},
    )
    study.add_trial(retry)
    second = study.ask()
    ckpt = optuna_fms.load_checkpoint(second)
    assert ckpt is not None and ckpt.step == 0 and torch.equal(ckpt.state_dict["w"], torch.ones(1))
    second.report(0.4, 1)
    study.tell(second, 0.4)
    (lin,) = optuna_fms.lineages(study)
    assert [t.number for t in lin.trials] == [first.number, second.number]
    assert lin.state == "finished" and lin.steps == [0, 1] and len(lin.checkpoints) == 1


def test_lineage_views_and_best_value_ignore_nan() -> None:
    study = optuna.create_study(direction="maximize")
    for values in ([0.1, 0.5], [0.2, math.nan]):
        t = study.ask()
        for step, v in enumerate(values):
            t.report(v, step)
        study.tell(t, state=optuna.trial.TrialState.PRUNED)
    lineages = optuna_fms.lineages(study)
    assert [lin.state for lin in lineages] == ["pruned", "failed"]
    assert optuna_fms.best_lineage(study).id == 0


def test_steps_out_of_order_or_repeated_are_stitched_by_step() -> None:
    study = optuna.create_study(direction="maximize", sampler=_sampler(), pruner=optuna_fms.FMSPruner())
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    for step, value in ((2, 0.3), (0, 0.1), (1, 0.2), (1, 0.9)):  # the repeat is ignored by Optuna
        trial.report(value, step)
        assert trial.should_prune() in (True, False)
    study.tell(trial, 0.3)
    (lin,) = optuna_fms.lineages(study)
    assert lin.curve == {0: 0.1, 1: 0.2, 2: 0.3} and lin.next_step == 3


def test_device_is_automatic_and_can_be_overridden() -> None:
    from optuna_fms.engine.device import resolve_device

    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            optuna_fms.FMSSampler(device="cuda")


def test_two_processes_share_a_study_and_never_run_one_lineage_twice(tmp_path) -> None:
    import multiprocessing

    from optuna.storages.journal import JournalFileBackend

    from tasks import optimize_worker

    path = str(tmp_path / "journal.log")
    storage = optuna.storages.JournalStorage(JournalFileBackend(path))
    optuna.create_study(study_name="shared", storage=storage, direction="maximize")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=optimize_worker, args=(path, "shared", 12, seed)) for seed in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
        assert w.exitcode == 0
    study = optuna.load_study(study_name="shared", storage=optuna.storages.JournalStorage(JournalFileBackend(path)))
    assert len(study.trials) == 24
    _assert_lineages_are_chains(study)
    parents = [t.system_attrs.get(lin_mod.PARENT) for t in study.trials if t.system_attrs.get(lin_mod.PARENT) is not None]
    assert parents and len(parents) == len(set(parents))
