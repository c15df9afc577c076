"""Describes a module's layer structure as a JSON-able architecture description, by torch.fx.

The description lists the parametrized layers in data-flow order with their state-dict keys, and
how neuron sets ("values") flow between them; :func:`optuna_fms.graphs.build.build_graph` turns it
plus a state dict into a parameter graph (see :mod:`optuna_fms.graphs.schema` for the encoding).
"""

from __future__ import annotations

from collections.abc import Callable
import operator
import threading
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from optuna_fms.graphs.schema import (
    ARCHITECTURE_FORMAT,
    ARCHITECTURE_VERSION,
    UnsupportedLayerError,
)

__all__ = ["describe_architecture"]

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
