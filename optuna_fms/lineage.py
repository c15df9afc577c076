"""Freeze-thaw bookkeeping on Optuna storage: how one configuration's run spans several trials.

A *lineage* is one configuration's run. Its first trial is the root; each thaw is a new trial
whose system attr ``fms:parent`` names the trial it continues (finished trials are immutable,
so the link lives on the child). This is the only module that knows that layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
import json
import math
from typing import TYPE_CHECKING, Any

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

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
RETRIED_FROM = "failed_trial"  # Optuna's RetryHeartbeatStaleTrialCallback link
USER_LINEAGE = "fms:lineage"
USER_PARENT = "fms:parent"
USER_START_STEP = "fms:start_step"
USER_DECISION = "fms:decision"
USER_ACQUISITION = "fms:acquisition"

RUNNING, FROZEN_STATE, FINISHED, FAILED_STATE, PRUNED = "running", "frozen", "finished", "failed", "pruned"


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

    def to_json(self) -> str:
        return json.dumps(
            {"artifact_id": self.artifact_id, "sha256": self.sha256, "size": self.size,
             "step": self.step, "graph": self.has_graph}
        )

    @classmethod
    def from_json(cls, raw: str, trial_number: int | None, trial_id: int | None) -> CheckpointRecord:
        rec = json.loads(raw)
        return cls(
            trial_number, trial_id, int(rec["step"]), str(rec["artifact_id"]), str(rec["sha256"]),
            int(rec["size"]), bool(rec.get("graph", False)),
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
    for key in (RETRIED_FROM, PARENT):
        if attrs.get(key) is not None:
            return int(attrs[key])
    return None


def build_lineages(trials: Sequence[FrozenTrial]) -> list[Lineage]:
    """Group trials into lineages; WAITING trials (not yet started) are left out."""
    by_number = {t.number: t for t in trials if t.state != TrialState.WAITING}
    groups: dict[int, list[FrozenTrial]] = {}
    for t in by_number.values():
        root, seen = t.number, set()
        while (prev := predecessor(by_number[root])) is not None and prev in by_number and root not in seen:
            seen.add(root)
            root = prev
        groups.setdefault(root, []).append(t)
    return [_make_lineage(root, sorted(ts, key=lambda t: t.number)) for root, ts in sorted(groups.items())]


def lineages(study: Study) -> list[Lineage]:
    """Every configuration of ``study`` with its params, stitched curve, state, checkpoints, trials."""
    return build_lineages(study.get_trials(deepcopy=False))


def best_lineage(study: Study) -> Lineage | None:
    """The lineage with the best reported (or returned) value, in the study's direction."""
    scored = [(lin.best(study.direction)[1], lin) for lin in lineages(study)]
    scored = [(v, lin) for v, lin in scored if v is not None]
    if not scored:
        return None
    pick = max if study.direction == StudyDirection.MAXIMIZE else min
    return pick(scored, key=lambda vl: vl[0])[1]


def lineage_of(study: Study, trial_number: int) -> Lineage | None:
    return find_lineage(lineages(study), trial_number)


def find_lineage(lineages: Sequence[Lineage], trial_number: int) -> Lineage | None:
    """The lineage one of whose segments is trial ``trial_number``."""
    return next((lin for lin in lineages if any(t.number == trial_number for t in lin.trials)), None)


def claim(study: Study, trial: FrozenTrial, parent_number: int) -> bool:
    """Try to make ``trial`` the one continuation of trial ``parent_number``.

    NOTE: storage offers no compare-and-swap, so each claimant writes its claim, then reads all
    claims, and wins only if it sees no other. Two racing claimants each see at least the
    other's write or are seen by it, so at most one wins (both may lose; they then start a new
    configuration). A lost claim is withdrawn.
    """
    storage = study._storage
    storage.set_trial_system_attr(trial._trial_id, CLAIM, parent_number)
    rivals = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number != trial.number and t.system_attrs.get(CLAIM) == parent_number
    ]
    if rivals:
        storage.set_trial_system_attr(trial._trial_id, CLAIM, None)
        return False
    return True


def set_system_attr(study: Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """Write through storage and into ``trial`` (the very object a new Trial keeps)."""
    study._storage.set_trial_system_attr(trial._trial_id, key, value)
    trial.system_attrs[key] = value


def set_user_attr(study: Study, trial: FrozenTrial, key: str, value: Any) -> None:
    study._storage.set_trial_user_attr(trial._trial_id, key, value)
    trial.user_attrs[key] = value


def lineage_label(trial: Any) -> int:
    """The lineage a running trial continues, as FMSSampler labelled it (else the trial's own number)."""
    label = trial.user_attrs.get(USER_LINEAGE)
    return int(label) if isinstance(label, int) else int(trial.number)


def mark_thaw(study: Study, trial: FrozenTrial, lineage: Lineage, reason: str) -> None:
    """Make the new ``trial`` continue ``lineage``: same params, parent link, continued steps."""
    set_system_attr(study, trial, "fixed_params", dict(lineage.params))
    set_system_attr(study, trial, PARENT, lineage.tail.number)
    set_user_attr(study, trial, USER_LINEAGE, lineage.id)
    set_user_attr(study, trial, USER_PARENT, lineage.tail.number)
    set_user_attr(study, trial, USER_START_STEP, lineage.next_step)
    set_user_attr(study, trial, USER_DECISION, reason)


def record_checkpoint(study: Study, trial_id: int, record: CheckpointRecord) -> None:
    study._storage.set_trial_system_attr(trial_id, f"{CHECKPOINT_PREFIX}{record.step:09d}", record.to_json())


def record_pretrained(study: Study, param: str, value: Any, record: CheckpointRecord) -> None:
    """Register the checkpoint a configuration with ``param == value`` starts from."""
    study._storage.set_study_system_attr(
        study._study_id, f"{PRETRAINED_PREFIX}{param}:{json.dumps(value)}", record.to_json()
    )


def pretrained_records(study: Study) -> dict[tuple[str, Any], CheckpointRecord]:
    """(param, value) -> the registered starting checkpoint, for every registration of the study."""
    out = {}
    # NOTE: in key order, whatever order the storage returns: the surrogate's graph table follows it
    for key, raw in sorted(study._storage.get_study_system_attrs(study._study_id).items()):
        if key.startswith(PRETRAINED_PREFIX) and isinstance(raw, str):
            param, _, value = key[len(PRETRAINED_PREFIX) :].partition(":")
            try:
                out[(param, json.loads(value))] = CheckpointRecord.from_json(raw, None, None)
            except (ValueError, KeyError, TypeError):
                continue
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


def _make_lineage(root: int, trials: list[FrozenTrial]) -> Lineage:
    curve: dict[int, float] = {}
    for t in trials:
        curve.update({int(s): float(v) for s, v in t.intermediate_values.items()})
    tail = trials[-1]
    if not curve and tail.state == TrialState.COMPLETE and tail.value is not None:
        # NOTE: an objective that never reports still gives one observation: its result.
        curve[0] = float(tail.value)
    failure = next((t.system_attrs[FAILED] for t in trials if t.system_attrs.get(FAILED)), None)
    if failure is None and any(not math.isfinite(v) for v in curve.values()):
        failure = "a non-finite value was reported"
    if failure is not None:
        state = FAILED_STATE
    elif tail.state in (TrialState.RUNNING, TrialState.WAITING):
        state = RUNNING
    elif tail.state == TrialState.COMPLETE:
        state = FINISHED
    elif tail.state == TrialState.FAIL:
        state = FAILED_STATE
        failure = "the trial failed"
    elif tail.system_attrs.get(FROZEN):
        state = FROZEN_STATE
    else:
        state = PRUNED
    # NOTE: a retry copies its failed trial's system attrs, checkpoint records included, so
    # records are de-duplicated by artifact.
    seen: dict[str, CheckpointRecord] = {}
    for t in trials:
        for rec in _checkpoints_of(t):
            seen.setdefault(rec.artifact_id, rec)
    params = dict(trials[0].params) or dict(tail.params)
    return Lineage(root, params, trials, state, curve, sorted(seen.values(), key=lambda c: c.step), failure)
