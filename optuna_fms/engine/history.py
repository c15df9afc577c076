"""Observations -> tensors: configurations, budgets, learning curves and weight embeddings."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optuna_fms.engine.space import SearchSpace
from optuna_fms.graphs.schema import ParameterGraph


@dataclass
class LineageRecord:
    """One configuration's run, possibly spread over several segments, as the engine sees it.

    ``values`` are oriented so that higher is better (the adapter negates a minimized metric).
    ``steps`` are the reported steps, strictly increasing; the budget of step ``s`` is ``s + 1``.
    ``checkpoints`` maps a step to the key of the parameter graph of the checkpoint saved there.
    """

    key: int
    config: Mapping[str, Any]
    steps: list[int]
    values: list[float]
    thawable: bool = False
    running: bool = False
    checkpoints: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.values):
            raise ValueError(f"Lineage {self.key}: {len(self.steps)} steps, {len(self.values)} values.")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError(f"Lineage {self.key}: steps must be strictly increasing.")
        if not all(np.isfinite(self.values)):
            raise ValueError(f"Lineage {self.key}: values must be finite.")

    @property
    def next_step(self) -> int:
        return self.steps[-1] + 1 if self.steps else 0


@dataclass
class Rows:
    """Inputs of the surrogate, one row per (configuration, budget) pair.

    ``curve`` holds the standardized values observed *before* each row's budget, right-aligned
    and zero-padded to a fixed length; ``mask`` marks which entries are real.
    """

    x: np.ndarray  # [N, width] encoded configurations
    budget: np.ndarray  # [N] budget / max_budget
    curve: np.ndarray  # [N, L]
    mask: np.ndarray  # [N, L]
    graph: np.ndarray  # [N] index into History.graph_keys of the weights the row starts from; -1: none

    def __len__(self) -> int:
        return len(self.x)

    def take(self, index: np.ndarray) -> Rows:
        return Rows(*(a[index] for a in (self.x, self.budget, self.curve, self.mask, self.graph)))


@dataclass
class Candidate:
    """A possible use of the next step: continue lineage ``key`` or start ``config`` (key None).

    ``step`` is the step it would run next; the surrogate is queried at ``horizon`` (default:
    that same step) from the values observed before ``step``.
    """

    config: Mapping[str, Any]
    step: int
    key: int | None = None
    horizon: int | None = None


class History:
    """All lineages of a study, with the scaling that turns them into surrogate rows."""

    def __init__(
        self,
        space: SearchSpace,
        lineages: Sequence[LineageRecord],
        *,
        max_steps: int | None = None,
        curve_length: int = 16,
        graphs: Mapping[str, ParameterGraph] | None = None,
        initial_weights: Callable[[Mapping[str, Any]], str | None] | None = None,
    ) -> None:
        """``graphs`` holds the parameter graph of every checkpoint key the lineages name;
        ``initial_weights`` names the graph a configuration starts from (its pretrained model),
        used before its first checkpoint and for configurations not yet started."""
        self.space = space
        self.lineages = [lin for lin in lineages if space.contains(lin.config)]
        self.by_key = {lin.key: lin for lin in self.lineages}
        self.max_steps = max_steps
        self.curve_length = curve_length
        self.graphs: Mapping[str, ParameterGraph] = graphs if graphs is not None else {}  # may load lazily
        # NOTE: in the order the caller lists them (lineage, then step), never by content hash: a
        # checkpoint's bytes also hold state that differs between identical runs (Python's RNG),
        # and the metanetwork's training subsets are drawn by index.
        self.graph_keys = list(self.graphs)
        self._graph_index = {k: i for i, k in enumerate(self.graph_keys)}
        self._initial_weights = initial_weights
        named = {key for lin in lineages for key in lin.checkpoints.values()}
        # NOTE: the graphs no lineage names as a checkpoint are those new configurations may start
        # from (their pretrained weights): an adapter loads them before a decision (graphs_to_read).
        self.start_keys = frozenset(k for k in self.graph_keys if k not in named)
        self._training_rows: dict[int | None, tuple[Rows, np.ndarray, np.ndarray]] = {}
        observed = [lin.steps[-1] + 1 for lin in self.lineages if lin.steps]
        self.max_budget = max([max_steps or 1, *observed, *(b + 1 for b in observed)])
        values = np.array([v for lin in self.lineages for v in lin.values], dtype=float)
        self.n_observations = len(values)
        self.y_mean = float(values.mean()) if len(values) else 0.0
        self.y_std = float(values.std()) if len(values) > 1 and values.std() > 1e-12 else 1.0

    def standardize(self, values: np.ndarray | Sequence[float]) -> np.ndarray:
        return (np.asarray(values, dtype=float) - self.y_mean) / self.y_std

    def training_rows(self, forecast_seed: int | None = None) -> tuple[Rows, np.ndarray, np.ndarray]:
        """Every observation as a row: (rows, standardized targets, flags of each lineage's newest row).

        Each row sees the whole curve before its step. With ``forecast_seed``, every
        observation with a curve before it gets a second row that sees only a random shorter
        prefix: the surrogate then also learns to forecast several steps ahead. Built once per
        seed (a decision asks twice: for the graphs it needs, then to fit).
        """
        if forecast_seed not in self._training_rows:
            self._training_rows[forecast_seed] = self._build_training_rows(forecast_seed)
        return self._training_rows[forecast_seed]

    def _build_training_rows(self, forecast_seed: int | None) -> tuple[Rows, np.ndarray, np.ndarray]:
        configs, steps, keys, targets, prefixes, newest = [], [], [], [], [], []
        rng = np.random.default_rng(forecast_seed)
        for lin in self.lineages:
            for i, (s, v) in enumerate(zip(lin.steps, lin.values)):
                shorter = [int(rng.integers(0, i))] if forecast_seed is not None and i > 0 else []
                for prefix in [i, *shorter]:
                    configs.append(lin.config)
                    steps.append(s)
                    keys.append(lin.key)
                    targets.append(v)
                    prefixes.append(prefix)
                    newest.append(prefix == i == len(lin.steps) - 1)
        rows = self._rows(configs, steps, keys, prefixes)
        return rows, self.standardize(targets), np.asarray(newest, dtype=bool)

    def candidate_rows(self, candidates: Sequence[Candidate]) -> Rows:
        horizons = [c.step if c.horizon is None else c.horizon for c in candidates]
        prefixes = [len([s for s in self.by_key[c.key].steps if s < c.step]) if c.key in self.by_key else 0
                    for c in candidates]
        return self._rows([c.config for c in candidates], horizons, [c.key for c in candidates], prefixes)

    def observed(self) -> tuple[np.ndarray, np.ndarray]:
        """(budgets, standardized values) of every observation, for per-fidelity incumbents."""
        budgets = [s + 1 for lin in self.lineages for s in lin.steps]
        values = [v for lin in self.lineages for v in lin.values]
        return np.asarray(budgets, dtype=float), self.standardize(values)

    def _rows(
        self,
        configs: Sequence[Mapping[str, Any]],
        steps: Sequence[int],
        keys: Sequence[int | None],
        prefixes: Sequence[int],
    ) -> Rows:
        """Rows at budget ``step + 1`` that see the first ``prefix`` values of their lineage."""
        n, length = len(configs), self.curve_length
        curve = np.zeros((n, length))
        mask = np.zeros((n, length))
        starts: dict[int, int] = {}  # NOTE: per config object, as encode_many
        graph = np.array([starts[id(c)] if id(c) in starts else starts.setdefault(id(c), self._start_graph(c))
                          for c in configs], dtype=np.int64)
        for i, (step, key, prefix) in enumerate(zip(steps, keys, prefixes)):
            lin = self.by_key.get(key) if key is not None else None
            if lin is None:
                continue
            # NOTE: only values reported strictly before this row's step (and within its
            # prefix), so a row never sees its own target, and a candidate sees exactly what
            # has been paid for.
            seen = lin.steps[:prefix]
            before = [v for s, v in zip(seen, lin.values) if s < step][-length:]
            if before:
                curve[i, length - len(before) :] = self.standardize(before)
                mask[i, length - len(before) :] = 1.0
            # NOTE: the weights are those of the newest checkpoint the row's curve has seen (the
            # checkpoint of epoch b for a row after epoch b), never a later one: no leakage.
            if seen:
                graph[i] = self._checkpoint_through(lin, seen[-1], graph[i])
        return Rows(
            x=self.space.encode_many(configs),
            budget=(np.asarray(steps, dtype=float) + 1.0) / self.max_budget,
            curve=curve,
            mask=mask,
            graph=graph,
        )

    def next_graph(self, key: int) -> int:
        """The graph lineage ``key``'s next step starts from (an index into ``graph_keys``, -1: none)."""
        lin = self.by_key[key]
        start = self._start_graph(lin.config)
        return self._checkpoint_through(lin, lin.steps[-1], start) if lin.steps else start

    def _checkpoint_through(self, lin: LineageRecord, step: int, otherwise: int) -> int:
        """The newest checkpoint of ``lin`` saved at or before ``step`` that has a graph, else ``otherwise``."""
        saved = [s for s in lin.checkpoints if s <= step and lin.checkpoints[s] in self._graph_index]
        return self._graph_index[lin.checkpoints[max(saved)]] if saved else otherwise

    def _start_graph(self, config: Mapping[str, Any]) -> int:
        key = self._initial_weights(config) if self._initial_weights is not None else None
        return self._graph_index.get(key, -1) if key is not None else -1
