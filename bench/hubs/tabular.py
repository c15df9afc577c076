"""The ``tabular`` hub: MLPs and residual MLPs pretrained on a synthetic proxy of scikit-learn's diabetes
table, fine-tuned on the real table's disease-progression tertiles with little data (curves overfit).

Data (scikit-learn only): 442 patients, 10 standardised features, 3 classes (progression tertiles).
122 teacher patients define the source: 20,000 mixups of two teacher patients plus jitter, labelled by
tertiles of a noisy linear score (weights: the teacher patients' feature-progression correlations). The
other 320 patients are the target: 120 train / 120 val / 80 held-out test.
Zoo: twelve architectures (six MLPs of depth 1-3 and width 32-128 with ReLU/tanh/GELU/SiLU/ELU and no,
Layer or Batch norm; six residual MLPs of width 16-64 with 1-3 pre-LayerNorm blocks), each once pretrained
(even ids) and once a fresh initialisation (odd ids) = 24 members.
Grid = 8 members (four architectures, pretrained and scratch) x batch_size {8,32} x lr {0.01,0.03,0.1,0.3}
x momentum {0.5,0.9} x weight_decay {1e-4,1e-2} x freeze_backbone {0,1} = 512 configs x 12 epochs.
Full build here: 333 s wall (zoo 80 s, fine-tuning 243 s) with 2 workers on 2 vCPUs shared with other
jobs (load ~5); 239 MB of checkpoints. Curve statistics: bench/README.md (Hubs).
Micro (``--micro``, for the tests): 4 members x 8 configs x 4 epochs on a 4,000-row source.

    python -m bench.hubs.tabular build [--micro] [--workers 2]
    python -m bench.hubs.tabular verify [--micro] [--rebuild K]
    python -m bench.hubs.tabular info [--micro]
"""

from __future__ import annotations

import sys
from typing import Any

from bench.hubs import data
from bench.hubs.recipe import Grid, HubRecipe, main, pretrained_and_scratch

N_FEATURES, N_CLASSES = 10, 3
PRETRAIN_LRS = (0.01, 0.03, 0.1)


def architectures() -> dict[str, dict[str, Any]]:
    """The twelve architectures; the first four are the grid's."""
    mlp = lambda hidden, act, norm: {"family": "mlp", "in_features": N_FEATURES, "hidden": list(hidden),  # noqa: E731
                                     "act": act, "norm": norm, "n_classes": N_CLASSES}
    res = lambda width, blocks, act: {"family": "resmlp", "in_features": N_FEATURES, "width": width,  # noqa: E731
                                      "blocks": blocks, "act": act, "n_classes": N_CLASSES}
    return {
        "mlp-32x2-tanh-ln": mlp((32, 32), "tanh", "layer"), "mlp-64x2-gelu-bn": mlp((64, 64), "gelu", "batch"),
        "resmlp-32x2-gelu": res(32, 2, "gelu"), "resmlp-64x1-tanh": res(64, 1, "tanh"),
        "mlp-64-relu": mlp((64,), "relu", "none"), "mlp-32x3-relu-ln": mlp((32, 32, 32), "relu", "layer"),
        "mlp-128-silu": mlp((128,), "silu", "none"), "mlp-64-32-elu-bn": mlp((64, 32), "elu", "batch"),
        "resmlp-32x1-relu": res(32, 1, "relu"), "resmlp-64x2-relu": res(64, 2, "relu"),
        "resmlp-16x3-gelu": res(16, 3, "gelu"), "resmlp-48x2-silu": res(48, 2, "silu"),
    }


def zoo(pretrain_epochs: tuple[int, ...] = (2, 4)) -> tuple[dict[str, Any], ...]:
    """Each architecture pretrained (even id; lr and epochs cycle) and from scratch (odd id)."""
    return pretrained_and_scratch(architectures(), lambda k: {
        "lr": PRETRAIN_LRS[k % 3], "weight_decay": 1e-4, "epochs": pretrain_epochs[k % len(pretrain_epochs)],
        "batch_size": 64, "momentum": 0.9})


def micro_source() -> data.Split:
    """A 4,000-row source, so that the micro hub pretrains in a second."""
    return data.diabetes_source(4000)


def recipe(micro: bool = False) -> HubRecipe:
    if micro:
        grid = Grid.of(model=(0, 1, 4, 5), batch_size=(16,), lr=(0.03, 0.3), momentum=(0.9,),
                       weight_decay=(1e-4,), freeze_backbone=(0,))
        return HubRecipe("tabular-micro", micro_source, data.diabetes_target, zoo((1,)), grid, n_epochs=4,
                         pretrain_all=False, notes="smoke test of the tabular path: MLP and residual MLP")
    grid = Grid.of(model=tuple(range(8)), batch_size=(8, 32), lr=(0.01, 0.03, 0.1, 0.3), momentum=(0.5, 0.9),
                   weight_decay=(1e-4, 1e-2), freeze_backbone=(0, 1))
    return HubRecipe("tabular", data.diabetes_source, data.diabetes_target, zoo(), grid, n_epochs=12, seed=0,
                     notes="synthetic diabetes proxy -> sklearn diabetes progression tertiles "
                           "(120 train / 120 val / 80 held-out test)")


if __name__ == "__main__":
    sys.exit(main(recipe))
