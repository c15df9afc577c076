"""How far off the surrogate's one-step predictions turned out, per kind of candidate.

Every decision scores candidates one step ahead; when one of them is then observed, the
prediction made before it is an honest held-out test of the surrogate. The record keeps the
squared standardized errors of those predictions, separately for new configurations (their
first step) and for lineages (their next step), and gives each kind a factor for its predictive
standard deviation: the one under which its recent errors would have looked like draws from the
predicted normal distributions.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
import math

import numpy as np

from optuna_fms.engine.history import Candidate, History

NEW, LINEAGE = "new", "lineage"
# NOTE: the median of a chi-square variable with one degree of freedom: a robust estimate of the
# variance ratio is median(z^2) / this, so one jump in a curve cannot dominate it.
_CHI2_MEDIAN = 0.454936


class PredictionRecord:
    """Predictions awaiting their observation, and the errors of those already observed."""

    def __init__(self, *, window: int = 100, prior_count: float = 5.0, max_pending: int = 4096,
                 bounds: tuple[float, float] = (0.5, 4.0)) -> None:
        self.window = window
        self.prior_count = prior_count  # NOTE: pseudo-errors of a calibrated surrogate (factor 1)
        self.max_pending = max_pending
        self.bounds = bounds
        self._pending: OrderedDict[tuple, tuple[str, float, float]] = OrderedDict()
        self._errors: dict[str, deque[float]] = {NEW: deque(maxlen=window), LINEAGE: deque(maxlen=window)}
        self._counted: dict[int, int] = {}  # lineage key -> values already matched

    def observe(self, history: History) -> None:
        """Match the values observed since the last call with the predictions made for them."""
        for lin in history.lineages:
            done = self._counted.get(lin.key, 0)
            for i in range(done, len(lin.steps)):
                step, value = lin.steps[i], lin.values[i]
                found = self._pending.pop((lin.key, step), None)
                if i == 0:
                    found = self._pending.pop((_code(history, lin.config), step), None) or found
                if found is not None:
                    kind, mean, std = found
                    self._errors[kind].append(((value - mean) / std) ** 2)
            self._counted[lin.key] = len(lin.steps)

    def record(self, history: History, candidates: Sequence[Candidate], mean: np.ndarray, std: np.ndarray) -> None:
        """Remember one-step predictions (standardized units of ``history``) until observed."""
        fresh = [c.config for c in candidates if c.key is None]
        codes = iter(history.space.encode_many(fresh)) if fresh else iter(())
        for c, m, s in zip(candidates, mean, std):
            code = next(codes).tobytes() if c.key is None else None
            if c.horizon is not None and c.horizon != c.step:
                continue
            key = (c.key, c.step) if c.key is not None else (code, c.step)
            self._pending[key] = (NEW if c.key is None else LINEAGE,
                                  float(m) * history.y_std + history.y_mean, max(float(s) * history.y_std, 1e-12))
            self._pending.move_to_end(key)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)

    def factor(self, kind: str) -> float:
        """The multiplier of the predictive std for ``kind``, shrunk to 1 while errors are few."""
        errors = self._errors[kind]
        if not errors:
            return 1.0
        n = len(errors)
        ratio = float(np.median(np.fromiter(errors, float))) / _CHI2_MEDIAN
        variance = (self.prior_count + n * ratio) / (self.prior_count + n)
        low, high = self.bounds
        return min(max(math.sqrt(variance), low), high)

    def factors(self, candidates: Sequence[Candidate], shared: bool = False) -> np.ndarray:
        lineage = self.factor(LINEAGE)
        new = lineage if shared else self.factor(NEW)
        return np.array([new if c.key is None else lineage for c in candidates])

    def summary(self) -> dict[str, tuple[int, float]]:
        return {kind: (len(errors), self.factor(kind)) for kind, errors in self._errors.items()}


def _code(history: History, config) -> bytes:
    return history.space.encode(config).tobytes()
