"""Graph metanetwork: embeds parameter graphs into fixed-size vectors, invariant to neuron permutations.

Architecture (an edge-conditioned MPNN in the spirit of the GMN used by FMS):
    encoders   node: type / norm-kind / io embeddings + sin(Linear(layer, position)) +
               Linear(bias, gamma, beta, mean, log var); edge: type embedding +
               sin(Linear(layer, kx, ky)) + Linear(value); each followed by SiLU and Linear.
    blocks     ``num_layers`` pre-LayerNorm residual blocks of ``EdgeNodeConv`` (edges and nodes
               both updated; messages flow along edges and, with separate weights, against them).
    readout    final LayerNorms, mean over each graph's edges and over its nodes, concatenated,
               then an MLP to ``out_dim`` (no output squashing).
Every operation is per node, per edge, or a mean over a neighbourhood or graph, so relabelling
hidden nodes (which carry no identity features) leaves the embedding unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter

from optuna_fms.graphs.schema import (
    EF_KX,
    EF_KY,
    EF_LAYER,
    EF_TYPE,
    EF_VALUE,
    NF_BETA,
    NF_BIAS,
    NF_GAMMA,
    NF_LAYER,
    NF_MEAN,
    NF_NORM,
    NF_POSITION,
    NF_TYPE,
    NF_VAR,
    NUM_EDGE_TYPES,
    NUM_NODE_TYPES,
    NUM_NORM_TYPES,
    ParameterGraph,
)

__all__ = ["EdgeNodeConv", "GraphMetanetwork"]


class EdgeNodeConv(MessagePassing):
    """One message-passing step that updates edges, then nodes.

    ``e'_ij = W2 silu(A x_i + B x_j + C e_ij)``; messages ``silu(P x_i + Q x_j + R e'_ij)`` are
    mean-aggregated at the destination (and, with separate weights, at the source); then
    ``x' = MLP([x, agg_in, agg_out])``. Returns the updates ``(dx, de)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(aggr="mean")
        # NOTE: Linear([x_i, x_j, e]) is split into per-node projections gathered onto edges, so
        # the only O(E * dim^2) work is on edge features.
        self.node_proj = nn.Linear(dim, 6 * dim, bias=False)
        self.edge_in = nn.Linear(dim, dim)
        self.edge_out = nn.Linear(dim, dim)
        self.edge_msg = nn.Linear(dim, 2 * dim)
        self.node_mlp = nn.Sequential(nn.Linear(3 * dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor, e: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        n = x.size(0)
        a, b, p_in, q_in, p_out, q_out = self.node_proj(x).chunk(6, dim=-1)
        de = self.edge_out(self.edge_updater(edge_index, x=(b, a), e=self.edge_in(e), size=(n, n)))
        m_in, m_out = self.edge_msg(de).chunk(2, dim=-1)
        agg_in = self.propagate(edge_index, x=(q_in, p_in), e=m_in, size=(n, n))
        agg_out = self.propagate(edge_index.flip(0), x=(q_out, p_out), e=m_out, size=(n, n))
        return self.node_mlp(torch.cat([x, agg_in, agg_out], dim=-1)), de

    def edge_update(self, x_i: Tensor, x_j: Tensor, e: Tensor) -> Tensor:
        return F.silu(x_i + x_j + e)

    def message(self, x_i: Tensor, x_j: Tensor, e: Tensor) -> Tensor:
        return F.silu(x_i + x_j + e)


class _Block(nn.Module):
    """Pre-LayerNorm residual block around an EdgeNodeConv."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.node_norm, self.edge_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.conv = EdgeNodeConv(dim)

    def forward(self, x: Tensor, e: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        dx, de = self.conv(self.node_norm(x), self.edge_norm(e), edge_index)
        return x + dx, e + de


class GraphMetanetwork(nn.Module):
    """Embeds a batch of ParameterGraphs (as PyG Data/Batch) into ``[num_graphs, out_dim]``."""

    def __init__(self, hidden_dim: int = 32, num_layers: int = 4, out_dim: int = 32) -> None:
        super().__init__()
        h = hidden_dim
        self.hidden_dim, self.out_dim = hidden_dim, out_dim
        self.node_type = nn.Embedding(NUM_NODE_TYPES, h)
        self.node_norm_kind = nn.Embedding(NUM_NORM_TYPES, h)
        self.node_io = nn.Embedding(2, h)
        self.node_freq = nn.Linear(2, h)
        self.node_values = nn.Linear(5, h)
        self.node_enc = nn.Sequential(nn.SiLU(), nn.Linear(h, h))
        self.edge_type = nn.Embedding(NUM_EDGE_TYPES, h)
        self.edge_freq = nn.Linear(3, h)
        self.edge_value = nn.Linear(1, h)
        self.edge_enc = nn.Sequential(nn.SiLU(), nn.Linear(h, h))
        self.blocks = nn.ModuleList(_Block(h) for _ in range(num_layers))
        self.final_node_norm, self.final_edge_norm = nn.LayerNorm(h), nn.LayerNorm(h)
        self.readout = nn.Sequential(nn.Linear(2 * h, h), nn.SiLU(), nn.Linear(h, out_dim))

    def encode_nodes(self, f: Tensor) -> Tensor:
        kind = f[:, NF_TYPE].long()
        io = (f[:, NF_POSITION] >= 0).long()
        var = torch.log(f[:, NF_VAR].clamp_min(0) + 1e-5)
        values = torch.stack([f[:, NF_BIAS], f[:, NF_GAMMA], f[:, NF_BETA], f[:, NF_MEAN], var], -1)
        h = (self.node_type(kind) + self.node_norm_kind(f[:, NF_NORM].long()) + self.node_io(io)
             + torch.sin(self.node_freq(f[:, [NF_LAYER, NF_POSITION]])) + self.node_values(values))
        return self.node_enc(h)

    def encode_edges(self, f: Tensor) -> Tensor:
        h = (self.edge_type(f[:, EF_TYPE].long()) + torch.sin(self.edge_freq(f[:, [EF_LAYER, EF_KX,
                                                                                    EF_KY]]))
             + self.edge_value(f[:, [EF_VALUE]]))
        return self.edge_enc(h)

    def forward(self, batch: Data | Batch) -> Tensor:
        """Embeddings ``[num_graphs, out_dim]`` for a PyG Data or Batch with x, edge_index, edge_attr."""
        p = self.readout[0].weight
        x_f = batch.x.to(p.device, p.dtype)
        e_f = batch.edge_attr.to(p.device, p.dtype)
        edge_index = batch.edge_index.to(p.device)
        node_batch = getattr(batch, "batch", None)
        if node_batch is None:
            node_batch = torch.zeros(x_f.size(0), dtype=torch.long, device=p.device)
        node_batch = node_batch.to(p.device)
        num_graphs = int(getattr(batch, "num_graphs", 1))
        x, e = self.encode_nodes(x_f), self.encode_edges(e_f)
        for block in self.blocks:
            x, e = block(x, e, edge_index)
        x, e = self.final_node_norm(x), self.final_edge_norm(e)
        pooled_e = scatter(e, node_batch[edge_index[0]], dim=0, dim_size=num_graphs, reduce="mean")
        pooled_x = scatter(x, node_batch, dim=0, dim_size=num_graphs, reduce="mean")
        return self.readout(torch.cat([pooled_e, pooled_x], dim=-1))

    def embed(self, graphs: Sequence[ParameterGraph]) -> Tensor:
        """Embeddings ``[len(graphs), out_dim]`` (differentiable; on this module's device)."""
        return self(Batch.from_data_list([g.to_pyg() for g in graphs]))

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, num_blocks={len(self.blocks)}, out_dim={self.out_dim}"
