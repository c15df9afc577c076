"""Tests for build_graph(coarsen=...): invariance, bounded size, no effect below the threshold."""

from __future__ import annotations

import math

import pytest
import torch
from test_graphs import ResNet, TokenModel, check_common, cnn, encoder, mlp
from test_metanet import CASES, Perms, Transformer, consume, permuted, randomize_norm_stats
from torch import Tensor, nn

from optuna_fms.graphs import GraphMetanetwork, ParameterGraph, build_graph, describe_architecture
from optuna_fms.graphs import graph_from_module
from optuna_fms.graphs.schema import (
    EDGE_EMBEDDING,
    EDGE_SUMMARY_MEAN,
    EDGE_SUMMARY_STD,
    EF_LAYER,
    EF_TYPE,
    EF_VALUE,
    NF_POSITION,
    NF_TYPE,
    NODE_SUMMARY,
    NODE_TOKEN,
    SUMMARY_EDGE_TYPES,
    WEIGHT_EDGE_TYPES,
)

FACTORIES = [mlp, cnn, ResNet, TokenModel, encoder, Transformer]


def weight_tensors(model: nn.Module) -> list[Tensor]:
    """The tensors that become weight edges: matrices, conv kernels, embeddings, in_proj."""
    return [p for n, p in model.named_parameters() if p.dim() >= 2]


def graph_tensor_sizes(model: nn.Module) -> list[int]:
    """Scalars per weight tensor as the graph sees them (q, k, v slices of in_proj separately)."""
    arch = describe_architecture(model)
    sizes = []
    for op in arch["layers"]:
        for field in ("weight", "q_weight", "k_weight", "v_weight", "out_weight"):
            spec = op.get(field)
            if spec is None or op["type"].endswith("Norm") or op["type"].startswith("BatchNorm"):
                continue
            shape = arch["parameters"][spec[0] if isinstance(spec, list) else spec]
            rows = spec[2] - spec[1] if isinstance(spec, list) else shape[0]
            sizes.append(rows * math.prod(shape[1:]))
    return sizes


def coarse64(model: nn.Module, coarsen: int) -> ParameterGraph:
    return graph_from_module(model, coarsen=coarsen, dtype=torch.float64)


def edge_types(g: ParameterGraph) -> Tensor:
    return g.edge_features[:, EF_TYPE].long()


def same_up_to_relabelling(a: ParameterGraph, b: ParameterGraph) -> None:
    """Necessary conditions for isomorphism: sizes, node types, and per edge type the multiset
    of values and the multiset of (destination type, source type) pairs."""
    assert (a.num_nodes, a.num_edges) == (b.num_nodes, b.num_edges)
    assert torch.equal(a.node_features[:, NF_TYPE].sort().values,
                       b.node_features[:, NF_TYPE].sort().values)
    for t in edge_types(a).unique().tolist():
        ma, mb = edge_types(a) == t, edge_types(b) == t
        assert int(ma.sum()) == int(mb.sum()), t
        va = a.edge_features[ma, EF_VALUE].sort().values
        vb = b.edge_features[mb, EF_VALUE].sort().values
        assert torch.allclose(va, vb, atol=1e-12), t

        def ends(g: ParameterGraph, m: Tensor) -> Tensor:
            src, dst = g.edge_index[:, m]
            key = g.node_features[src, NF_TYPE] * 100 + g.node_features[dst, NF_TYPE]
            return key.sort().values

        assert torch.equal(ends(a, ma), ends(b, mb)), t


# -- no effect below the threshold ------------------------------------------------------------


@pytest.mark.parametrize("factory", FACTORIES)
def test_no_effect_below_threshold(factory) -> None:
    torch.manual_seed(0)
    m = factory()
    largest = max(graph_tensor_sizes(m))
    plain = graph_from_module(m)
    for c in (largest, largest + 1, 10**9):
        assert graph_from_module(m, coarsen=c).equals(plain), c
    assert not graph_from_module(m, coarsen=largest - 1).equals(plain)


def test_only_large_tensors_change() -> None:
    torch.manual_seed(0)
    m = mlp()  # weights 16x5 (80), 16x16 (256), 3x16 (48)
    plain, g = graph_from_module(m), graph_from_module(m, coarsen=100)
    check_common(g)
    layer = g.edge_features[:, EF_LAYER]
    p_layer = plain.edge_features[:, EF_LAYER]
    for small in (1, 3):  # untouched, bit for bit
        assert torch.equal(g.edge_features[layer == small], plain.edge_features[p_layer == small])
    assert int((g.node_features[:, NF_TYPE] == NODE_SUMMARY).sum()) == 1
    # layer 2: k = max(1, (100 - 2 * (16 + 16)) // 16) = 2 kept weights per neuron + 64 summaries
    mid = layer == 2
    assert int(torch.isin(edge_types(g)[mid], torch.tensor(WEIGHT_EDGE_TYPES)).sum()) == 16 * 2
    assert int(torch.isin(edge_types(g)[mid], torch.tensor(SUMMARY_EDGE_TYPES)).sum()) == 64
    # kept edges are each row's two largest magnitudes, with their true values
    w = m[2].weight.detach()
    kept = mid & torch.isin(edge_types(g), torch.tensor(WEIGHT_EDGE_TYPES))
    src, dst = g.edge_index[:, kept]
    assert torch.equal(g.edge_features[kept, EF_VALUE], w[dst - 21, src - 5])
    top2 = w.abs().topk(2, dim=1).values
    assert torch.equal(w[dst - 21, src - 5].abs().sort().values, top2.reshape(-1).sort().values)
    # summary -> neuron o: mean / std of row o; neuron j -> summary: of column j
    sid = int((g.node_features[:, NF_TYPE] == NODE_SUMMARY).nonzero())
    assert sid == 37  # inputs 0-4, layer-1 neurons 5-20, layer-2 neurons 21-36, then its summary
    mean_row = mid & (edge_types(g) == EDGE_SUMMARY_MEAN) & (g.edge_index[0] == sid)
    _, dst = g.edge_index[:, mean_row]
    assert torch.allclose(g.edge_features[mean_row, EF_VALUE], w.mean(1)[dst - 21])
    std_col = mid & (edge_types(g) == EDGE_SUMMARY_STD) & (g.edge_index[1] == sid)
    src, _ = g.edge_index[:, std_col]
    assert int(mean_row.sum()) == int(std_col.sum()) == 16
    assert torch.allclose(g.edge_features[std_col, EF_VALUE], w.std(0, correction=0)[src - 5])


# -- bounded size ----------------------------------------------------------------------------


class Wide(nn.Module):
    """A model far above the threshold: vocabulary 5,000 x 64, two 1024-wide layers, a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5000, 64)
        self.up = nn.Linear(64, 1024)
        self.down = nn.Linear(1024, 64)
        self.attn = nn.TransformerEncoderLayer(64, 4, 512, dropout=0.0, batch_first=True)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.attn(self.down(torch.relu(self.up(self.emb(tokens)))))


@pytest.mark.parametrize("coarsen", [64, 500, 2000])
def test_edges_bounded(coarsen: int) -> None:
    torch.manual_seed(0)
    m = Wide()
    arch = describe_architecture(m)
    g = build_graph(m.state_dict(), arch, coarsen=coarsen)
    check_common(g)
    bound = 0
    for op in arch["layers"]:
        if op["type"] == "Embedding":
            vocab, dim = arch["parameters"][op["weight"]]
            bound += max(coarsen, 2 * dim) if vocab * dim > coarsen else vocab * dim
        elif op["type"] == "Linear":
            out, n_in = arch["parameters"][op["weight"]]
            bound += max(coarsen, 3 * out + 2 * n_in) if out * n_in > coarsen else out * n_in
        elif op["type"] == "MultiheadAttention":
            e = arch["parameters"][op["out_weight"]][0]
            bound += 4 * (max(coarsen, 5 * e) if e * e > coarsen else e * e) + 3 * e
        elif op["type"] == "residual":
            bound += arch["sizes"][op["output"]]
    assert g.num_edges <= bound
    build_graph(m.state_dict(), arch, max_edges=g.num_edges, coarsen=coarsen)  # counts kept edges
    with pytest.raises(ValueError, match="max_edges"):
        build_graph(m.state_dict(), arch, max_edges=g.num_edges - 1, coarsen=coarsen)
    assert g.num_edges < sum(t.numel() for t in weight_tensors(m)) / 20
    # vocabulary: blocks of contiguous token indices, positions = first token of each block
    tokens = g.node_features[:, NF_TYPE] == NODE_TOKEN
    n_blocks = max(1, min(5000, coarsen // 128))
    assert int(tokens.sum()) == n_blocks
    first = g.node_features[tokens, NF_POSITION]
    assert first[0] == 0 and (first.diff() > 0).all()


def test_embedding_blocks_are_row_statistics() -> None:
    torch.manual_seed(0)
    m = TokenModel()  # Embedding(20, 8): 160 scalars; coarsen=48 -> 48 // 16 = 3 blocks of 7, 7, 6
    g = graph_from_module(m, coarsen=48, dtype=torch.float64)
    check_common(g)
    tok = (g.node_features[:, NF_TYPE] == NODE_TOKEN).nonzero().squeeze(1)
    assert g.node_features[tok, NF_POSITION].tolist() == [0, 7, 14]
    assert not bool((edge_types(g) == EDGE_EMBEDDING).any())
    w = m.emb.weight.detach().double()
    for t, (a, b) in zip(tok.tolist(), ((0, 7), (7, 14), (14, 20))):
        for kind, ref in ((EDGE_SUMMARY_MEAN, w[a:b].mean(0)),
                          (EDGE_SUMMARY_STD, w[a:b].std(0, correction=0))):
            sel = (g.edge_index[0] == t) & (edge_types(g) == kind)
            dims = g.edge_index[1, sel] - g.edge_index[1, sel].min()
            assert torch.allclose(g.edge_features[sel, EF_VALUE], ref[dims])


# -- invariance ------------------------------------------------------------------------------


def token_perms(g: torch.Generator) -> Perms:
    p = torch.randperm(8, generator=g)  # embedding dimensions are hidden; tokens are not
    return [("emb.weight", 1, p)] + consume("head.weight", p)


INVARIANCE_CASES = CASES + [(TokenModel, token_perms, None)]


@pytest.mark.parametrize(("factory", "make_perms", "in_shape"), INVARIANCE_CASES,
                         ids=["mlp", "cnn", "resnet", "transformer", "embedding"])
@pytest.mark.parametrize("quantize", [False, True], ids=["float", "ties"])
def test_coarsened_graph_is_permutation_invariant(factory, make_perms, in_shape,
                                                  quantize: bool) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = factory().double().eval()
    randomize_norm_stats(model, g)
    if quantize:  # NOTE: many exact ties, and an all-zero row, at the top-k threshold
        with torch.no_grad():
            for p in weight_tensors(model):
                p.copy_((p * 4).round() / 4)
                p[0].zero_()
    perms = make_perms(g)
    other = permuted(model, perms)
    coarsen = 24  # every weight tensor of these models is above it, so all are coarsened
    a, b = coarse64(model, coarsen), coarse64(other, coarsen)
    check_common(a)
    assert a.num_edges < graph_from_module(model).num_edges
    assert int((a.node_features[:, NF_TYPE] == NODE_SUMMARY).sum()) > 0
    same_up_to_relabelling(a, b)
    net = GraphMetanetwork().double()
    with torch.no_grad():
        emb, emb_perm = net.embed([a, b])
        assert (emb - emb_perm).abs().max() < 1e-5
        # still sensitive to the weights: scale one tensor
        key = perms[0][0]
        changed = {k: v.clone() for k, v in model.state_dict().items()}
        changed[key] *= 1.5
        model.load_state_dict(changed)
        assert (emb - net.embed([coarse64(model, coarsen)])[0]).abs().max() > 1e-6


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "ties"])
def test_coarsened_graph_is_an_exact_relabelling(quantize: bool) -> None:
    """MLP with both hidden layers permuted: mapping each hidden node to its pre-permutation
    neuron turns the permuted model's coarsened graph into the original's, edge for edge."""
    from test_metanet import mlp_perms

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = mlp().double()
    if quantize:
        with torch.no_grad():
            for p in weight_tensors(model):
                p.copy_((p * 4).round() / 4)
    perms = mlp_perms(gen)
    p1, p2 = perms[0][2], perms[4][2]
    other = permuted(model, perms)
    a, b = coarse64(model, 60), coarse64(other, 60)  # 16x5 and 16x16 coarsened, 3x16 not
    assert int((a.node_features[:, NF_TYPE] == NODE_SUMMARY).sum()) == 2
    to_model = torch.arange(b.num_nodes)  # node of b -> node of a
    for layer, perm in ((1, p1), (2, p2)):
        ids = ((a.node_features[:, NF_TYPE] != NODE_SUMMARY)
               & (a.node_features[:, 1] == layer)).nonzero().squeeze(1)
        assert len(ids) == 16
        to_model[ids] = ids[perm]
    assert torch.equal(a.node_features[to_model], b.node_features)

    def edge_set(g: ParameterGraph, relabel: Tensor) -> set[tuple]:
        src, dst = relabel[g.edge_index]
        return {(int(s_), int(d_), int(t), round(float(v), 9)) for s_, d_, t, v in
                zip(src, dst, g.edge_features[:, EF_TYPE], g.edge_features[:, EF_VALUE])}

    assert edge_set(b, to_model) == edge_set(a, torch.arange(a.num_nodes))
    assert len(edge_set(a, torch.arange(a.num_nodes))) == a.num_edges < 80 + 256 + 48


def test_coarsen_validation() -> None:
    m = mlp()
    arch = describe_architecture(m)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="coarsen"):
            build_graph(m.state_dict(), arch, coarsen=bad)
    with pytest.raises(ValueError, match="max_edges"):
        build_graph(m.state_dict(), arch, coarsen=50, max_edges=50)
