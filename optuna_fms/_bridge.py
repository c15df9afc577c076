"""Optuna study -> engine inputs: the shared search space and the lineage history."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
import math
from typing import TYPE_CHECKING, Any, TypeVar

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.search_space import IntersectionSearchSpace
from optuna.study import StudyDirection

from optuna_fms._retry import with_backoff
from optuna_fms.engine.history import History, LineageRecord
from optuna_fms.engine.policy import FreezeThawPolicy
from optuna_fms.engine.space import Dimension, SearchSpace, is_number
from optuna_fms.graph_source import GraphSource, LazyGraphs
from optuna_fms.lineage import FINISHED, FROZEN_STATE, RUNNING, Lineage, pretrained_records

if TYPE_CHECKING:
    from optuna.study import Study

_T = TypeVar("_T")


def optuna_search_space(study: Study) -> dict[str, BaseDistribution]:
    """Parameters every finished or paused trial shares, with one distribution each."""
    space = with_backoff("read the search space", lambda: IntersectionSearchSpace(include_pruned=True).calculate(study))
    return {name: d for name, d in space.items() if not d.single()}


def engine_space(distributions: dict[str, BaseDistribution], ordered_choices: bool = False) -> SearchSpace:
    """The engine's space; with ``ordered_choices``, categoricals of numbers also encode their rank."""
    return SearchSpace([_dimension(name, d, ordered_choices) for name, d in sorted(distributions.items())])


def _dimension(name: str, d: BaseDistribution, ordered_choices: bool = False) -> Dimension:
    if isinstance(d, CategoricalDistribution):
        ordered = ordered_choices and len(d.choices) > 1 and all(map(is_number, d.choices))
        return Dimension(name, "categorical", choices=tuple(d.choices), ordered=ordered)
    if isinstance(d, (FloatDistribution, IntDistribution)):
        kind = "int" if isinstance(d, IntDistribution) else "float"
        step = None if d.log else d.step
        return Dimension(name, kind, float(d.low), float(d.high), log=d.log, step=step)
    raise TypeError(f"Unsupported distribution {type(d).__name__} for {name!r}.")


def inferred_max_steps(lineages: Sequence[Lineage], explicit: int | None) -> int | None:
    """The run length: as given, else the longest finished run so far (None before any)."""
    if explicit is not None:
        return explicit
    finished = [lin.next_step for lin in lineages if lin.state == FINISHED and lin.curve]
    return max(finished) if finished else None


def make_history(
    study: Study,
    lineages: Sequence[Lineage],
    space: SearchSpace,
    *,
    max_steps: int | None = None,
    graph_source: GraphSource | None = None,
) -> History:
    """The engine's view: finite values oriented so that higher is better, and (with a
    ``graph_source``) the parameter graphs of the checkpoints and registered pretrained weights."""
    sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
    pretrained = pretrained_records(study) if graph_source is not None else {}
    # NOTE: a lineage without every parameter of the space is not the engine's to see, nor its graphs.
    usable = [lin for lin in lineages if all(name in lin.params for name in space.names)]
    graphs = None
    if graph_source is not None:
        every = [r for lin in usable for r in lin.checkpoints] + list(pretrained.values())
        graphs = graph_source.graphs(study, every)
    records = []
    for lin in usable:
        points = [(s, v) for s, v in sorted(lin.curve.items()) if math.isfinite(v)]
        records.append(
            LineageRecord(
                key=lin.id,
                config={name: lin.params[name] for name in space.names},
                steps=[s for s, _ in points],
                values=[sign * v for _, v in points],
                thawable=lin.state == FROZEN_STATE and bool(lin.checkpoints),
                running=lin.state == RUNNING,
                checkpoints={c.step: c.sha256 for c in lin.checkpoints if graphs is not None and c.sha256 in graphs},
            )
        )

    def initial_weights(config: Mapping[str, Any]) -> str | None:
        for (param, value), record in pretrained.items():
            if param in config and config[param] == value and type(config[param]) is type(value):
                return record.sha256
        return None

    return History(
        space, records, max_steps=max_steps, graphs=graphs,
        initial_weights=initial_weights if pretrained else None,
    )


def decide_after_reading(
    lock: AbstractContextManager[Any], policy: FreezeThawPolicy, history: History, decide: Callable[[], _T]
) -> _T:
    """``decide()`` under ``lock``, once every graph it may read is in memory.

    NOTE: the graphs are read between two holds of the lock, never under it; another thread's
    decision may change the surrogate meanwhile, so what is missing is asked again under the lock.
    """
    graphs = history.graphs
    while True:
        with lock:
            missing = graphs.missing(policy.graphs_to_read(history)) if isinstance(graphs, LazyGraphs) else []
            if not missing:
                return decide()
        graphs.pin(missing)  # type: ignore[union-attr]
