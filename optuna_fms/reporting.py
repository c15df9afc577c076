"""What FMSSampler reports after each trial: the progress line and the dashboard's figure and notes.

Optuna gives a sampler no end-of-study hook and lets it register no callback, but it calls
``after_trial`` once per trial (before the trial's state is stored): that is where this runs.
Its cost is bounded: one read of the trials, a rebuild of only the lineages that changed (the
shared index), a note per segment of the trial's lineage, and the figure (at most
``max_lineages`` curves) every ``every`` trials and whenever a run finishes. A failure here
never fails the trial: it is said once and the study goes on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
import copy
import threading
from typing import TYPE_CHECKING

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from optuna_fms import lineage as lin_mod
from optuna_fms._warnings import warn_once
from optuna_fms.explain import logger, readable
from optuna_fms.lineage_index import index_of

if TYPE_CHECKING:
    from optuna.study import Study


class TrialReporter:
    """The sampler's after-trial reports; see ``FMSSampler(dashboard=..., progress=...)``."""

    def __init__(self, *, dashboard: bool = True, every: int = 10, progress: bool = True,
                 max_lineages: int = 40) -> None:
        if every < 1:
            raise ValueError(f"dashboard_every must be >= 1, got {every!r}.")
        self.dashboard = dashboard
        self.every = every
        self.progress = progress
        self.max_lineages = max_lineages
        self._count = 0
        self._lock = threading.Lock()

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        if not (self.dashboard or self.progress):
            return
        try:
            lineages = lineages_after(study, trial, state, values)
        except Exception as err:  # NOTE: a report is never worth a trial
            warn_once(f"report:{type(err).__name__}", f"FMS could not report on trial {trial.number}: {err!r}.")
            return
        if self.progress:
            logger.info(progress_line(study, lineages))
        if self.dashboard:
            self._publish(study, trial, state, lineages)

    def _publish(self, study: Study, trial: FrozenTrial, state: TrialState,
                 lineages: Sequence[lin_mod.Lineage]) -> None:
        if not _dashboard_available():
            self.dashboard = False
            return
        from optuna_fms import dashboard

        with self._lock:
            self._count += 1
            refresh = self._count % self.every == 0 or state == TrialState.COMPLETE
        mine = lin_mod.find_lineage(lineages, trial.number)
        try:
            # NOTE: every segment's note, so a parent's note names the child that continued it
            dashboard.publish(study, max_lineages=self.max_lineages, trials=mine.trials if mine else [],
                              lineages=lineages, figure=refresh)
        except Exception as err:
            warn_once(f"dashboard:{type(err).__name__}",
                      f"FMS could not write the dashboard's figure or notes ({err!r}); the study goes on.")


def lineages_after(study: Study, trial: FrozenTrial, state: TrialState,
                   values: Sequence[float] | None) -> list[lin_mod.Lineage]:
    """The study's lineages as they are once ``trial`` (still RUNNING in storage) ends in ``state``.

    NOTE: through the study's shared index, so a report rebuilds only the lineages that changed.
    The copy is provisional: Optuna stores the trial's values (a pruned trial's last report) and
    completion time after this call, so the index keeps nothing built from it.
    """
    done = copy.copy(trial)
    done.state = state
    done.values = list(values) if values is not None else None
    trials = [done if t.number == trial.number else t for t in lin_mod.all_trials(study)]
    return index_of(study).update(trials, lin_mod.study_view(study), provisional=trial.number)


def progress_line(study: Study, lineages: Sequence[lin_mod.Lineage]) -> str:
    """E.g. "FMS: 15 trials, 37 steps; best 0.9421 (lineage 3, step 7); lineages: 10 frozen, 1 finished"."""
    steps = sum(len(t.intermediate_values) for lin in lineages for t in lin.trials)
    n_trials = sum(len(lin.trials) for lin in lineages)
    best = _best(lineages, study)
    best_text = "no value yet"
    if best is not None:
        step, value = best.best(study.direction)
        best_text = f"best {readable(value)} (lineage {best.id}" + (f", step {step})" if step is not None else ")")
    states = Counter(lin.state for lin in lineages)
    by_state = ", ".join(f"{states[s]} {s}" for s in (lin_mod.RUNNING, lin_mod.FROZEN_STATE, lin_mod.FINISHED,
                                                       lin_mod.FAILED_STATE, lin_mod.PRUNED) if states[s])
    return f"FMS: {n_trials} trials, {steps} steps; {best_text}; lineages: {by_state or 'none'}"


def _best(lineages: Sequence[lin_mod.Lineage], study: Study) -> lin_mod.Lineage | None:
    scored = [(v, lin) for lin in lineages if (v := lin.best(study.direction)[1]) is not None and v == v]
    if not scored:
        return None
    pick = max if study.direction == StudyDirection.MAXIMIZE else min
    return pick(scored, key=lambda vl: vl[0])[1]


_available: bool | None = None


def _dashboard_available() -> bool:
    global _available
    if _available is None:
        try:
            import optuna_dashboard  # noqa: F401
            import plotly  # noqa: F401

            _available = True
        except ImportError:
            _available = False
            warn_once("dashboard-missing", "optuna-dashboard or plotly is not installed, so FMS writes no "
                      "lineage figure and no trial notes: pip install 'optuna-fms[dashboard]' "
                      "(FMSSampler(dashboard=False) silences this).")
    return _available
