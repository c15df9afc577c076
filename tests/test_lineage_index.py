"""The shared lineage index gives exactly what a full rebuild gives, on random histories of a real
study: new runs, reports, checkpoints, freezes, thaws, detached and attached retries, crashes
(FAIL and expired leases), NaN failures, bad-checkpoint, deletion and failed-lineage marks."""

from __future__ import annotations

import copy
import random

import optuna
from optuna.trial import TrialState
import pytest

from optuna_fms import lineage as lin_mod
from optuna_fms.lineage_index import LineageIndex, index_of, study_lineages


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _record(study: optuna.Study, trial: optuna.trial.FrozenTrial, step: int) -> lin_mod.CheckpointRecord:
    rec = lin_mod.CheckpointRecord(trial.number, trial._trial_id, step, f"a{trial.number}-{step}", f"{step:064d}", 10)
    lin_mod.record_checkpoint(study, trial._trial_id, rec)
    return rec


class RandomHistory:
    """Random operations on a real in-memory study, as workers, Optuna and retention make them."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.recovery = lin_mod.RecoverySettings(lease_seconds=60.0, max_retries=2, clock=self.clock)
        self.study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        self.running: list[optuna.Trial] = []
        self.records: list[lin_mod.CheckpointRecord] = []

    def view(self) -> lin_mod.StudyView:
        return lin_mod.study_view(self.study, self.recovery)

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def start(self) -> None:
        trial = self.study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        lin_mod.renew_lease(self.study, trial._cached_frozen_trial, self.view())
        self.running.append(trial)

    def thaw(self) -> None:
        frozen = [lin for lin in lin_mod.build_lineages(self.trials(), self.view()) if lin.state == "frozen"]
        if not frozen:
            return self.start()
        lin = self.rng.choice(frozen)
        trial = self.study.ask()
        frozen_trial = trial._cached_frozen_trial
        if lin_mod.claim(self.study, frozen_trial, lin.tail.number, self.view()):
            lin_mod.mark_thaw(self.study, frozen_trial, lin, "test", lin.checkpoint_at_or_before(None))
        trial.suggest_float("x", 0.0, 1.0)
        self.running.append(trial)

    def report(self) -> None:
        if not self.running:
            return
        trial = self.rng.choice(self.running)
        step = (max(trial._cached_frozen_trial.intermediate_values, default=-1) + 1)
        if self.rng.random() < 0.8:
            self.records.append(_record(self.study, trial._cached_frozen_trial, step))
        value = float("nan") if self.rng.random() < 0.03 else self.rng.random()
        trial.report(value, step)
        if value != value:
            lin_mod.write_trial_attr(self.study, trial._trial_id, lin_mod.FAILED, "nan")
        lin_mod.renew_lease(self.study, trial._cached_frozen_trial, self.view())

    def end(self) -> None:
        if not self.running:
            return
        trial = self.running.pop(self.rng.randrange(len(self.running)))
        kind = self.rng.choice(["freeze", "freeze", "complete", "fail", "die"])
        if kind == "freeze":
            lin_mod.write_trial_attr(self.study, trial._trial_id, lin_mod.FROZEN, "test")
            self.study.tell(trial, state=TrialState.PRUNED)
        elif kind == "complete":
            self.study.tell(trial, self.rng.random())
        elif kind == "fail":
            self.study.tell(trial, state=TrialState.FAIL)
            if self.rng.random() < 0.5:  # Optuna's retry callback: a WAITING copy of the failed trial
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)(self.study, self.study.trials[trial.number])
        # "die": left RUNNING; its lease expires as the clock moves

    def pop_retry(self) -> None:
        waiting = [t for t in self.trials() if t.state == TrialState.WAITING]
        if not waiting:
            return
        trial = self.study.ask()  # pops the retry
        frozen = trial._cached_frozen_trial
        if self.rng.random() < 0.3:
            lin_mod.detach(self.study, frozen, "test")
        else:
            lin = lin_mod.find_lineage(lin_mod.build_lineages(self.trials(), self.view(), exclude=trial.number),
                                       lin_mod.predecessor(frozen) or -1)
            if lin is not None and lin.state == "frozen":
                lin_mod.mark_thaw(self.study, frozen, lin, "retry", lin.checkpoint_at_or_before(None))
        self.running.append(trial)

    def mark(self) -> None:
        if not self.records:
            return
        rec = self.rng.choice(self.records)
        which = self.rng.choice(["bad", "deleted", "failed"])
        if which == "bad":
            lin_mod.mark_bad_checkpoint(self.study, rec, "test")
        elif which == "deleted":
            lin_mod.record_deletion(self.study, rec, "test")
        else:
            lin = lin_mod.find_lineage(lin_mod.build_lineages(self.trials(), self.view()), rec.trial_number)
            if lin is not None:
                lin_mod.mark_lineage_failed(self.study, lin, "test")

    def tick(self) -> None:
        self.clock.now += self.rng.choice([1.0, 5.0, 70.0])

    def step(self) -> None:
        ops = [self.start, self.thaw, self.report, self.report, self.report, self.end, self.pop_retry,
               self.mark, self.tick]
        self.rng.choice(ops)()


@pytest.mark.parametrize("seed", range(4))
def test_the_index_equals_a_full_rebuild_after_every_change(seed: int) -> None:
    history = RandomHistory(seed)
    index = LineageIndex()
    kept_some = False
    for i in range(250):
        history.step()
        view, trials = history.view(), history.trials()
        expected = lin_mod.build_lineages(trials, view)
        assert index.update(trials, view) == expected, f"after operation {i}"
        kept_some |= index.rebuilt < len(expected)
        if history.running and i % 7 == 0:
            number = history.running[-1].number
            assert index.update(trials, view, exclude=number) == lin_mod.build_lineages(trials, view, exclude=number)
    states = {lin.state for lin in lin_mod.build_lineages(history.trials(), history.view())}
    assert {"frozen", "failed"} <= states  # the history reached the states that matter
    assert kept_some  # and the index did keep lineages rather than rebuild them all


def test_a_finished_lineage_is_kept_until_a_mark_touches_it() -> None:
    history = RandomHistory(0)
    study = history.study
    for _ in range(3):
        history.start()
    for _ in range(2):
        for trial in list(history.running):
            history.records.append(_record(study, trial._cached_frozen_trial, len(trial._cached_frozen_trial.intermediate_values)))
            trial.report(0.5, len(trial._cached_frozen_trial.intermediate_values))
    for trial in history.running[:2]:
        lin_mod.write_trial_attr(study, trial._trial_id, lin_mod.FROZEN, "test")
        study.tell(trial, state=TrialState.PRUNED)
    index = LineageIndex()
    index.update(history.trials(), history.view())
    assert index.rebuilt == 3
    index.update(history.trials(), history.view())
    assert index.rebuilt == 1  # only the lineage still running
    lin_mod.mark_bad_checkpoint(study, history.records[0], "test")  # a checkpoint of lineage 0
    lineages = index.update(history.trials(), history.view())
    assert index.rebuilt == 2 and [c.step for c in lineages[0].checkpoints] == [1]


def test_sampler_pruner_and_load_checkpoint_share_one_index_per_study() -> None:
    storage = optuna.storages.InMemoryStorage()
    a = optuna.create_study(storage=storage, study_name="a")
    b = optuna.create_study(storage=storage, study_name="b")
    again = optuna.load_study(storage=storage, study_name="a")
    assert index_of(a) is index_of(again) and index_of(a) is not index_of(b)
    a.ask().report(1.0, 0)
    assert [lin.curve for lin in study_lineages(a, lin_mod.study_view(a))] == [{0: 1.0}]
    assert study_lineages(b, lin_mod.study_view(b)) == []


def test_the_reporter_reads_the_index_and_agrees_with_a_rebuild_before_and_after_the_trial_is_stored() -> None:
    """The after-trial report sees the trial as it will be stored (through the shared index, which
    rebuilds only what changed), and what the index keeps from that copy equals a full rebuild
    from storage afterwards."""
    from optuna_fms import reporting

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for number in range(6):
        trial = study.ask()
        trial.report(0.1 * number, 0)
        _record(study, trial._cached_frozen_trial, 0)
        frozen = trial._cached_frozen_trial
        seen = reporting.lineages_after(study, frozen, TrialState.PRUNED, None)
        expected_trials = [t for t in study.get_trials(deepcopy=False) if t.number != number]
        done = copy.copy(frozen)
        done.state = TrialState.PRUNED
        assert seen == lin_mod.build_lineages([*expected_trials, done], lin_mod.study_view(study))
        if number >= 2:
            assert index_of(study).rebuilt == 1  # only the trial's own lineage, not all of them
        study.tell(trial, state=TrialState.PRUNED)
        stored = study_lineages(study, lin_mod.study_view(study))
        assert stored == lin_mod.build_lineages(study.get_trials(deepcopy=False), lin_mod.study_view(study))
        assert [lin.state for lin in stored] == ["pruned"] * (number + 1)
