"""The ``arch`` hub: mixed architectures, from a Fashion-MNIST pretraining or from scratch, fine-tuned on
Animal-MNIST: the cross-architecture case the graph metanetwork exists for.

Zoo: five architectures, each once pretrained on Fashion-MNIST and once a fresh initialisation:
a narrow GAP-CNN, a wide GAP-CNN with BN and GELU, a two-stage ResNet, a ViT (7x7 patches, 2 pre-norm
blocks) and an MLP (784-64-32). Grid = 10 models x batch_size {16,128} x lr {0.003,0.01,0.03,0.1} x
momentum {0.5,0.9} x weight_decay {1e-4,1e-2} x freeze_backbone {0,1} = 640 configs x 16 epochs.
(A frozen from-scratch backbone is a random-features baseline: a real choice with its own curve.)
Micro (``--micro``; scikit-learn digits only, for the tests): the same five families on 8x8 digits 0-4
-> 5-9, 4 zoo members x 8 configs x 4 epochs.
Needs ``pip install --no-deps animal-mnist`` and ``apt-get install -y dataset-fashion-mnist``.

    python -m bench.hubs.arch build [--micro] [--workers 2]
    python -m bench.hubs.arch verify [--micro] [--rebuild K]
    python -m bench.hubs.arch info [--micro]
"""

from __future__ import annotations

import sys
from typing import Any

from bench.hubs import data
from bench.hubs.recipe import Grid, HubRecipe, main

PRETRAIN = {"lr": 0.03, "weight_decay": 1e-4, "epochs": 2, "batch_size": 64, "momentum": 0.9}


def architectures(image: int, n_classes: int) -> dict[str, dict[str, Any]]:
    """The five families, sized for ``image`` x ``image`` one-channel inputs."""
    common = {"in_channels": 1, "n_classes": n_classes}
    return {
        "cnn-w4": {"family": "gap_cnn", "width": 4, "act": "relu", "bn": False, **common},
        "cnn-w12-bn-gelu": {"family": "gap_cnn", "width": 12, "act": "gelu", "bn": True, **common},
        "resnet-w8": {"family": "resnet", "width": 8, "stages": 2, **common},
        "vit-d32": {"family": "vit", "image_size": image, "patch": 7 if image % 7 == 0 else 4, "dim": 32,
                    "depth": 2, "heads": 4, **common},
        "mlp-64-32": {"family": "mlp", "in_features": image * image, "hidden": [64, 32],
                      "n_classes": n_classes},
    }


def zoo(image: int, n_classes: int, pretrain_epochs: int) -> tuple[dict[str, Any], ...]:
    """Each architecture twice: pretrained (even ids), then from scratch (odd ids)."""
    out = []
    for k, (name, arch) in enumerate(architectures(image, n_classes).items()):
        out.append({"name": f"{name}-pretrained", "arch": arch,
                    "pretrain": dict(PRETRAIN, epochs=pretrain_epochs, seed=2 * k)})
        out.append({"name": f"{name}-scratch", "arch": arch, "pretrain": dict(PRETRAIN, epochs=0, seed=2 * k + 1)})
    return tuple(out)


def recipe(micro: bool = False) -> HubRecipe:
    if micro:
        members = zoo(8, 5, pretrain_epochs=3)
        grid = Grid.of(model=(2, 5, 6, 8), batch_size=(32,), lr=(0.03, 0.1), momentum=(0.9,),
                       weight_decay=(1e-4,), freeze_backbone=(0, 1))
        return HubRecipe("arch-micro", data.digits_low_source, data.digits_high_target, members, grid,
                         n_epochs=4, seed=0, pretrain_all=False,
                         notes="smoke test of the mixed-architecture path: ResNet, ViT, MLP, CNN")
    members = zoo(28, 10, pretrain_epochs=PRETRAIN["epochs"])
    grid = Grid.of(model=tuple(range(len(members))), batch_size=(16, 128), lr=(0.003, 0.01, 0.03, 0.1),
                   momentum=(0.5, 0.9), weight_decay=(1e-4, 1e-2), freeze_backbone=(0, 1))
    return HubRecipe("arch", data.fashion_source, data.animal_target, members, grid, n_epochs=16, seed=0,
                     notes="mixed architectures, Fashion-MNIST pretraining or scratch -> Animal-MNIST "
                           "(2000 train / 1000 val / 2000 held-out test)")


if __name__ == "__main__":
    sys.exit(main(recipe))
