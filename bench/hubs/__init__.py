"""Deterministic benchmark hubs for Forecasting Model Search (FMS).

A hub is a recipe: a zoo of pretrained models plus a full-factorial fine-tuning grid whose per-epoch
learning curves (committed JSON tables under ``bench/hubs/tables``) and checkpoints (local cache under
``bench/cache/<hub>``, rebuildable and verifiable by sha256) form a tabular freeze-thaw HPO benchmark.

Entry points: ``python -m bench.hubs.digits build|verify|info`` (same for ``bench.hubs.animal``,
``bench.hubs.arch``, the mixed-architecture hub, ``bench.hubs.tabular``, MLPs on a small table whose
curves overfit, and ``bench.hubs.tokens``, token models on a synthetic language),
:func:`bench.hubs.recipe.build_micro_hub` and :class:`bench.hubs.recipe.HubTable`.
"""

from typing import Any

__all__ = ["HubTable", "build_micro_hub"]


def __getattr__(name: str) -> Any:  # lazy, so that ``bench.hubs.data`` does not import torch
    if name in __all__:
        from bench.hubs import recipe

        return getattr(recipe, name)
    raise AttributeError(name)
