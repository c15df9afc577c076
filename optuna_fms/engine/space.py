"""Search-space encoding: configurations <-> points of the unit cube the surrogate reads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
import math
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter, described without Optuna.

    ``kind`` is ``"float"``, ``"int"`` or ``"categorical"``. Numeric dimensions use ``low``,
    ``high``, ``log`` and ``step`` (``None`` for continuous); categorical ones use ``choices``.
    """

    name: str
    kind: str
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    ordered: bool = False  # categorical of numbers: also encode the choice's rank in sorted order

    def __post_init__(self) -> None:
        if self.kind not in ("float", "int", "categorical"):
            raise ValueError(f"Dimension {self.name!r}: unknown kind {self.kind!r}.")
        if self.kind == "categorical" and not self.choices:
            raise ValueError(f"Dimension {self.name!r}: a categorical needs choices.")
        if self.kind != "categorical" and not self.low <= self.high:
            raise ValueError(f"Dimension {self.name!r}: low {self.low} > high {self.high}.")
        if self.log and self.low <= 0:
            raise ValueError(f"Dimension {self.name!r}: a log scale needs low > 0.")
        if self.ordered and not (self.kind == "categorical" and all(map(is_number, self.choices))):
            raise ValueError(f"Dimension {self.name!r}: only a categorical of numbers can be ordered.")

    @property
    def width(self) -> int:
        """Number of encoded columns: one per choice (one-hot, plus the rank when ordered) or one."""
        return len(self.choices) + self.ordered if self.kind == "categorical" else 1

    def rank(self, value: Any) -> float:
        """An ordered choice's position among the sorted choices, in [0, 1] (a geometric grid's
        rank is its log scale)."""
        levels = sorted(set(float(c) for c in self.choices))
        return levels.index(float(value)) / (len(levels) - 1) if len(levels) > 1 else 0.5


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class SearchSpace:
    """Encodes configurations into ``[0, 1]^width``: log scales honoured, categoricals one-hot."""

    def __init__(self, dimensions: Sequence[Dimension]) -> None:
        names = [d.name for d in dimensions]
        if len(set(names)) != len(names):
            raise ValueError(f"Duplicate dimension names in {names}.")
        self.dimensions: tuple[Dimension, ...] = tuple(dimensions)
        self.width = sum(d.width for d in self.dimensions)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and self.dimensions == other.dimensions

    def __hash__(self) -> int:
        return hash(self.dimensions)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    def encode(self, config: Mapping[str, Any]) -> np.ndarray:
        """One configuration -> a float vector of length ``width``."""
        out = np.zeros(self.width)
        col = 0
        for d in self.dimensions:
            value = config[d.name]
            if d.kind == "categorical":
                out[col + _choice_index(d, value)] = 1.0
                if d.ordered:
                    out[col + len(d.choices)] = d.rank(value)
            else:
                out[col] = _to_unit(d, float(value))
            col += d.width
        return out

    def encode_many(self, configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        if not configs:
            return np.zeros((0, self.width))
        # NOTE: the rows of one lineage share its config object: encode each object once (the
        # same vector; this was most of a decision's Python time at 10,000 observations).
        encoded: dict[int, np.ndarray] = {}
        return np.stack([encoded[id(c)] if id(c) in encoded else encoded.setdefault(id(c), self.encode(c))
                         for c in configs])

    def sample(self, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        """``n`` configurations drawn uniformly in the encoded (log-aware) space."""
        configs: list[dict[str, Any]] = [{} for _ in range(n)]
        for d in self.dimensions:
            if d.kind == "categorical":
                picks = rng.integers(len(d.choices), size=n)
                for c, i in zip(configs, picks):
                    c[d.name] = d.choices[int(i)]
            else:
                for c, u in zip(configs, rng.random(n)):
                    c[d.name] = _from_unit(d, float(u))
        return configs

    def perturb(
        self, config: Mapping[str, Any], rng: np.random.Generator, scale: float = 0.1
    ) -> dict[str, Any]:
        """A neighbour of ``config``: Gaussian steps in the unit scale, one categorical resample."""
        out = dict(config)
        for d in self.dimensions:
            if d.kind == "categorical":
                if rng.random() < 1.0 / max(len(self.dimensions), 1):
                    out[d.name] = d.choices[int(rng.integers(len(d.choices)))]
            else:
                u = _to_unit(d, float(config[d.name])) + rng.normal(0.0, scale)
                out[d.name] = _from_unit(d, _reflect(u))
        return out

    def contains(self, config: Mapping[str, Any]) -> bool:
        """Whether ``config`` sets every dimension to a value the space can encode."""
        for d in self.dimensions:
            if d.name not in config:
                return False
            value = config[d.name]
            if d.kind == "categorical":
                if not any(_same_choice(value, c) for c in d.choices):
                    return False
            elif not (isinstance(value, (int, float)) and d.low <= float(value) <= d.high):
                return False
        return True


def _reflect(u: float) -> float:
    """Fold ``u`` back into [0, 1]; clipping would pile local moves up on the bounds."""
    u = abs(u) % 2.0
    return 2.0 - u if u > 1.0 else u


def _same_choice(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b or (a is None and b is None)


def _choice_index(d: Dimension, value: Any) -> int:
    for i, c in enumerate(d.choices):
        if _same_choice(value, c):
            return i
    raise ValueError(f"{value!r} is not a choice of {d.name!r} {d.choices}.")


def _to_unit(d: Dimension, value: float) -> float:
    if d.high == d.low:
        return 0.5
    if d.log:
        u = (math.log(value) - math.log(d.low)) / (math.log(d.high) - math.log(d.low))
    else:
        u = (value - d.low) / (d.high - d.low)
    return min(max(u, 0.0), 1.0)


def _from_unit(d: Dimension, u: float) -> float | int:
    if d.log:
        value = math.exp(math.log(d.low) + u * (math.log(d.high) - math.log(d.low)))
    else:
        value = d.low + u * (d.high - d.low)
    if d.step is not None:
        value = d.low + round((value - d.low) / d.step) * d.step
    value = min(max(value, d.low), d.high)
    return int(round(value)) if d.kind == "int" else float(value)
