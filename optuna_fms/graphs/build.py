"""Turns a module, or a state dict plus its architecture description, into a parameter graph.

``build_graph`` lays out the nodes and edges described in :mod:`optuna_fms.graphs.schema` for an
architecture description made by :mod:`optuna_fms.graphs.describe`; ``graph_from_module`` does both
steps for a module. The graph is the same, up to relabelling, for every model that differs by a
permutation of hidden neurons; coarsening keeps that so (below).

Coarsening (``build_graph(..., coarsen=C)``; off by default). One edge per weight does not scale to
large models (a 22M-parameter MiniLM would be a 22M-edge graph). With ``coarsen=C``, every weight
tensor with more than ``C`` scalars is summarized; every tensor with at most ``C`` scalars, and all
nodes, biases, norms, residual and attention-structure edges, are built exactly as without it (a
model whose tensors are all at most ``C`` gets the identical graph). Two rules:

    Linear, conv and attention projections (``W`` is ``[out, in]``, or ``[out, in/groups * k]``
    for a conv: one row per destination node). All nodes are kept. Each destination keeps only its
    largest-magnitude incoming weights as ordinary weight edges: the entries of row ``o`` with
    ``|W[o, j]|`` *strictly greater* than the row's ``(k+1)``-th largest magnitude, so at most
    ``k = max(1, (C - 2 * (out + in)) // out)`` of them (fewer on exact ties; an all-zero row keeps
    none). One ``NODE_SUMMARY`` node is added per coarsened tensor, wired by
    ``EDGE_SUMMARY_MEAN`` / ``EDGE_SUMMARY_STD`` edges whose values are the mean / population
    standard deviation of a full set of weights: summary -> destination ``o`` over row ``o`` (all of
    ``o``'s incoming weights), source ``j`` -> summary over column ``j`` (all of ``j``'s outgoing
    weights in this tensor, kernel positions included). A coarsened tensor has at most
    ``max(C, 3 * out + 2 * in)`` edges.

    Embedding (``[vocab, dim]``). Token rows carry identity (their vocabulary index), so they are
    grouped by index into ``B = max(1, min(vocab, C // (2 * dim)))`` contiguous blocks; each block
    is one ``NODE_TOKEN`` node whose position is its first token's index, with two edges to every
    embedding dimension: ``EDGE_SUMMARY_MEAN`` / ``EDGE_SUMMARY_STD`` of the block's rows in that
    column. At most ``max(C, 2 * dim)`` edges.

Why invariance still holds. A hidden-neuron permutation permutes the rows and/or columns of each
weight tensor (jointly across tensors, as in the uncoarsened graph) and never the vocabulary or the
network inputs. Row and column means / deviations are invariant to the order within the row or
column and follow its row / column. The kept set of row ``o`` is defined by a magnitude threshold
computed from the row's multiset of values, so it is the same set of (source, weight) pairs after
any relabelling of sources; no index-based tie-breaking is involved (exact ties at the threshold are
dropped together). Vocabulary blocks depend only on token indices, which are identities, and
their column statistics follow the embedding dimensions. So the coarsened graph of a permuted model
is a relabelling of the coarsened graph of the original, exactly as without coarsening; inputs,
outputs and tokens keep their position features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from typing import Any

import torch
from torch import Tensor, nn

from optuna_fms.graphs.describe import describe_architecture
from optuna_fms.graphs.schema import (
    ARCHITECTURE_FORMAT,
    ARCHITECTURE_VERSION,
    EDGE_ATTN_HEAD_VALUE,
    EDGE_ATTN_K,
    EDGE_ATTN_KEY_HEAD,
    EDGE_ATTN_OUT,
    EDGE_ATTN_Q,
    EDGE_ATTN_QK,
    EDGE_ATTN_V,
    EDGE_CONV,
    EDGE_EMBEDDING,
    EDGE_FEATURE_DIM,
    EDGE_LINEAR,
    EDGE_NORM_COPY,
    EDGE_RESIDUAL,
    EDGE_SUMMARY_MEAN,
    EDGE_SUMMARY_STD,
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
    NODE_ATTN_HEAD,
    NODE_ATTN_K,
    NODE_ATTN_Q,
    NODE_ATTN_V,
    NODE_CHANNEL,
    NODE_FEATURE_DIM,
    NODE_INPUT,
    NODE_NEURON,
    NODE_NORM_COPY,
    NODE_SUMMARY,
    NODE_TOKEN,
    NORM_BATCH,
    NORM_GROUP,
    NORM_LAYER,
    ParameterGraph,
)

__all__ = ["build_graph", "graph_from_module"]


def _offsets(k: int, dtype: torch.dtype) -> Tensor:
    """Kernel positions 0..k-1 as offsets normalized to [-1, 1] (0 for k == 1)."""
    return (torch.arange(k, dtype=dtype) * 2 - (k - 1)) / max(k - 1, 1)


def _stats(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Mean and population std along ``dim`` of a 2-D tensor (two passes: faster than
    ``torch.std_mean`` on CPU, and as accurate)."""
    mean = w.mean(dim, keepdim=True)
    return mean.squeeze(dim), (w - mean).square_().mean(dim).sqrt_()


class _Builder:
    def __init__(self, tensors: dict[str, Tensor], dtype: torch.dtype, max_edges: int | None,
                 coarsen: int | None = None):
        self.t, self.dtype, self.max_edges, self.coarsen = tensors, dtype, max_edges, coarsen
        self.num_nodes = 0
        self.num_edges = 0
        self.node_blocks: list[Tensor] = []
        self.edge_blocks: list[tuple[Tensor, Tensor, Tensor]] = []
        self.updates: list[tuple[Tensor, int, Tensor | float]] = []  # (node ids, column, values)
        self.values: dict[str, Tensor] = {}
        self.layer_of: dict[str, int] = {}
        self.normed: set[int] = set()
        self.layer = 0

    def get(self, spec: Any) -> Tensor | None:
        """The tensor for a key, a ``[key, row_start, row_stop]`` slice, or None."""
        if spec is None:
            return None
        if isinstance(spec, list):
            return self.t[spec[0]][spec[1]:spec[2]]
        return self.t[spec]

    def req(self, spec: Any) -> Tensor:
        t = self.get(spec)
        assert t is not None
        return t

    def nodes(self, n: int, kind: int, layer: int, bias: Tensor | None = None) -> Tensor:
        f = torch.zeros(n, NODE_FEATURE_DIM, dtype=self.dtype)
        f[:, NF_TYPE], f[:, NF_LAYER], f[:, NF_POSITION] = kind, layer, -1
        f[:, NF_GAMMA], f[:, NF_VAR] = 1, 1
        if bias is not None:
            f[:, NF_BIAS] = bias
        self.node_blocks.append(f)
        ids = torch.arange(self.num_nodes, self.num_nodes + n)
        self.num_nodes += n
        return ids

    def edges(self, src: Tensor, dst: Tensor, value: Tensor | float, kind: int, layer: int,
              kx: Tensor | float = 0.0, ky: Tensor | float = 0.0) -> None:
        f = torch.empty(src.numel(), EDGE_FEATURE_DIM, dtype=self.dtype)
        f[:, EF_VALUE], f[:, EF_TYPE], f[:, EF_LAYER], f[:, EF_KX], f[:, EF_KY] = (
            value, kind, layer, kx, ky)
        self.edge_blocks.append((src, dst, f))

    def reserve(self, n: int, name: str) -> None:
        self.num_edges += n
        if self.max_edges is not None and self.num_edges > self.max_edges:
            raise ValueError(f"parameter graph exceeds max_edges={self.max_edges} at layer "
                             f"{name!r} ({self.num_edges} edges so far); pass coarsen=... to "
                             "summarize large layers")

    def coarsened(self, numel: int) -> bool:
        return self.coarsen is not None and numel > self.coarsen

    def dense(self, src_ids: Tensor, dst_ids: Tensor, w: Tensor, kind: int, layer: int,
              name: str) -> None:
        """Edges src_ids[j] -> dst_ids[o] with value w[o, j] (summarized above ``coarsen``)."""
        o, i = w.shape
        if self.coarsened(w.numel()):
            rows, cols = self.top_rows(w, i)
            self.summarize(w, w, src_ids, dst_ids, rows.numel(), layer, name)
            self.edges(src_ids[cols], dst_ids[rows], w[rows, cols], kind, layer)
            return
        self.reserve(w.numel(), name)
        self.edges(src_ids.repeat(o), dst_ids.repeat_interleave(i), w.reshape(-1), kind, layer)

    def top_rows(self, w: Tensor, n_in: int) -> tuple[Tensor, Tensor]:
        """(row, column) of entries above their row's (k+1)-th largest magnitude (see Coarsening).

        ``n_in`` is the number of source nodes, which sets ``k`` (for a conv, rows also span kernel
        positions). The threshold depends on each row's values only, never on index order.
        """
        assert self.coarsen is not None
        out, width = w.shape
        k = max(1, (self.coarsen - 2 * (out + n_in)) // out)
        if k >= width:  # NOTE: only when 2 * (out + n_in) dominates; keep every entry
            return torch.nonzero(torch.ones_like(w, dtype=torch.bool), as_tuple=True)
        top, idx = w.abs().topk(k + 1, dim=1, sorted=True)
        # NOTE: entries strictly above the (k+1)-th magnitude are all among the top k
        keep = top[:, :k] > top[:, k:]
        return torch.arange(out).unsqueeze(1).expand(out, k)[keep], idx[:, :k][keep]

    def summarize(self, rows: Tensor, cols: Tensor, src_ids: Tensor, dst_ids: Tensor, kept: int,
                  layer: int, name: str) -> None:
        """A summary node: EDGE_SUMMARY_* from it to each destination (over ``rows[o, :]``) and
        to it from each source (over ``cols[:, j]``)."""
        self.reserve(kept + 2 * (dst_ids.numel() + src_ids.numel()), name)
        summary = self.nodes(1, NODE_SUMMARY, layer)
        r_mean, r_std = _stats(rows, 1)
        c_mean, c_std = _stats(cols, 0)
        to_dst, from_src = summary.expand(dst_ids.numel()), summary.expand(src_ids.numel())
        self.edges(to_dst, dst_ids, r_mean, EDGE_SUMMARY_MEAN, layer)
        self.edges(to_dst, dst_ids, r_std, EDGE_SUMMARY_STD, layer)
        self.edges(src_ids, from_src, c_mean, EDGE_SUMMARY_MEAN, layer)
        self.edges(src_ids, from_src, c_std, EDGE_SUMMARY_STD, layer)

    # -- ops -------------------------------------------------------------------------------
    def linear(self, op: dict[str, Any]) -> None:
        self.layer += 1
        w = self.req(op["weight"])
        out = self.nodes(w.shape[0], NODE_NEURON, self.layer, self.get(op["bias"]))
        self.dense(self.values[op["input"]], out, w, EDGE_LINEAR, self.layer, op["name"])
        self.set(op["output"], out)

    def conv(self, op: dict[str, Any]) -> None:
        self.layer += 1
        w = self.req(op["weight"])
        n_out, n_in_g, groups = w.shape[0], w.shape[1], op["groups"]
        ks = op["kernel_size"]
        k = math.prod(ks)
        out = self.nodes(n_out, NODE_CHANNEL, self.layer, self.get(op["bias"]))
        src_ids = self.values[op["input"]]
        if self.coarsened(w.numel()):
            og = n_out // groups
            rows = w.reshape(n_out, n_in_g * k)
            # column j = g * n_in_g + c: channel c of group g feeds output channels of group g only
            cols = w.reshape(groups, og, n_in_g, k).permute(1, 3, 0, 2).reshape(og * k,
                                                                             groups * n_in_g)
            o, f = self.top_rows(rows, src_ids.numel())
            self.summarize(rows, cols, src_ids, out, o.numel(), self.layer, op["name"])
            j, p = (o // og) * n_in_g + f // k, f % k
            val = rows[o, f]
        else:
            self.reserve(w.numel(), op["name"])
            o = torch.arange(n_out).view(-1, 1, 1).expand(n_out, n_in_g, k)
            j = (o // (n_out // groups)) * n_in_g + torch.arange(n_in_g).view(1, -1, 1)
            j = j.reshape(-1)
            p = torch.arange(k).expand(n_out, n_in_g, k).reshape(-1)
            o, val = o.reshape(-1), w.reshape(-1)
        if len(ks) == 1:
            kx, ky = _offsets(ks[0], self.dtype)[p], 0.0
        else:
            kx, ky = _offsets(ks[1], self.dtype)[p % ks[1]], _offsets(ks[0], self.dtype)[p // ks[1]]
        self.edges(src_ids[j], out[o], val, EDGE_CONV, self.layer, kx, ky)
        self.set(op["output"], out)

    def embedding(self, op: dict[str, Any]) -> None:
        self.layer += 1
        w = self.req(op["weight"])  # [vocab, dim]
        vocab, dim = w.shape
        if self.coarsened(w.numel()):
            assert self.coarsen is not None
            n_blocks = max(1, min(vocab, self.coarsen // (2 * dim)))
            # contiguous blocks by token index: block b holds tokens first[b] .. first[b+1]-1
            first = [-(-b * vocab // n_blocks) for b in range(n_blocks + 1)]
            tokens = self.nodes(n_blocks, NODE_TOKEN, 0)
            self.updates.append((tokens, NF_POSITION, torch.tensor(first[:-1], dtype=self.dtype)))
            out = self.nodes(dim, NODE_NEURON, self.layer)
            mean, std = (torch.stack(s) for s in zip(*(
                _stats(w[first[b]:first[b + 1]], 0) for b in range(n_blocks))))
            self.reserve(2 * n_blocks * dim, op["name"])
            src, dst = tokens.repeat_interleave(dim), out.repeat(n_blocks)
            self.edges(src, dst, mean.reshape(-1), EDGE_SUMMARY_MEAN, self.layer)
            self.edges(src, dst, std.reshape(-1), EDGE_SUMMARY_STD, self.layer)
            self.set(op["output"], out)
            return
        tokens = self.nodes(vocab, NODE_TOKEN, 0)
        self.updates.append((tokens, NF_POSITION, torch.arange(vocab, dtype=self.dtype)))
        out = self.nodes(dim, NODE_NEURON, self.layer)
        self.dense(tokens, out, w.t(), EDGE_EMBEDDING, self.layer, op["name"])
        self.set(op["output"], out)

    def norm(self, op: dict[str, Any]) -> None:
        ids = self.values[op["input"]]
        layer = self.layer_of[op["input"]]
        if any(i in self.normed for i in ids.tolist()):
            # NOTE: second norm on the same neurons: give it an identity copy to carry its params
            copy = self.nodes(ids.numel(), NODE_NORM_COPY, layer)
            self.reserve(ids.numel(), op["name"])
            self.edges(ids, copy, 1.0, EDGE_NORM_COPY, layer)
            ids = copy
        self.normed.update(ids.tolist())
        kind = {"batch": NORM_BATCH, "layer": NORM_LAYER, "group": NORM_GROUP}[op["norm"]]
        self.updates.append((ids, NF_NORM, float(kind)))
        for col, key in ((NF_GAMMA, "weight"), (NF_BETA, "bias"), (NF_MEAN, "running_mean"),
                         (NF_VAR, "running_var")):
            if (t := self.get(op[key])) is not None:
                self.updates.append((ids, col, t))
        self.values[op["output"]], self.layer_of[op["output"]] = ids, layer

    def attention(self, op: dict[str, Any]) -> None:
        self.layer += 1
        lq, name = self.layer, op["name"]
        wq, wk, wv = (self.req(op[f"{c}_weight"]) for c in "qkv")
        e, h = wq.shape[0], op["num_heads"]
        q = self.nodes(e, NODE_ATTN_Q, lq, self.get(op["q_bias"]))
        k = self.nodes(e, NODE_ATTN_K, lq, self.get(op["k_bias"]))
        v = self.nodes(e, NODE_ATTN_V, lq, self.get(op["v_bias"]))
        heads = self.nodes(h, NODE_ATTN_HEAD, lq)
        self.dense(self.values[op["query"]], q, wq, EDGE_ATTN_Q, lq, name)
        self.dense(self.values[op["key"]], k, wk, EDGE_ATTN_K, lq, name)
        self.dense(self.values[op["value"]], v, wv, EDGE_ATTN_V, lq, name)
        head_of = heads[torch.arange(e) // (e // h)]
        self.reserve(3 * e, name)
        self.edges(q, k, 1.0, EDGE_ATTN_QK, lq)
        self.edges(k, head_of, 1.0, EDGE_ATTN_KEY_HEAD, lq)
        self.edges(head_of, v, 1.0, EDGE_ATTN_HEAD_VALUE, lq)
        self.layer += 1
        out = self.nodes(e, NODE_NEURON, self.layer, self.get(op["out_bias"]))
        self.dense(v, out, self.req(op["out_weight"]), EDGE_ATTN_OUT, self.layer, name)
        self.set(op["output"], out)

    def residual(self, op: dict[str, Any]) -> None:
        src, dst = self.values[op["input"]], self.values[op["output"]]
        if torch.equal(src, dst):
            return
        self.reserve(dst.numel(), "residual")
        self.edges(src, dst, 1.0, EDGE_RESIDUAL, self.layer_of[op["output"]])

    def set(self, value: str, ids: Tensor) -> None:
        self.values[value], self.layer_of[value] = ids, self.layer

    def finish(self) -> ParameterGraph:
        x = torch.cat(self.node_blocks) if self.node_blocks else torch.zeros(0, NODE_FEATURE_DIM)
        for ids, col, val in self.updates:
            x[ids, col] = val.to(self.dtype) if isinstance(val, Tensor) else val
        if self.edge_blocks:
            src, dst, ef = (torch.cat(parts) for parts in zip(*self.edge_blocks))
            ei = torch.stack([src, dst])
        else:
            ei, ef = torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, EDGE_FEATURE_DIM)
        return ParameterGraph(node_features=x, edge_index=ei, edge_features=ef)


def _checked_tensors(state_dict: Mapping[str, Tensor], shapes: Mapping[str, list[int]],
                     dtype: torch.dtype) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        if key not in state_dict:
            raise ValueError(f"state dict lacks {key!r}, which the architecture uses")
        t = state_dict[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"shape mismatch for {key!r}: state dict has {tuple(t.shape)}, "
                             f"architecture expects {tuple(shape)}")
        t = t.detach().to("cpu", dtype)
        # NOTE: min/max propagate NaN and expose inf, in one pass without a mask the size of t
        if t.numel() and not all(torch.isfinite(v) for v in torch.aminmax(t)):
            raise ValueError(f"non-finite values (NaN or inf) in {key!r}")
        out[key] = t
    return out


def build_graph(state_dict: Mapping[str, Tensor], architecture: Mapping[str, Any], *,
                max_edges: int | None = None, coarsen: int | None = None,
                dtype: torch.dtype = torch.float32) -> ParameterGraph:
    """Parameter graph of ``state_dict`` laid out as ``architecture`` (from describe_architecture).

    ``coarsen``: summarize every weight tensor with more than this many scalars, keeping the graph
    permutation invariant (see "Coarsening" in the module docstring); None (default) keeps one edge
    per weight. Raises ValueError for a missing key, a shape mismatch (naming the key and both
    shapes), NaN/inf values, a ``coarsen`` below 1, or more than ``max_edges`` edges.
    """
    if architecture.get("format") != ARCHITECTURE_FORMAT or architecture.get(
            "version") != ARCHITECTURE_VERSION:
        raise ValueError(f"not an architecture description of format {ARCHITECTURE_FORMAT!r} "
                         f"version {ARCHITECTURE_VERSION}")
    if coarsen is not None and (isinstance(coarsen, bool) or int(coarsen) != coarsen
                                or coarsen < 1):
        raise ValueError(f"coarsen must be a positive integer or None, got {coarsen!r}")
    b = _Builder(_checked_tensors(state_dict, architecture["parameters"], dtype), dtype, max_edges,
                 None if coarsen is None else int(coarsen))
    sizes = architecture["sizes"]
    for i, v in enumerate(architecture["inputs"]):
        ids = b.nodes(sizes[v], NODE_INPUT, 0)
        b.updates.append((ids, NF_POSITION, torch.arange(sizes[v], dtype=dtype)))
        b.set(v, ids)
    handlers: dict[str, Callable[[dict[str, Any]], None]] = {
        "Linear": b.linear, "Conv1d": b.conv, "Conv2d": b.conv, "Embedding": b.embedding,
        "MultiheadAttention": b.attention, "residual": b.residual,
        "BatchNorm1d": b.norm, "BatchNorm2d": b.norm, "LayerNorm": b.norm, "GroupNorm": b.norm,
    }
    for op in architecture["layers"]:
        handlers[op["type"]](op)
    for v in architecture["outputs"]:
        ids = b.values[v]
        b.updates.append((ids, NF_POSITION, torch.arange(ids.numel(), dtype=dtype)))
    return b.finish()


def graph_from_module(module: nn.Module, *, max_edges: int | None = None,
                      coarsen: int | None = None,
                      dtype: torch.dtype = torch.float32) -> ParameterGraph:
    """``build_graph(module.state_dict(), describe_architecture(module))``."""
    return build_graph(module.state_dict(), describe_architecture(module), max_edges=max_edges,
                       coarsen=coarsen, dtype=dtype)
