"""The best run finished: after the search, train the best lineage to its last step.

A sampler never learns a study's budget (``n_trials`` and ``timeout`` stay inside
``study.optimize``), so no final phase can start by itself at the right moment. Instead the
search ends with one call::

    study.optimize(objective, n_trials=150)
    trial = optuna_fms.finish_best(study, objective)   # study.best_trial, a run to max_steps

It compares what each lineage can still give: a finished full run its final value (what
``study.best_trial`` ranks), a frozen lineage that can resume its best reported value. When the
best is frozen, one more trial that the pruner never freezes (``fms:finish``) trains it to the
last step. Either way the search ends with ``study.best_trial`` a full run, and that trial is
returned: the lineage just finished, or an earlier full run that ended higher (curves that peak
and fall end below their best). The decisions of the search are untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from optuna.study import StudyDirection

from optuna_fms import explain, lineage as lin_mod

if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import FrozenTrial, Trial

    from optuna_fms.sampler import FMSSampler


def finish_best(
    study: Study,
    objective: Callable[[Trial], float],
    *,
    callbacks: Sequence[Callable[[Study, FrozenTrial], None]] | None = None,
    attempts: int = 3,
) -> FrozenTrial:
    """Train the study's best lineage to the last step; return ``study.best_trial``, a full run.

    The run length is ``FMSPruner(max_steps=...)``, else the longest finished run. When no
    frozen lineage has reported better than the best full run ended, nothing is trained. A
    lineage whose checkpoint cannot be resumed is failed and the next best is tried, ``attempts``
    times at most. Each try is one more trial (``callbacks`` as in ``study.optimize``).
    """
    from optuna_fms._bridge import inferred_max_steps
    from optuna_fms.pruner import FMSPruner
    from optuna_fms.sampler import FMSSampler

    sampler, pruner = study.sampler, study.pruner
    if not isinstance(sampler, FMSSampler) or not isinstance(pruner, FMSPruner):
        raise ValueError("finish_best needs a study with FMSSampler and FMSPruner.")
    for _ in range(attempts):
        lineages = lin_mod.lineages(study)
        max_steps = inferred_max_steps(lineages, pruner.max_steps)
        if max_steps is None:
            raise ValueError("finish_best: the run length is unknown; give it as FMSPruner(max_steps=...).")
        best = _best_to_finish(lineages, study.direction, max_steps)
        if best is None:
            raise ValueError("finish_best: no lineage can be finished (none is frozen with a checkpoint).")
        if best.state == lin_mod.FINISHED:
            return study.best_trial
        explain.logger.info(f"finish_best: training lineage {best.id} from step {best.next_step} "
                            f"to step {max_steps - 1}.")
        with sampler.lock:
            sampler._finish = best.id
        try:
            study.optimize(objective, n_trials=1, callbacks=list(callbacks or []))
        finally:
            with sampler.lock:
                sampler._finish = None
        done = lin_mod.lineage_of(study, best.id)
        if done is not None and done.state == lin_mod.FINISHED and done.tail.system_attrs.get(lin_mod.FINISH):
            # NOTE: a curve that peaked and fell may end below an earlier full run; that one is then
            # the study's best trial, and it is what the user is shown.
            return study.best_trial
    raise RuntimeError(f"finish_best: no lineage was finished in {attempts} attempts.")


def _best_to_finish(lineages: Sequence[lin_mod.Lineage], direction: StudyDirection,
                    max_steps: int) -> lin_mod.Lineage | None:
    def promise(lin: lin_mod.Lineage) -> float | None:
        """A full run: its final value (what study.best_trial ranks); a frozen lineage that can
        resume: its best reported value; anything else: None."""
        if lin.state == lin_mod.FINISHED:
            return lin.value if lin.next_step >= max_steps else None
        if lin.state == lin_mod.FROZEN_STATE and lin.checkpoints and lin.next_step < max_steps:
            return lin.best(direction)[1]
        return None

    scored = [(v, lin) for lin in lineages if (v := promise(lin)) is not None and v == v]
    if not scored:
        return None
    sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
    return min(scored, key=lambda vl: (sign * vl[0], vl[1].id))[1]


def thaw_to_the_end(sampler: FMSSampler, study: Study, trial: FrozenTrial, lineage: lin_mod.Lineage | None,
                    view: Any) -> bool:
    """Make ``trial`` the segment that trains ``lineage`` to its last step (the sampler's part of
    finish_best): verify, claim, link, mark ``fms:finish``. False: it cannot; the sampler decides."""
    if lineage is None or lineage.state != lin_mod.FROZEN_STATE:
        return False
    resume = sampler._verified_resume(study, lineage)
    if resume is None or not lin_mod.claim(study, trial, lineage.tail.number, view):
        return False
    said = f"thawed lineage {lineage.id} at step {resume.step + 1} by finish_best: the best run, trained to the last step"
    lin_mod.mark_thaw(study, trial, lineage, said, resume)
    lin_mod.set_system_attr(study, trial, lin_mod.FINISH, True)
    lin_mod.set_user_attr(study, trial, lin_mod.USER_THAW_REASON, said)
    explain.logger.info(f"Trial {trial.number} {said}.")
    return True
