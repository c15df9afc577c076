"""A prior's input layout: which columns a parameter takes, and how another search space fits in.

A surrogate pretrained on other studies reads configurations in its own layout: one *slot* per
parameter it was trained on (a :class:`Dimension`, encoded as :class:`SearchSpace` encodes it).
A new study's space is fitted into that layout by one rule (README, Transfer):

* a parameter is matched to the slot of the same name and the same kind of distribution
  (categorical; int or float, each on a log or a linear scale);
* it is read through the slot only where the distributions agree: a categorical whose choices
  are all among the slot's, a number whose range lies within the slot's (its value is then
  re-encoded on the slot's scale, so 0.01 means 0.01 in both studies);
* a slot that no parameter of the new space fills reads :data:`UNKNOWN`, which the feature
  extractor replaces by its learned "unknown" input;
* a parameter that fills no slot (a new name, or one whose distribution disagrees) gets columns
  of its own after the slots; the warm start gives them zero weights, so they start out
  neutral and are learned from the new study's data.

Everything is one affine map of the new space's encoding, so it runs on whole row matrices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
import math
from typing import Any

import numpy as np

from optuna_fms.engine.space import Dimension, SearchSpace, is_number

# NOTE: every encoded column lies in [0, 1] (unit scales, one-hot, ranks), so a negative value
# can only be this marker.
UNKNOWN = -1.0


def signature(d: Dimension) -> str:
    """The kind of distribution a slot holds: ``categorical``, ``float-log``, ``int-linear``..."""
    return "categorical" if d.kind == "categorical" else f"{d.kind}-{'log' if d.log else 'linear'}"


def agrees(d: Dimension, slot: Dimension) -> bool:
    """Whether ``slot`` can encode every value of ``d`` (same name and kind, choices or range within)."""
    if d.name != slot.name or signature(d) != signature(slot):
        return False
    if d.kind == "categorical":
        return all(any(_same(c, s) for s in slot.choices) for c in d.choices)
    return slot.low <= d.low and d.high <= slot.high


@dataclass(frozen=True)
class InputMap:
    """A space's encoding -> the layout's columns: ``x @ matrix + offset``, then UNKNOWN where unfilled.

    ``matched`` names the parameters read through a slot, ``unknown`` the slots left unknown and
    ``extra`` the parameters that got columns of their own.
    """

    matrix: np.ndarray  # [space.width, width]
    offset: np.ndarray  # [width]
    unknown_columns: np.ndarray  # [width] bool
    slot_width: int
    matched: tuple[str, ...]
    unknown: tuple[str, ...]
    extra: tuple[str, ...]

    @property
    def width(self) -> int:
        return len(self.offset)

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(x, dtype=float) @ self.matrix + self.offset
        out[:, self.unknown_columns] = UNKNOWN
        return out


class InputLayout:
    """The slots of a prior, in column order."""

    def __init__(self, slots: Sequence[Dimension]) -> None:
        keys = [(d.name, signature(d)) for d in slots]
        if len(set(keys)) != len(keys):
            raise ValueError(f"Duplicate slots in {keys}.")
        self.slots: tuple[Dimension, ...] = tuple(slots)
        self.width = sum(d.width for d in self.slots)

    @classmethod
    def union(cls, spaces: Sequence[SearchSpace], ordered_choices: bool = False) -> InputLayout:
        """One slot per (name, kind of distribution) over ``spaces``: the union of a categorical's
        choices (numbers sorted), the widest range of a number; in order of first appearance."""
        groups: dict[tuple[str, str], list[Dimension]] = {}
        for space in spaces:
            for d in space.dimensions:
                groups.setdefault((d.name, signature(d)), []).append(d)
        slots = []
        for (name, sig), dims in groups.items():
            if sig == "categorical":
                choices: list[Any] = []
                for d in dims:
                    choices += [c for c in d.choices if not any(_same(c, s) for s in choices)]
                numbers = all(map(is_number, choices))
                if numbers:
                    choices.sort(key=float)
                ordered = ordered_choices and numbers and len(choices) > 1
                slots.append(Dimension(name, "categorical", choices=tuple(choices), ordered=ordered))
            else:
                slots.append(Dimension(name, dims[0].kind, min(d.low for d in dims), max(d.high for d in dims),
                                       log=dims[0].log))
        return cls(slots)

    def input_map(self, space: SearchSpace) -> InputMap:
        """How ``space``'s encoding fills this layout (the module docstring's rule)."""
        by_key = {(s.name, signature(s)): s for s in self.slots}
        offsets, col = {}, 0
        for s in self.slots:
            offsets[s.name, signature(s)] = col
            col += s.width
        extra = [d for d in space.dimensions
                 if not ((d.name, signature(d)) in by_key and agrees(d, by_key[d.name, signature(d)]))]
        width = self.width + sum(d.width for d in extra)
        matrix, offset = np.zeros((space.width, width)), np.zeros(width)
        unknown = np.ones(width, dtype=bool)
        unknown[self.width:] = False
        matched, extra_names = [], {d.name for d in extra}
        extra_col, src = self.width, 0
        for d in space.dimensions:
            if d.name in extra_names:
                matrix[src:src + d.width, extra_col:extra_col + d.width] = np.eye(d.width)
                extra_col += d.width
            else:
                slot = by_key[d.name, signature(d)]
                at = offsets[d.name, signature(d)]
                _fill(matrix, offset, d, src, slot, at)
                unknown[at:at + slot.width] = False
                matched.append(d.name)
            src += d.width
        left = tuple(s.name for s in self.slots if unknown[offsets[s.name, signature(s)]])
        return InputMap(matrix, offset, unknown, self.width, tuple(matched), left, tuple(d.name for d in extra))

    def to_json(self) -> list[dict[str, Any]]:
        return [{"name": d.name, "kind": d.kind, "low": d.low, "high": d.high, "log": d.log,
                 "choices": list(d.choices), "ordered": d.ordered} for d in self.slots]

    @classmethod
    def from_json(cls, slots: Sequence[Mapping[str, Any]]) -> InputLayout:
        return cls([Dimension(s["name"], s["kind"], float(s["low"]), float(s["high"]), log=bool(s["log"]),
                              choices=tuple(s["choices"]), ordered=bool(s["ordered"])) for s in slots])


def _fill(matrix: np.ndarray, offset: np.ndarray, d: Dimension, src: int, slot: Dimension, at: int) -> None:
    """Columns ``src..`` of ``d``'s encoding -> slot columns ``at..`` (an agreeing pair)."""
    if d.kind == "categorical":
        for j, c in enumerate(d.choices):  # NOTE: d's own rank column, if any, is not read
            k = next(i for i, s in enumerate(slot.choices) if _same(c, s))
            matrix[src + j, at + k] = 1.0
            if slot.ordered:
                matrix[src + j, at + len(slot.choices)] = slot.rank(c)
        return
    # NOTE: the unit value u of d is the value low + u (high - low) (in logs on a log scale);
    # re-encoded on the slot's range that is again affine in u.
    scale = math.log if d.log else float
    s_lo, s_hi, lo, hi = scale(slot.low), scale(slot.high), scale(d.low), scale(d.high)
    if s_hi == s_lo:
        offset[at] += 0.5
        return
    matrix[src, at] = (hi - lo) / (s_hi - s_lo)
    offset[at] += (lo - s_lo) / (s_hi - s_lo)


def _same(a: Any, b: Any) -> bool:
    return (type(a) is type(b) and a == b) or (a is None and b is None)
