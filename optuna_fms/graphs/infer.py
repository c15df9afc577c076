"""An architecture description found without being given one.

For a module: :func:`describe_architecture` (torch.fx), once per architecture and thread-safe.
For a plain state dict: read from its parameter names and shapes when they form an unambiguous
sequential chain of supported layers. The rule (README, "Weights"):

* Every entry belongs to a layer named by its key up to the last dot (``0.weight``,
  ``fc1.weight``, ``features.3.bias``): at most two name levels, as in an ``nn.Sequential`` or
  a model of named layers. Deeper names (blocks inside stages, as in ResNets and transformers)
  may hide residual or parallel paths and are not read.
* A layer is recognized by its entries alone: a 2-D ``weight`` with a ``bias`` is a Linear; a
  3-D or 4-D ``weight`` is a Conv1d or Conv2d; ``running_mean`` and ``running_var`` make a
  BatchNorm; a 1-D ``weight`` (and ``bias``) is a LayerNorm after a Linear or an Embedding and a
  GroupNorm after a conv. A 2-D ``weight`` without a bias is an Embedding only when it is the
  first layer and the next layer takes its second dimension (a Linear when it takes the first).
  Anything else (attention's ``in_proj_weight``, a custom parameter) is not read.
* Layers follow each other in the state dict's order, each taking the previous one's output
  size (a conv's groups are the previous channels over its input channels). A flatten of
  spatial positions into a Linear breaks the chain (as for torch.fx, only global pooling is
  understood between a conv and a Linear).

What a state dict cannot show: a residual addition or branch between flat-named layers whose
sizes happen to chain, a reordered ``forward``, ops without parameters. Such a state dict is read
as a plain chain; pass the module or ``architecture=describe_architecture(model)`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
import threading
from typing import Any

from torch import Tensor, nn

from optuna_fms.graphs.describe import describe_architecture
from optuna_fms.graphs.schema import (
    ARCHITECTURE_FORMAT,
    ARCHITECTURE_VERSION,
    UnsupportedLayerError,
)

__all__ = ["NotInferableError", "find_architecture", "infer_architecture"]

_MAX_NAME_LEVELS = 2
_IGNORED = {"num_batches_tracked"}  # a BatchNorm counter, not a parameter of the graph


class NotInferableError(ValueError):
    """A state dict whose architecture cannot be read from its names and shapes alone."""


def infer_architecture(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The description of a sequential chain read from ``state_dict`` (see the module docstring).

    Raises :class:`NotInferableError` saying which entry breaks the rule.
    """
    layers = _group(state_dict)
    if not layers:
        raise NotInferableError("the state dict holds no layer weights")
    chain = _Chain()
    for i, (name, entries) in enumerate(layers):
        following = layers[i + 1][1] if i + 1 < len(layers) else None
        chain.add(name, entries, first=i == 0, next_input=_input_size(following))
    return chain.description()


def _group(state_dict: Mapping[str, Tensor]) -> list[tuple[str, dict[str, list[int]]]]:
    groups: dict[str, dict[str, list[int]]] = {}
    order: list[str] = []
    for key, tensor in state_dict.items():
        prefix, _, attr = key.rpartition(".")
        if attr in _IGNORED:
            continue
        if prefix.count(".") + 1 > _MAX_NAME_LEVELS:
            raise NotInferableError(f"{key!r} is nested {prefix.count('.') + 1} levels deep, which "
                                    "may hide residual or parallel paths")
        if prefix not in groups:
            groups[prefix] = {}
            order.append(prefix)
        elif order[-1] != prefix:
            raise NotInferableError(f"the entries of layer {prefix!r} are not contiguous")
        groups[prefix][attr] = list(tensor.shape)
    return [(p, groups[p]) for p in order]


def _kind(name: str, entries: Mapping[str, list[int]]) -> str:
    """linear, matrix (Linear or Embedding), conv1d, conv2d, batchnorm or affinenorm."""
    attrs, weight = set(entries), entries.get("weight")
    if {"running_mean", "running_var"} <= attrs <= {"weight", "bias", "running_mean", "running_var"}:
        sizes = {tuple(s) for s in entries.values()}
        if len(sizes) == 1 and len(next(iter(sizes))) == 1:
            return "batchnorm"
    elif weight is not None and attrs <= {"weight", "bias"}:
        bias = entries.get("bias")
        kinds = {1: "affinenorm", 2: "matrix" if bias is None else "linear", 3: "conv1d", 4: "conv2d"}
        if len(weight) in kinds and (bias is None or bias == weight[:1]):
            return kinds[len(weight)]
    shown = ", ".join(f"{a} {tuple(s)}" for a, s in entries.items())
    raise NotInferableError(f"layer {name!r} ({shown}) is not a Linear, Conv1d/2d, norm or Embedding")


def _input_size(entries: Mapping[str, list[int]] | None) -> int | None:
    """The input size a layer takes, as far as its entries alone tell (None: not known)."""
    if entries is None or "weight" not in entries:
        return None if entries is None else entries["running_mean"][0]
    weight = entries["weight"]
    return weight[0] if len(weight) == 1 else weight[1]


class _Chain:
    """Builds the description in the same layout as :func:`describe_architecture`."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.inputs: list[str] = []
        self.params: dict[str, list[int]] = {}
        self.layers: list[dict[str, Any]] = []
        self.current: str | None = None
        self.last_weighted = ""

    def value(self, size: int) -> str:
        name = f"v{len(self.sizes)}"
        self.sizes[name] = size
        return name

    def take(self, name: str, size: int) -> str:
        """The current value as the input of a layer taking ``size`` (the network input first)."""
        if self.current is None:
            self.current = self.value(size)
            self.inputs.append(self.current)
        elif self.sizes[self.current] != size:
            raise NotInferableError(
                f"layer {name!r} takes {size} features/channels but the layer before it gives "
                f"{self.sizes[self.current]} (a flatten of spatial positions, a residual or a branch "
                "cannot be read from a state dict)")
        return self.current

    def key(self, name: str, attr: str, entries: Mapping[str, list[int]]) -> str | None:
        if attr not in entries:
            return None
        k = f"{name}.{attr}" if name else attr
        self.params[k] = entries[attr]
        return k

    def add(self, name: str, entries: Mapping[str, list[int]], *, first: bool,
            next_input: int | None) -> None:
        kind = _kind(name, entries)
        if kind == "matrix":
            kind = self.linear_or_embedding(name, entries["weight"], first, next_input)
        weight = entries.get("weight")
        if kind == "embedding":
            out = self.value(weight[1])
            self.layers.append({"type": "Embedding", "name": name, "output": out,
                                "weight": self.key(name, "weight", entries)})
        elif kind == "linear":
            x = self.take(name, weight[1])
            out = self.value(weight[0])
            self.layers.append({"type": "Linear", "name": name, "input": x, "output": out,
                                "weight": self.key(name, "weight", entries),
                                "bias": self.key(name, "bias", entries)})
        elif kind in ("conv1d", "conv2d"):
            out = self.conv(name, entries, kind)
        else:
            out = self.norm(name, entries, kind)
        if kind != "batchnorm" and kind != "affinenorm":
            self.last_weighted = kind
        self.current = out

    def linear_or_embedding(self, name: str, weight: list[int], first: bool,
                            next_input: int | None) -> str:
        if not first:
            return "linear"
        rows, cols = weight
        if next_input == rows and rows != cols:
            return "linear"
        if next_input == cols and rows != cols:
            return "embedding"
        raise NotInferableError(f"layer {name!r} (weight {tuple(weight)}, no bias) may be a Linear "
                                "or an Embedding")

    def conv(self, name: str, entries: Mapping[str, list[int]], kind: str) -> str:
        weight = entries["weight"]
        n_out, n_in_group = weight[0], weight[1]
        channels = n_in_group if self.current is None else self.sizes[self.current]
        groups, rest = divmod(channels, n_in_group)
        if rest or n_out % groups:
            raise NotInferableError(f"conv {name!r} takes {n_in_group} channels per group, which does "
                                    f"not divide the {channels} channels before it")
        x = self.take(name, channels)
        out = self.value(n_out)
        self.layers.append({"type": "Conv1d" if kind == "conv1d" else "Conv2d", "name": name,
                            "input": x, "output": out, "kernel_size": weight[2:], "groups": groups,
                            "weight": self.key(name, "weight", entries),
                            "bias": self.key(name, "bias", entries)})
        return out

    def norm(self, name: str, entries: Mapping[str, list[int]], kind: str) -> str:
        size = next(iter(entries.values()))[0]
        after_conv = self.last_weighted.startswith("conv")
        if kind == "batchnorm":
            norm, type_ = "batch", "BatchNorm2d" if self.last_weighted == "conv2d" else "BatchNorm1d"
        else:
            norm, type_ = ("group", "GroupNorm") if after_conv else ("layer", "LayerNorm")
        x = self.take(name, size)
        out = self.value(size)
        self.layers.append({"type": type_, "name": name, "norm": norm, "input": x, "output": out,
                            **{a: self.key(name, a, entries)
                               for a in ("weight", "bias", "running_mean", "running_var")}})
        return out

    def description(self) -> dict[str, Any]:
        return {"format": ARCHITECTURE_FORMAT, "version": ARCHITECTURE_VERSION, "module": None,
                "inferred": "state dict", "inputs": self.inputs, "sizes": self.sizes,
                "parameters": self.params, "layers": self.layers,
                "outputs": [self.current] if self.current is not None else []}


# --- once per architecture -------------------------------------------------------------------

# NOTE: one lock for lookups and traces, so two threads meeting a new architecture trace it once.
_lock = threading.Lock()
_found: dict[Any, dict[str, Any] | tuple[type[ValueError], str]] = {}
_MAX_FOUND = 256


def find_architecture(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> dict[str, Any]:
    """The description of a module (torch.fx) or of a state dict (:func:`infer_architecture`).

    Found once per architecture (the module's class, its submodules' types and its parameter
    names and shapes; for a state dict, the names and shapes) and cached, failures included:
    raises the same :class:`UnsupportedLayerError` or :class:`NotInferableError` again. Safe
    with several threads. The description returned is shared: do not modify it.
    """
    if isinstance(model_or_state_dict, nn.Module):
        module = model_or_state_dict
        shapes = tuple((k, tuple(t.shape)) for k, t in module.state_dict().items())
        key: Any = (type(module), tuple((n, type(m)) for n, m in module.named_modules()), shapes)
        find: Any = lambda: describe_architecture(module)  # noqa: E731
    else:
        state = model_or_state_dict
        key = tuple((k, tuple(t.shape)) for k, t in state.items())
        find = lambda: infer_architecture(state)  # noqa: E731
    with _lock:
        found = _found.get(key)
        if found is None:
            try:
                found = find()
            except (UnsupportedLayerError, NotInferableError) as err:
                found = (type(err), str(err))
            if len(_found) >= _MAX_FOUND:
                _found.pop(next(iter(_found)))
            _found[key] = found
    if isinstance(found, tuple):
        raise found[0](found[1])
    return found
