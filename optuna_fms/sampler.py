"""FMSSampler: thaw the frozen lineage or start the new configuration the engine scores best."""

from __future__ import annotations

from collections.abc import Sequence
import threading
from typing import TYPE_CHECKING, Any

from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from optuna_fms import explain, finish as finish_mod, lineage as lin_mod
from optuna_fms._bridge import decide_after_reading, engine_space, inferred_max_steps, make_history, optuna_search_space
from optuna_fms._warnings import warn_once
from optuna_fms.lineage_index import study_lineages
from optuna_fms.graph_source import GraphSource
from optuna_fms.reporting import TrialReporter
from optuna_fms.engine.policy import Decision, FreezeThawPolicy, PolicySettings
from optuna_fms.engine.surrogate import FitSettings

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore
    from optuna.distributions import BaseDistribution
    from optuna.study import Study


class FMSSampler(BaseSampler):
    """Forecasting Model Search: DyHPO-style freeze-thaw BO with a GP that reads the checkpointed weights.

    Before each trial, the engine scores every frozen lineage at its next step and a pool of
    new configurations at their first step by multi-fidelity expected improvement. The best
    frozen lineage is thawed (the new trial gets its params, ``fms:parent`` and resumes from
    its checkpoint through :func:`optuna_fms.load_checkpoint`), or the best new configuration
    is suggested. Use it with :class:`optuna_fms.FMSPruner`, which freezes runs.

    Args:
        seed: Seed of the candidate pool, the start-up design and the surrogate.
        n_startup_trials: Random configurations (one step each under freeze-thaw) before the
            surrogate decides.
        independent_sampler: Sampler for parameters outside the shared search space.
        artifact_store: Where checkpoints live; default: a folder next to the storage file.
        device: Device of the surrogate; default CUDA when available, else CPU.
        pool_size: Random new configurations scored per decision.
        use_learning_curve: Feed the learning curve so far to the surrogate, as DyHPO/FMS do.
            Default (None): off, or as the ``prior`` was trained. The default kernel reads the
            configuration, budget and weights; the curve's features added nothing there
            (README, Surrogate options).
        target: ``"next"`` (default): DyHPO's and FMS's expected improvement one step ahead;
            ``"horizon"``: EI at a horizon drawn afresh for each decision (ifBO's hedge against
            favouring fast starters); ``"new-horizon"``: lineages one step ahead, new configurations
            at such a random horizon; ``"final"``: EI of the forecast at the deepest step seen so
            far, per step still needed.
        weights: How the surrogate reads checkpointed weights: ``"gmn"`` (graph metanetwork,
            default), ``"flat"`` (a fixed-size sketch of all weights) or None (DyHPO: none).
            Weights are read from checkpoints saved with ``architecture=`` and from
            :func:`optuna_fms.register_pretrained`.
        fit_settings: How the surrogate is trained: full fits, refinements and the floor of its
            noise variance (``FitSettings.noise_floor``).
        ordered_choices: Also encode a categorical of numbers (say ``[0.003, 0.01, 0.03]``) by its
            rank, so the surrogate can carry what it learns about one level to the next; off by
            default, since Optuna's categoricals are unordered.
        promotion_probability: With this probability a decision thaws the frozen lineage that
            successive halving would promote (top third at its step), without the surrogate: a
            model-free hedge against a misleading surrogate. 0 (default): DyHPO/FMS as published.
        recovery: How crashed segments come back: the lease that frees a lineage whose worker
            died without Optuna's heartbeat, and how many crashes a lineage survives (see
            :class:`optuna_fms.RecoverySettings`).
        dashboard: After each trial, write the note of its lineage's trials, and every
            ``dashboard_every`` trials (and whenever a run finishes) refresh the lineage figure,
            for optuna-dashboard (:mod:`optuna_fms.dashboard`; needs the ``[dashboard]`` extra,
            said once when missing). False: neither.
        dashboard_every: Trials between two refreshes of the figure.
        progress: After each trial, one INFO line on the ``optuna.fms`` logger: trials, steps
            spent, the best value so far and the lineages by state. False: none.
        prior: A surrogate pretrained on finished studies (a file written by
            :func:`optuna_fms.pretrain_surrogate`): every full fit starts from it instead of a
            random initialization, with the prior's kernel, and keeps learning from this study's
            data (the default kernel's prior: its mean's offset and scale). Parameters are
            matched to the prior's by name and distribution (README, Transfer). A file that
            cannot be read or does not fit these settings raises :class:`optuna_fms.PriorError`.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        n_startup_trials: int = 8,
        independent_sampler: BaseSampler | None = None,
        artifact_store: ArtifactStore | None = None,
        device: str | None = None,
        pool_size: int = 256,
        use_learning_curve: bool | None = None,
        target: str = "next",
        weights: str | None = "gmn",
        fit_settings: FitSettings | None = None,
        ordered_choices: bool = False,
        promotion_probability: float = 0.0,
        recovery: lin_mod.RecoverySettings | None = None,
        dashboard: bool = True,
        dashboard_every: int = 10,
        progress: bool = True,
        prior: Any = None,
    ) -> None:
        if target not in ("final", "next", "horizon", "new-horizon"):
            raise ValueError(f"target must be 'next', 'horizon', 'new-horizon' or 'final', got {target!r}.")
        if not 0.0 <= promotion_probability <= 1.0:
            raise ValueError(f"promotion_probability must be in [0, 1], got {promotion_probability!r}.")
        settings = PolicySettings(
            n_startup=n_startup_trials,
            pool_size=pool_size,
            use_curve=use_learning_curve,
            target=target,
            weights=weights,
            ordered_choices=ordered_choices,
            promotion_probability=promotion_probability,
            fit=fit_settings or FitSettings(),
        )
        if prior is not None:
            from optuna_fms.transfer import resolve_prior

            settings.prior = resolve_prior(prior)
            # NOTE: checked now, so a prior that does not fit fails before the study starts.
            settings.prior.check_compatible(weights=weights, use_curve=use_learning_curve)
        self.policy = FreezeThawPolicy(settings, seed=seed, device=device)
        self.artifact_store = artifact_store
        self.recovery = recovery or lin_mod.RecoverySettings()
        self.graph_source = GraphSource(artifact_store) if weights is not None else None
        self._independent = independent_sampler or RandomSampler(seed=seed)
        # NOTE: with n_jobs > 1 the threads share this object; the lock serializes the engine's
        # decisions (never storage or artifact I/O), and the pruner takes it too. Lineages a
        # thread is claiming are in _thawing, so the process's other decisions pass them over.
        self.lock = threading.RLock()
        self._thawing: set[int] = set()
        self._new_configs: dict[int, dict[str, Any]] = {}
        self._spaces: dict[int, dict[str, BaseDistribution]] = {}
        self._last_space: Any = None
        self.reporter = TrialReporter(dashboard=dashboard, every=dashboard_every, progress=progress)
        self._finish: int | None = None  # NOTE: the lineage finish_best hands the next trial

    def reseed_rng(self) -> None:
        self.policy.reseed(None)
        self._independent.reseed_rng()

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        view = lin_mod.study_view(study, self.recovery)
        lin_mod.renew_lease(study, trial, view)  # NOTE: first: a retry inherits its dead trial's lease
        if lin_mod.is_retry(trial):
            self._continue_retry(study, trial, view)  # NOTE: decides nothing, so takes no lock
            return
        if "fixed_params" in trial.system_attrs:
            return  # enqueued trials are decided already (GridSampler's rule)
        from optuna_fms.pruner import FMSPruner

        pruner = study.pruner
        can_thaw = isinstance(pruner, FMSPruner)
        if not can_thaw:
            warn_once(
                "sampler-without-pruner",
                "FMSSampler runs without FMSPruner: no run is ever frozen, so nothing can be "
                "thawed; FMSSampler only chooses new configurations (scored at their final step).",
            )
        # NOTE: storage and artifacts are read (and checkpoints verified, claims written)
        # outside the lock; under it runs only the engine's decision on what was read.
        distributions = optuna_search_space(study)
        space = engine_space(distributions, self.policy.settings.ordered_choices)
        with self.lock:
            if self._last_space is not None and self._last_space.dimensions and space != self._last_space:
                warn_once(
                    f"space:{study._study_id}:{tuple(space.names)}",
                    f"The search space changed to {space.names}; lineages outside it are no "
                    "longer thawed, and other parameters are sampled independently.",
                )
            self._last_space = space
        lineages = study_lineages(study, view)
        max_steps = inferred_max_steps(lineages, pruner.max_steps if can_thaw else None)
        history = make_history(study, lineages, space, max_steps=max_steps, graph_source=self.graph_source)
        new_step = 0 if can_thaw or not max_steps else max_steps - 1
        by_id = {lin.id: lin for lin in lineages}
        with self.lock:
            key, self._finish = self._finish, None
        if key is not None and finish_mod.thaw_to_the_end(self, study, trial, by_id.get(key), view):
            return  # finish_best asked for this lineage
        lost: dict[int, str] = {}
        sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0

        def choose() -> Decision:
            decision = self.policy.choose_next(history, exclude=frozenset(set(lost) | self._thawing),
                                               new_step=new_step)
            if decision.action == "thaw" and decision.key is not None:
                self._thawing.add(decision.key)  # NOTE: no other thread of this process picks it meanwhile
            return decision

        while True:
            decision = decide_after_reading(self.lock, self.policy, history, choose)
            if decision.action != "thaw" or decision.key is None:
                break
            chosen = by_id[decision.key]
            try:
                resume = self._verified_resume(study, chosen)
                if resume is not None and lin_mod.claim(study, trial, chosen.tail.number, view):
                    said = explain.thaw_sentence(chosen.id, resume.step + 1, decision, sign)
                    lin_mod.mark_thaw(study, trial, chosen, said, resume)
                    explain.record_start(study, trial, decision, said, thawed=chosen.id, skipped=lost)
                    return
            finally:
                with self.lock:
                    self._thawing.discard(decision.key)
            lost[decision.key] = "no readable checkpoint" if resume is None else "another trial claimed it"
        self._new_configs[trial._trial_id] = decision.config or {}
        self._spaces[trial._trial_id] = distributions
        lin_mod.set_user_attr(study, trial, lin_mod.USER_LINEAGE, trial.number)
        explain.record_start(study, trial, decision, explain.new_sentence(decision, sign), thawed=None,
                             skipped=lost)

    def _continue_retry(self, study: Study, trial: FrozenTrial, view: lin_mod.StudyView) -> None:
        """A retry (Optuna's heartbeat callback) continues its own lineage and decides nothing.

        NOTE: it claims the dead tail like any thaw, so that it never runs beside a thaw that
        got there first; it resumes the lineage's newest verified checkpoint. With no lineage
        left to continue (lost claim, failed lineage, no readable checkpoint) it is cut loose and
        runs its copied params from scratch as a lineage of its own.
        """
        lineages = study_lineages(study, view, exclude=trial.number)
        failed_number = lin_mod.predecessor(trial)
        lineage = lin_mod.find_lineage(lineages, failed_number) if failed_number is not None else None
        why = None
        if lineage is None:
            why = f"trial {failed_number} is not in the study"
        elif lineage.state != lin_mod.FROZEN_STATE:
            why = f"its lineage {lineage.id} is {lineage.state}" + (f" ({lineage.failure})" if lineage.failure else "")
        else:
            resume = self._verified_resume(study, lineage)
            if resume is None:
                why = f"lineage {lineage.id} has no readable checkpoint left"
            elif not lin_mod.claim(study, trial, lineage.tail.number, view):
                why = f"another trial continues lineage {lineage.id}"
            else:
                reason = (f"retry of trial {failed_number}: resumes lineage {lineage.id} from trial "
                          f"{resume.trial_number}'s checkpoint at step {resume.step}")
                lin_mod.mark_thaw(study, trial, lineage, reason, resume)
                explain.record_retry(study, trial, reason, continues=True)
                return
        warn_once(f"retry-detached:{study._study_id}:{trial.number}",
                  f"Trial {trial.number} retries trial {failed_number}, but {why}: it starts afresh.")
        reason = f"retry of trial {failed_number} starts afresh: {why}"
        lin_mod.detach(study, trial, reason)
        explain.record_retry(study, trial, reason, continues=False)

    def _verified_resume(self, study: Study, lineage: lin_mod.Lineage) -> lin_mod.CheckpointRecord | None:
        """The newest checkpoint of ``lineage`` that verifies; bad ones are recorded, and a
        lineage with none left is failed."""
        from optuna_fms.checkpoints import newest_good_checkpoint

        resume = newest_good_checkpoint(study, lineage, artifact_store=self.artifact_store)
        if resume is None:
            lin_mod.mark_lineage_failed(study, lineage, "no readable checkpoint is left")
            explain.record_failure(study, None, "no readable checkpoint is left", lineage_id=lineage.id)
        return resume

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._spaces.get(trial._trial_id, {})

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        config = self._new_configs.get(trial._trial_id)
        if config is None:
            # NOTE: called without before_trial (a caller driving the sampler by hand, as
            # Optuna's conformance kit does): no claim was made, so nothing is thawed and the
            # engine picks a new configuration of the given space.
            config = self._new_config(study, search_space)
        return {name: config[name] for name in search_space if name in config}

    def _new_config(self, study: Study, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        from optuna_fms.pruner import FMSPruner

        pruner = study.pruner
        can_thaw = isinstance(pruner, FMSPruner)
        space = engine_space(search_space, self.policy.settings.ordered_choices)
        lineages = study_lineages(study, lin_mod.study_view(study, self.recovery))
        max_steps = inferred_max_steps(lineages, pruner.max_steps if can_thaw else None)
        history = make_history(study, lineages, space, max_steps=max_steps, graph_source=self.graph_source)
        new_step = 0 if can_thaw or not max_steps else max_steps - 1
        every = frozenset(record.key for record in history.lineages)
        decision = decide_after_reading(
            self.lock, self.policy, history, lambda: self.policy.choose_next(history, exclude=every, new_step=new_step))
        return decision.config or {}

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._independent.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._new_configs.pop(trial._trial_id, None)
        self._spaces.pop(trial._trial_id, None)
        self.reporter.after_trial(study, trial, state, values)
