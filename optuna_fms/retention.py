"""Checkpoint retention: delete the checkpoints a study no longer needs, never the ones it does.

What is always kept (the *protected* checkpoints):

- for every lineage that may still run (running or frozen; a crashed segment that left a
  checkpoint counts as frozen until its retry limit), its newest checkpoint whose bytes match the
  recorded SHA-256: the one a thaw or a retry resumes from;
- for the ``keep_best`` best lineages (in the study's direction), the checkpoint of the best
  step and the newest one;
- every registered pretrained model (study artifacts are never touched), and every artifact
  that is not a checkpoint record of this package.

Besides those, each lineage keeps its ``keep_last`` newest checkpoints. If ``max_bytes`` is
given and the kept checkpoints are larger, the unprotected ones go too: worst lineages first,
oldest steps first. The protected ones stay even above ``max_bytes`` (the report says so).

What the surrogate then reads: each step's row reads the newest checkpoint its lineage saved
before that step. After a deletion the row reads the newest *kept* checkpoint before it, else
the configuration's pretrained weights, else the learned "no weights" vector; every worker sees
the same, since deletions are noted in the study (``lineage.DELETED_PREFIX``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
import logging
import math
import threading
from typing import TYPE_CHECKING

from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.study import StudyDirection

from optuna_fms import lineage as lin_mod
from optuna_fms.checkpoint_store import resolve_artifact_store
from optuna_fms.checkpoints import verify_checkpoint
from optuna_fms.lineage import CheckpointRecord, Lineage

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore
    from optuna.study import Study
    from optuna.trial import FrozenTrial

_logger = logging.getLogger(__name__)

REASON = "retention"  # the reason noted with each deletion


@dataclass(frozen=True)
class RetentionReport:
    """What one pass freed and kept (``dry_run``: what it would free)."""

    deleted: tuple[CheckpointRecord, ...]
    kept: tuple[CheckpointRecord, ...]
    protected: int  # how many of ``kept`` no setting may delete
    failed: tuple[tuple[CheckpointRecord, str], ...] = ()  # removals the store refused (kept, retried next pass)
    dry_run: bool = False
    over_budget: bool = False  # the protected checkpoints alone exceed max_bytes

    @property
    def files(self) -> int:
        return len(self.deleted)

    @property
    def bytes(self) -> int:
        return sum(r.size for r in self.deleted)

    @property
    def kept_bytes(self) -> int:
        return sum(r.size for r in self.kept)

    def __str__(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        text = (f"retention {verb} {self.files} checkpoints ({_size(self.bytes)}); kept {len(self.kept)} "
                f"({_size(self.kept_bytes)}, {self.protected} protected)")
        if self.failed:
            text += f"; {len(self.failed)} could not be removed"
        if self.over_budget:
            text += "; the protected checkpoints alone exceed max_bytes"
        return text


@dataclass
class RetentionPlan:
    """What :func:`plan_retention` decided: artifacts to delete, to keep, and the protected ones' ids."""

    delete: list[CheckpointRecord] = field(default_factory=list)
    keep: list[CheckpointRecord] = field(default_factory=list)
    protected: set[str] = field(default_factory=set)
    over_budget: bool = False


def collect_garbage(
    study: Study,
    *,
    keep_last: int | None = None,
    max_bytes: int | None = None,
    keep_best: int = 1,
    artifact_store: ArtifactStore | None = None,
    dry_run: bool = False,
    verify: bool = True,
) -> RetentionReport:
    """Delete the checkpoints of ``study`` that no lineage needs (see the module docstring).

    ``keep_last``: checkpoints each lineage keeps, newest first (None: no such limit).
    ``max_bytes``: the most bytes the kept checkpoints may take (None: no limit); at least one
    of the two is needed. ``keep_best``: how many of the best lineages keep their best-step and
    newest checkpoints. ``verify``: check the newest checkpoint of each lineage that may resume
    against its SHA-256, so a corrupt one does not count as its resume point. Each deletion uses
    the store's ``remove`` and is noted in the study, so :func:`optuna_fms.lineages`,
    :func:`optuna_fms.load_checkpoint` and the surrogate no longer read it.
    """
    return _collect(study, keep_last, max_bytes, keep_best, artifact_store, dry_run, verify, set())


def _collect(
    study: Study,
    keep_last: int | None,
    max_bytes: int | None,
    keep_best: int,
    artifact_store: ArtifactStore | None,
    dry_run: bool,
    verify: bool,
    verified: set[str],
) -> RetentionReport:
    _check_settings(keep_last, max_bytes, keep_best)
    store = resolve_artifact_store(study, artifact_store)

    def intact(record: CheckpointRecord) -> bool:
        if not verify or record.artifact_id in verified:
            return True
        ok = verify_checkpoint(study, record, artifact_store=store) is None
        if ok:
            verified.add(record.artifact_id)
        return ok

    plan = plan_retention(lin_mod.lineages(study), study.direction, keep_last=keep_last, max_bytes=max_bytes,
                          keep_best=keep_best, intact=intact)
    deleted, failed = [], []
    for record in plan.delete:
        if dry_run:
            deleted.append(record)
            continue
        try:
            store.remove(record.artifact_id)
        except ArtifactNotFound:
            pass  # NOTE: gone already (an earlier pass that stopped before noting it, or by hand)
        except Exception as err:  # noqa: BLE001 - a store's own errors vary; the file stays and is retried
            failed.append((record, f"{type(err).__name__}: {err}"))
            continue
        # NOTE: noted after the removal: a pass that dies in between leaves a file that is missing
        # but not noted, which readers already survive, and the next pass notes it.
        lin_mod.record_deletion(study, record, REASON)
        deleted.append(record)
    kept = plan.keep + [r for r, _ in failed]
    report = RetentionReport(tuple(deleted), tuple(kept), len(plan.protected), tuple(failed), dry_run,
                             plan.over_budget)
    _logger.info("%s", report)
    for record, err in failed:
        _logger.warning("retention could not remove artifact %s of trial %s: %s", record.artifact_id,
                        record.trial_number, err)
    return report


class RetentionCallback:
    """``study.optimize(..., callbacks=[RetentionCallback(keep_last=2)])``: collect garbage after
    every ``every``-th finished trial, with the settings of :func:`collect_garbage`.

    The newest pass is kept in ``last_report``. With ``n_jobs > 1`` a pass that finds another one
    under way in this process is skipped (the next trial runs it).
    """

    def __init__(
        self,
        *,
        keep_last: int | None = None,
        max_bytes: int | None = None,
        keep_best: int = 1,
        artifact_store: ArtifactStore | None = None,
        every: int = 1,
        verify: bool = True,
    ) -> None:
        _check_settings(keep_last, max_bytes, keep_best)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}.")
        self.keep_last, self.max_bytes, self.keep_best = keep_last, max_bytes, keep_best
        self.artifact_store, self.every, self.verify = artifact_store, every, verify
        self.last_report: RetentionReport | None = None
        self._calls = 0
        self._lock = threading.Lock()
        self._verified: set[str] = set()  # NOTE: artifacts are written once; each is hashed once

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        self._calls += 1
        if self._calls % self.every or not self._lock.acquire(blocking=False):
            return
        try:
            self.last_report = _collect(study, self.keep_last, self.max_bytes, self.keep_best, self.artifact_store,
                                        False, self.verify, self._verified)
        finally:
            self._lock.release()


def plan_retention(
    lineages: Sequence[Lineage],
    direction: StudyDirection,
    *,
    keep_last: int | None,
    max_bytes: int | None,
    keep_best: int = 1,
    intact: Callable[[CheckpointRecord], bool] = lambda record: True,
) -> RetentionPlan:
    """Which checkpoints to delete and which to keep; reads no files except through ``intact``."""
    plan = RetentionPlan()
    plan.protected = _protected(lineages, direction, keep_best, intact)
    candidates: list[tuple[Lineage, CheckpointRecord]] = []
    for lin in lineages:
        newest_first = sorted(lin.checkpoints, key=lambda c: (c.step, c.trial_number or -1), reverse=True)
        for i, record in enumerate(newest_first):
            if record.artifact_id in plan.protected:
                plan.keep.append(record)
            elif keep_last is None or i < keep_last:
                candidates.append((lin, record))
            else:
                plan.delete.append(record)
    if max_bytes is not None:
        total = sum(r.size for r in plan.keep) + sum(r.size for _, r in candidates)
        rank = _badness(lineages, direction)
        for lin, record in sorted(candidates, key=lambda lr: (rank[lr[0].id], lr[1].step)):
            if total <= max_bytes:
                plan.keep.append(record)
            else:
                plan.delete.append(record)
                total -= record.size
        plan.over_budget = total > max_bytes
    else:
        plan.keep += [r for _, r in candidates]
    return plan


def _protected(
    lineages: Iterable[Lineage], direction: StudyDirection, keep_best: int, intact: Callable[[CheckpointRecord], bool]
) -> set[str]:
    out: set[str] = set()
    for lin in lineages:
        if _may_resume(lin):
            newest_first = sorted(lin.checkpoints, key=lambda c: (c.step, c.trial_number or -1), reverse=True)
            good = next((c for c in newest_first if intact(c)), None)
            if good is not None:
                out.add(good.artifact_id)
    ranked = sorted((lin for lin in lineages if lin.best(direction)[1] is not None),
                    key=lambda lin: _oriented(lin.best(direction)[1], direction), reverse=True)
    for lin in ranked[:keep_best]:
        best_step, _ = lin.best(direction)
        for record in (lin.checkpoint_at_or_before(best_step) if best_step is not None else None,
                       lin.checkpoint_at_or_before(None)):
            if record is not None:
                out.add(record.artifact_id)
    return out


def _may_resume(lin: Lineage) -> bool:
    """Running and frozen lineages resume (a crash with a checkpoint left is frozen again); failed
    ones (NaN/inf, a retry limit reached) never run again."""
    return lin.state in (lin_mod.RUNNING, lin_mod.FROZEN_STATE)


def _badness(lineages: Iterable[Lineage], direction: StudyDirection) -> dict[int, int]:
    """lineage id -> rank, 0 for the worst (lineages without a value are worst of all)."""
    def score(lin: Lineage) -> float:
        value = lin.best(direction)[1]
        return -math.inf if value is None else _oriented(value, direction)

    return {lin.id: i for i, lin in enumerate(sorted(lineages, key=lambda lin: (score(lin), lin.id)))}


def _oriented(value: float, direction: StudyDirection) -> float:
    return value if direction == StudyDirection.MAXIMIZE else -value


def _check_settings(keep_last: int | None, max_bytes: int | None, keep_best: int) -> None:
    if keep_last is None and max_bytes is None:
        raise ValueError("collect_garbage needs keep_last or max_bytes (or both); with neither it would keep all.")
    for name, value in (("keep_last", keep_last), ("max_bytes", max_bytes), ("keep_best", keep_best)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int, got {value!r}.")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
