"""Transfer across studies: finished Optuna studies -> engine histories -> a pretrained surrogate file.

    optuna_fms.pretrain_surrogate([study_a, study_b], "prior.safetensors")
    sampler = optuna_fms.FMSSampler(prior="prior.safetensors")

The engine side (training, the file, the warm start) is :mod:`optuna_fms.engine.prior`; the rule
that fits another search space into the prior's inputs is :mod:`optuna_fms.engine.layout`.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from optuna_fms.engine.history import History
from optuna_fms.engine.prior import Prior, PriorError, PretrainSettings, load_prior, pretrain, save_prior

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore
    from optuna.study import Study

Source = Union["Study", History, tuple[Any, Any]]

__all__ = ["PriorError", "load_prior", "pretrain_surrogate", "study_history"]


def study_history(study: Study, *, artifact_store: ArtifactStore | None = None, weights: bool = True,
                  ordered_choices: bool = False) -> History:
    """The engine's history of a finished (or paused) study, as its own FMSSampler would see it:
    every lineage's stitched curve and, with ``weights``, the parameter graphs of its checkpoints
    and registered pretrained weights (read from ``artifact_store``, default the study's folder)."""
    from optuna_fms import lineage as lin_mod
    from optuna_fms._bridge import engine_space, inferred_max_steps, make_history, optuna_search_space
    from optuna_fms.graph_source import GraphSource
    from optuna_fms.pruner import FMSPruner

    view = lin_mod.study_view(study)
    lineages = lin_mod.build_lineages(lin_mod.all_trials(study), view)
    space = engine_space(optuna_search_space(study), ordered_choices)
    pruner = study.pruner
    explicit = pruner.max_steps if isinstance(pruner, FMSPruner) else None
    max_steps = inferred_max_steps(lineages, explicit) or max((lin.next_step for lin in lineages), default=None)
    graphs = GraphSource(artifact_store) if weights else None
    return make_history(study, lineages, space, max_steps=max_steps, graph_source=graphs)


def pretrain_surrogate(
    sources: Sequence[Source],
    path: str | os.PathLike[str],
    *,
    weights: str | None = "gmn",
    artifact_store: ArtifactStore | None = None,
    seed: int = 0,
    device: str | None = None,
    kernel: str = "input",
    use_learning_curve: bool | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train the whole surrogate on finished work and write it to ``path`` (safetensors, no pickle).

    ``sources``: Optuna studies (any storage; their checkpoints are read from ``artifact_store``,
    default each study's own folder; pass ``(study, store)`` for a study with its own store),
    engine :class:`~optuna_fms.engine.History` objects, or ``(name, history)`` pairs (the benchmark's
    hub tables: ``bench/transfer.py``). ``weights``: the weight encoder to pretrain (``"gmn"``,
    ``"flat"`` or None). ``kernel``: the surrogate's kernel, ``"input"`` (the default's: a pretrained
    mean and hyperparameters) or ``"deep"`` (DyHPO/FMS's: a pretrained feature extractor); a study
    started from the prior uses it. ``use_learning_curve`` None: the curve branch for ``"deep"``
    only. ``options``: fields of :class:`optuna_fms.engine.prior.PretrainSettings`
    (``steps``, ``batch_size``, ``learning_rate``, ``unknown_dropout``, ``weight_steps``,
    ``weight_graphs``, ``ordered_choices``...). Returns the file's JSON description.
    """
    known = set(PretrainSettings.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"Unknown pretraining options {unknown}; choose from {sorted(known)}.")
    settings = PretrainSettings(**options)
    if not sources:
        raise ValueError("pretrain_surrogate needs at least one source.")
    histories, names = [], []
    for i, source in enumerate(sources):
        name, history = _history(source, i, artifact_store, weights is not None, settings.ordered_choices)
        names.append(name)
        histories.append(history)
    prior = pretrain(histories, names, weights=weights, settings=settings, seed=seed, device=device,
                     use_curve=use_learning_curve, kernel=kernel)
    save_prior(prior, Path(path))
    return prior.description


def _history(source: Source, i: int, store: ArtifactStore | None, weights: bool,
             ordered_choices: bool) -> tuple[str, History]:
    from optuna.study import Study

    if isinstance(source, History):
        return f"history {i}", source
    if isinstance(source, tuple) and len(source) == 2:
        first, second = source
        if isinstance(first, str) and isinstance(second, History):
            return first, second
        if isinstance(first, Study):
            return first.study_name, study_history(first, artifact_store=second, weights=weights,
                                                   ordered_choices=ordered_choices)
    if isinstance(source, Study):
        return source.study_name, study_history(source, artifact_store=store, weights=weights,
                                                ordered_choices=ordered_choices)
    raise TypeError(f"Source {i} is a {type(source).__name__}; pass an optuna Study, (study, artifact_store), "
                    "an engine History or (name, History).")


def resolve_prior(prior: str | os.PathLike[str] | Prior | None) -> Prior | None:
    """A sampler's ``prior=`` argument as a loaded prior (a path is read and checked now)."""
    if prior is None or isinstance(prior, Prior):
        return prior
    if isinstance(prior, (str, os.PathLike)):
        return load_prior(prior)
    raise TypeError(f"prior must be a path to a prior file or a loaded Prior, got {type(prior).__name__}.")
