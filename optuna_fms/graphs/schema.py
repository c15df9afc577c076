"""What a parameter graph is: feature columns, node / edge / norm types, and its container.

The graph has one node per neuron or channel and one edge per weight, following Graph Metanetworks
(Lim et al.) as used by FMS (arXiv 2406.18630). Hidden neurons carry no identity, so the graph is the
same, up to relabelling, for every model that differs by a permutation of hidden neurons.

Node features (``ParameterGraph.node_features``, float ``[N, 9]``), columns ``NF_*``:
    0 type      ``NODE_*``: input, token (an Embedding row, or a block of rows when coarsened),
                neuron (Linear / Embedding / attention output), channel (conv), attention q / k / v,
                attention head, norm copy, summary (one per coarsened weight tensor, see
                "Coarsening" in :mod:`optuna_fms.graphs.build`)
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

Architecture descriptions (from :mod:`optuna_fms.graphs.describe`) carry ``ARCHITECTURE_FORMAT``
and ``ARCHITECTURE_VERSION``; :mod:`optuna_fms.graphs.build` turns them into a ``ParameterGraph``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ARCHITECTURE_FORMAT",
    "EDGE_FEATURE_DIM",
    "NODE_FEATURE_DIM",
    "ParameterGraph",
    "UnsupportedLayerError",
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
#: Edge types of coarsened layers: the mean / std of a set of weights (see "Coarsening" in
#: build.py).
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
