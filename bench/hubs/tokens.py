"""The ``tokens`` hub: small token models pretrained on one rule of a seeded synthetic language and
fine-tuned on a related rule with little data (no offline text data set ships in any package).

Language: 16 tokens per sequence over a vocabulary of 12: markers 0-3 (p = 0.35), a trigger 4 (p = 0.15)
and fillers 5-11 (p = 0.5), drawn from fixed seeds, so identical on every machine.
Source (8,000 sequences: 6,000 train / 1,000 val / 1,000 test): the most frequent marker of the sequence (4 classes).
Target (128 train / 256 val / 256 held-out test): the most frequent marker among the tokens that directly
follow a trigger: the counting transfers, which tokens to count must be learnt.
Zoo: twelve architectures (six transformer encoders: token + position ``nn.Embedding``, 1-2 pre-norm
``nn.TransformerEncoderLayer`` s of width 16-32, mean pooling; six 1-D CNNs: ``nn.Embedding`` -> 1-3
Conv1d of kernel 3 or 5 -> average pooling), each pretrained (even ids) and from scratch (odd ids) = 24.
Grid = 8 members (four architectures, pretrained and scratch) x batch_size {16,64} x lr {0.01,0.03,0.1}
x momentum {0.5,0.9} x weight_decay {1e-4,1e-2} x freeze_backbone {0,1} = 384 configs x 12 epochs.
Full build here: 410 s wall (zoo 66 s, fine-tuning 339 s) with 2 workers on 2 vCPUs shared with other
jobs (load ~5); 121 MB of checkpoints. Curve statistics: bench/README.md (Hubs).
Micro (``--micro``, for the tests): 4 members x 8 configs x 4 epochs on a 3,000-sequence source.

    python -m bench.hubs.tokens build [--micro] [--workers 2]
    python -m bench.hubs.tokens verify [--micro] [--rebuild K]
    python -m bench.hubs.tokens info [--micro]
"""

from __future__ import annotations

import sys
from typing import Any

from bench.hubs import data
from bench.hubs.recipe import Grid, HubRecipe, main, pretrained_and_scratch

PRETRAIN_LRS = (0.03, 0.1)


def architectures() -> dict[str, dict[str, Any]]:
    """The twelve architectures; the first four are the grid's."""
    common = {"vocab": data.TOKEN_VOCAB, "n_classes": data.TOKEN_CLASSES}
    tf = lambda dim, depth, heads: {"family": "token_transformer", "length": data.TOKEN_LENGTH, "dim": dim,  # noqa: E731
                                    "depth": depth, "heads": heads, **common}
    cnn = lambda dim, width, depth, kernel, act: {"family": "token_cnn", "dim": dim, "width": width,  # noqa: E731
                                                  "depth": depth, "kernel": kernel, "act": act, **common}
    return {
        "tf-d24x2": tf(24, 2, 4), "tf-d16x1": tf(16, 1, 2),
        "cnn-32x2-k3-relu": cnn(16, 32, 2, 3, "relu"), "cnn-24x1-k5-gelu": cnn(16, 24, 1, 5, "gelu"),
        "tf-d32x1": tf(32, 1, 4), "tf-d16x2": tf(16, 2, 2), "tf-d24x1": tf(24, 1, 2), "tf-d32x2": tf(32, 2, 4),
        "cnn-32x3-k3-gelu": cnn(16, 32, 3, 3, "gelu"), "cnn-16x2-k5-relu": cnn(8, 16, 2, 5, "relu"),
        "cnn-48x1-k3-tanh": cnn(16, 48, 1, 3, "tanh"), "cnn-32x2-k5-silu": cnn(16, 32, 2, 5, "silu"),
    }


def zoo(pretrain_epochs: tuple[int, ...] = (2, 3)) -> tuple[dict[str, Any], ...]:
    """Each architecture pretrained (even id; lr and epochs cycle) and from scratch (odd id)."""
    return pretrained_and_scratch(architectures(), lambda k: {
        "lr": PRETRAIN_LRS[k % 2], "weight_decay": 1e-4,
        "epochs": pretrain_epochs[(k // 2) % len(pretrain_epochs)], "batch_size": 64, "momentum": 0.9})


def micro_source() -> data.Split:
    """A 4,000-sequence source, so that the micro hub pretrains in seconds."""
    return data.tokens_source(3000)


def recipe(micro: bool = False) -> HubRecipe:
    if micro:
        grid = Grid.of(model=(0, 1, 4, 5), batch_size=(32,), lr=(0.03, 0.1), momentum=(0.9,),
                       weight_decay=(1e-4,), freeze_backbone=(0,))
        return HubRecipe("tokens-micro", micro_source, data.tokens_target, zoo((1,)), grid, n_epochs=4,
                         pretrain_all=False, notes="smoke test of the token path: transformer and 1-D CNN")
    grid = Grid.of(model=tuple(range(8)), batch_size=(16, 64), lr=(0.01, 0.03, 0.1), momentum=(0.5, 0.9),
                   weight_decay=(1e-4, 1e-2), freeze_backbone=(0, 1))
    return HubRecipe("tokens", data.tokens_source, data.tokens_target, zoo(), grid, n_epochs=12, seed=0,
                     notes="synthetic language: majority marker -> majority marker after a trigger "
                           "(128 train / 256 val / 256 held-out test)")


if __name__ == "__main__":
    sys.exit(main(recipe))
