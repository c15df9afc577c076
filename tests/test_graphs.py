"""Tests for optuna_fms.graphs: architecture description, graph structure, errors, cache."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from optuna_fms.graphs import (
    EDGE_FEATURE_DIM,
    NODE_FEATURE_DIM,
    GraphCache,
    ParameterGraph,
    UnsupportedLayerError,
    build_graph,
    describe_architecture,
    graph_from_module,
)
from optuna_fms.graphs.schema import (
    EDGE_RESIDUAL,
    EF_KX,
    EF_KY,
    EF_TYPE,
    EF_VALUE,
    NF_BIAS,
    NF_GAMMA,
    NF_POSITION,
    NF_TYPE,
    NODE_ATTN_HEAD,
    WEIGHT_EDGE_TYPES,
)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = BasicBlock(8, 8)
        self.block2 = BasicBlock(8, 12, stride=2)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.emb(tokens).mean(dim=1))


class SelfAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 12, 3, stride=2), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))


def encoder() -> nn.Module:
    return nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)


def weight_scalars(module: nn.Module) -> int:
    """Scalars in weight matrices/kernels (not biases, not norm affine terms)."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
    return sum(p.numel() for m in module.modules() if not isinstance(m, norms)
               for n, p in m.named_parameters(recurse=False) if "bias" not in n)


def check_common(g: ParameterGraph) -> None:
    assert g.node_features.shape == (g.num_nodes, NODE_FEATURE_DIM)
    assert g.edge_features.shape == (g.num_edges, EDGE_FEATURE_DIM)
    assert g.edge_index.dtype == torch.long and g.edge_index.shape == (2, g.num_edges)
    assert int(g.edge_index.max()) < g.num_nodes
    touched = torch.zeros(g.num_nodes, dtype=torch.bool)
    touched[g.edge_index.reshape(-1)] = True
    assert touched.all(), "every node has an edge"
    assert (g.edge_index[0] != g.edge_index[1]).all(), "no self loops"


def count(g: ParameterGraph, types: tuple[int, ...] | int) -> int:
    types = (types,) if isinstance(types, int) else types
    return int(torch.isin(g.edge_features[:, EF_TYPE].long(), torch.tensor(types)).sum())


def test_mlp_structure() -> None:
    m = mlp()
    g = graph_from_module(m)
    check_common(g)
    assert g.num_nodes == 5 + 16 + 16 + 3
    assert g.num_edges == count(g, WEIGHT_EDGE_TYPES) == weight_scalars(m) == 5 * 16 + 16 * 16 + 48
    pos = g.node_features[:, NF_POSITION]
    assert pos[:5].tolist() == list(range(5)) and pos[-3:].tolist() == [0, 1, 2]
    assert (pos[5:-3] == -1).all(), "hidden neurons carry no identity"
    assert torch.equal(g.node_features[5:21, NF_BIAS], m[0].bias.detach())
    # edge (input j -> neuron o) carries W[o, j]
    w = m[0].weight.detach()
    src, dst = g.edge_index[:, :80]
    assert torch.equal(g.edge_features[:80, EF_VALUE], w[dst - 5, src])


def test_cnn_structure() -> None:
    m = cnn()
    g = graph_from_module(m)
    check_common(g)
    assert g.num_nodes == 3 + 8 + 12 + 10
    assert count(g, WEIGHT_EDGE_TYPES) == g.num_edges == weight_scalars(m)
    assert torch.equal(g.node_features[3:11, NF_GAMMA], m[1].weight.detach())
    kx, ky = g.edge_features[:216, EF_KX], g.edge_features[:216, EF_KY]
    assert set(kx.tolist()) == set(ky.tolist()) == {-1.0, 0.0, 1.0}


def test_resnet_structure() -> None:
    m = ResNet()
    g = graph_from_module(m)
    check_common(g)
    # stem 8, block1 conv1 8 (conv2 output = residual stream, shared), block2 conv1 12, conv2 12,
    # shortcut 12 (its nodes carry the sum)
    assert g.num_nodes == 3 + 8 + 8 + 8 + 12 + 12 + 12 + 5
    assert count(g, EDGE_RESIDUAL) == 8 + 12
    assert g.num_edges == weight_scalars(m) + 8 + 12


def test_embedding_structure() -> None:
    m = TokenModel()
    g = graph_from_module(m)
    check_common(g)
    assert g.num_nodes == 20 + 8 + 4
    assert g.num_edges == weight_scalars(m)
    assert g.node_features[:20, NF_POSITION].tolist() == list(range(20)), "token identity kept"


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_structure(norm_first: bool) -> None:
    m = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=norm_first)
    g = graph_from_module(m)
    check_common(g)
    # input 16, q/k/v 48, heads 4, attention out 16, ffn hidden 32, ffn out 16
    assert g.num_nodes == 16 + 48 + 4 + 16 + 32 + 16
    assert count(g, WEIGHT_EDGE_TYPES) == weight_scalars(m) == 4 * 256 + 2 * 512
    assert count(g, EDGE_RESIDUAL) == 32
    assert g.num_edges == weight_scalars(m) + 32 + 3 * 16  # + q-k pairing, k->head, head->v
    assert int((g.node_features[:, NF_TYPE] == NODE_ATTN_HEAD).sum()) == 4


def test_multihead_attention_structure() -> None:
    for m, n_in in ((SelfAttention(), 16), (nn.MultiheadAttention(16, 4), 3 * 16)):
        g = graph_from_module(m)
        check_common(g)
        assert g.num_nodes == n_in + 48 + 4 + 16
        assert count(g, WEIGHT_EDGE_TYPES) == weight_scalars(m) == 4 * 256


@pytest.mark.parametrize("factory", [mlp, cnn, ResNet, TokenModel, encoder, SelfAttention])
def test_round_trip_through_json(factory) -> None:
    m = factory()
    arch = json.loads(json.dumps(describe_architecture(m)))
    assert build_graph(m.state_dict(), arch).equals(graph_from_module(m))


def test_unsupported_layers() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4))

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x)

    with pytest.raises(UnsupportedLayerError, match=r"LSTM.*'body\.1'"):
        describe_architecture(Net())

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(4))

        def forward(self, x: Tensor) -> Tensor:
            return x * self.s

    with pytest.raises(UnsupportedLayerError, match=r"Scale.*'1'"):
        describe_architecture(nn.Sequential(nn.Linear(3, 4), Scale()))

    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)

        def forward(self, x: Tensor) -> Tensor:
            return torch.cat([self.a(x), self.b(x)], -1)

    with pytest.raises(UnsupportedLayerError, match="cat"):
        describe_architecture(Cat())
    with pytest.raises(UnsupportedLayerError, match="expects 32 input features"):
        describe_architecture(nn.Sequential(nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(32, 2)))
    assert issubclass(UnsupportedLayerError, ValueError)


def test_bad_state_dicts() -> None:
    m = cnn()
    arch = describe_architecture(m)
    sd = dict(m.state_dict())
    sd["4.weight"] = torch.zeros(12, 8, 5, 5)
    with pytest.raises(ValueError, match=r"'4\.weight'.*\(12, 8, 5, 5\).*\(12, 8, 3, 3\)"):
        build_graph(sd, arch)
    sd = dict(m.state_dict())
    sd["1.running_var"] = sd["1.running_var"].clone()
    sd["1.running_var"][3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*'1\.running_var'"):
        build_graph(sd, arch)
    sd = dict(m.state_dict())
    del sd["9.bias"]
    with pytest.raises(ValueError, match=r"'9\.bias'"):
        build_graph(sd, arch)
    with pytest.raises(ValueError, match="max_edges"):
        build_graph(m.state_dict(), arch, max_edges=100)


def test_float64_and_pyg() -> None:
    g = graph_from_module(mlp().double(), dtype=torch.float64)
    assert g.node_features.dtype == g.edge_features.dtype == torch.float64
    data = g.to_pyg()
    assert data.num_nodes == g.num_nodes and data.edge_attr.shape[0] == g.num_edges


def test_cache_builds_once() -> None:
    cache = GraphCache(maxsize=2)
    m = mlp()
    calls = []

    def builder() -> ParameterGraph:
        calls.append(1)
        return graph_from_module(m)

    g1 = cache.get_or_build("sha-a", builder)
    g2 = cache.get_or_build("sha-a", builder)
    assert g1 is g2 and len(calls) == 1 and "sha-a" in cache
    cache.get_or_build("sha-b", builder)
    cache.get_or_build("sha-a", builder)  # refreshes a
    cache.get_or_build("sha-c", builder)  # evicts b
    assert len(calls) == 3 and len(cache) == 2 and "sha-b" not in cache and "sha-a" in cache


def test_grouped_conv1d_groupnorm_and_double_norm() -> None:
    m = nn.Sequential(nn.Conv1d(2, 4, 3, groups=2), nn.GroupNorm(2, 4), nn.ReLU(),
                      nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                      nn.Linear(6, 3), nn.LayerNorm(3), nn.LayerNorm(3))
    g = graph_from_module(m)
    check_common(g)
    assert g.num_nodes == 2 + 4 + 6 + 3 + 3  # the second LayerNorm gets an identity copy
    assert count(g, WEIGHT_EDGE_TYPES) == weight_scalars(m) == 12 + 24 + 18
    assert g.num_edges == 54 + 3
    # grouped conv: channels 0-1 read input 0 only, channels 2-3 input 1 only
    src, dst = g.edge_index[:, :12]
    assert torch.equal(src, (dst - 2) // 2)
    assert build_graph(m.state_dict(), json.loads(json.dumps(describe_architecture(m)))).equals(g)


def test_graphs_package_does_not_import_optuna() -> None:
    import ast
    from pathlib import Path

    import optuna_fms.graphs as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "optuna" or n.startswith("optuna.") for n in names), path
