"""One per-study index of lineages that FMSSampler, FMSPruner and load_checkpoint share.

A decision needs every lineage of the study. Rebuilding them from every trial costs time in
proportion to the trials (0.34 s at 12k trials); most of them are finished, and finished trials
never change (Optuna refuses writes to them). So the index derives each finished trial once
(its predecessor, its checkpoint records) and keeps each lineage whose segments are all finished,
rebuilding only lineages that have a segment still running, a new segment, or a study-level mark
(bad checkpoint, deletion, failure) that touches them. The result is exactly
:func:`optuna_fms.lineage.build_lineages` of the same trials and view.

NOTE: the trials themselves are read with ``get_all_trials(deepcopy=False)``: on RDBStorage,
Optuna's ``_CachedStorage`` already re-reads only trials that are new or unfinished, and the
in-memory and journal storages hand out their own objects. Reading happens outside the
index's lock, so a slow storage blocks no other thread's derivation.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
import threading
from typing import TYPE_CHECKING
import weakref

from optuna.trial import FrozenTrial, TrialState

from optuna_fms import lineage as lin_mod

if TYPE_CHECKING:
    from optuna.study import Study

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class _Derived:
    """What a finished trial contributes, computed once."""

    predecessor: int | None
    checkpoints: list[lin_mod.CheckpointRecord]
    artifact_ids: frozenset[str]


class LineageIndex:
    """The lineages of one study, brought up to date from what changed since the last call.

    Lineages handed out are shared between callers: read them, never change them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._derived: dict[int, _Derived] = {}  # finished trial number -> its derivation
        self._kept: dict[int, tuple[Hashable, lin_mod.Lineage]] = {}  # root -> (signature, lineage)
        self.rebuilt = 0  # lineages built in the last update (the rest were kept): for tests and bench

    def lineages(self, study: Study, view: lin_mod.StudyView, *, exclude: int | None = None) -> list[lin_mod.Lineage]:
        """Every lineage of ``study`` now (see :func:`optuna_fms.lineage.build_lineages`)."""
        return self.update(lin_mod.all_trials(study), view, exclude=exclude)

    def update(
        self, trials: Sequence[FrozenTrial], view: lin_mod.StudyView, *, exclude: int | None = None,
        provisional: int | None = None,
    ) -> list[lin_mod.Lineage]:
        """The lineages of ``trials`` (the study's trials as just read) under ``view``.

        ``provisional``: the number of a trial given as it *will* be stored (the after-trial
        report's copy, whose stored values and completion time differ); its lineage is built but
        neither it nor the trial's derivation is kept.
        """
        with self._lock:
            for t in trials:
                if t.state in _FINISHED and t.number not in self._derived and t.number != provisional:
                    records = lin_mod._checkpoints_of(t)
                    self._derived[t.number] = _Derived(
                        lin_mod.predecessor(t), records, frozenset(r.artifact_id for r in records))
            groups, pending = lin_mod.group_segments(trials, self._predecessor, exclude=exclude)
            out, kept, rebuilt = [], {}, 0
            for root, segments in groups:
                signature = self._signature(root, segments, view, root in pending)
                cached = self._kept.get(root)
                if signature is not None and cached is not None and cached[0] == signature:
                    lineage = cached[1]
                else:
                    lineage = lin_mod._make_lineage(root, segments, view, root in pending, self._checkpoints)
                    rebuilt += 1
                if signature is not None:
                    kept[root] = (signature, lineage)
                out.append(lineage)
            # NOTE: only lineages of this update are kept, so memory follows the study, and a
            # call with ``exclude`` cannot leave a lineage behind that lacks a segment.
            if exclude is None:
                self._kept = kept
            else:
                self._kept.update(kept)
            self.rebuilt = rebuilt
            return out

    def _predecessor(self, trial: FrozenTrial) -> int | None:
        derived = self._derived.get(trial.number) if trial.state in _FINISHED else None
        return derived.predecessor if derived is not None else lin_mod.predecessor(trial)

    def _checkpoints(self, trial: FrozenTrial) -> list[lin_mod.CheckpointRecord]:
        derived = self._derived.get(trial.number) if trial.state in _FINISHED else None
        return list(derived.checkpoints) if derived is not None else lin_mod._checkpoints_of(trial)

    def _signature(
        self, root: int, segments: list[FrozenTrial], view: lin_mod.StudyView, retry_pending: bool
    ) -> Hashable | None:
        """Everything a lineage of finished segments depends on; None when a segment can still
        change (a RUNNING one: its attrs, its lease, the clock)."""
        if any(t.state not in _FINISHED or t.number not in self._derived for t in segments):
            return None
        ids = frozenset().union(*(self._derived[t.number].artifact_ids for t in segments))
        return (
            tuple(t.number for t in segments), retry_pending, view.recovery.max_retries,
            view.failed_lineages.get(root),
            frozenset(ids & view.bad_checkpoints.keys()), frozenset(ids & view.deleted_checkpoints.keys()),
        )


_registry: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> {study id: index}
_registry_lock = threading.Lock()


def index_of(study: Study) -> LineageIndex:
    """The one index of ``study`` in this process (shared by every Study object on its storage)."""
    with _registry_lock:
        per_storage = _registry.setdefault(study._storage, {})
        return per_storage.setdefault(study._study_id, LineageIndex())


def study_lineages(study: Study, view: lin_mod.StudyView, *, exclude: int | None = None) -> list[lin_mod.Lineage]:
    """The lineages of ``study`` through its index."""
    return index_of(study).lineages(study, view, exclude=exclude)
