"""Checkpoint weights -> parameter graph -> permutation-invariant embedding (no optuna import)."""

from optuna_fms.graphs.build import build_graph, graph_from_module
from optuna_fms.graphs.cache import GraphCache
from optuna_fms.graphs.describe import describe_architecture
from optuna_fms.graphs.metanet import EdgeNodeConv, GraphMetanetwork
from optuna_fms.graphs.schema import (
    ARCHITECTURE_FORMAT,
    EDGE_FEATURE_DIM,
    NODE_FEATURE_DIM,
    ParameterGraph,
    UnsupportedLayerError,
)

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
