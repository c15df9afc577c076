"""Checkpoint records -> parameter graphs for the engine: read from the artifact store once, cached."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
import threading
from typing import TYPE_CHECKING, Any

from optuna_fms._warnings import warn_once
from optuna_fms.checkpoints import CheckpointError, read_checkpoint
from optuna_fms.graphs.cache import GraphCache
from optuna_fms.graphs.schema import ParameterGraph
from optuna_fms.graphs.template import TemplatedBuilder
from optuna_fms.lineage import CheckpointRecord

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore
    from optuna.study import Study


# NOTE: a study this many checkpoints in with no graph will not get one by waiting; say so once.
_SILENT_RECORDS = 5


class GraphSource:
    """Builds the parameter graph of each checkpoint that carries an architecture, by content hash.

    A checkpoint that cannot be read or turned into a graph (missing, corrupt, NaN weights,
    shapes that do not fit) is left out with one warning: the surrogate then treats it as "no
    weights", and the study goes on. Graphs live in an LRU cache and are re-read when evicted;
    a decision's own graphs are pinned while it runs (:class:`LazyGraphs`).
    """

    def __init__(
        self, artifact_store: ArtifactStore | None = None, cache_size: int = 256, coarsen: int | None = 4096
    ) -> None:
        """``coarsen``: weight tensors above this many scalars are summarized (see
        :func:`optuna_fms.graphs.build_graph`), so a large checkpoint stays a small graph."""
        self.artifact_store = artifact_store
        self.coarsen = coarsen
        self._build_graph = TemplatedBuilder(coarsen=coarsen)
        self._cache = GraphCache(maxsize=cache_size)
        self._checked: set[str] = set()  # keys read once already (evicted graphs are re-read lazily)
        self._bad: set[str] = set()
        self._lock = threading.Lock()

    def graphs(self, study: Study, records: Iterable[CheckpointRecord]) -> LazyGraphs:
        """sha256 -> graph for every usable record; new ones are read now, once."""
        records = list(records)
        by_key = {r.sha256: r for r in records if r.has_graph and r.sha256 not in self._bad}
        for key, record in list(by_key.items()):
            if key in self._checked:
                continue
            if self._load(study, record) is None:
                del by_key[key]
            else:
                with self._lock:
                    self._checked.add(key)
        if not by_key and len(records) >= _SILENT_RECORDS:
            warn_once(f"no-graphs:{study._study_id}:{study.study_name}", (
                f"The surrogate reads no weights in study {study.study_name!r}: none of its "
                f"{len(records)} checkpoints carries a usable architecture description. Save the model "
                "itself (save_checkpoint(trial, model, ...)) or pass "
                "architecture=optuna_fms.describe_architecture(model); FMSSampler(weights=None) turns "
                "weights off."))
        return LazyGraphs(self, study, by_key)

    def _load(self, study: Study, record: CheckpointRecord) -> ParameterGraph | None:
        try:
            return self._cache.get_or_build(record.sha256, lambda: self._build(study, record))
        except (CheckpointError, ValueError, KeyError) as err:
            with self._lock:
                self._bad.add(record.sha256)
            warn_once(f"graph:{record.sha256}", f"The weights of a checkpoint are not featurized ({err}); "
                      "the surrogate treats it as having no weights.")
            return None

    def _build(self, study: Study, record: CheckpointRecord) -> ParameterGraph:
        ckpt = read_checkpoint(study, record, artifact_store=self.artifact_store)
        if ckpt.architecture is None:
            raise ValueError("the checkpoint carries no architecture")
        return self._build_graph(ckpt.state_dict, ckpt.architecture)


class LazyGraphs(Mapping[str, ParameterGraph]):
    """One decision's graphs: read from the source's cache, or the artifact store on a miss.

    ``pin`` reads graphs ahead and holds them for this mapping's life (one decision), so the
    decision itself, under its lock, finds them in memory (see ``_bridge.decide_after_reading``).
    """

    def __init__(self, source: GraphSource, study: Study, records: dict[str, CheckpointRecord]) -> None:
        self._source, self._study, self._records = source, study, records
        self._pinned: dict[str, ParameterGraph] = {}
        self._unreadable: set[str] = set()

    def missing(self, keys: Iterable[str]) -> list[str]:
        """Those of ``keys`` neither pinned nor known to be unreadable."""
        return [k for k in keys if k in self._records and k not in self._pinned and k not in self._unreadable]

    def pin(self, keys: Iterable[str]) -> None:
        """Read ``keys`` now (I/O on a cache miss) and hold them."""
        for key in keys:
            graph = self._source._load(self._study, self._records[key]) if key in self._records else None
            if graph is None:
                self._unreadable.add(key)
            else:
                self._pinned[key] = graph

    def __getitem__(self, key: str) -> ParameterGraph:
        graph = self._pinned.get(key)
        if graph is None:
            graph = self._source._load(self._study, self._records[key])
        if graph is None:
            raise KeyError(key)
        return graph

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: Any) -> bool:
        return key in self._records
