"""Imports DGL (the optional extra ``optuna-fms[dgl]``) on torch versions its PyPI wheel predates.

The newest DGL on PyPI, 2.1.0, ships its GraphBolt library only for torch 2.0.0 - 2.2.1, yet
``import dgl`` loads GraphBolt eagerly (through ``dgl.distributed``) and fails on any other torch.
Nothing else DGL's message passing needs depends on the torch version: GraphBolt is only touched
inside function bodies of ``dgl.distributed``. So when this torch has no GraphBolt build, a
placeholder module takes the place of ``dgl.graphbolt`` before the import; no DGL file is changed.
``dgl.graphbolt`` and ``dgl.sparse`` are then unavailable; graphs, ``update_all`` / ``apply_edges``,
batching and readouts work (on CPU: the PyPI wheel is a CPU-only build).

Always import DGL through :func:`import_dgl`: a plain ``import dgl`` that runs first fails.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Any

__all__ = ["INSTALL_HINT", "import_dgl"]

INSTALL_HINT = 'pip install "optuna-fms[dgl]"'
_GRAPHBOLT = "dgl.graphbolt"


def _graphbolt_placeholder(torch_release: str) -> types.ModuleType:
    module = types.ModuleType(_GRAPHBOLT, f"Placeholder: DGL's GraphBolt has no build for torch "
                                          f"{torch_release}, so it is unavailable.")
    module.__spec__ = importlib.machinery.ModuleSpec(_GRAPHBOLT, None)

    def __getattr__(name: str) -> Any:  # PEP 562: only called for names the module lacks
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"dgl.graphbolt.{name} is unavailable: the installed DGL has no "
                             f"GraphBolt build for torch {torch_release} (optuna-fms imports DGL "
                             "without it)")

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


def import_dgl() -> types.ModuleType:
    """The ``dgl`` module, imported on first use; sets ``DGLBACKEND=pytorch`` unless already set.

    Raises ImportError (with the install command) when DGL is missing or cannot be imported, or
    when DGLBACKEND names a backend other than pytorch.
    """
    loaded = sys.modules.get("dgl")
    if loaded is not None:
        return loaded
    os.environ.setdefault("DGLBACKEND", "pytorch")  # NOTE: unset, DGL asks and writes ~/.dgl
    spec = importlib.util.find_spec("dgl")
    if spec is None:
        raise ImportError(f"the DGL backend needs the optional dependency dgl: {INSTALL_HINT}")
    import torch

    release = torch.__version__.split("+", 1)[0]
    package_dir = os.path.dirname(spec.origin or "")
    native = os.path.join(package_dir, "graphbolt", f"libgraphbolt_pytorch_{release}.so")
    placeholder = None
    if not os.path.exists(native) and _GRAPHBOLT not in sys.modules:
        placeholder = sys.modules[_GRAPHBOLT] = _graphbolt_placeholder(release)
    try:
        import dgl
    except Exception as err:  # noqa: BLE001 - any failure here means "DGL is not usable"
        if placeholder is not None and sys.modules.get(_GRAPHBOLT) is placeholder:
            del sys.modules[_GRAPHBOLT]
        raise ImportError(f"dgl is installed but failed to import on torch {torch.__version__} "
                          f"({type(err).__name__}: {err}); {INSTALL_HINT} installs a working set "
                          "(dgl==2.1.0 with pandas)") from err
    if placeholder is not None:
        dgl.graphbolt = placeholder  # NOTE: `from .. import graphbolt` bound no attribute
    if dgl.backend.backend_name != "pytorch":
        raise ImportError(f"optuna-fms needs DGL's pytorch backend, but DGLBACKEND is "
                          f"{os.environ.get('DGLBACKEND')!r}")
    return dgl
