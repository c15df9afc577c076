"""One architecture's graph structure, derived once, so a checkpoint's graph is a single gather.

Without coarsening, ``build_graph`` lays out nodes and edges from the architecture alone and only
copies weight scalars into feature cells (edge values, biases, norm parameters and statistics).
A :class:`GraphTemplate` records that layout and, for every weight-carrying cell, which scalar of
the flattened state dict it holds. It is derived from ``build_graph`` itself (never a second
implementation of the layout): two probe builds whose "weights" are ``+id`` and ``-id`` (``id``
= 1 + the scalar's flat index) tell the copied cells (they differ, and hold exactly the id) from
the constant ones (equal). A layout that is not a pure copy (a coarsened layer: summaries and
top-k selection depend on the values) has no template, and callers use ``build_graph``.

``graph(state_dict)`` equals ``build_graph(state_dict, architecture)`` exactly (tested), and
``batch(state_dicts)`` builds a whole PyG batch at once on any device, which is what makes
featurizing thousands of same-architecture checkpoints per second possible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import math
from typing import Any

import torch
from torch import Tensor

from optuna_fms.graphs.build import _checked_tensors, build_graph
from optuna_fms.graphs.cache import GraphCache
from optuna_fms.graphs.schema import ParameterGraph

__all__ = ["GraphTemplate", "TemplatedBuilder"]


class GraphTemplate:
    """The fixed structure of one architecture's (uncoarsened) parameter graphs."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], skeleton: ParameterGraph,
                 node_cells: Tensor, node_sources: Tensor, edge_cells: Tensor,
                 edge_sources: Tensor) -> None:
        self.shapes = {k: tuple(int(d) for d in s) for k, s in shapes.items()}
        self.skeleton = skeleton  # constant cells as build_graph computes them; copied cells 0
        self._node_cells, self._node_sources = node_cells, node_sources  # flat cell -> scalar
        self._edge_cells, self._edge_sources = edge_cells, edge_sources

    @classmethod
    def of(cls, architecture: Mapping[str, Any], *, coarsen: int | None = None,
           dtype: torch.dtype = torch.float32) -> GraphTemplate | None:
        """The template of ``architecture``'s graphs, or None when ``coarsen`` would summarize a
        layer (then each graph depends on the values beyond copying them: use build_graph)."""
        shapes: Mapping[str, Sequence[int]] = architecture["parameters"]
        if coarsen is not None and any(math.prod(s) > coarsen for s in shapes.values()):
            return None
        ids, start = {}, 1
        for key, shape in shapes.items():
            n = math.prod(shape)
            ids[key] = torch.arange(start, start + n, dtype=torch.float64).reshape(shape)
            start += n
        if start > 2**52:  # NOTE: ids must stay exact integers in float64
            return None
        plus = build_graph(ids, architecture, dtype=torch.float64)
        minus = build_graph({k: -v for k, v in ids.items()}, architecture, dtype=torch.float64)
        # NOTE: built from zeros, so every copied cell already holds 0
        skeleton = build_graph({k: torch.zeros(s) for k, s in shapes.items()}, architecture,
                               dtype=dtype)
        if not torch.equal(plus.edge_index, minus.edge_index):
            return None
        cells = []
        for a, b in ((plus.node_features, minus.node_features),
                     (plus.edge_features, minus.edge_features)):
            a, b = a.reshape(-1), b.reshape(-1)
            copied = torch.nonzero(a != b).squeeze(1)
            src = a[copied]
            if not (torch.equal(b[copied], -src) and bool((src == src.round()).all())
                    and bool(((src >= 1) & (src < start)).all())):
                return None  # NOTE: some cell is a function of the weights, not a copy
            cells.append((copied, src.long() - 1))
        (node_cells, node_src), (edge_cells, edge_src) = cells
        return cls(shapes, skeleton, node_cells, node_src, edge_cells, edge_src)

    @property
    def num_nodes(self) -> int:
        return self.skeleton.num_nodes

    @property
    def num_edges(self) -> int:
        return self.skeleton.num_edges

    def flatten(self, state_dict: Mapping[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
        """The architecture's scalars in template order, checked (shapes, NaN/inf) with the same
        errors as ``build_graph``."""
        try:
            flat = torch.cat([state_dict[k].detach().reshape(-1) for k in self.shapes]).to(dtype=dtype)
            ok = all(tuple(state_dict[k].shape) == s for k, s in self.shapes.items())
        except (KeyError, RuntimeError):
            ok = False
        if not ok or (flat.numel() and not bool(torch.isfinite(flat).all())):
            _checked_tensors(state_dict, self.shapes, dtype)  # raises the precise ValueError
        return flat

    def graph(self, state_dict: Mapping[str, Tensor]) -> ParameterGraph:
        """Exactly ``build_graph(state_dict, architecture, dtype=<template dtype>)``."""
        flat = self.flatten(state_dict, self.skeleton.node_features.dtype)
        x, e = self.skeleton.node_features.clone(), self.skeleton.edge_features.clone()
        x.view(-1)[self._node_cells] = flat[self._node_sources]
        e.view(-1)[self._edge_cells] = flat[self._edge_sources]
        return ParameterGraph(x, self.skeleton.edge_index, e)

    def batch(self, state_dicts: Sequence[Mapping[str, Tensor]], device: torch.device | str | None = None) -> Any:
        """A ``torch_geometric.data.Batch`` of the graphs of ``state_dicts``, built on ``device``."""
        from torch_geometric.data import Batch  # NOTE: lazy, as in schema.py

        dtype = self.skeleton.node_features.dtype
        flat = torch.stack([self.flatten(sd, dtype) for sd in state_dicts]).to(device)
        n, b = self.num_nodes, flat.shape[0]
        x = self.skeleton.node_features.to(device).expand(b, -1, -1).clone()
        e = self.skeleton.edge_features.to(device).expand(b, -1, -1).clone()
        x.view(b, -1)[:, self._node_cells.to(device)] = flat[:, self._node_sources.to(device)]
        e.view(b, -1)[:, self._edge_cells.to(device)] = flat[:, self._edge_sources.to(device)]
        offsets = torch.arange(b, device=device).mul_(n).view(b, 1, 1)
        edge_index = (self.skeleton.edge_index.to(device).unsqueeze(0) + offsets).permute(1, 0, 2).reshape(2, -1)
        out = Batch(
            x=x.reshape(b * n, -1), edge_index=edge_index, edge_attr=e.reshape(-1, e.shape[-1]),
            batch=torch.arange(b, device=device).repeat_interleave(n),
            ptr=torch.arange(b + 1, device=device) * n,
        )
        out._num_graphs = b
        return out


class TemplatedBuilder:
    """``build_graph`` through a remembered template per architecture, where one exists.

    Thread-safe; keeps the templates of the ``maxsize`` most recent architectures.
    """

    def __init__(self, *, coarsen: int | None = None, dtype: torch.dtype = torch.float32, maxsize: int = 16) -> None:
        self.coarsen, self.dtype = coarsen, dtype
        self._templates: GraphCache[GraphTemplate | None] = GraphCache(maxsize=maxsize)

    def template(self, architecture: Mapping[str, Any]) -> GraphTemplate | None:
        return self._templates.get_or_build(
            json.dumps(architecture, sort_keys=True),
            lambda: GraphTemplate.of(architecture, coarsen=self.coarsen, dtype=self.dtype),
        )

    def __call__(self, state_dict: Mapping[str, Tensor], architecture: Mapping[str, Any]) -> ParameterGraph:
        template = self.template(architecture)
        if template is None:
            return build_graph(state_dict, architecture, coarsen=self.coarsen, dtype=self.dtype)
        return template.graph(state_dict)
