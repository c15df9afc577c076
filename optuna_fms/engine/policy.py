"""Freeze-thaw decisions: which lineage or new configuration deserves the next step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
import threading
from typing import Any

import numpy as np

from optuna_fms.engine.acquisition import expected_improvement, incumbents
from optuna_fms.engine.device import resolve_device
from optuna_fms.engine.history import Candidate, History
from optuna_fms.engine.promotion import promotable
from optuna_fms.engine.surrogate import GPSurrogate, FitSettings, subsample_rows


@dataclass
class PolicySettings:
    """Knobs of the freeze-thaw policy.

    ``n_startup`` lineages are started at random and, when thawing is possible, frozen after
    their first step (DyHPO's initial design). New configurations are scored from a pool of
    ``pool_size`` random points plus ``n_local`` perturbations of the best lineages.
    """

    # NOTE: 8 with a prior too. 2 with a prior moved leave-one-hub-out regret both ways (animal
    # -0.146 +/- 0.064 at 10 %, tabular -0.013 +/- 0.005 at 25 %; tokens +0.044 +/- 0.020 at 10 %,
    # arch +0.058 +/- 0.015 at 100 %; pooled z -0.5 / -0.8 / -0.8 / -0.9):
    # bench/results/transfer/input-prior/.
    n_startup: int = 8
    pool_size: int = 256
    n_local: int = 64
    # The surrogate's kernel (engine.surrogate.KERNELS): "input" (default), a Matern-5/2 kernel
    # on the configuration, budget and weight embedding; "deep", DyHPO/FMS's deep kernel. A prior
    # brings its own and overrides this. NOTE: on 40 paired seeds per design hub without weights,
    # "input" left no seed stuck on arch (9 of 40 with "deep") and had lower regret at 25 / 50 /
    # 100 % (pooled z -1.9 / -2.4 / -2.7), at a cost on arch at 10 % (+0.042, 2.1 s.e.):
    # bench/results/probes/kernel/.
    kernel: str = "input"
    # NOTE: the curve branch's features as more inputs; with the input kernel they added nothing
    # (pooled z +2.2 at 10 % and +2.1 at 100 %, worse), so they are off unless asked for. None:
    # as the prior was trained (with the branch or not), else off.
    use_curve: bool | None = None
    # NOTE: "next" (default) is DyHPO/FMS as published: EI one step ahead, over the best value seen
    # at that budget. "final" scores every candidate by the EI of its forecast value at the
    # deepest step observed so far over the best value seen, per step still needed (the surrogate
    # also trains on forecasts from shorter curve prefixes). On the digits hub (10 seeds) "next"
    # had lower regret with and without weights and cost half the decision time.
    # "horizon" (as ifBO's random horizon): each decision draws a horizon h uniformly from 1 to the
    # run length and scores every candidate by EI h steps ahead (capped at the deepest step observed)
    # over the best value seen at that budget, so a slow starter can win a decision; the surrogate
    # then trains on forecasts from shorter prefixes too, as for "final".
    # "new-horizon": lineages are scored one step ahead (as "next"), new configurations at a horizon
    # drawn afresh for each decision (as "horizon"): only a configuration nobody has run yet is
    # judged on where it may get, not on its first step.
    target: str = "next"
    # "gmn" (graph metanetwork), "flat" (count sketch of all weights) or None (DyHPO: no weights).
    weights: str | None = "gmn"
    # Categorical choices that are all numbers also get their position in sorted order as one more
    # column (see engine.space.Dimension.ordered), so what is learned about one level carries over.
    ordered_choices: bool = False
    # NOTE: a model-free hedge (as Syne Tune's DyHPO, which uses 0.25): with this probability a
    # decision thaws the lineage successive halving would promote (top 1/promotion_eta at its
    # step; see engine.promotion) instead of asking the surrogate. 0 is DyHPO/FMS as published.
    promotion_probability: float = 0.0
    promotion_eta: int = 3
    fit: FitSettings = field(default_factory=FitSettings)
    # NOTE: a decision also carries a Forecast (one more surrogate query of two rows, after the
    # choice is made, so it changes no decision); False leaves it out.
    explain: bool = True
    # A pretrained surrogate (engine/prior.py) every full fit starts from; None: a random start.
    prior: Any = None


@dataclass
class Forecast:
    """The numbers behind one decision, in the history's units (values oriented so that higher
    is better; the adapter flips a minimized metric back). Plain data, for logs and the dashboard.

    ``gain``: the chosen candidate's acquisition value in those units (expected improvement,
    per step still needed when ``per_step``); ``alternative_gain``: the best alternative's
    (``alternative_key``: its lineage, None for a new configuration; ``alternative_new``: the
    alternative is a new configuration, and no alternative at all leaves both gains' partner None).
    """

    next_step: int
    next_mean: float
    next_std: float
    final_step: int
    final_mean: float
    final_std: float
    gain: float
    alternative_gain: float | None = None
    alternative_key: int | None = None
    alternative_new: bool = False
    per_step: bool = False


@dataclass
class Decision:
    """What to do next, with the numbers behind it (for logs and the dashboard)."""

    action: str  # "continue", "freeze", "thaw" or "new"
    key: int | None = None  # the lineage to continue, freeze or thaw
    config: dict[str, Any] | None = None  # the configuration of a new lineage
    reason: str = ""
    acquisition: float | None = None
    predicted_mean: float | None = None  # in standardized units of the history
    predicted_std: float | None = None
    alternatives: list[tuple[int | None, float]] = field(default_factory=list)
    forecast: Forecast | None = None  # see PolicySettings.explain


class FreezeThawPolicy:
    """DyHPO/FMS: refit the GP surrogate on the history, score candidates by EI one step ahead."""

    def __init__(
        self,
        settings: PolicySettings | None = None,
        *,
        seed: int | None = None,
        device: str | None = None,
    ) -> None:
        self.settings = settings or PolicySettings()
        self._rng = np.random.default_rng(seed)
        self._seed = 0 if seed is None else seed
        self._device = resolve_device(device)  # fails early on an unavailable device
        self._surrogate: GPSurrogate | None = None
        self._fitted_key: tuple | None = None
        self._lock = threading.RLock()

    def reseed(self, seed: int | None) -> None:
        with self._lock:
            self._rng = np.random.default_rng(seed)

    # --- decisions ------------------------------------------------------------------------

    def choose_next(
        self, history: History, *, exclude: frozenset[int] = frozenset(), new_step: int = 0
    ) -> Decision:
        """Thaw the best frozen lineage or start the best new configuration.

        Lineages in ``exclude`` are not thawed (e.g. a claim on them was lost). New
        configurations are scored at ``new_step``: 0 (their first step) under freeze-thaw, the
        last step when runs are never frozen, so EI then targets final values.
        """
        with self._lock:
            if len(history.lineages) < self.settings.n_startup or not history.n_observations:
                return self._random_new(history, "start-up: random configuration")
            hedge = self._promotion(history, exclude)
            if hedge is not None:
                return hedge
            thaws = [c for c in self._thaw_candidates(history) if c.key not in exclude]
            candidates = thaws + self._new_candidates(history, new_step)
            if not candidates:
                return self._random_new(history, "no candidate left: random configuration")
            scores, mean, std = self._score(history, candidates)
            if scores is None:
                return self._random_new(history, "surrogate unavailable: random configuration")
            best = int(np.argmax(scores))
            chosen = candidates[best]
            decision = Decision(
                action="thaw" if chosen.key is not None else "new",
                key=chosen.key,
                config=dict(chosen.config) if chosen.key is None else None,
                acquisition=float(scores[best]),
                predicted_mean=float(mean[best]),
                predicted_std=float(std[best]),
                alternatives=_top(candidates, scores, 5),
            )
            decision.reason = (
                f"EI {scores[best]:.4g} is the best of {len(candidates)} candidates"
                f" ({sum(c.key is not None for c in candidates)} frozen lineages)"
            )
            # NOTE: the alternative is the best candidate of the other kind: the best new
            # configuration for a thaw, the best frozen lineage for a new configuration.
            other = [i for i, c in enumerate(candidates) if (c.key is None) != (chosen.key is None)]
            alt = max(other, key=lambda i: scores[i]) if other else None
            decision.forecast = self._forecast(history, candidates, scores, best, alt)
            return decision

    def should_continue(
        self,
        history: History,
        key: int,
        *,
        segment_steps: int,
        can_thaw: bool,
        freeze_margin: float = 0.2,
        min_segment_steps: int = 1,
    ) -> Decision:
        """Whether running lineage ``key`` should take its next step, or be frozen.

        ``can_thaw`` says whether frozen lineages will ever be resumed (FMSSampler present);
        without it, freezing is plain early stopping and frozen lineages are no alternative.
        Against thrashing, the lineage is frozen only when an alternative's EI exceeds its own
        by the relative ``freeze_margin``, and only after ``min_segment_steps`` steps of its
        current segment.
        """
        with self._lock:
            lin = history.by_key.get(key)
            if lin is None or not lin.steps:
                return Decision("continue", key, reason="no observation yet")
            if history.max_steps is not None and lin.next_step >= history.max_steps:
                return Decision("continue", key, reason="last step of the budget")
            if history.max_steps is None and lin.next_step >= max(o.next_step for o in history.lineages):
                # NOTE: while the run length is unknown, the deepest run is never frozen: it may
                # be at its last step (a thaw would then have nothing left to do), and when it
                # finishes it reveals the run length.
                return Decision("continue", key, reason="deepest run while the run length is unknown")
            if can_thaw and len(history.lineages) < self.settings.n_startup:
                return Decision("freeze", key, reason="start-up: one step per configuration")
            if not can_thaw and sum(not lin.running for lin in history.lineages) < self.settings.n_startup:
                # NOTE: as early stopping, like MedianPruner: no stop before n_startup runs ended.
                return Decision("continue", key, reason="start-up")
            if segment_steps < min_segment_steps:
                return Decision("continue", key, reason="minimum segment length")
            own = Candidate(lin.config, lin.next_step, key)
            others = (self._thaw_candidates(history) if can_thaw else []) + self._new_candidates(history)
            if not others:
                return Decision("continue", key, reason="no alternative")
            scores, mean, std = self._score(history, [own, *others])
            if scores is None:
                return Decision("continue", key, reason="surrogate unavailable")
            mine, best_other = float(scores[0]), int(np.argmax(scores[1:])) + 1
            threshold = mine * (1.0 + freeze_margin) + 1e-9
            action = "freeze" if scores[best_other] > threshold else "continue"
            alt = others[best_other - 1]
            what = f"lineage {alt.key}" if alt.key is not None else "a new configuration"
            return Decision(
                action,
                key,
                acquisition=mine,
                predicted_mean=float(mean[0]),
                predicted_std=float(std[0]),
                alternatives=_top([own, *others], scores, 5),
                reason=f"EI {mine:.4g} here vs {scores[best_other]:.4g} for {what}",
                forecast=self._forecast(history, [own, *others], scores, 0, best_other),
            )

    def predict(self, history: History, candidates: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and std at ``candidates``, in the history's original units."""
        with self._lock:
            self._fit(history)
            if self._surrogate is None or not self._surrogate.ready:
                raise RuntimeError("The surrogate could not be fitted on this history.")
            self._surrogate.set_graphs(history.graph_keys, history.graphs)
            mean, std = self._surrogate.predict(history.candidate_rows(candidates))
            return mean * history.y_std + history.y_mean, std * history.y_std

    def graphs_to_read(self, history: History) -> frozenset[str]:
        """The graph keys the next decision on ``history`` may read from ``history.graphs``.

        An adapter whose graphs load lazily (from an artifact store) loads these first, outside
        its decision lock, so the decision itself reads nothing. A superset: the rows the next
        fit will train on (if the history changed), every frozen or running lineage's next step
        and every start weight, less the graphs whose embedding the surrogate has cached (none
        when the next fit starts from scratch).
        """
        with self._lock:
            if self.settings.weights is None or not history.graph_keys or history.n_observations < 2:
                return frozenset()
            surrogate = self._reusable_surrogate(history)
            fits = surrogate is None or not surrogate.ready or self._fitted_key != self._history_key(history)
            used = {history.next_graph(lin.key) for lin in history.lineages if lin.thawable or lin.running}
            anew = False
            if fits:
                rows, _, newest = history.training_rows(forecast_seed=self._forecast_seed(history))
                index = (surrogate.training_index(len(rows), newest) if surrogate is not None
                         else subsample_rows(len(rows), self.settings.fit.max_rows, newest, seed=self._seed))
                used.update(rows.graph[index].tolist())
                anew = surrogate is None or surrogate.refits_from_scratch(len(rows))
            keys = {history.graph_keys[i] for i in used if i >= 0} | set(history.start_keys)
            if anew:
                return frozenset(keys)
            assert surrogate is not None
            return frozenset(k for k in keys if surrogate.needs_graph(k))

    # --- internals ------------------------------------------------------------------------

    def _forecast(
        self,
        history: History,
        candidates: Sequence[Candidate],
        scores: np.ndarray,
        chosen: int,
        alternative: int | None,
    ) -> Forecast | None:
        """The chosen candidate's predicted value at its next step and at the final step (the
        run length, else the deepest step observed), and both acquisition values, in the
        history's units. NOTE: called after the choice; it draws no random number."""
        if not self.settings.explain or self._surrogate is None or not self._surrogate.ready:
            return None
        c = candidates[chosen]
        observed_budgets, _ = history.observed()
        final = max(c.step, history.max_steps - 1 if history.max_steps else int(observed_budgets.max()) - 1)
        rows = history.candidate_rows([Candidate(c.config, c.step, c.key),
                                       Candidate(c.config, c.step, c.key, horizon=final)])
        self._surrogate.set_graphs(history.graph_keys, history.graphs)
        mean, std = self._surrogate.predict(rows)
        scale, shift = history.y_std, history.y_mean
        alt = candidates[alternative] if alternative is not None else None
        return Forecast(
            next_step=c.step,
            next_mean=float(mean[0] * scale + shift),
            next_std=float(std[0] * scale),
            final_step=final,
            final_mean=float(mean[1] * scale + shift),
            final_std=float(std[1] * scale),
            gain=float(scores[chosen] * scale),  # NOTE: EI scales with the values' unit
            alternative_gain=float(scores[alternative] * scale) if alternative is not None else None,
            alternative_key=alt.key if alt is not None else None,
            alternative_new=alt is not None and alt.key is None,
            per_step=self.settings.target == "final",
        )

    def _thaw_candidates(self, history: History) -> list[Candidate]:
        max_steps = history.max_steps
        return [
            Candidate(lin.config, lin.next_step, lin.key)
            for lin in history.lineages
            if lin.thawable and lin.steps and (max_steps is None or lin.next_step < max_steps)
        ]

    def _promotion(self, history: History, exclude: frozenset[int]) -> Decision | None:
        p = self.settings.promotion_probability
        if p <= 0 or self._rng.random() >= p:  # NOTE: no draw at 0, so the published path is unchanged
            return None
        key = promotable(history, eta=self.settings.promotion_eta, exclude=exclude)
        if key is None:
            return None
        return Decision("thaw", key=key, reason=f"successive halving: top 1/{self.settings.promotion_eta} "
                                                f"at its step (hedge taken with probability {p:g})")

    def _new_candidates(self, history: History, step: int = 0) -> list[Candidate]:
        space = history.space
        configs = space.sample(self.settings.pool_size, self._rng)
        # NOTE: local moves around the best lineages so far, for a sharper pool than random alone.
        ranked = sorted(
            (lin for lin in history.lineages if lin.values), key=lambda lin: max(lin.values), reverse=True
        )[:8]
        for i in range(self.settings.n_local if ranked else 0):
            configs.append(space.perturb(ranked[i % len(ranked)].config, self._rng))
        existing = {space.encode(lin.config).tobytes() for lin in history.lineages}
        unique: dict[bytes, dict[str, Any]] = {}
        for c in configs:
            code = space.encode(c).tobytes()
            if code not in existing:
                unique.setdefault(code, c)
        return [Candidate(c, step, None) for c in unique.values()]

    def _random_new(self, history: History, reason: str) -> Decision:
        pool = self._new_candidates(history) if history.space.dimensions else []
        config = dict(pool[0].config) if pool else history.space.sample(1, self._rng)[0]
        return Decision("new", config=config, reason=reason)

    @staticmethod
    def _history_key(history: History) -> tuple:
        return (
            history.space,
            history.n_observations,
            tuple(history.graph_keys),
            tuple((lin.key, len(lin.values), lin.values[-1] if lin.values else None) for lin in history.lineages),
        )

    def _forecast_seed(self, history: History) -> int | None:
        return self._seed + history.n_observations if self.settings.target in _FORECASTING else None

    def _weights_for(self, history: History) -> str | None:
        # NOTE: the weight branch exists only once some checkpoint has a graph, so a study
        # without architectures runs exactly DyHPO's network.
        return self.settings.weights if history.graph_keys else None

    def _reusable_surrogate(self, history: History) -> GPSurrogate | None:
        """The current surrogate if the next fit on ``history`` keeps it, else None (a new one)."""
        s = self._surrogate
        if (
            s is None
            or s.config_dim != history.space.width
            or s.weights != self._weights_for(history)
            or (self.settings.prior is not None and s.space != history.space)
        ):
            return None
        return s

    def _fit(self, history: History) -> None:
        # NOTE: refit only when the history changed since the last fit; the pruner and the
        # sampler of one study share this policy, so one report costs one refinement.
        key = self._history_key(history)
        if key == self._fitted_key and self._surrogate is not None and self._surrogate.ready:
            return
        if history.n_observations < 2:
            return
        if self._reusable_surrogate(history) is None:
            self._surrogate = GPSurrogate(
                history.space.width,
                self._weights_for(history),
                use_curve=self.settings.use_curve,
                kernel=self.settings.kernel,
                curve_length=history.curve_length,
                settings=self.settings.fit,
                seed=self._seed,
                device=self._device,
                **({"prior": self.settings.prior, "space": history.space} if self.settings.prior is not None else {}),
            )
        self._surrogate.set_graphs(history.graph_keys, history.graphs)
        rows, targets, newest = history.training_rows(forecast_seed=self._forecast_seed(history))
        self._surrogate.fit(rows, targets, keep=newest)  # each lineage's newest row is kept
        self._fitted_key = key

    def _score(
        self, history: History, candidates: Sequence[Candidate]
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        self._fit(history)
        if self._surrogate is None or not self._surrogate.ready:
            return None, np.zeros(0), np.zeros(0)
        observed_budgets, observed_values = history.observed()
        if self.settings.target == "final":
            horizon = _deepest_queryable(history, observed_budgets)
            queries = [Candidate(c.config, c.step, c.key, horizon=max(horizon, c.step)) for c in candidates]
            best = np.full(len(candidates), observed_values.max())
            # NOTE: cost-aware (as Quick-Tune): EI per step still needed to reach the horizon.
            cost = np.array([max(horizon, c.step) - c.step + 1.0 for c in candidates])
        elif self.settings.target in ("horizon", "new-horizon"):
            cap = _deepest_queryable(history, observed_budgets)
            ahead = int(self._rng.integers(0, max(history.max_steps or int(observed_budgets.max()), 1)))
            only_new = self.settings.target == "new-horizon"
            queries = [c if only_new and c.key is not None
                       else Candidate(c.config, c.step, c.key, horizon=max(c.step, min(c.step + ahead, cap)))
                       for c in candidates]
            budgets = np.array([(q.step if q.horizon is None else q.horizon) + 1.0 for q in queries])
            best = incumbents(budgets, observed_budgets, observed_values)
            cost = np.ones(len(candidates))
        else:
            queries = list(candidates)
            budgets = np.array([c.step + 1.0 for c in candidates])
            best = incumbents(budgets, observed_budgets, observed_values)
            cost = np.ones(len(candidates))
        self._surrogate.set_graphs(history.graph_keys, history.graphs)
        mean, std = self._surrogate.predict(history.candidate_rows(queries))
        return expected_improvement(mean, std, best) / cost, mean, std


_FORECASTING = ("final", "horizon", "new-horizon")  # targets whose surrogate also learns from shorter prefixes


def _deepest_queryable(history: History, observed_budgets: np.ndarray) -> int:
    # NOTE: a GP cannot extrapolate in the budget, so the deepest step worth querying is the
    # deepest observed so far (it moves out as runs go deeper), capped by the run length.
    deepest = int(observed_budgets.max()) - 1
    return deepest if history.max_steps is None else min(deepest, history.max_steps - 1)


def _top(candidates: Sequence[Candidate], scores: np.ndarray, k: int) -> list[tuple[int | None, float]]:
    order = np.argsort(-scores)[:k]
    return [(candidates[i].key, float(scores[i])) for i in order]
