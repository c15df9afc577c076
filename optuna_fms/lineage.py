"""Freeze-thaw bookkeeping on Optuna storage: how one configuration's run spans several trials.

A *lineage* is one configuration's run. Its first trial is the root; each thaw is a new trial
whose system attr ``fms:parent`` names the trial it continues (finished trials are immutable,
so the link lives on the child). This is the only module that knows that layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
import json
import math
import time
from typing import TYPE_CHECKING, Any

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from optuna_fms._retry import with_backoff

if TYPE_CHECKING:
    from optuna.study import Study

# NOTE: every key of this package lives here. System attrs hold the bookkeeping; user attrs
# mirror what a person wants to see in optuna-dashboard.
PARENT = "fms:parent"  # trial number this trial continues
CLAIM = "fms:claim"  # trial number this trial tried to continue (None once the claim is lost)
FROZEN = "fms:frozen"  # why FMSPruner froze this trial
FAILED = "fms:failed"  # why this lineage must never run again
CHECKPOINT_PREFIX = "fms:checkpoint:"  # + zero-padded step -> JSON record of the artifact
PRETRAINED_PREFIX = "fms:pretrained:"  # study attr: + param + ":" + JSON value -> JSON record
RETRIED_FROM = "failed_trial"  # Optuna's RetryHeartbeatStaleTrialCallback link (the first failed trial)
RETRY_HISTORY = "retry_history"  # Optuna's list of the failed trials a retry descends from
LEASE = "fms:lease"  # time.time() of the segment's last sign of life (claim, report)
RESUME = "fms:resume"  # JSON record of the checkpoint this segment resumes from
DETACHED = "fms:detached"  # why a retry was cut loose from the lineage it retried
BAD_CHECKPOINT_PREFIX = "fms:bad_checkpoint:"  # study attr: + artifact id -> why it is unusable
# NOTE: a study attr, not a trial attr: the trials that own old checkpoints are finished, and
# finished trials refuse every write.
DELETED_PREFIX = "fms:deleted:"  # study attr: + artifact id -> JSON note of a checkpoint retention removed
LINEAGE_FAILED_PREFIX = "fms:lineage_failed:"  # study attr: + root number -> why it never runs again
USER_RESUME = "fms:resume"
USER_FALLBACK = "fms:fallback"
USER_LINEAGE = "fms:lineage"
USER_PARENT = "fms:parent"
USER_START_STEP = "fms:start_step"
USER_DECISION = "fms:decision"
USER_ACQUISITION = "fms:acquisition"
# NOTE: why each decision was taken, one attr per writer, so neither overwrites the other
# (explain.py writes them; fms:decision stays as the newest of them, for older readers).
USER_THAW_REASON = "fms:thaw_reason"  # sampler, on a thawed trial: why this lineage got the next step
USER_NEW_REASON = "fms:new_reason"  # sampler, on a new configuration's first trial
USER_FREEZE_REASON = "fms:freeze_reason"  # pruner: why this segment was frozen
USER_FAILURE = "fms:failure"  # why this trial's lineage failed (NaN/inf, no readable checkpoint)
USER_START_PREDICTED = "fms:start_predicted"  # the sampler's forecast for this trial (JSON object)
USER_FREEZE_PREDICTED = "fms:freeze_predicted"  # the pruner's forecast when it froze this segment
FINISH = "fms:finish"  # system attr: this segment trains its lineage to the last step (finish_best)

RUNNING, FROZEN_STATE, FINISHED, FAILED_STATE, PRUNED = "running", "frozen", "finished", "failed", "pruned"


@dataclass(frozen=True)
class RecoverySettings:
    """How crashed segments come back.

    Args:
        lease_seconds: Without Optuna's heartbeat (any storage but ``RDBStorage(heartbeat_interval=...)``),
            a RUNNING segment that has shown no sign of life (its claim, a report) for this long
            counts as dead, and its lineage is freed. Make it longer than the slowest step.
        max_retries: Crashes (FAIL without a deterministic cause, or a dead RUNNING segment) a
            lineage survives; one more and it is failed for good.
        clock: The time source of leases (a fake one in tests).
    """

    lease_seconds: float = 3600.0
    max_retries: int = 3
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if self.lease_seconds <= 0 or self.max_retries < 0:
            raise ValueError("lease_seconds must be > 0 and max_retries >= 0.")


@dataclass(frozen=True)
class StudyView:
    """What lineage states depend on besides the trials: settings, time, heartbeat, study attrs."""

    recovery: RecoverySettings = field(default_factory=RecoverySettings)
    now: float = 0.0
    heartbeat: bool = False  # Optuna fails stale RUNNING trials itself
    bad_checkpoints: Mapping[str, str] = field(default_factory=dict)  # artifact id -> reason
    failed_lineages: Mapping[int, str] = field(default_factory=dict)  # root number -> reason
    deleted_checkpoints: Mapping[str, str] = field(default_factory=dict)  # artifact id -> why (retention)

    def is_alive(self, trial: FrozenTrial) -> bool:
        """A RUNNING segment that still works: heartbeat storage, or an unexpired lease."""
        if trial.state != TrialState.RUNNING:
            return False
        if self.heartbeat:
            return True  # NOTE: Optuna fails stale trials before each new one; trust it.
        lease = trial.system_attrs.get(LEASE)
        if not isinstance(lease, (int, float)):
            start = trial.datetime_start
            lease = start.timestamp() if start is not None else self.now
        return self.now - float(lease) <= self.recovery.lease_seconds

    def crashed(self, trial: FrozenTrial) -> bool:
        """Did this segment die (not fail by itself)? A FAIL, or a RUNNING one whose lease expired."""
        if trial.system_attrs.get(FAILED):
            return False
        if trial.state == TrialState.FAIL:
            return True
        return trial.state == TrialState.RUNNING and not self.is_alive(trial)


def study_view(study: Study, recovery: RecoverySettings | None = None) -> StudyView:
    """The view of ``study`` now, with the recovery settings of its FMSSampler (or the given ones)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if recovery is None:
        recovery = getattr(study.sampler, "recovery", None) or RecoverySettings()
    attrs = study_attrs(study)
    bad = {k[len(BAD_CHECKPOINT_PREFIX) :]: str(v) for k, v in attrs.items() if k.startswith(BAD_CHECKPOINT_PREFIX)}
    failed = {}
    for k, v in attrs.items():
        if k.startswith(LINEAGE_FAILED_PREFIX) and k[len(LINEAGE_FAILED_PREFIX) :].isdigit():
            failed[int(k[len(LINEAGE_FAILED_PREFIX) :])] = str(v)
    return StudyView(recovery, recovery.clock(), is_heartbeat_enabled(study._storage), bad, failed,
                     _deleted_in(attrs))


@dataclass(frozen=True)
class CheckpointRecord:
    """Where one checkpoint lives: the trial that uploaded it (None: the study) and its artifact.

    ``has_graph`` says that the file carries an architecture description, so its weights can be
    read as a parameter graph.
    """

    trial_number: int | None
    trial_id: int | None
    step: int
    artifact_id: str
    sha256: str
    size: int
    has_graph: bool = False

    def to_json(self, with_owner: bool = False) -> str:
        rec = {"artifact_id": self.artifact_id, "sha256": self.sha256, "size": self.size,
               "step": self.step, "graph": self.has_graph}
        if with_owner:  # NOTE: a copy kept elsewhere than on its owner says whose it is
            rec.update(trial_number=self.trial_number, trial_id=self.trial_id)
        return json.dumps(rec)

    @classmethod
    def from_json(cls, raw: str, trial_number: int | None, trial_id: int | None) -> CheckpointRecord:
        rec = json.loads(raw)
        return cls(
            rec.get("trial_number", trial_number), rec.get("trial_id", trial_id), int(rec["step"]),
            str(rec["artifact_id"]), str(rec["sha256"]), int(rec["size"]), bool(rec.get("graph", False)),
        )


@dataclass
class Lineage:
    """One configuration's run across all its trials (segments)."""

    id: int  # the root trial's number
    params: dict[str, Any]
    trials: list[FrozenTrial]
    state: str
    curve: dict[int, float]  # step -> reported value, segments stitched (later ones win)
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    failure: str | None = None
    crashes: int = 0  # segments that died (see RecoverySettings)
    lost_steps: int = 0  # steps reported after the last checkpoint by segments that died: compute, not data

    @property
    def tail(self) -> FrozenTrial:
        """The newest segment: the one a thaw continues."""
        return self.trials[-1]

    @property
    def steps(self) -> list[int]:
        return sorted(self.curve)

    @property
    def next_step(self) -> int:
        return max(self.curve) + 1 if self.curve else 0

    @property
    def n_thaws(self) -> int:
        return sum(PARENT in t.system_attrs and t.system_attrs[PARENT] is not None for t in self.trials)

    @property
    def value(self) -> float | None:
        """The final value: what the finished trial returned, else the newest report."""
        if self.state == FINISHED and self.tail.value is not None:
            return float(self.tail.value)
        return self.curve[max(self.curve)] if self.curve else None

    def best(self, direction: StudyDirection) -> tuple[int | None, float | None]:
        """(step, value) of the best finite report, or of the final value when nothing was reported."""
        finite = [(s, v) for s, v in self.curve.items() if math.isfinite(v)]
        if not finite:
            v = self.value
            return (None, v) if v is not None and math.isfinite(v) else (None, None)
        pick = max if direction == StudyDirection.MAXIMIZE else min
        return pick(finite, key=lambda sv: sv[1])

    def checkpoint_at_or_before(self, step: int | None) -> CheckpointRecord | None:
        eligible = [c for c in self.checkpoints if step is None or c.step <= step]
        return max(eligible, key=lambda c: (c.step, c.trial_number)) if eligible else None


def predecessor(trial: FrozenTrial) -> int | None:
    """The trial number this segment continues: a retry's failed trial, else its parent."""
    attrs = trial.system_attrs
    if attrs.get(DETACHED):
        return None
    history = attrs.get(RETRY_HISTORY)
    if isinstance(history, list) and history:
        return int(history[-1])
    for key in (RETRIED_FROM, PARENT):
        if attrs.get(key) is not None:
            return int(attrs[key])
    return None


def is_retry(trial: FrozenTrial) -> bool:
    """A trial Optuna re-created from a failed one (heartbeat callback), not yet cut loose."""
    return trial.system_attrs.get(RETRIED_FROM) is not None and not trial.system_attrs.get(DETACHED)


def build_lineages(
    trials: Sequence[FrozenTrial], view: StudyView | None = None, *, exclude: int | None = None
) -> list[Lineage]:
    """Group trials into lineages; WAITING trials (not yet started) are left out, except that a
    waiting retry keeps its lineage running. ``exclude``: a trial number to leave out (the
    trial being decided). The full rebuild; lineage_index.py keeps the same result up to date."""
    view = view or StudyView(now=time.time())
    groups, pending = group_segments(trials, predecessor, exclude=exclude)
    return [_make_lineage(root, ts, view, root in pending) for root, ts in groups]


def group_segments(
    trials: Sequence[FrozenTrial], predecessor_of: Callable[[FrozenTrial], int | None], *, exclude: int | None = None
) -> tuple[list[tuple[int, list[FrozenTrial]]], set[int]]:
    """(root, segments by number) per lineage, by root, and the roots a WAITING retry continues."""
    started = [t for t in trials if t.number != exclude]
    by_number = {t.number: t for t in started if t.state != TrialState.WAITING}
    waiting = [t for t in started if t.state == TrialState.WAITING and predecessor_of(t) is not None]

    def root_of(number: int) -> int:
        root, seen = number, set()
        while (prev := predecessor_of(by_number[root])) is not None and prev in by_number and root not in seen:
            seen.add(root)
            root = prev
        return root

    groups: dict[int, list[FrozenTrial]] = {}
    for t in by_number.values():
        groups.setdefault(root_of(t.number), []).append(t)
    pending = {root_of(p) for t in waiting if (p := predecessor_of(t)) in by_number}
    return [(root, sorted(ts, key=lambda t: t.number)) for root, ts in sorted(groups.items())], pending


def lineages(study: Study, view: StudyView | None = None) -> list[Lineage]:
    """Every configuration of ``study`` with its params, stitched curve, state, checkpoints, trials."""
    from optuna_fms.lineage_index import study_lineages  # NOTE: kept up to date, not rebuilt

    return study_lineages(study, view or study_view(study))


def all_trials(study: Study) -> list[FrozenTrial]:
    """Every trial of ``study``, read through a short storage outage."""
    return with_backoff("read the trials", lambda: study.get_trials(deepcopy=False))


def study_attrs(study: Study) -> dict[str, Any]:
    return with_backoff("read the study attrs", lambda: study._storage.get_study_system_attrs(study._study_id))


def write_trial_attr(study: Study, trial_id: int, key: str, value: Any, *, user: bool = False) -> None:
    """One trial attr, written through a short storage outage (a write of a whole value repeats safely)."""
    storage = study._storage
    write = storage.set_trial_user_attr if user else storage.set_trial_system_attr
    with_backoff(f"write {key}", lambda: write(trial_id, key, value))


def _write_study_attr(study: Study, key: str, value: Any) -> None:
    with_backoff(f"write {key}", lambda: study._storage.set_study_system_attr(study._study_id, key, value))


def best_lineage(study: Study, *, artifact_store: Any = None) -> Lineage | None:
    """The lineage with the best reported (or returned) value, in the study's direction, whose
    checkpoint at (or before) its best step can be read.

    Lineages whose checkpoints are all missing or corrupt are passed over (and their bad
    checkpoints recorded); None when no lineage has a readable one (a warning says so). In a
    study that never saved a checkpoint, the best value alone decides.
    """
    from optuna_fms.checkpoints import verify_checkpoint

    all_lineages = lineages(study)
    scored = [(lin.best(study.direction), lin) for lin in all_lineages]
    scored = [(sv, lin) for sv, lin in scored if sv[1] is not None]
    sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
    scored.sort(key=lambda svl: sign * svl[0][1])  # best first; stable, so ties keep lineage order
    if not any(lin.checkpoints for lin in all_lineages) and not any(
        k.startswith(BAD_CHECKPOINT_PREFIX) for k in study_attrs(study)
    ):
        return scored[0][1] if scored else None
    for (step, _), lin in scored:
        for record in sorted(
            (c for c in lin.checkpoints if step is None or c.step <= step), key=lambda c: -c.step
        ):
            if verify_checkpoint(study, record, artifact_store=artifact_store) is None:
                return lin
    from optuna_fms._warnings import warn_once

    warn_once(f"no-readable-best:{study._study_id}", "best_lineage: no lineage has a readable checkpoint.")
    return None


def lineage_of(study: Study, trial_number: int, view: StudyView | None = None) -> Lineage | None:
    return find_lineage(lineages(study, view), trial_number)


def find_lineage(lineages: Sequence[Lineage], trial_number: int) -> Lineage | None:
    """The lineage one of whose segments is trial ``trial_number``."""
    return next((lin for lin in lineages if any(t.number == trial_number for t in lin.trials)), None)


def claim(study: Study, trial: FrozenTrial, parent_number: int, view: StudyView | None = None) -> bool:
    """Try to make ``trial`` the one continuation of trial ``parent_number``.

    NOTE: storage offers no compare-and-swap, so each claimant writes its claim, then reads all
    claims, and wins only if it sees no other. Two racing claimants each see at least the
    other's write or are seen by it, so at most one wins (both may lose; they then start a new
    configuration). A lost claim is withdrawn. A rival that died between its claim and its
    thaw (no parent link, and no longer alive) blocks nobody.
    """
    view = view or study_view(study)
    write_trial_attr(study, trial._trial_id, CLAIM, parent_number)
    rivals = [
        t
        for t in all_trials(study)
        if t.number != trial.number
        and t.system_attrs.get(CLAIM) == parent_number
        and (t.system_attrs.get(PARENT) is not None or view.is_alive(t))
    ]
    if rivals:
        write_trial_attr(study, trial._trial_id, CLAIM, None)
        return False
    return True


def set_system_attr(study: Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Write through storage and into ``trial`` (the very object a new Trial keeps)."""
    write_trial_attr(study, trial._trial_id, key, value)
    trial.system_attrs[key] = value


def set_user_attr(study: Study, trial: FrozenTrial, key: str, value: Any) -> None:
    write_trial_attr(study, trial._trial_id, key, value, user=True)
    trial.user_attrs[key] = value


def lineage_label(trial: Any) -> int:
    """The lineage a running trial continues, as FMSSampler labelled it (else the trial's own number)."""
    label = trial.user_attrs.get(USER_LINEAGE)
    return int(label) if isinstance(label, int) else int(trial.number)


def mark_thaw(
    study: Study, trial: FrozenTrial, lineage: Lineage, reason: str, resume: CheckpointRecord | None = None
) -> None:
    """Make the new ``trial`` continue ``lineage``: same params, parent link, continued steps.

    With ``resume`` (the verified checkpoint it starts from), the parent is the segment that
    wrote it and the start step follows it; a healthy thaw resumes the tail's newest checkpoint,
    so both are the tail's.
    """
    parent = lineage.tail.number if resume is None or resume.trial_number is None else resume.trial_number
    start = lineage.next_step if resume is None else resume.step + 1
    if not is_retry(trial):
        set_system_attr(study, trial, "fixed_params", dict(lineage.params))
    set_system_attr(study, trial, PARENT, parent)
    if resume is not None:
        set_system_attr(study, trial, RESUME, resume.to_json(with_owner=True))
        set_user_attr(study, trial, USER_RESUME, f"trial {resume.trial_number}, step {resume.step}")
        newest = lineage.checkpoint_at_or_before(None)
        if newest is not None and newest.artifact_id != resume.artifact_id:
            set_user_attr(study, trial, USER_FALLBACK, f"the checkpoint at step {newest.step} of trial "
                          f"{newest.trial_number} is unusable; resumed from step {resume.step}")
    set_user_attr(study, trial, USER_LINEAGE, lineage.id)
    set_user_attr(study, trial, USER_PARENT, parent)
    set_user_attr(study, trial, USER_START_STEP, start)
    set_user_attr(study, trial, USER_DECISION, reason)


def detach(study: Study, trial: FrozenTrial, reason: str) -> None:
    """Cut a retry loose from the lineage it retried: it runs as a new lineage of its own."""
    set_system_attr(study, trial, DETACHED, reason)
    set_system_attr(study, trial, PARENT, None)
    set_system_attr(study, trial, RESUME, None)
    for key in [k for k in trial.system_attrs if k.startswith(CHECKPOINT_PREFIX)]:
        set_system_attr(study, trial, key, None)  # NOTE: copied from the failed trial, not its own
    set_user_attr(study, trial, USER_LINEAGE, trial.number)
    set_user_attr(study, trial, USER_PARENT, None)
    set_user_attr(study, trial, USER_START_STEP, 0)
    set_user_attr(study, trial, USER_DECISION, reason)


def renew_lease(study: Study, trial: FrozenTrial, view: StudyView | None = None) -> None:
    """A sign of life of a RUNNING segment (not needed where Optuna's heartbeat runs)."""
    if view is not None and view.heartbeat:
        return
    clock = view.recovery.clock if view is not None else time.time
    set_system_attr(study, trial, LEASE, float(clock()))


def resume_record(trial: FrozenTrial) -> CheckpointRecord | None:
    """The checkpoint the sampler verified for this segment to resume from, if any."""
    raw = trial.system_attrs.get(RESUME)
    if not isinstance(raw, str):
        return None
    try:
        return CheckpointRecord.from_json(raw, None, None)
    except (ValueError, KeyError, TypeError):
        return None


def mark_bad_checkpoint(study: Study, record: CheckpointRecord, reason: str) -> None:
    """Every worker skips this checkpoint from now on (study attrs stay writable)."""
    _write_study_attr(study, f"{BAD_CHECKPOINT_PREFIX}{record.artifact_id}", reason)


def mark_lineage_failed(study: Study, lineage: Lineage, reason: str) -> None:
    """The lineage never runs again, though its tail is finished (immutable)."""
    _write_study_attr(study, f"{LINEAGE_FAILED_PREFIX}{lineage.id}", reason)


def record_checkpoint(study: Study, trial_id: int, record: CheckpointRecord) -> None:
    write_trial_attr(study, trial_id, f"{CHECKPOINT_PREFIX}{record.step:09d}", record.to_json())


def record_pretrained(study: Study, param: str, value: Any, record: CheckpointRecord) -> None:
    """Register the checkpoint a configuration with ``param == value`` starts from."""
    _write_study_attr(study, f"{PRETRAINED_PREFIX}{param}:{json.dumps(value)}", record.to_json())


def pretrained_records(study: Study) -> dict[tuple[str, Any], CheckpointRecord]:
    """(param, value) -> the registered starting checkpoint, for every registration of the study."""
    out = {}
    # NOTE: in key order, whatever order the storage returns: the surrogate's graph table follows it
    for key, raw in sorted(study_attrs(study).items()):
        if key.startswith(PRETRAINED_PREFIX) and isinstance(raw, str):
            param, _, value = key[len(PRETRAINED_PREFIX) :].partition(":")
            try:
                out[(param, json.loads(value))] = CheckpointRecord.from_json(raw, None, None)
            except (ValueError, KeyError, TypeError):
                continue
    return out


def record_deletion(study: Study, record: CheckpointRecord, reason: str) -> None:
    """Note that the artifact of ``record`` was removed from the store, and why."""
    note = {"trial": record.trial_number, "step": record.step, "size": record.size, "reason": reason}
    _write_study_attr(study, f"{DELETED_PREFIX}{record.artifact_id}", json.dumps(note))


def deleted_checkpoints(study: Study) -> dict[str, str]:
    """artifact id -> why it was deleted, for every checkpoint retention removed from ``study``."""
    return _deleted_in(study_attrs(study))


def _deleted_in(attrs: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, raw in attrs.items():
        if key.startswith(DELETED_PREFIX):
            try:
                out[key[len(DELETED_PREFIX) :]] = str(json.loads(raw)["reason"])
            except (ValueError, KeyError, TypeError):
                out[key[len(DELETED_PREFIX) :]] = "deleted"
    return out


def _checkpoints_of(trial: FrozenTrial) -> list[CheckpointRecord]:
    out = []
    for key, raw in trial.system_attrs.items():
        if not key.startswith(CHECKPOINT_PREFIX) or not isinstance(raw, str):
            continue
        try:
            out.append(CheckpointRecord.from_json(raw, trial.number, trial._trial_id))
        except (ValueError, KeyError, TypeError):
            continue  # NOTE: a damaged record is ignored; the checkpoint then counts as missing.
    return out


def _make_lineage(
    root: int,
    trials: list[FrozenTrial],
    view: StudyView,
    retry_pending: bool = False,
    checkpoints_of: Callable[[FrozenTrial], list[CheckpointRecord]] | None = None,
) -> Lineage:
    # NOTE: a retry copies its failed trial's system attrs, checkpoint records included, so
    # records are de-duplicated by artifact; checkpoints found bad or deleted are left out.
    checkpoints_of = checkpoints_of or _checkpoints_of
    seen: dict[str, CheckpointRecord] = {}
    curve: dict[int, float] = {}
    crashes = lost = 0
    params: dict[str, Any] = {}
    for t in trials:
        for rec in checkpoints_of(t):
            if rec.artifact_id not in view.bad_checkpoints and rec.artifact_id not in view.deleted_checkpoints:
                seen.setdefault(rec.artifact_id, rec)
        # NOTE: a parameter a later segment added (the search space grew) is drawn once and
        # then kept: the first segment that has it fixes it for the rest of the lineage.
        for name, value in t.params.items():
            params.setdefault(name, value)
        values = {int(s): float(v) for s, v in t.intermediate_values.items()}
        if view.crashed(t):
            crashes += 1
            # NOTE: steps a dead segment reported after the lineage's last checkpoint are redone
            # by whoever resumes it: lost compute, not data.
            saved = max((c.step for c in seen.values()), default=-1)
            kept = {s: v for s, v in values.items() if s <= saved}
            lost += len(values) - len(kept)
            values = kept
        curve.update(values)
    tail = trials[-1]
    if not curve and tail.state == TrialState.COMPLETE and tail.value is not None:
        # NOTE: an objective that never reports still gives one observation: its result.
        curve[0] = float(tail.value)
    checkpoints = sorted(seen.values(), key=lambda c: c.step)
    failure = next((t.system_attrs[FAILED] for t in trials if t.system_attrs.get(FAILED)), None)
    failure = failure or view.failed_lineages.get(root)
    if failure is None and any(not math.isfinite(v) for v in curve.values()):
        failure = "a non-finite value was reported"
    if failure is None and view.crashed(tail) and not retry_pending:
        if not checkpoints:
            failure = "the trial failed" if tail.state == TrialState.FAIL else "the trial died"
            failure += " and left no checkpoint"
        elif crashes > view.recovery.max_retries:
            failure = f"it crashed {crashes} times (RecoverySettings.max_retries={view.recovery.max_retries})"
    if failure is not None:
        state = FAILED_STATE
    elif retry_pending or tail.state == TrialState.WAITING or view.is_alive(tail):
        state = RUNNING
    elif view.crashed(tail):
        state = FROZEN_STATE  # NOTE: a crash with a checkpoint left is resumable, like a freeze
    elif tail.state == TrialState.COMPLETE:
        state = FINISHED
    elif tail.system_attrs.get(FROZEN):
        state = FROZEN_STATE
    else:
        state = PRUNED
    if not params:
        params = dict(tail.params)
    return Lineage(root, params, trials, state, curve, checkpoints, failure, crashes, lost)
