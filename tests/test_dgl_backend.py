"""Tests for optuna_fms.graphs.dgl_backend: the DGL metanetwork matches the PyG one exactly.

Skipped when DGL is not installed, except under CI (environment variable CI set), where a missing
or broken DGL fails the run.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from test_graphs import ResNet, TokenModel, cnn, mlp
from test_metanet import Transformer, graph64, randomize_norm_stats
from torch import nn

from optuna_fms.graphs import GraphMetanetwork, ParameterGraph
from optuna_fms.graphs import _dgl

try:
    dgl = _dgl.import_dgl()
except ImportError as err:
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must run the DGL backend tests, but DGL is unusable: {err}"
                           ) from err
    pytest.skip(f"DGL backend tests skipped: {err}", allow_module_level=True)

from optuna_fms.graphs.dgl_backend import DGLGraphMetanetwork, to_dgl  # noqa: E402

TOL = 1e-5
MODELS = {"mlp": mlp, "cnn": cnn, "transformer": Transformer}


def model64(factory) -> nn.Module:
    model = factory().double().eval()
    randomize_norm_stats(model, torch.Generator().manual_seed(1))
    return model


@pytest.fixture(scope="module")
def graphs() -> dict[str, ParameterGraph]:
    torch.manual_seed(0)
    return {name: graph64(model64(f)) for name, f in MODELS.items()}


def pair(**kwargs) -> tuple[GraphMetanetwork, DGLGraphMetanetwork]:
    torch.manual_seed(0)
    net = GraphMetanetwork(**kwargs).double()
    return net, DGLGraphMetanetwork.from_pyg(net)


@pytest.mark.parametrize("name", list(MODELS))
def test_same_embedding(graphs, name: str) -> None:
    net, dnet = pair()
    with torch.no_grad():
        ref, out = net.embed([graphs[name]]), dnet.embed([graphs[name]])
        assert out.shape == ref.shape == (1, 32) and out.dtype == torch.float64
        assert (out - ref).abs().max() < TOL
        assert torch.allclose(dnet(to_dgl(graphs[name])), ref, rtol=0, atol=TOL)


def test_same_embedding_batched_and_float32(graphs) -> None:
    torch.manual_seed(0)
    extra = [graph64(model64(TokenModel)), graph64(model64(ResNet))]
    batch = list(graphs.values()) + extra
    net, dnet = pair(hidden_dim=16, num_layers=3, out_dim=8)
    with torch.no_grad():
        ref, out = net.embed(batch), dnet.embed(batch)
        assert out.shape == (5, 8) and (out - ref).abs().max() < TOL
        singles = torch.cat([dnet.embed([g]) for g in batch])
        assert (out - singles).abs().max() < TOL, "graphs in a DGL batch interact"
        net.float()  # float64 graphs into a float32 network: cast like the PyG path
        assert (dnet.embed(batch) - net.embed(batch)).abs().max() < 1e-4


def test_gradients_agree(graphs) -> None:
    net, dnet = pair(hidden_dim=16, num_layers=2, out_dim=8)
    batch = list(graphs.values())
    w = torch.randn(len(batch), 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def grads(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        net.zero_grad()
        inputs = [ParameterGraph(g.node_features, g.edge_index,
                                 g.edge_features.clone().requires_grad_()) for g in batch]
        (module.embed(inputs) * w).sum().backward()
        return ([p.grad.clone() for p in net.parameters()], [g.edge_features.grad for g in inputs])

    (ref_p, ref_e), (out_p, out_e) = grads(net), grads(dnet)
    assert all(g.abs().sum() > 0 for g in ref_p[-4:])
    for a, b in zip(ref_p + ref_e, out_p + out_e, strict=True):
        assert b is not None and (a - b).abs().max() < TOL


def test_shared_parameters_and_state_dict(graphs) -> None:
    net, dnet = pair(hidden_dim=16, num_layers=2, out_dim=8)
    assert dnet.to_pyg() is net and (dnet.hidden_dim, dnet.out_dim) == (16, 8)
    assert {id(p) for p in dnet.parameters()} == {id(p) for p in net.parameters()}
    g = [graphs["mlp"]]
    with torch.no_grad():
        before = dnet.embed(g)
        net.readout[-1].bias.add_(1.0)  # a change to the PyG module is seen through the DGL one
        assert torch.allclose(dnet.embed(g), before + 1.0, atol=1e-12)
        fresh = DGLGraphMetanetwork(hidden_dim=16, num_layers=2, out_dim=8).double()
        assert (fresh.embed(g) - before).abs().max() > 1e-6
        fresh.metanet.load_state_dict(net.state_dict())
        assert (fresh.embed(g) - net.embed(g)).abs().max() < TOL
    with pytest.raises(TypeError, match="GraphMetanetwork"):
        DGLGraphMetanetwork(metanet=nn.Linear(2, 2))


def test_to_dgl_and_edge_cases(graphs) -> None:
    pg = graphs["cnn"]
    g = to_dgl(pg)
    src, dst = g.edges(order="eid")
    assert (g.num_nodes(), g.num_edges()) == (pg.num_nodes, pg.num_edges)
    assert torch.equal(torch.stack([src, dst]), pg.edge_index)
    assert g.ndata["feat"] is pg.node_features and g.edata["feat"] is pg.edge_features
    assert g.device.type == "cpu" and g.idtype == torch.int64
    net, dnet = pair(hidden_dim=8, num_layers=1, out_dim=4)
    # a graph without edges, alone and in a batch: PyG's mean over no edges is 0, DGL must match
    empty = ParameterGraph(pg.node_features[:3], torch.zeros(2, 0, dtype=torch.long),
                           pg.edge_features[:0])
    with torch.no_grad():
        for batch in ([empty], [empty, pg], [pg, empty]):
            out = dnet.embed(batch)
            assert torch.isfinite(out).all() and (out - net.embed(batch)).abs().max() < TOL
        dnet(g)
        assert len(list(g.ndata.keys())) == 1 and len(list(g.edata.keys())) == 1  # no leftovers


def test_shim() -> None:
    assert os.environ["DGLBACKEND"] == "pytorch" and _dgl.import_dgl() is dgl is sys.modules["dgl"]
    release = torch.__version__.split("+", 1)[0]
    if not os.path.exists(os.path.join(os.path.dirname(dgl.__file__), "graphbolt",
                                       f"libgraphbolt_pytorch_{release}.so")):
        with pytest.raises(AttributeError, match="GraphBolt"):
            dgl.graphbolt.ItemSampler  # noqa: B018


def test_missing_dgl_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "dgl")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "dgl" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r'pip install "optuna-fms\[dgl\]"'):
        _dgl.import_dgl()


def test_non_cpu_parameters_fail_clearly(graphs) -> None:
    dnet = DGLGraphMetanetwork(hidden_dim=8, num_layers=1, out_dim=4).to("meta")
    with pytest.raises(RuntimeError, match="CPU-only"):
        dnet.embed([graphs["mlp"]])
