"""The graph metanetwork with DGL message passing (the optional extra ``optuna-fms[dgl]``).

:class:`DGLGraphMetanetwork` computes exactly the function of a
:class:`~optuna_fms.graphs.metanet.GraphMetanetwork`, on the very same parameters: it wraps one
(``DGLGraphMetanetwork.from_pyg(metanet)`` shares it, so training either trains both) and reuses its
encoders, LayerNorms, linear maps and readout MLP. Only the graph operations are DGL's:
gathering node terms onto edges (``apply_edges`` with ``u_add_v``), mean aggregation at edge
destinations and, on the reversed graph, at edge sources (``update_all``, ``copy_e`` / ``mean``),
batching (``dgl.batch``) and the per-graph means over nodes and edges (``dgl.mean_nodes`` /
``dgl.mean_edges``). DGL from PyPI is a CPU-only build, so this backend runs on CPU only; the
PyTorch Geometric GraphMetanetwork stays the default and runs on any device.

Importing this module imports DGL (through :func:`optuna_fms.graphs._dgl.import_dgl`) and raises
ImportError, naming ``pip install "optuna-fms[dgl]"``, when it is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optuna_fms.graphs._dgl import import_dgl
from optuna_fms.graphs.schema import ParameterGraph
from optuna_fms.graphs.metanet import EdgeNodeConv, GraphMetanetwork

dgl = import_dgl()
fn = dgl.function

__all__ = ["EDGE_FEAT", "NODE_FEAT", "DGLGraphMetanetwork", "to_dgl"]

#: ``ndata`` key of the node features [N, 9] and ``edata`` key of the edge features [E, 5].
NODE_FEAT = "feat"
EDGE_FEAT = "feat"


def to_dgl(graph: ParameterGraph) -> Any:
    """``graph`` as a ``dgl.DGLGraph`` (CPU, int64 ids): edge ``k`` is ``edge_index[:, k]``.

    Features are stored as given (no copy, gradients flow through) under ``ndata["feat"]`` and
    ``edata["feat"]``.
    """
    src, dst = graph.edge_index.to("cpu", torch.int64)
    g = dgl.graph((src, dst), num_nodes=graph.num_nodes, idtype=torch.int64, device="cpu")
    g.ndata[NODE_FEAT] = graph.node_features
    g.edata[EDGE_FEAT] = graph.edge_features
    return g


def _edge_node_conv(conv: EdgeNodeConv, g: Any, rg: Any, x: Tensor, e: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """``conv(x, e, edge_index)`` of the PyG EdgeNodeConv, on DGL graph ``g`` (``rg``: reversed)."""
    a, b, p_in, q_in, p_out, q_out = conv.node_proj(x).chunk(6, dim=-1)
    g.ndata.update({"a": a, "b": b, "p_in": p_in, "q_in": q_in, "p_out": p_out, "q_out": q_out})
    # edge update: silu(a[dst] + b[src] + edge_in(e))
    g.apply_edges(fn.u_add_v("b", "a", "ab"))
    de = conv.edge_out(F.silu(g.edata.pop("ab") + conv.edge_in(e)))
    m_in, m_out = conv.edge_msg(de).chunk(2, dim=-1)
    # forward messages silu(p_in[dst] + q_in[src] + m_in), averaged at the destination
    g.apply_edges(fn.u_add_v("q_in", "p_in", "s"))
    g.edata["m"] = F.silu(g.edata.pop("s") + m_in)
    g.update_all(fn.copy_e("m", "m"), fn.mean("m", "agg"))
    agg_in = g.ndata.pop("agg")
    # backward messages silu(p_out[src] + q_out[dst] + m_out), averaged at the source
    g.apply_edges(fn.u_add_v("p_out", "q_out", "s"))
    rg.edata["m"] = F.silu(g.edata.pop("s") + m_out)  # NOTE: rg's edge k is g's edge k reversed
    rg.update_all(fn.copy_e("m", "m"), fn.mean("m", "agg"))
    agg_out = rg.ndata.pop("agg")
    return conv.node_mlp(torch.cat([x, agg_in, agg_out], dim=-1)), de


class DGLGraphMetanetwork(nn.Module):
    """A GraphMetanetwork evaluated with DGL: embeds DGL graphs into ``[num_graphs, out_dim]``.

    ``DGLGraphMetanetwork(hidden_dim, num_layers, out_dim)`` builds a fresh GraphMetanetwork;
    ``DGLGraphMetanetwork(metanet=net)`` or :meth:`from_pyg` wraps ``net`` itself (shared
    parameters). ``self.metanet`` is that module, and ``self.metanet.state_dict()`` is
    interchangeable with a GraphMetanetwork's (``self.state_dict()`` prefixes keys with
    ``metanet.``).
    """

    def __init__(self, hidden_dim: int = 32, num_layers: int = 4, out_dim: int = 32, *,
                 metanet: GraphMetanetwork | None = None) -> None:
        super().__init__()
        if metanet is None:
            metanet = GraphMetanetwork(hidden_dim=hidden_dim, num_layers=num_layers,
                                       out_dim=out_dim)
        elif not isinstance(metanet, GraphMetanetwork):
            raise TypeError(f"metanet must be a GraphMetanetwork, not {type(metanet).__name__}")
        self.metanet = metanet

    @classmethod
    def from_pyg(cls, metanet: GraphMetanetwork) -> DGLGraphMetanetwork:
        """A DGL view of ``metanet`` sharing its parameters (no copy)."""
        return cls(metanet=metanet)

    def to_pyg(self) -> GraphMetanetwork:
        """The wrapped PyG GraphMetanetwork (the same parameters)."""
        return self.metanet

    @property
    def hidden_dim(self) -> int:
        return self.metanet.hidden_dim

    @property
    def out_dim(self) -> int:
        return self.metanet.out_dim

    def forward(self, g: Any) -> Tensor:
        """Embeddings ``[g.batch_size, out_dim]`` of a DGLGraph (one graph or a ``dgl.batch``)
        with ``ndata["feat"]`` and ``edata["feat"]`` as made by :func:`to_dgl`."""
        net = self.metanet
        p = net.readout[0].weight
        if g.device != p.device:
            try:
                g = g.to(p.device)
            except Exception as err:  # noqa: BLE001 - DGL raises its own DGLError type
                raise RuntimeError(
                    f"cannot move the DGL graph to {p.device}: DGL from PyPI is a CPU-only build. "
                    "Keep the DGL metanetwork on CPU, or use GraphMetanetwork (PyTorch Geometric) "
                    "on other devices") from err
        with g.local_scope():
            x = net.encode_nodes(g.ndata[NODE_FEAT].to(p.dtype))
            e = net.encode_edges(g.edata[EDGE_FEAT].to(p.dtype))
            rg = dgl.reverse(g)
            for block in net.blocks:  # NOTE: _Block.forward, with the DGL conv
                dx, de = _edge_node_conv(block.conv, g, rg, block.node_norm(x), block.edge_norm(e))
                x, e = x + dx, e + de
            g.ndata["h"], g.edata["h"] = net.final_node_norm(x), net.final_edge_norm(e)
            pooled_x = dgl.mean_nodes(g, "h")
            if g.num_edges() > 0:
                pooled_e = dgl.mean_edges(g, "h")
            else:  # NOTE: DGL's mean over zero edges in all is 0/0; PyG's scatter gives 0
                pooled_e = torch.zeros_like(pooled_x)
        return net.readout(torch.cat([pooled_e, pooled_x], dim=-1))

    def embed(self, graphs: Sequence[ParameterGraph]) -> Tensor:
        """Embeddings ``[len(graphs), out_dim]``, as ``GraphMetanetwork.embed`` (differentiable)."""
        return self(dgl.batch([to_dgl(graph) for graph in graphs]))

    def extra_repr(self) -> str:
        return "backend=dgl"
