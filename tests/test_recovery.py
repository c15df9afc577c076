"""Lineages that survive crashes, retries and bad checkpoints, on real studies.

A dead worker is a trial left RUNNING; its lease expires on a fake clock (or, on RDBStorage,
Optuna's heartbeat goes stale). Thaws are forced through the sampler's successive-halving hedge
(``promotion_probability=1``): the best frozen lineage at its step is thawed, so each test knows
which lineage the next trial continues.
"""

from __future__ import annotations

import math
import os
import time

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState
import pytest
import torch

import optuna_fms
from optuna_fms import lineage as lin_mod
from optuna_fms.engine.surrogate import FitSettings

STEPS = 6
LEASE = 60.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def value(x: float, step: int) -> float:
    return x + 0.01 * step


def weights(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), float(step))}


def make_study(storage, store, clock=None, *, max_retries: int = 3, study_name: str | None = None):
    recovery = optuna_fms.RecoverySettings(lease_seconds=LEASE, max_retries=max_retries, clock=clock or FakeClock())
    sampler = optuna_fms.FMSSampler(
        seed=0, n_startup_trials=2, pool_size=16, weights=None, promotion_probability=1.0,
        fit_settings=FitSettings(full_steps=30, refine_steps=5), recovery=recovery, artifact_store=store,
    )
    pruner = optuna_fms.FMSPruner(min_segment_steps=100, max_steps=STEPS)
    return optuna.create_study(
        storage=storage, study_name=study_name, direction="maximize", sampler=sampler, pruner=pruner,
        load_if_exists=study_name is not None,
    )


def objective(trial: optuna.Trial) -> float:
    """The user's loop: resume, then checkpoint and report each step."""
    x = trial.suggest_float("x", 0.0, 1.0)
    ckpt = optuna_fms.load_checkpoint(trial)
    start = 0 if ckpt is None else ckpt.step + 1
    if ckpt is not None:
        assert torch.equal(ckpt.state_dict["w"], weights(ckpt.step)["w"])
    for step in range(start, STEPS):
        optuna_fms.save_checkpoint(trial, weights(step), step)
        trial.report(value(x, step), step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return value(x, STEPS - 1)


def add_lineage(study: optuna.Study, x: float, steps: int, *, frozen: bool) -> int:
    """One segment run by hand: a frozen one (what FMSPruner leaves) or a finished one."""
    study.enqueue_trial({"x": x})
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    for step in range(steps):
        optuna_fms.save_checkpoint(trial, weights(step), step)
        trial.report(value(x, step), step)
    if frozen:
        study._storage.set_trial_system_attr(trial._trial_id, lin_mod.FROZEN, "frozen by the test")
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, value(x, steps - 1))
    return trial.number


def seed_study(study: optuna.Study) -> dict[str, int]:
    """A (0.9) and B (0.5) frozen after step 0; C and D finished: A is the one to thaw."""
    return {
        "A": add_lineage(study, 0.9, 1, frozen=True),
        "B": add_lineage(study, 0.5, 1, frozen=True),
        "C": add_lineage(study, 0.1, STEPS, frozen=False),
        "D": add_lineage(study, 0.2, STEPS, frozen=False),
    }


def start_and_die(study: optuna.Study, *, checkpoints_to: int, reports_to: int) -> optuna.Trial:
    """A thaw chosen by the sampler that resumes, works, and dies RUNNING."""
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    ckpt = optuna_fms.load_checkpoint(trial)
    start = 0 if ckpt is None else ckpt.step + 1
    for step in range(start, reports_to + 1):
        if step <= checkpoints_to:
            optuna_fms.save_checkpoint(trial, weights(step), step)
        trial.report(value(trial.params["x"], step), step)
    return trial


def attrs(study: optuna.Study, number: int) -> tuple[dict, dict]:
    t = study.trials[number]
    return t.system_attrs, t.user_attrs


def by_root(study: optuna.Study) -> dict[int, optuna_fms.Lineage]:
    return {lin.id: lin for lin in optuna_fms.lineages(study)}


def claims_on(study: optuna.Study, number: int) -> list[int]:
    return [t.number for t in study.trials if t.system_attrs.get(lin_mod.CLAIM) == number]


@pytest.fixture
def store(tmp_path) -> FileSystemArtifactStore:
    folder = tmp_path / "artifacts"
    folder.mkdir()
    return FileSystemArtifactStore(str(folder))


# --- dead segments ------------------------------------------------------------------------------


def test_an_expired_lease_frees_the_lineage_and_steps_after_its_checkpoint_are_lost(
    storage, study_name, store
) -> None:
    clock = FakeClock()
    study = make_study(storage, store, clock, study_name=study_name)
    try:
        names = seed_study(study)
        dead = start_and_die(study, checkpoints_to=1, reports_to=2)  # step 2 was never saved
        assert attrs(study, dead.number)[0][lin_mod.PARENT] == names["A"]

        clock.advance(LEASE / 2)
        assert by_root(study)[names["A"]].state == "running"
        clock.advance(LEASE)
        lin = by_root(study)[names["A"]]
        assert (lin.state, lin.crashes, lin.lost_steps) == ("frozen", 1, 1)
        assert lin.steps == [0, 1]  # the curve the surrogate reads ends at the last checkpoint

        study.optimize(objective, n_trials=1)
        system, user = attrs(study, dead.number + 1)
        assert system[lin_mod.PARENT] == dead.number  # resumes the dead segment's checkpoint
        assert user[lin_mod.USER_START_STEP] == 2
        lin = by_root(study)[names["A"]]
        assert [t.number for t in lin.trials] == [names["A"], dead.number, dead.number + 1]
        assert lin.state == "finished" and lin.steps == list(range(STEPS))
        assert by_root(study)[names["B"]].state == "frozen"
    finally:
        if isinstance(storage, optuna.storages.RDBStorage) and storage.url.startswith("postgresql"):
            optuna.delete_study(study_name=study_name, storage=storage)


def test_a_live_worker_keeps_its_lineage_and_a_superseded_one_stops(store) -> None:
    clock = FakeClock()
    study = make_study(None, store, clock)
    names = seed_study(study)
    slow = start_and_die(study, checkpoints_to=1, reports_to=1)
    assert not slow.should_prune()  # a report renews the lease ...
    clock.advance(LEASE * 0.9)
    slow.report(value(0.9, 2), 2)
    assert not slow.should_prune()  # ... so the lineage stays running
    clock.advance(LEASE * 0.9)
    assert by_root(study)[names["A"]].state == "running"
    clock.advance(LEASE)
    study.optimize(objective, n_trials=1)  # the lease expired: another trial resumes the lineage
    assert by_root(study)[names["A"]].tail.number == slow.number + 1
    slow.report(value(0.9, 3), 3)
    assert slow.should_prune()  # the zombie learns it was replaced and stops
    assert attrs(study, slow.number)[1][lin_mod.USER_DECISION].startswith("superseded")


def test_a_crash_between_claim_and_thaw_blocks_the_lineage_only_until_its_lease_ends(store) -> None:
    clock = FakeClock()
    study = make_study(None, store, clock)
    names = seed_study(study)
    # A worker that wrote its claim on A's tail and died before linking its trial to it.
    claimant_id = study._storage.create_new_trial(study._study_id)
    study._storage.set_trial_system_attr(claimant_id, lin_mod.LEASE, clock())
    study._storage.set_trial_system_attr(claimant_id, lin_mod.CLAIM, names["A"])
    other = study.ask()
    assert study.trials[other.number].system_attrs.get(lin_mod.PARENT) != names["A"]  # blocked while alive
    study.tell(other, state=TrialState.FAIL)
    clock.advance(2 * LEASE)
    study.optimize(objective, n_trials=1)
    newest = study.trials[-1]
    assert newest.system_attrs[lin_mod.CLAIM] == names["A"] and newest.system_attrs[lin_mod.PARENT] == names["A"]
    assert by_root(study)[names["A"]].state == "finished"


def test_a_lineage_that_crashes_too_often_is_failed_for_good(store) -> None:
    clock = FakeClock()
    study = make_study(None, store, clock, max_retries=1)
    names = seed_study(study)
    first = start_and_die(study, checkpoints_to=1, reports_to=1)
    clock.advance(2 * LEASE)
    second = start_and_die(study, checkpoints_to=2, reports_to=2)
    assert study.trials[second.number].system_attrs[lin_mod.PARENT] == first.number
    clock.advance(2 * LEASE)
    lin = by_root(study)[names["A"]]
    assert lin.state == "failed" and lin.crashes == 2 and "max_retries=1" in lin.failure
    study.optimize(objective, n_trials=1)
    assert claims_on(study, second.number) == []


def test_a_failed_trial_with_a_checkpoint_is_resumed_but_a_nan_report_stays_failed(store) -> None:
    clock = FakeClock()
    study = make_study(None, store, clock)
    names = seed_study(study)
    crashed = start_and_die(study, checkpoints_to=1, reports_to=1)
    study.tell(crashed, state=TrialState.FAIL)  # an exception in the objective: transient
    assert by_root(study)[names["A"]].state == "frozen"
    nan_run = study.ask()  # thaws A again from step 1
    assert study.trials[nan_run.number].system_attrs[lin_mod.PARENT] == crashed.number
    optuna_fms.load_checkpoint(nan_run)
    optuna_fms.save_checkpoint(nan_run, weights(2), 2)
    nan_run.report(math.nan, 2)
    assert nan_run.should_prune()
    study.tell(nan_run, state=TrialState.PRUNED)
    clock.advance(10 * LEASE)
    lin = by_root(study)[names["A"]]
    assert lin.state == "failed" and "nan" in lin.failure
    study.optimize(objective, n_trials=1)
    assert claims_on(study, nan_run.number) == []


# --- retries (Optuna's heartbeat) --------------------------------------------------------------


def test_a_heartbeat_retry_continues_its_own_lineage_and_decides_nothing(tmp_path, store) -> None:
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=2,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
    )
    study = make_study(storage, store)
    names = seed_study(study)
    # A first segment (the case that used to decide and claim another lineage) dies after
    # saving step 0 and reporting step 1.
    study.enqueue_trial({"x": 0.7})
    root = study.ask()
    root.suggest_float("x", 0.0, 1.0)
    storage.record_heartbeat(root._trial_id)
    optuna_fms.save_checkpoint(root, weights(0), 0)
    root.report(value(0.7, 0), 0)
    root.report(value(0.7, 1), 1)
    time.sleep(3.5)  # NOTE: the heartbeat goes stale after the grace period (no assertion on time)

    study.optimize(objective, n_trials=1)  # Optuna fails the stale trial and runs its retry
    retry = study.trials[-1]
    assert retry.system_attrs["failed_trial"] == root.number and retry.state == TrialState.COMPLETE
    assert retry.system_attrs[lin_mod.PARENT] == root.number
    assert retry.user_attrs[lin_mod.USER_START_STEP] == 1
    assert retry.user_attrs[lin_mod.USER_LINEAGE] == root.number
    assert retry.user_attrs[lin_mod.USER_DECISION].startswith(f"retry of trial {root.number}")
    # Its reason in the dashboard is its own; the dead trial's copied attrs are emptied.
    assert retry.user_attrs[lin_mod.USER_THAW_REASON] == retry.user_attrs[lin_mod.USER_DECISION]
    assert retry.user_attrs.get(lin_mod.USER_NEW_REASON) is None
    lin = by_root(study)[root.number]
    assert [t.number for t in lin.trials] == [root.number, retry.number]
    assert lin.state == "finished" and lin.steps == list(range(STEPS)) and lin.crashes == 1
    for other in ("A", "B"):
        assert claims_on(study, names[other]) == [] and by_root(study)[names[other]].state == "frozen"


def test_a_retry_whose_lineage_was_resumed_elsewhere_starts_afresh(store) -> None:
    clock = FakeClock()
    study = make_study(None, store, clock)
    names = seed_study(study)
    crashed = start_and_die(study, checkpoints_to=1, reports_to=1)
    study.tell(crashed, state=TrialState.FAIL)
    study.optimize(objective, n_trials=1)  # a thaw resumes A before the retry runs
    failed = study._storage.get_trial(crashed._trial_id)
    optuna.storages.RetryHeartbeatStaleTrialCallback()(study, failed)
    study.optimize(objective, n_trials=1)
    retry = study.trials[-1]
    assert retry.system_attrs[lin_mod.DETACHED].startswith(f"retry of trial {crashed.number} starts afresh")
    assert crashed.number != retry.number and lin_mod.USER_THAW_REASON in failed.user_attrs  # copied by Optuna
    assert retry.user_attrs[lin_mod.USER_NEW_REASON] == retry.user_attrs[lin_mod.USER_DECISION]
    assert retry.user_attrs[lin_mod.USER_THAW_REASON] is None
    assert lin_mod.find_lineage(optuna_fms.lineages(study), retry.number).id == retry.number
    assert retry.intermediate_values.keys() == set(range(STEPS))
    assert len([t for t in by_root(study)[names["A"]].trials if t.state == TrialState.COMPLETE]) == 1


# --- checkpoints that cannot half-exist ------------------------------------------------------


def _damage(store: FileSystemArtifactStore, artifact_id: str, how: str) -> None:
    if how == "deleted":
        store.remove(artifact_id)
        return
    path = os.path.join(store._base_path, artifact_id)
    data = open(path, "rb").read()
    flipped = data[:-16] + bytes(b ^ 0xFF for b in data[-16:])
    with open(path, "wb") as f:
        f.write({"flipped": flipped, "truncated": data[: len(data) // 2], "empty": b""}[how])


@pytest.mark.parametrize("how", ["flipped", "truncated", "empty", "deleted"])
def test_a_bad_newest_checkpoint_falls_back_to_the_newest_good_one(store, how) -> None:
    study = make_study(None, store)
    seed_study(study)
    e = add_lineage(study, 0.95, 2, frozen=True)  # the one to thaw now; its step 1 goes bad
    bad = by_root(study)[e].checkpoints[-1]
    _damage(store, bad.artifact_id, how)
    study.optimize(objective, n_trials=1)  # must not raise
    resumed = study.trials[-1]
    assert resumed.system_attrs[lin_mod.PARENT] == e and resumed.state == TrialState.COMPLETE
    assert resumed.user_attrs[lin_mod.USER_START_STEP] == 1  # after the good step 0
    assert resumed.user_attrs[lin_mod.USER_RESUME] == f"trial {e}, step 0"
    assert resumed.user_attrs[lin_mod.USER_FALLBACK].startswith(f"the checkpoint at step 1 of trial {e} is unusable")
    marks = study._storage.get_study_system_attrs(study._study_id)
    assert f"{lin_mod.BAD_CHECKPOINT_PREFIX}{bad.artifact_id}" in marks
    lin = by_root(study)[e]
    assert bad.artifact_id not in {c.artifact_id for c in lin.checkpoints}
    assert lin.state == "finished" and lin.steps == list(range(STEPS))


def test_a_lineage_with_no_good_checkpoint_is_failed_and_the_trial_starts_a_new_configuration(store) -> None:
    study = make_study(None, store)
    names = seed_study(study)
    _damage(store, by_root(study)[names["A"]].checkpoints[0].artifact_id, "flipped")
    study.optimize(objective, n_trials=1)
    lin = by_root(study)[names["A"]]
    assert lin.state == "failed" and "no readable checkpoint" in lin.failure
    newest = study.trials[-1]
    assert newest.system_attrs.get(lin_mod.PARENT) is None or newest.system_attrs[lin_mod.PARENT] == names["B"]
    assert claims_on(study, names["A"]) == []


class Plain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


def _thaw_after_a_foreign_checkpoint(store) -> tuple[optuna.Study, int, optuna.Trial]:
    """Lineage A whose newest checkpoint (step 1) holds another architecture, and its next thaw."""
    study = make_study(None, store)
    names = seed_study(study)
    segment = study.ask()  # thaws A
    optuna_fms.save_checkpoint(segment, torch.nn.Linear(2, 1), 1)
    study._storage.set_trial_system_attr(segment._trial_id, lin_mod.FROZEN, "frozen by the test")
    study.tell(segment, state=TrialState.PRUNED)
    thaw = study.ask()
    assert study.trials[thaw.number].system_attrs[lin_mod.PARENT] == segment.number
    return study, names["A"], thaw


def test_a_checkpoint_of_another_architecture_falls_back_to_one_that_fits(store) -> None:
    study, _, thaw = _thaw_after_a_foreign_checkpoint(store)
    model = Plain()
    ckpt = optuna_fms.load_checkpoint(thaw, model)
    assert ckpt.step == 0 and torch.equal(model.w.detach(), weights(0)["w"])
    user = study.trials[thaw.number].user_attrs
    assert "step 1" in user[lin_mod.USER_FALLBACK] and user[lin_mod.USER_START_STEP] == 1


def test_when_no_checkpoint_fits_the_trial_ends_cleanly_and_the_lineage_fails(store) -> None:
    study, root, thaw = _thaw_after_a_foreign_checkpoint(store)
    with pytest.raises(optuna_fms.LineageLost):  # neither {"w"} nor Linear(2, 1) fits
        optuna_fms.load_checkpoint(thaw, torch.nn.Linear(3, 1))
    assert issubclass(optuna_fms.LineageLost, optuna.TrialPruned)  # so study.optimize goes on
    study.tell(thaw, state=TrialState.PRUNED)
    lin = by_root(study)[root]
    assert lin.state == "failed" and "can be resumed" in lin.failure


def test_study_optimize_survives_a_checkpoint_that_breaks_after_it_was_verified(store, monkeypatch) -> None:
    study = make_study(None, store)
    names = seed_study(study)
    from optuna_fms import checkpoints

    real = checkpoints.newest_good_checkpoint

    def verify_then_delete(study_, lineage, **kwargs):
        record = real(study_, lineage, **kwargs)
        if record is not None:
            store.remove(record.artifact_id)  # deleted by hand between the check and the load
        return record

    monkeypatch.setattr(checkpoints, "newest_good_checkpoint", verify_then_delete)
    study.optimize(objective, n_trials=1)
    thaw = study.trials[-1]
    assert thaw.state == TrialState.PRUNED and thaw.system_attrs[lin_mod.PARENT] == names["A"]
    assert "can be resumed" in thaw.system_attrs[lin_mod.FAILED]
    assert by_root(study)[names["A"]].state == "failed"


def test_best_lineage_is_one_whose_best_checkpoint_can_be_read(store) -> None:
    study = make_study(None, store)
    names = seed_study(study)
    assert optuna_fms.best_lineage(study).id == names["A"]
    for record in by_root(study)[names["A"]].checkpoints:
        store.remove(record.artifact_id)
    assert optuna_fms.best_lineage(study, artifact_store=store).id == names["B"]
    for lin in optuna_fms.lineages(study):
        for record in lin.checkpoints:
            if lin.id != names["A"]:
                store.remove(record.artifact_id)
    assert optuna_fms.best_lineage(study, artifact_store=store) is None


# --- search-space changes ----------------------------------------------------------------------


def test_a_parameter_added_mid_study_is_drawn_once_per_lineage(tmp_path, store) -> None:
    """Two workers with different search spaces share one study: the second adds ``wd``."""
    storage = f"sqlite:///{tmp_path / 'space.db'}"
    old_worker = make_study(storage, store, study_name="space")
    names = seed_study(old_worker)
    new_worker = make_study(storage, store, study_name="space")

    def with_wd(trial: optuna.Trial) -> float:
        trial.suggest_float("wd", 1e-5, 1e-1, log=True)
        return objective_one_segment(trial)

    def objective_one_segment(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        ckpt = optuna_fms.load_checkpoint(trial)
        step = 0 if ckpt is None else ckpt.step + 1
        optuna_fms.save_checkpoint(trial, weights(step), step)
        trial.report(value(x, step), step)
        if step < STEPS - 1:
            study_of_trial = trial.study
            study_of_trial._storage.set_trial_system_attr(trial._trial_id, lin_mod.FROZEN, "one step")
            raise optuna.TrialPruned()
        return value(x, step)

    new_worker.optimize(with_wd, n_trials=3)  # three segments of A, each one step
    lin = by_root(new_worker)[names["A"]]
    segments = lin.trials[1:]
    assert len(segments) == 3 and lin.steps == [0, 1, 2, 3]
    drawn = {t.params["wd"] for t in segments}
    assert len(drawn) == 1 and lin.params["wd"] == drawn.pop()
    assert lin.params["x"] == 0.9 and "wd" not in lin.trials[0].params
    old_worker.optimize(objective_one_segment, n_trials=1)  # the old worker continues it without wd
    assert by_root(old_worker)[names["A"]].steps == [0, 1, 2, 3, 4]


# --- a storage that is away for a moment -----------------------------------------------------


class FlakyStorage(optuna.storages.InMemoryStorage):
    """Refuses the next ``outage`` reads and writes of attrs and trials, as a dropped connection would."""

    def __init__(self) -> None:
        super().__init__()
        self.outage = 0

    def _maybe_fail(self) -> None:
        if self.outage > 0:
            self.outage -= 1
            raise ConnectionError("connection refused")

    def set_trial_system_attr(self, trial_id, key, value) -> None:
        self._maybe_fail()
        super().set_trial_system_attr(trial_id, key, value)

    def get_study_system_attrs(self, study_id):
        self._maybe_fail()
        return super().get_study_system_attrs(study_id)


def test_a_short_storage_outage_is_ridden_out_and_a_long_one_is_a_clear_error(store, monkeypatch) -> None:
    from optuna_fms import _retry

    slept: list[float] = []
    monkeypatch.setattr(_retry.time, "sleep", slept.append)
    storage = FlakyStorage()
    study = make_study(storage, store)
    names = seed_study(study)
    storage.outage = 3
    study.optimize(objective, n_trials=1)  # the thaw goes through once the storage answers
    assert slept == list(_retry.DELAYS[:3])
    assert by_root(study)[names["A"]].state == "finished"

    storage.outage = 1000
    slept.clear()
    with pytest.raises(optuna_fms.StorageUnavailable, match="no answer after 7 tries"):
        study.optimize(objective, n_trials=1)
    assert slept == list(_retry.DELAYS)


def test_a_lost_connection_to_the_artifact_store_never_marks_a_checkpoint_bad(store, monkeypatch) -> None:
    from optuna_fms import _retry

    monkeypatch.setattr(_retry.time, "sleep", lambda _: None)
    study = make_study(None, store)
    names = seed_study(study)
    record = by_root(study)[names["A"]].checkpoints[0]
    real_open = store.open_reader
    calls = []

    def unreachable(artifact_id):
        calls.append(artifact_id)
        raise ConnectionError("artifact server unreachable")

    monkeypatch.setattr(store, "open_reader", unreachable)
    with pytest.raises(optuna_fms.StorageUnavailable):
        optuna_fms.read_checkpoint(study, record, artifact_store=store)
    assert len(calls) == len(_retry.DELAYS) + 1
    monkeypatch.setattr(store, "open_reader", real_open)
    assert optuna_fms.checkpoints.verify_checkpoint(study, record, artifact_store=store) is None
    assert not any(k.startswith(lin_mod.BAD_CHECKPOINT_PREFIX) for k in lin_mod.study_attrs(study))
