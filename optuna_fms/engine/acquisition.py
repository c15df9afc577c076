"""Multi-fidelity expected improvement with a per-budget incumbent (DyHPO's rule)."""

from __future__ import annotations

import math

import numpy as np

_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


def expected_improvement(mean: np.ndarray, std: np.ndarray, incumbent: np.ndarray) -> np.ndarray:
    """EI of maximization, elementwise; zero where the standard deviation vanishes."""
    mean, std, incumbent = np.broadcast_arrays(
        np.asarray(mean, float), np.asarray(std, float), np.asarray(incumbent, float)
    )
    ei = np.maximum(mean - incumbent, 0.0)
    ok = std > 1e-12
    z = (mean[ok] - incumbent[ok]) / std[ok]
    cdf = 0.5 * (1.0 + _erf(z / _SQRT2))
    pdf = np.exp(-0.5 * z * z) / _SQRT2PI
    ei = ei.astype(float)
    ei[ok] = (mean[ok] - incumbent[ok]) * cdf + std[ok] * pdf
    return np.maximum(ei, 0.0)


def incumbents(
    candidate_budgets: np.ndarray, observed_budgets: np.ndarray, observed_values: np.ndarray
) -> np.ndarray:
    """The value each candidate must beat: the best observed at its own budget.

    When nothing has been observed at that budget yet, the best at any smaller budget is used,
    and failing that the best overall.
    """
    out = np.empty(len(candidate_budgets))
    best_overall = observed_values.max() if len(observed_values) else 0.0
    for i, b in enumerate(candidate_budgets):
        same = observed_values[observed_budgets == b]
        if len(same):
            out[i] = same.max()
            continue
        lower = observed_values[observed_budgets < b]
        out[i] = lower.max() if len(lower) else best_overall
    return out


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[float])(x) if len(x) else np.zeros(0)
