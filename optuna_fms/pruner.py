"""FMSPruner: after each report, freeze the run when another candidate deserves the next step."""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

from optuna.pruners import BasePruner

from optuna_fms import explain, lineage as lin_mod
from optuna_fms._bridge import decide_after_reading, engine_space, inferred_max_steps, make_history, optuna_search_space
from optuna_fms._warnings import warn_once
from optuna_fms.lineage_index import study_lineages
from optuna_fms.graph_source import GraphSource
from optuna_fms.engine.policy import Decision, FreezeThawPolicy, PolicySettings
from optuna_fms.engine.surrogate import FitSettings

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore
    from optuna.study import Study
    from optuna.trial import FrozenTrial


class FMSPruner(BasePruner):
    """Freeze (not kill) a run that is no longer the best use of compute.

    On each report, the surrogate is refined with the new point, and the run's expected
    improvement at its next step is compared with that of the alternatives: frozen lineages
    (when :class:`optuna_fms.FMSSampler` can thaw them) and new configurations. A frozen
    trial ends PRUNED with the reason in ``fms:frozen``; its checkpoint stays, and the sampler
    may continue it later in a new trial. With another sampler this is plain early stopping.
    A NaN or infinite report marks the lineage failed and stops it.

    Args:
        freeze_margin: Against thrashing: freeze only when an alternative's EI exceeds this
            run's by this relative margin.
        min_segment_steps: Against thrashing: steps a (thawed) segment runs at least.
        max_steps: Run length in steps; default: the longest finished run so far.
        n_startup_trials: Only used with another sampler: never stop a run before this many
            configurations were tried.
        seed: Seed of this pruner's own engine (used only with another sampler).
        device: Device of that engine.
        artifact_store: Where checkpoints live, if not given to the sampler.
        weights: Weight encoder of this pruner's own surrogate (other samplers only); see
            :class:`optuna_fms.FMSSampler`.
        fit_settings: Training schedule of this pruner's own surrogate (other samplers only).
    """

    def __init__(
        self,
        *,
        freeze_margin: float = 0.2,
        min_segment_steps: int = 1,
        max_steps: int | None = None,
        n_startup_trials: int = 8,
        seed: int | None = None,
        device: str | None = None,
        artifact_store: ArtifactStore | None = None,
        weights: str | None = "gmn",
        fit_settings: FitSettings | None = None,
    ) -> None:
        if freeze_margin < 0 or min_segment_steps < 1:
            raise ValueError("freeze_margin must be >= 0 and min_segment_steps >= 1.")
        if max_steps is not None and max_steps < 1:
            raise ValueError("max_steps must be >= 1.")
        self.freeze_margin = freeze_margin
        self.min_segment_steps = min_segment_steps
        self.max_steps = max_steps
        self.artifact_store = artifact_store
        settings = PolicySettings(n_startup=n_startup_trials, weights=weights, fit=fit_settings or FitSettings())
        self._own = FreezeThawPolicy(settings, seed=seed, device=device)
        self._own_graphs = GraphSource(artifact_store) if weights is not None else None
        self._own_lock = threading.RLock()
        self._decided: dict[tuple[int, int], bool] = {}

    def prune(self, study: Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        memo = (trial._trial_id, step)
        if memo in self._decided:  # should_prune twice at one step answers the same
            return self._decided[memo]
        value = trial.intermediate_values[step]
        if not math.isfinite(value):
            reason = f"step {step} reported {value}"
            lin_mod.write_trial_attr(study, trial._trial_id, lin_mod.FAILED, reason)
            lin_mod.write_trial_attr(study, trial._trial_id, lin_mod.USER_DECISION, f"failed: {reason}", user=True)
            explain.record_failure(study, trial, reason, log=False)  # NOTE: the warning below says it
            warn_once(f"nan:{study._study_id}:{trial._trial_id}",
                      f"Trial {trial.number} {reason}: its lineage is marked failed and never thawed.")
            self._decided[memo] = True
            return True
        if trial.system_attrs.get(lin_mod.FINISH):  # finish_best: this segment runs to the last step
            self._decided[memo] = False
            return False
        decision = self._decide(study, trial)
        if decision.action == "superseded":
            lin_mod.write_trial_attr(study, trial._trial_id, lin_mod.USER_DECISION, decision.reason, user=True)
            self._decided[memo] = True
            return True
        frozen = decision.action == "freeze"
        if frozen:
            lin_mod.write_trial_attr(study, trial._trial_id, lin_mod.FROZEN, decision.reason)
            explain.record_freeze(study, trial, decision)
        self._decided[memo] = frozen
        return frozen

    def _decide(self, study: Study, trial: FrozenTrial) -> Decision:
        from optuna_fms.sampler import FMSSampler

        sampler = study.sampler
        shared = isinstance(sampler, FMSSampler)
        if shared:
            policy, lock, graphs = sampler.policy, sampler.lock, sampler.graph_source
        else:
            policy, lock, graphs = self._own, self._own_lock, self._own_graphs
        view = lin_mod.study_view(study, sampler.recovery if shared else None)
        # NOTE: everything is read outside the lock; under it runs only the engine's decision.
        lineages = study_lineages(study, view)
        mine = lin_mod.find_lineage(lineages, trial.number)
        if mine is None:
            return Decision("continue", reason="trial not found")
        if mine.tail.number != trial.number:
            # NOTE: its lease expired and another trial resumed the lineage: this one is a
            # zombie (a worker slower than the lease), so it stops here.
            return Decision("superseded", reason=f"superseded: trial {mine.tail.number} resumed this lineage")
        lin_mod.renew_lease(study, trial, view)
        resumable = shared and bool(mine.checkpoints)
        if shared and not mine.checkpoints:
            warn_once(
                f"no-checkpoint:{study._study_id}",
                f"Trial {trial.number} reported before saving any checkpoint, so FMS cannot "
                "resume it: freezing would end it. Call optuna_fms.save_checkpoint before "
                "trial.report to make runs resumable.",
            )
        space = engine_space(optuna_search_space(study), policy.settings.ordered_choices)
        history = make_history(
            study, lineages, space, max_steps=inferred_max_steps(lineages, self.max_steps), graph_source=graphs
        )
        return decide_after_reading(lock, policy, history, lambda: policy.should_continue(
            history,
            mine.id,
            segment_steps=len(trial.intermediate_values),
            can_thaw=resumable,
            freeze_margin=self.freeze_margin,
            min_segment_steps=self.min_segment_steps,
        ))
