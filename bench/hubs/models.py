"""Small model families for the hubs; plain ``nn.Module`` s that ``torch.fx.symbolic_trace`` can trace.

* :func:`gap_cnn` - ``nn.Sequential`` of Conv/[BN]/act/[pool] blocks -> ``AdaptiveAvgPool2d(1)`` -> Flatten
  -> Linear, so every parameter is a neuron-to-neuron weight (no spatial flatten; GMN/NFN-friendly).
* :class:`MiniResNet` (BasicBlocks), :class:`TinyViT` (``nn.TransformerEncoderLayer``, batch_first, mean
  pooling) and :func:`mlp`, for the ``arch`` hub.
* :func:`mlp` with a norm per hidden layer and :class:`ResMLP` (pre-LayerNorm residual blocks), for the
  ``tabular`` hub; :class:`TokenTransformer` and :class:`TokenCNN` (``nn.Embedding`` over token ids), for
  the ``tokens`` hub.

:func:`build_model` makes any of them from a JSON-able spec ``{"family": ..., **kwargs}``; by convention
the classification head is the last child module (``head_name``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU,
}


def _act(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}") from None


def gap_cnn(width: int = 8, act: str = "relu", bn: bool = False, in_channels: int = 1,
            n_classes: int = 10, channels: tuple[int, ...] = (1, 2, 2),
            pool: tuple[bool, ...] = (True, True, False)) -> nn.Sequential:
    """Conv3x3 blocks with ``width * channels[i]`` filters, optional BN and 2x2 max-pool, then GAP + Linear.

    The default (w=8) has 3 blocks 8/16/16 wide: 3,738 parameters on 1-channel input with 10 classes."""
    if len(channels) != len(pool):
        raise ValueError("channels and pool need one entry per conv block")
    layers: list[nn.Module] = []
    c_in = in_channels
    for mult, do_pool in zip(channels, pool):
        c_out = width * mult
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=1))
        if bn:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(_act(act))
        if do_pool:
            layers.append(nn.MaxPool2d(2))
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1-conv shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, act: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = _act(act)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = _act(act)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class MiniResNet(nn.Module):
    """Stem conv -> one BasicBlock per stage (stride 2 after the first) -> GAP -> Linear ``head``."""

    def __init__(self, width: int = 16, stages: int = 2, act: str = "relu", in_channels: int = 1,
                 n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  _act(act))
        blocks, c = [], width
        for s in range(stages):
            c_out = width * 2 ** s
            blocks.append(BasicBlock(c, c_out, 1 if s == 0 else 2, act))
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))))


def encoder_layers(dim: int, heads: int, mlp_ratio: int, depth: int) -> nn.ModuleList:
    """``depth`` pre-norm GELU ``nn.TransformerEncoderLayer`` s (batch_first, no dropout)."""
    return nn.ModuleList(
        nn.TransformerEncoderLayer(dim, heads, dim * mlp_ratio, dropout=0.0, activation="gelu",
                                   batch_first=True, norm_first=True) for _ in range(depth))


class TinyViT(nn.Module):
    """Patch-embedding conv + learned position embedding -> ``depth`` pre-norm
    ``nn.TransformerEncoderLayer`` s (batch_first) -> mean over tokens -> LayerNorm -> Linear ``head``.

    NOTE: positions are an ``nn.Embedding`` looked up by ``arange`` (not a raw ``nn.Parameter``), so the
    parameter graph builder sees a layer it supports: one token node per position.
    """

    def __init__(self, image_size: int = 28, patch: int = 7, dim: int = 32, depth: int = 2, heads: int = 4,
                 mlp_ratio: int = 2, in_channels: int = 1, n_classes: int = 10) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError("image_size must be a multiple of patch")
        self.n_tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos = nn.Embedding(self.n_tokens, dim)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.layers = encoder_layers(dim, heads, mlp_ratio, depth)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = self.pos(torch.arange(self.n_tokens, device=x.device))
        tokens = self.embed(x).flatten(2).transpose(1, 2) + positions
        for layer in self.layers:
            tokens = layer(tokens)
        return self.head(self.norm(tokens.mean(dim=1)))


NORMS: dict[str, Callable[[int], nn.Module]] = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d}


def mlp(in_features: int = 784, hidden: tuple[int, ...] = (32, 32), act: str = "relu",
        n_classes: int = 10, norm: str = "none") -> nn.Sequential:
    """Flatten -> (Linear, [norm], act) per hidden layer -> Linear; ``norm`` is none, layer or batch."""
    if norm != "none" and norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {['none', *sorted(NORMS)]}")
    layers: list[nn.Module] = [nn.Flatten()]
    c = in_features
    for h in hidden:
        layers.append(nn.Linear(c, h))
        if norm != "none":
            layers.append(NORMS[norm](h))
        layers.append(_act(act))
        c = h
    layers.append(nn.Linear(c, n_classes))
    return nn.Sequential(*layers)


class ResidualMLPBlock(nn.Module):
    """x + Linear(act(Linear(LayerNorm(x)))), the hidden layer ``expand`` times wider."""

    def __init__(self, width: int, act: str = "relu", expand: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width * expand)
        self.act = _act(act)
        self.fc2 = nn.Linear(width * expand, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResMLP(nn.Module):
    """Linear stem -> ``blocks`` residual MLP blocks -> LayerNorm -> Linear ``head`` (tabular inputs)."""

    def __init__(self, in_features: int = 10, width: int = 32, blocks: int = 2, act: str = "relu",
                 n_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(*(ResidualMLPBlock(width, act) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))))


class TokenTransformer(nn.Module):
    """Token and position ``nn.Embedding`` s -> ``depth`` pre-norm ``nn.TransformerEncoderLayer`` s
    (batch_first) -> mean over positions -> LayerNorm -> Linear ``head``; input: int64 ``[batch, length]``."""

    def __init__(self, vocab: int = 12, length: int = 20, dim: int = 32, depth: int = 2, heads: int = 4,
                 mlp_ratio: int = 2, n_classes: int = 4) -> None:
        super().__init__()
        self.length = length
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(length, dim)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.layers = encoder_layers(dim, heads, mlp_ratio, depth)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x) + self.pos(torch.arange(self.length, device=x.device))
        for layer in self.layers:
            tokens = layer(tokens)
        return self.head(self.norm(tokens.mean(dim=1)))


class TokenCNN(nn.Module):
    """Token ``nn.Embedding`` -> Conv1d blocks (kernel ``kernel``, same padding) -> average over positions
    -> Linear ``head``; input: int64 ``[batch, length]``."""

    def __init__(self, vocab: int = 12, dim: int = 16, width: int = 32, depth: int = 2, kernel: int = 3,
                 act: str = "relu", n_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        convs: list[nn.Module] = []
        c = dim
        for _ in range(depth):
            convs += [nn.Conv1d(c, width, kernel, padding=kernel // 2), _act(act)]
            c = width
        self.convs = nn.Sequential(*convs)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.convs(self.embed(x).transpose(1, 2))))


FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "gap_cnn": gap_cnn, "resnet": MiniResNet, "vit": TinyViT, "mlp": mlp, "resmlp": ResMLP,
    "token_transformer": TokenTransformer, "token_cnn": TokenCNN,
}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate ``{"family": name, **kwargs}``; lists in the spec (from JSON) become tuples."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "family"}
    try:
        factory = FAMILIES[spec["family"]]
    except KeyError:
        raise ValueError(f"unknown model family {spec.get('family')!r}; choose from {sorted(FAMILIES)}") from None
    return factory(**kwargs)


def head_name(model: nn.Module) -> str:
    """Name of the last child module: the classification head of every family here."""
    return list(model.named_children())[-1][0]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
