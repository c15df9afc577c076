"""Checkpoint weights -> parameter graph -> permutation-invariant embedding (no optuna import)."""

from optuna_fms.graphs.build import (
    ARCHITECTURE_FORMAT,
    EDGE_FEATURE_DIM,
    NODE_FEATURE_DIM,
    GraphCache,
    ParameterGraph,
    UnsupportedLayerError,
    build_graph,
    describe_architecture,
    graph_from_module,
)
from optuna_fms.graphs.metanet import EdgeNodeConv, GraphMetanetwork

__all__ = [
    "ARCHITECTURE_FORMAT",
    "EDGE_FEATURE_DIM",
    "NODE_FEATURE_DIM",
    "EdgeNodeConv",
    "GraphCache",
    "GraphMetanetwork",
    "ParameterGraph",
    "UnsupportedLayerError",
    "build_graph",
    "describe_architecture",
    "graph_from_module",
]
