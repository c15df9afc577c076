"""Turns a module, or a state dict plus its architecture description, into a parameter graph.

The graph has one node per neuron or channel and one edge per weight, following Graph Metanetworks
(Lim et al.) as used by FMS (arXiv 2406.18630). Hidden neurons carry no identity, so the graph is the
same, up to relabelling, for every model that differs by a permutation of hidden neurons.

Node features (``ParameterGraph.node_features``, float ``[N, 9]``), columns ``NF_*``:
    0 type      ``NODE_*``: input, token (an Embedding row, or a block of rows when coarsened),
                neuron (Linear / Embedding / attention output), channel (conv), attention q / k / v,
                attention head, norm copy, summary (one per coarsened weight tensor, see below)
    1 layer     index of the producing layer in data-flow order (0 for network inputs and tokens)
    2 position  index within the network inputs, the Embedding vocabulary or the network outputs;
                -1 for every hidden node
    3 bias      bias of the producing Linear / conv / projection (0 when absent)
    4 norm      ``NORM_*`` kind of the normalization applied to this neuron (0 none)
    5 gamma     normalization scale (1 when absent)
    6 beta      normalization shift (0 when absent)
    7 mean      BatchNorm running mean (0 when absent)
    8 var       BatchNorm running variance (1 when absent)

Edge features (``ParameterGraph.edge_features``, float ``[E, 5]``), columns ``EF_*``:
    0 value     the weight (1 for structural edges: residual, attention structure, norm copy; a
                mean or standard deviation for the summary edges of coarsened layers)
    1 type      ``EDGE_*``
    2 layer     layer index of the destination layer
    3 kx, 4 ky  conv kernel position as an offset normalized to [-1, 1] (0 for non-conv edges)

Layer encodings:
    Linear / conv   input neuron -> output neuron, one edge per weight; conv kernels give one
                    parallel edge per kernel position; grouped convs connect within groups.
    Embedding       one token node per vocabulary row -> one neuron per embedding dimension.
    Norms           no nodes or edges: gamma, beta (and BatchNorm running stats) become features of
                    the neurons they normalize. A neuron normalized twice first gets an identity copy.
    Residual add    ``a + b``: edges a_i -> b_i of value 1; the sum is carried by b's nodes (b is the
                    operand produced later, i.e. the branch).
    Attention       q, k, v projections into separate q / k / v nodes, one node per head, and the
                    out projection from v nodes to output neurons. Heads are structure: q_i -> k_i
                    (value 1, the dot-product pairing), k_i -> head(i), head(j) -> v_j. Permuting
                    heads, q/k dims jointly within a head, or v dims within a head (with the out
                    projection's columns) relabels the graph, matching the true symmetries.
Parameter-free ops (activations, pooling, dropout, flatten, reshape, transpose, mean over
non-feature axes) pass neuron identity through; they are assumed not to mix the feature axis.

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

import math
import operator
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

__all__ = [
    "ARCHITECTURE_FORMAT",
    "EDGE_FEATURE_DIM",
    "NODE_FEATURE_DIM",
    "GraphCache",
    "ParameterGraph",
    "UnsupportedLayerError",
    "build_graph",
    "describe_architecture",
    "graph_from_module",
]

ARCHITECTURE_FORMAT = "optuna_fms.architecture"
ARCHITECTURE_VERSION = 1

(NODE_INPUT, NODE_TOKEN, NODE_NEURON, NODE_CHANNEL, NODE_ATTN_Q, NODE_ATTN_K, NODE_ATTN_V,
 NODE_ATTN_HEAD, NODE_NORM_COPY, NODE_SUMMARY) = range(10)
NUM_NODE_TYPES = 10
(EDGE_LINEAR, EDGE_CONV, EDGE_EMBEDDING, EDGE_ATTN_Q, EDGE_ATTN_K, EDGE_ATTN_V, EDGE_ATTN_OUT,
 EDGE_RESIDUAL, EDGE_ATTN_QK, EDGE_ATTN_KEY_HEAD, EDGE_ATTN_HEAD_VALUE, EDGE_NORM_COPY,
 EDGE_SUMMARY_MEAN, EDGE_SUMMARY_STD) = range(14)
NUM_EDGE_TYPES = 14
#: Edge types of coarsened layers: the mean / std of a set of weights (see "Coarsening").
SUMMARY_EDGE_TYPES = (EDGE_SUMMARY_MEAN, EDGE_SUMMARY_STD)
#: Edge types that carry one weight scalar each (the others are structural, value 1, or summaries).
WEIGHT_EDGE_TYPES = (EDGE_LINEAR, EDGE_CONV, EDGE_EMBEDDING, EDGE_ATTN_Q, EDGE_ATTN_K, EDGE_ATTN_V,
                     EDGE_ATTN_OUT)
NORM_NONE, NORM_BATCH, NORM_LAYER, NORM_GROUP = range(4)
NUM_NORM_TYPES = 4

NF_TYPE, NF_LAYER, NF_POSITION, NF_BIAS, NF_NORM, NF_GAMMA, NF_BETA, NF_MEAN, NF_VAR = range(9)
NODE_FEATURE_DIM = 9
EF_VALUE, EF_TYPE, EF_LAYER, EF_KX, EF_KY = range(5)
EDGE_FEATURE_DIM = 5


_V = TypeVar("_V")


class UnsupportedLayerError(ValueError):
    """A module (or operation) the parameter graph cannot encode."""


@dataclass(frozen=True)
class ParameterGraph:
    """A parameter graph: node features [N, 9], edge_index [2, E] (src -> dst), edge features [E, 5]."""

    node_features: Tensor
    edge_index: Tensor
    edge_features: Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.node_features.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def to_pyg(self) -> Any:
        """This graph as a ``torch_geometric.data.Data`` (x, edge_index, edge_attr)."""
        from torch_geometric.data import Data  # NOTE: lazy, PyG import is slow and optional here

        return Data(x=self.node_features, edge_index=self.edge_index,
                    edge_attr=self.edge_features, num_nodes=self.num_nodes)

    def equals(self, other: ParameterGraph) -> bool:
        """Exact equality of all tensors."""
        return (torch.equal(self.node_features, other.node_features)
                and torch.equal(self.edge_index, other.edge_index)
                and torch.equal(self.edge_features, other.edge_features))


# ---------------------------------------------------------------------------------------------
# describe_architecture: module -> JSON description (torch.fx)

_PARAM_OWNERS = (nn.Linear, NonDynamicallyQuantizableLinear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d,
                 nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.MultiheadAttention)
_LEAVES = _PARAM_OWNERS + (nn.TransformerEncoderLayer, nn.TransformerEncoder)
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_SHAPE_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "type", "to_list"}


# NOTE: torch.fx patches nn.Module.__call__ and __getattr__ for the whole process while it traces.
# One trace at a time (nested patches of two tracers would be undone out of order), and modules
# called from other threads meanwhile (training with n_jobs > 1) run untouched.
_TRACE_LOCK = threading.Lock()


class _Tracer(torch.fx.Tracer):
    def __init__(self) -> None:
        super().__init__()
        self._thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in _LEAVES or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _qual(name: str) -> str:
    return repr(name) if name else "<root>"


class _Describer:
    """Walks a traced graph and emits layer ops over named neuron sets ("values")."""

    def __init__(self) -> None:
        self.sizes: dict[str, int | None] = {}
        self.placeholders: list[str] = []
        self.params: dict[str, list[int]] = {}
        self.layers: list[dict[str, Any]] = []

    def new_value(self, size: int | None) -> str:
        name = f"v{len(self.sizes)}"
        self.sizes[name] = size
        return name

    def bind(self, value: Any, size: int, who: str) -> str:
        if not isinstance(value, str):
            raise UnsupportedLayerError(f"{who}: its input does not come from the network inputs "
                                        "or a supported layer")
        cur = self.sizes[value]
        if cur is None:
            self.sizes[value] = size
        elif cur != size:
            raise UnsupportedLayerError(
                f"{who} expects {size} input features/channels but its input carries {cur} neurons "
                "(only ops that keep the feature axis, e.g. flatten after global pooling, are "
                "supported between layers)")
        return value

    def key(self, prefix: str, attr: str, t: Tensor | None) -> str | None:
        if t is None:
            return None
        k = f"{prefix}.{attr}" if prefix else attr
        self.params[k] = list(t.shape)
        return k

    # -- leaves ----------------------------------------------------------------------------
    def call_leaf(self, m: nn.Module, name: str, args: list[Any]) -> Any:
        who = f"{type(m).__name__} {_qual(name)}"
        if isinstance(m, nn.Linear):  # includes NonDynamicallyQuantizableLinear
            x = self.bind(args[0], m.in_features, who)
            out = self.new_value(m.out_features)
            self.layers.append({"type": "Linear", "name": name, "input": x, "output": out,
                                "weight": self.key(name, "weight", m.weight),
                                "bias": self.key(name, "bias", m.bias)})
            return out
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            x = self.bind(args[0], m.in_channels, who)
            out = self.new_value(m.out_channels)
            self.layers.append({"type": type(m).__name__, "name": name, "input": x, "output": out,
                                "kernel_size": list(m.kernel_size), "groups": m.groups,
                                "weight": self.key(name, "weight", m.weight),
                                "bias": self.key(name, "bias", m.bias)})
            return out
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            return self.norm(m, name, args[0], who)
        if isinstance(m, nn.Embedding):
            out = self.new_value(m.embedding_dim)
            self.layers.append({"type": "Embedding", "name": name, "output": out,
                                "weight": self.key(name, "weight", m.weight)})
            return out
        if isinstance(m, nn.MultiheadAttention):
            out = self.attention(m, name, args[0], args[1], args[2], who)
            return (out, None)  # NOTE: MHA returns (output, weights); getitem picks from this
        if isinstance(m, nn.TransformerEncoderLayer):
            return self.encoder_layer(m, name, args[0])
        if isinstance(m, nn.TransformerEncoder):
            x = args[0]
            for i, layer in enumerate(m.layers):
                x = self.call_leaf(layer, f"{name}.layers.{i}" if name else f"layers.{i}", [x])
            if m.norm is not None:
                x = self.call_leaf(m.norm, f"{name}.norm" if name else "norm", [x])
            return x
        raise AssertionError(type(m))

    def norm(self, m: nn.Module, name: str, x: Any, who: str) -> str:
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                raise UnsupportedLayerError(f"{who}: only 1-D normalized_shape is supported")
            size, kind = m.normalized_shape[0], "layer"
        elif isinstance(m, nn.GroupNorm):
            size, kind = m.num_channels, "group"
        else:
            size, kind = m.num_features, "batch"  # type: ignore[union-attr]
        x = self.bind(x, size, who)
        out = self.new_value(size)
        self.layers.append({
            "type": type(m).__name__, "name": name, "norm": kind, "input": x, "output": out,
            "weight": self.key(name, "weight", m.weight), "bias": self.key(name, "bias", m.bias),
            "running_mean": self.key(name, "running_mean", getattr(m, "running_mean", None)),
            "running_var": self.key(name, "running_var", getattr(m, "running_var", None)),
        })
        return out

    def attention(self, m: nn.MultiheadAttention, name: str, q: Any, k: Any, v: Any,
                  who: str) -> str:
        if m.bias_k is not None or m.bias_v is not None:
            raise UnsupportedLayerError(f"{who}: add_bias_kv=True is not supported")
        e = m.embed_dim
        q, k, v = self.bind(q, e, who), self.bind(k, m.kdim, who), self.bind(v, m.vdim, who)

        def rows(attr: str, t: Tensor | None, i: int) -> list[Any] | None:
            key = self.key(name, attr, t)
            return None if key is None else [key, i * e, (i + 1) * e]

        if m.in_proj_weight is not None:
            ws = [rows("in_proj_weight", m.in_proj_weight, i) for i in range(3)]
        else:
            ws = [rows(a, getattr(m, a), 0) for a in ("q_proj_weight", "k_proj_weight",
                                                      "v_proj_weight")]
        bs = [rows("in_proj_bias", m.in_proj_bias, i) for i in range(3)]
        out = self.new_value(e)
        op = f"{name}.out_proj" if name else "out_proj"
        self.layers.append({
            "type": "MultiheadAttention", "name": name, "query": q, "key": k, "value": v,
            "output": out, "num_heads": m.num_heads,
            "q_weight": ws[0], "k_weight": ws[1], "v_weight": ws[2],
            "q_bias": bs[0], "k_bias": bs[1], "v_bias": bs[2],
            "out_weight": self.key(op, "weight", m.out_proj.weight),
            "out_bias": self.key(op, "bias", m.out_proj.bias),
        })
        return out

    def residual(self, a: str, b: str) -> str:
        # NOTE: the sum lives on the operand created later (the branch); `a` feeds it by 1-edges.
        if int(a[1:]) > int(b[1:]):
            a, b = b, a
        size_a, size_b = self.sizes[a], self.sizes[b]
        if size_a is None or size_b is None:
            self.sizes[a] = self.sizes[b] = size_a or size_b
        elif size_a != size_b:
            raise UnsupportedLayerError(f"residual addition of {size_a} and {size_b} neurons")
        self.layers.append({"type": "residual", "input": a, "output": b})
        return b

    def encoder_layer(self, m: nn.TransformerEncoderLayer, name: str, x: Any) -> str:
        p = f"{name}." if name else ""
        sub = {n: (getattr(m, n), p + n) for n in ("norm1", "norm2", "linear1", "linear2",
                                                   "self_attn")}

        def leaf(n: str, *a: Any) -> Any:
            mod, qn = sub[n]
            return self.call_leaf(mod, qn, list(a))

        if m.norm_first:  # x = x + sa(norm1(x)); x = x + ff(norm2(x))
            h = leaf("norm1", x)
            s = self.residual(x, leaf("self_attn", h, h, h)[0])
            return self.residual(s, leaf("linear2", leaf("linear1", leaf("norm2", s))))
        # x = norm1(x + sa(x)); x = norm2(x + ff(x))
        s = leaf("norm1", self.residual(x, leaf("self_attn", x, x, x)[0]))
        return leaf("norm2", self.residual(s, leaf("linear2", leaf("linear1", s))))


def _check_supported(module: nn.Module) -> None:
    for name, m in module.named_modules():
        if type(m) not in _PARAM_OWNERS and next(m.parameters(recurse=False), None) is not None:
            raise UnsupportedLayerError(
                f"unsupported parametrized layer {type(m).__name__} at {_qual(name)}: supported are "
                + ", ".join(t.__name__ for t in _LEAVES if t is not NonDynamicallyQuantizableLinear))


def _flat_nodes(a: Any) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(a, lambda n: out.append(n) or n)
    return out


def describe_architecture(module: nn.Module) -> dict[str, Any]:
    """JSON-serializable description of ``module``'s layer structure, found by torch.fx tracing.

    Lists the parametrized layers in data-flow order with their state-dict keys, and how neuron sets
    ("values") flow between them. Raises ``UnsupportedLayerError`` for layers or ops it cannot
    encode. Safe to call while other threads run modules (see ``_TRACE_LOCK``).
    """
    _check_supported(module)
    d = _Describer()
    if type(module) in _LEAVES:  # NOTE: fx traces *into* the root, so a bare leaf is handled here
        n_in = 3 if isinstance(module, nn.MultiheadAttention) else 1
        ins = [d.new_value(None) for _ in range(n_in)]
        d.placeholders = ins
        out = d.call_leaf(module, "", list(ins))
        outputs = [out[0] if isinstance(out, tuple) else out]
    else:
        try:
            with _TRACE_LOCK:
                graph = _Tracer().trace(module)
        except Exception as exc:  # noqa: BLE001 - fx raises many types
            raise UnsupportedLayerError(
                f"torch.fx could not trace {type(module).__name__}: {exc}") from exc
        outputs = _walk(module, graph, d)
    sizes = {k: v for k, v in d.sizes.items() if v is not None}
    return {
        "format": ARCHITECTURE_FORMAT, "version": ARCHITECTURE_VERSION,
        "module": type(module).__name__,
        "inputs": [v for v in d.placeholders if v in sizes],
        "sizes": sizes,
        "parameters": d.params,
        "layers": d.layers,
        "outputs": [v for v in outputs if v in sizes],
    }


def _walk(root: nn.Module, graph: torch.fx.Graph, d: _Describer) -> list[str]:
    env: dict[torch.fx.Node, Any] = {}
    named_tensors = dict(root.named_parameters()) | dict(root.named_buffers())
    outputs: list[str] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = d.new_value(None)
            d.placeholders.append(env[node])
        elif node.op == "get_attr":
            if node.target in named_tensors:
                raise UnsupportedLayerError(
                    f"parameter or buffer {node.target!r} is used directly in forward (functional "
                    "use of weights, e.g. weight tying, is not supported)")
            env[node] = None
        elif node.op == "output":
            for n in _flat_nodes(node.args):
                val = env[n]
                val = val[0] if isinstance(val, tuple) else val
                if isinstance(val, str):
                    outputs.append(val)
        elif node.op == "call_module" and type(m := root.get_submodule(node.target)) in _LEAVES:
            args = list(node.args)
            if isinstance(m, nn.MultiheadAttention):
                names = ("query", "key", "value")
                args = args + [node.kwargs[k] for k in names[len(args):3]]
            env[node] = d.call_leaf(m, node.target, [env[a] if isinstance(a, torch.fx.Node)
                                                     else None for a in args])
        else:
            env[node] = _generic(root, node, env, d)
    return outputs


def _generic(root: nn.Module, node: torch.fx.Node, env: dict[torch.fx.Node, Any],
             d: _Describer) -> Any:
    """Parameter-free op: passes a single neuron set through; ``a + b`` is a residual."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if next(m.parameters(), None) is not None:
            raise UnsupportedLayerError(
                f"unsupported parametrized layer {type(m).__name__} at {_qual(str(node.target))}")
    ins = [env[n] for n in _flat_nodes((node.args, node.kwargs))]
    if node.target is operator.getitem and isinstance(ins[0], tuple):
        return ins[0][node.args[1]]
    if any(isinstance(v, tuple) for v in ins):
        raise UnsupportedLayerError(f"unsupported use of a MultiheadAttention result in {node.name}")
    if (node.op == "call_method" and node.target in _SHAPE_METHODS) or (
            node.target is getattr and node.args[1] in ("shape", "dtype", "device", "ndim")):
        return None
    values = list(dict.fromkeys(v for v in ins if isinstance(v, str)))
    if len(values) <= 1:
        return values[0] if values else None
    is_add = node.target in _ADD_FUNCTIONS or (node.op == "call_method"
                                               and node.target in _ADD_METHODS)
    if len(values) == 2 and is_add:
        return d.residual(values[0], values[1])
    raise UnsupportedLayerError(
        f"operation {getattr(node.target, '__name__', node.target)!s} ({node.name}) combines "
        f"{len(values)} neuron-carrying tensors; only additions (residual connections) are supported")


# ---------------------------------------------------------------------------------------------
# build_graph: state dict + description -> ParameterGraph


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


class GraphCache(Generic[_V]):
    """Thread-safe LRU keyed by a string: parameter graphs by content hash (e.g. a checkpoint's
    sha256), or anything else built once per key (templates by architecture)."""

    def __init__(self, maxsize: int = 512) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self._items: OrderedDict[str, _V] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_build(self, key: str, build: Callable[[], _V]) -> _V:
        """The cached graph for ``key``, calling ``build()`` only on a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        graph = build()  # NOTE: built outside the lock; a racing duplicate build is harmless
        with self._lock:
            self._items[key] = graph
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return graph

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
