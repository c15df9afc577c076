"""Successive halving's promotion rule over frozen lineages: a model-free hedge for the policy."""

from __future__ import annotations

from collections import defaultdict

from optuna_fms.engine.history import History


def promotable(history: History, *, eta: int = 3, exclude: frozenset[int] = frozenset()) -> int | None:
    """The frozen lineage that asynchronous successive halving would promote next, or None.

    Every step is a rung. A lineage frozen after step ``s`` is promotable when its value at ``s``
    is among the best ``floor(n / eta)`` of the ``n`` lineages that reported step ``s``; the
    deepest promotable lineage wins (ASHA's order), ties by value, then by key.
    """
    at_step: dict[int, list[float]] = defaultdict(list)
    for lin in history.lineages:
        for step, value in zip(lin.steps, lin.values):
            at_step[step].append(value)
    max_steps = history.max_steps
    best: tuple[int, float, int] | None = None
    for lin in history.lineages:
        if not lin.thawable or not lin.steps or lin.key in exclude:
            continue
        if max_steps is not None and lin.next_step >= max_steps:
            continue
        step, value = lin.steps[-1], lin.values[-1]
        peers = sorted(at_step[step], reverse=True)
        top = len(peers) // eta
        if top == 0 or value < peers[top - 1]:
            continue
        rank = (step, value, -lin.key)
        if best is None or rank > best:
            best = rank
    return None if best is None else -best[2]
