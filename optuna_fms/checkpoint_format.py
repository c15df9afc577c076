"""One checkpoint <-> one safetensors file: tensors + JSON metadata (states as tensors, never pickle), SHA-256."""

from __future__ import annotations

from collections.abc import Mapping
import hashlib
import json
import math
from typing import Any

import numpy as np
import torch

MIMETYPE = "application/x-safetensors"
FORMAT = "optuna-fms/1"
_META_KEY = "optuna_fms"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or cannot be written or restored."""


def _model_tensors(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        state = model_or_state_dict.state_dict()
    else:
        state = dict(model_or_state_dict)
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"State dict entry {key!r} is a {type(value).__name__}, not a tensor.")
        tensors[f"model/{key}"] = _storable(value)
    return tensors


def _storable(t: torch.Tensor) -> torch.Tensor:
    # NOTE: safetensors refuses shared or strided storage; a contiguous CPU copy is always valid.
    return t.detach().to("cpu", copy=True).contiguous()


# NOTE: the JSON skeleton of nested states. Tensors go to the safetensors body and leave a
# reference; dicts keep their key types (optimizer states are keyed by int); tuples stay tuples.
def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = _storable(obj)
        return {"__tensor__": path}
    if isinstance(obj, Mapping):
        return {"__dict__": [[_encode(k, f"{path}/k{i}", tensors), _encode(v, f"{path}/{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
    raise CheckpointError(f"Cannot store a {type(obj).__name__} at {path!r} in a checkpoint.")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
    return obj


def _write_file(path: str, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """``tensors`` and the JSON ``header`` as one safetensors file at ``path``."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={_META_KEY: json.dumps(header)})


def _read_file(path: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON header and the tensors of the file at ``path``; CheckpointError naming ``what`` if unparsable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            header = json.loads((f.metadata() or {})[_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise CheckpointError(f"The {what} cannot be parsed: {err}") from err
    return header, tensors


def _contents(header: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A file's header and tensors decoded: step, state dict, metadata, states and architecture."""
    state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    return {
        "step": int(header["step"]),
        "state_dict": state,
        "metadata": _decode(header.get("metadata"), tensors) or {},
        "optimizer_state": _decode(header.get("optimizer"), tensors),
        "scheduler_state": _decode(header.get("scheduler"), tensors),
        "architecture": header.get("architecture"),
        "rng_state": _decode(header.get("rng"), tensors),
    }


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
