"""The ``animal`` hub: GAP-CNNs pretrained on Fashion-MNIST, fine-tuned on Animal-MNIST.

Full: zoo of 48 (width {4,8,12} x act {relu,tanh,gelu} x BN, pretraining lr/wd/epochs drawn per member);
grid = 4 diverse zoo members x batch_size {16,128} x lr geomspace(0.003, 0.3, 4) x momentum {0.1,0.5,0.9}
x weight_decay {1e-4,1e-2} x freeze_backbone {0,1} = 384 configs x 16 epochs.
Micro (``--micro``, a smoke test of the data path): 2 zoo members x 8 configs x 4 epochs.
Needs ``pip install --no-deps animal-mnist`` and ``apt-get install -y dataset-fashion-mnist``.

    python -m bench.hubs.animal build [--micro] [--workers 2]
    python -m bench.hubs.animal verify [--micro] [--rebuild K]
    python -m bench.hubs.animal info [--micro]
"""

from __future__ import annotations

import sys

from bench.hubs import data
from bench.hubs.recipe import Grid, HubRecipe, main, make_zoo, pick_diverse

LR_GEOM4 = (0.003, 0.01392, 0.06463, 0.3)  # geomspace(3e-3, 0.3, 4) to 4 significant digits


def recipe(micro: bool = False) -> HubRecipe:
    zoo = tuple(make_zoo(48, seed=28))
    models = tuple(pick_diverse(zoo, 4))
    if micro:
        grid = Grid.of(model=models[:2], batch_size=(64,), lr=(0.01392, 0.06463), momentum=(0.9,),
                       weight_decay=(1e-4,), freeze_backbone=(0, 1))
        return HubRecipe("animal-micro", data.fashion_source, data.animal_target, zoo, grid, n_epochs=4,
                         pretrain_all=False, notes="smoke test of the animal data path")
    grid = Grid.of(model=models, batch_size=(16, 128), lr=LR_GEOM4, momentum=(0.1, 0.5, 0.9),
                   weight_decay=(1e-4, 1e-2), freeze_backbone=(0, 1))
    return HubRecipe("animal", data.fashion_source, data.animal_target, zoo, grid, n_epochs=16, seed=0,
                     notes="Fashion-MNIST -> Animal-MNIST (2000 train / 1000 val / 2000 held-out test)")


if __name__ == "__main__":
    sys.exit(main(recipe))
