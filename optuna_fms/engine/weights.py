"""Weight encoders: checkpoint parameter graphs -> embeddings for the surrogate's feature extractor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import hashlib

import numpy as np
import torch
from torch import nn

from optuna_fms.graphs.schema import EF_VALUE, NF_BIAS, ParameterGraph

WEIGHT_KINDS = ("gmn", "flat")


class WeightEncoder(nn.Module):
    """Embeds the graphs of a table, addressed by index; index -1 means "no weights".

    ``kind="gmn"``: the permutation-invariant graph metanetwork. ``kind="flat"``: every weight
    and bias, hashed by position into ``flat_dim`` buckets with random signs (a count sketch,
    so any architecture fits one fixed size), then a linear map; not permutation-invariant,
    the FMS-Flat baseline. A missing checkpoint gets a learned "no weights" embedding.

    NOTE: the metanetwork is costly, so it learns only while ``trainable`` is set (the
    surrogate's full fits), and then on at most ``max_graphs`` graphs per step (the others use
    cached, detached embeddings). Frozen, every graph is embedded once and cached.
    """

    def __init__(self, kind: str, dim: int = 32, *, flat_dim: int = 256, max_graphs: int = 16, seed: int = 0) -> None:
        super().__init__()
        if kind not in WEIGHT_KINDS:
            raise ValueError(f"Unknown weight encoder {kind!r}; use one of {WEIGHT_KINDS}.")
        self.kind, self.dim, self.flat_dim, self.max_graphs = kind, dim, flat_dim, max_graphs
        self.missing = nn.Parameter(torch.zeros(dim))
        if kind == "gmn":
            from optuna_fms.graphs.metanet import GraphMetanetwork

            self.net: nn.Module = GraphMetanetwork(hidden_dim=32, num_layers=3, out_dim=dim)
        else:
            self.net = nn.Sequential(nn.Linear(flat_dim, dim), nn.Tanh())
        self.trainable = False
        self._keys: list[str] = []
        self._graphs: Mapping[str, ParameterGraph] = {}
        self._cache: dict[str, torch.Tensor] = {}
        self._pending: dict[str, ParameterGraph] = {}  # read by _available, consumed by _run
        self._unavailable: set[str] = set()
        self._memo: tuple[tuple, torch.Tensor] | None = None
        self._sketches: dict[str, torch.Tensor] = {}
        self._rng = np.random.default_rng(seed)

    def set_table(self, keys: Sequence[str], graphs: Mapping[str, ParameterGraph]) -> None:
        """The graphs that indices refer to, in order; ``graphs`` may load lazily, since only
        graphs without a cached embedding are read."""
        self._keys = list(keys)
        self._graphs = graphs

    def reset_cache(self) -> None:
        self._cache.clear()
        self._memo = None

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        index = index.long()
        present = (index >= 0).unsqueeze(1)
        missing = self.missing.expand(len(index), self.dim)
        if not bool(present.any()):
            return missing.clone()
        learning = self.trainable and self.training
        # NOTE: frozen, the embeddings of one set of rows never change, and a refinement asks
        # for the same rows at every step: remember the last answer.
        memo_key = (tuple(self._keys), index.cpu().numpy().tobytes())
        if not learning and self._memo is not None and self._memo[0] == memo_key:
            embedded = self._memo[1]
        else:
            unique, inverse = torch.unique(index.clamp_min(0), return_inverse=True)
            keys = [self._keys[i] for i in unique.tolist()]
            embedded = self._embed(keys)[inverse]
            self._memo = None if learning else (memo_key, embedded.detach())
        return torch.where(present, embedded, missing)

    def _embed(self, keys: list[str]) -> torch.Tensor:
        p = self.missing
        learn: set[str] = set()
        if self.trainable and self.training:
            chosen = self._rng.permutation(len(keys))[: self.max_graphs]
            learn = {keys[i] for i in chosen}
        learn = {k for k in learn if self._available(k)}
        stale = [k for k in keys if k not in self._cache and k not in learn and self._available(k)]
        if stale:
            with torch.no_grad():
                for k, e in zip(stale, self._run(stale)):
                    self._cache[k] = e.detach()
        ordered = [k for k in keys if k in learn]  # NOTE: table order, not hash order (see History)
        fresh = dict(zip(ordered, self._run(ordered))) if learn else {}
        if learn:
            for k, e in fresh.items():
                self._cache[k] = e.detach()
        rows = [fresh[k] if k in fresh else self._cache.get(k, p) for k in keys]
        return torch.stack([r.to(p.device, p.dtype) for r in rows])

    def needs_graph(self, key: str) -> bool:
        """Whether embedding ``key`` would read its graph (frozen: none is cached or held)."""
        return key not in self._cache and key not in self._pending and key not in self._unavailable

    def _available(self, key: str) -> bool:
        """Whether ``key``'s graph can be read; one that cannot (e.g. its checkpoint vanished)
        counts as "no weights" from then on."""
        if key in self._cache or key in self._pending:
            return True
        if key in self._unavailable:
            return False
        try:
            self._pending[key] = self._graphs[key]
            return True
        except KeyError:
            self._unavailable.add(key)
            return False

    def _run(self, keys: list[str]) -> torch.Tensor:
        graphs = [self._pending.pop(k) if k in self._pending else self._graphs[k] for k in keys]
        if self.kind == "gmn":
            return self.net.embed(graphs)  # type: ignore[operator]
        p = next(self.net.parameters())
        sketch = torch.stack([self._sketch(k, g) for k, g in zip(keys, graphs)]).to(p.device, p.dtype)
        return self.net(sketch)

    def _sketch(self, key: str, graph: ParameterGraph) -> torch.Tensor:
        if key not in self._sketches:
            values = torch.cat([graph.edge_features[:, EF_VALUE], graph.node_features[:, NF_BIAS]]).double()
            n = len(values)
            # NOTE: buckets and signs depend only on the position and the total size, so the
            # same architecture always hashes the same way, in every process.
            seed = int.from_bytes(hashlib.sha256(f"flat:{n}".encode()).digest()[:8], "little")
            g = torch.Generator().manual_seed(seed)
            buckets = torch.randint(0, self.flat_dim, (n,), generator=g)
            signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
            sketch = torch.zeros(self.flat_dim, dtype=torch.float64).index_add_(0, buckets, values * signs)
            self._sketches[key] = sketch / max(1.0, float(np.sqrt(n / self.flat_dim)))
        return self._sketches[key]
