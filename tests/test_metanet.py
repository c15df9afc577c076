"""Tests for optuna_fms.graphs.metanet: shapes, batching, devices and permutation invariance."""

from __future__ import annotations

import copy

import pytest
import torch
from test_graphs import ResNet, TokenModel, cnn, mlp
from torch import Tensor, nn
from torch_geometric.data import Batch

from optuna_fms.graphs import GraphMetanetwork, ParameterGraph, graph_from_module

Perms = list[tuple[str, int, Tensor]]  # (state-dict key, dim, permutation)


class Transformer(nn.Module):
    """Input projection, a post-norm and a pre-norm encoder layer, mean over tokens, head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.enc1 = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc2 = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True,
                                               norm_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.enc2(self.enc1(self.inp(x))).mean(dim=1))


def permuted(model: nn.Module, perms: Perms) -> nn.Module:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for key, dim, p in perms:
        sd[key] = sd[key].index_select(dim, p)
    out = copy.deepcopy(model)
    out.load_state_dict(sd)
    return out


def produce(prefix: str, p: Tensor, bias: bool = True) -> Perms:
    return [(f"{prefix}.weight", 0, p)] + ([(f"{prefix}.bias", 0, p)] if bias else [])


def bn(prefix: str, p: Tensor) -> Perms:
    return [(f"{prefix}.{a}", 0, p) for a in ("weight", "bias", "running_mean", "running_var")]


def consume(key: str, p: Tensor) -> Perms:
    return [(key, 1, p)]


def mlp_perms(g: torch.Generator) -> Perms:
    p1, p2 = torch.randperm(16, generator=g), torch.randperm(16, generator=g)
    return (produce("0", p1) + consume("2.weight", p1) + produce("2", p2)
            + consume("4.weight", p2))


def cnn_perms(g: torch.Generator) -> Perms:
    p1, p2 = torch.randperm(8, generator=g), torch.randperm(12, generator=g)
    return (produce("0", p1) + bn("1", p1) + consume("4.weight", p1) + produce("4", p2)
            + bn("5", p2) + consume("9.weight", p2))


def resnet_perms(g: torch.Generator) -> Perms:
    s, q1 = torch.randperm(8, generator=g), torch.randperm(8, generator=g)
    q2, r = torch.randperm(12, generator=g), torch.randperm(12, generator=g)
    return (  # stream s: stem and block1's output; r: block2's output (conv2 and shortcut)
        produce("stem.0", s) + bn("stem.1", s) + consume("block1.conv1.weight", s)
        + produce("block1.conv2", s, bias=False) + bn("block1.bn2", s)
        + consume("block2.conv1.weight", s) + consume("block2.shortcut.0.weight", s)
        + produce("block1.conv1", q1, bias=False) + bn("block1.bn1", q1)
        + consume("block1.conv2.weight", q1)
        + produce("block2.conv1", q2, bias=False) + bn("block2.bn1", q2)
        + consume("block2.conv2.weight", q2)
        + produce("block2.conv2", r, bias=False) + bn("block2.bn2", r)
        + produce("block2.shortcut.0", r, bias=False) + bn("block2.shortcut.1", r)
        + consume("fc.weight", r))


def transformer_perms(g: torch.Generator) -> Perms:
    s = torch.randperm(16, generator=g)  # shared by every layer on the residual stream
    perms = produce("inp", s) + consume("head.weight", s)
    for enc in ("enc1", "enc2"):
        # heads permuted together for q, k and v; within a head q and k share a permutation
        hp, d = torch.randperm(4, generator=g), 4
        qk = torch.cat([hp[h] * d + torch.randperm(d, generator=g) for h in range(4)])
        v = torch.cat([hp[h] * d + torch.randperm(d, generator=g) for h in range(4)])
        f = torch.randperm(32, generator=g)
        in_rows = torch.cat([qk, 16 + qk, 32 + v])
        perms += [(f"{enc}.self_attn.in_proj_weight", 0, in_rows),
                  (f"{enc}.self_attn.in_proj_weight", 1, s),
                  (f"{enc}.self_attn.in_proj_bias", 0, in_rows),
                  (f"{enc}.self_attn.out_proj.weight", 1, v)]
        perms += produce(f"{enc}.self_attn.out_proj", s)
        perms += produce(f"{enc}.norm1", s) + produce(f"{enc}.norm2", s)
        perms += consume(f"{enc}.linear1.weight", s) + produce(f"{enc}.linear1", f)
        perms += consume(f"{enc}.linear2.weight", f) + produce(f"{enc}.linear2", s)
    return perms


def randomize_norm_stats(model: nn.Module, g: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + .5)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))


def graph64(model: nn.Module) -> ParameterGraph:
    return graph_from_module(model, dtype=torch.float64)


CASES = [
    (mlp, mlp_perms, (7, 5)),
    (cnn, cnn_perms, (2, 3, 16, 16)),
    (ResNet, resnet_perms, (2, 3, 8, 8)),
    (Transformer, transformer_perms, (2, 5, 6)),
]


@pytest.mark.parametrize(("factory", "make_perms", "in_shape"), CASES,
                         ids=["mlp", "cnn", "resnet", "transformer"])
def test_permutation_invariance(factory, make_perms, in_shape) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = factory().double().eval()
    randomize_norm_stats(model, g)
    perms = make_perms(g)
    assert any(not torch.equal(p, torch.arange(len(p))) for _, _, p in perms)
    other = permuted(model, perms)
    x = torch.randn(*in_shape, dtype=torch.float64, generator=g)
    with torch.no_grad():  # the permutation is a true symmetry of the network function
        assert torch.allclose(model(x), other(x), atol=1e-10)
        assert not torch.equal(model.state_dict()[perms[0][0]], other.state_dict()[perms[0][0]])
    net = GraphMetanetwork().double()
    with torch.no_grad():
        emb, emb_perm = net.embed([graph64(model), graph64(other)])
        assert (emb - emb_perm).abs().max() < 1e-5
        key = perms[0][0]
        changed = {k: v.clone() for k, v in model.state_dict().items()}
        changed[key].view(-1)[0] += 0.5
        model.load_state_dict(changed)
        emb_changed = net.embed([graph64(model)])[0]
        assert (emb - emb_changed).abs().max() > 1e-6


def test_input_permutation_is_not_invariant() -> None:
    torch.manual_seed(0)
    model = mlp().double()
    net = GraphMetanetwork().double()
    sd = dict(model.state_dict())
    sd["0.weight"] = sd["0.weight"][:, [1, 0, 2, 3, 4]]
    other = mlp().double()
    other.load_state_dict(sd)
    with torch.no_grad():
        a, b = net.embed([graph64(model), graph64(other)])
    assert (a - b).abs().max() > 1e-6


def test_batching_shapes_and_gradients() -> None:
    torch.manual_seed(0)
    graphs = [graph_from_module(f()) for f in (mlp, cnn, TokenModel)]
    net = GraphMetanetwork(hidden_dim=16, num_layers=2, out_dim=8)
    out = net.embed(graphs)
    assert out.shape == (3, 8) and torch.isfinite(out).all()
    singles = torch.cat([net(g.to_pyg()) for g in graphs])
    assert torch.allclose(out, singles, atol=1e-5), "graphs in a batch do not interact"
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    default = GraphMetanetwork()
    assert default(Batch.from_data_list([graphs[0].to_pyg()])).shape == (1, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_gpu() -> None:
    graphs = [graph_from_module(mlp()), graph_from_module(cnn())]
    net = GraphMetanetwork().cuda()
    out = net.embed(graphs)
    assert out.device.type == "cuda" and out.shape == (2, 32)
    cpu = GraphMetanetwork()
    cpu.load_state_dict({k: v.cpu() for k, v in net.state_dict().items()})
    assert torch.allclose(out.cpu(), cpu.embed(graphs), atol=1e-4)
