"""The public checkpoint API: save, register pretrained, load (with fallback), verify, read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
import json
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import torch

from optuna_fms import lineage as lineage_mod
from optuna_fms._retry import with_backoff
from optuna_fms._warnings import warn_once
from optuna_fms.checkpoint_format import FORMAT, CheckpointError, _contents, _encode, _model_tensors, _read_file
from optuna_fms.checkpoint_store import (
    _download_verified,
    _file_name,
    _where,
    _write_and_upload,
    resolve_artifact_store,
)
from optuna_fms.graphs.schema import UnsupportedLayerError
from optuna_fms.lineage import CheckpointRecord
from optuna_fms.rng import TrialRNG, global_state, may_restore_global, restore_global

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore
    from optuna.study import Study

_logger = logging.getLogger(__name__)

USER_CHECKPOINT_STEP = "fms:checkpoint_step"


class LineageLost(CheckpointError, optuna.TrialPruned):
    """No checkpoint of the lineage a trial continues can be read or restored.

    NOTE: a TrialPruned, so that ``study.optimize`` goes on: the trial ends PRUNED, its lineage
    is marked failed (``fms:failed``) with this message, and the next trial decides afresh.
    """


@dataclass
class Checkpoint:
    """A loaded checkpoint: weights, optimizer and scheduler states, and user metadata."""

    step: int
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    trial_number: int | None = None
    artifact_id: str | None = None
    sha256: str | None = None
    architecture: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = field(default=None, repr=False)

    def rng(self) -> TrialRNG | None:
        """The saved RNG states as this trial's own generators (None if none were saved)."""
        return TrialRNG.from_state(self.rng_state) if self.rng_state is not None else None


# --- save ------------------------------------------------------------------------------------


def save_checkpoint(
    trial: optuna.Trial,
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    step: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    metadata: Mapping[str, Any] | None = None,
    architecture: Mapping[str, Any] | None = None,
    artifact_store: ArtifactStore | None = None,
    save_rng: bool = True,
    rng: TrialRNG | None = None,
) -> CheckpointRecord:
    """Write one safetensors file for ``step`` and upload it as an artifact of ``trial``.

    Optimizer and scheduler states are stored as tensors plus a JSON skeleton; the RNG states
    of torch, numpy and ``random`` are stored too (``save_rng``), so a thawed run continues
    exactly: the trial's own generators if given as ``rng``, else the process-wide ones. The
    step and a SHA-256 of the file are recorded on the trial. The file is named by lineage and
    step (``lineage-0017-step-0004.safetensors``, what optuna-dashboard shows).

    ``architecture`` (from :func:`optuna_fms.describe_architecture`) is stored so the weights can
    be read as a graph from the file alone. Without it, a module is described here (torch.fx,
    once per architecture, safe with ``n_jobs > 1``) and a plain state dict's description is
    inferred from its names and shapes where they form a plain chain of layers
    (:mod:`optuna_fms.graphs.infer`); when neither works, one warning says how to fix it and the
    checkpoint is saved without a description.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}.")
    step = int(step)
    study = trial.study
    tensors = _model_tensors(model_or_state_dict)
    if architecture is None:
        architecture = _found_architecture(study, model_or_state_dict)
    header = {
        "format": FORMAT,
        "step": step,
        "trial_number": trial.number,
        "metadata": _encode(dict(metadata or {}), "metadata", tensors),
        "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors) if optimizer else None,
        "scheduler": _encode(scheduler.state_dict(), "scheduler", tensors) if scheduler else None,
        "rng": _encode(rng.state() if rng is not None else global_state(), "rng", tensors) if save_rng else None,
        "architecture": dict(architecture) if architecture is not None else None,
    }
    name = f"lineage-{lineage_mod.lineage_label(trial):04d}-step-{step:04d}"
    artifact_id, digest, size = _write_and_upload(
        study, trial, tensors, header, artifact_store, name, f"of trial {trial.number} at step {step}"
    )
    record = CheckpointRecord(trial.number, trial._trial_id, step, artifact_id, digest, size, architecture is not None)
    lineage_mod.record_checkpoint(study, trial._trial_id, record)
    study._storage.set_trial_user_attr(trial._trial_id, USER_CHECKPOINT_STEP, step)
    return record


def register_pretrained(
    study: Study,
    param: str,
    value: Any,
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    *,
    architecture: Mapping[str, Any] | None = None,
    artifact_store: ArtifactStore | None = None,
) -> CheckpointRecord:
    """Register the weights a configuration with ``param == value`` starts from.

    Typically one call per value of a categorical ``"model"`` parameter, before optimizing:
    the surrogate then scores configurations not yet started by their pretrained weights
    (without it, by a learned "no weights" embedding). Stored as a study artifact, so every
    worker sees it, named by the value (``pretrained-model=resnet_small.safetensors``). Without
    ``architecture``, it is found as in :func:`save_checkpoint`.
    """
    shown = json.dumps(value)  # NOTE: the value becomes part of a JSON key; fail early if it cannot
    tensors = _model_tensors(model_or_state_dict)
    if architecture is None:
        architecture = _found_architecture(study, model_or_state_dict)
    header = {"format": FORMAT, "step": 0, "trial_number": None, "pretrained": [param, value],
              "architecture": dict(architecture) if architecture is not None else None}
    artifact_id, digest, size = _write_and_upload(
        study, study, tensors, header, artifact_store,
        _file_name(f"pretrained-{param}={value if isinstance(value, str) else shown}"),
        f"pretrained for {param}={value!r}",
    )
    record = CheckpointRecord(None, None, 0, artifact_id, digest, size, architecture is not None)
    lineage_mod.record_pretrained(study, param, value, record)
    return record


def _found_architecture(
    study: Study, model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]
) -> dict[str, Any] | None:
    """The description of what is saved when none is given, or None (one warning per cause)."""
    from optuna_fms.graphs.infer import NotInferableError, find_architecture

    try:
        return find_architecture(model_or_state_dict)
    except (UnsupportedLayerError, NotInferableError) as err:
        if not _reads_weights(study):
            return None
        if isinstance(model_or_state_dict, torch.nn.Module):
            kind = type(model_or_state_dict).__name__
            warn_once(f"describe:{type(model_or_state_dict).__qualname__}", (
                f"The architecture of {kind} cannot be described ({err}), so FMSSampler reads no "
                f"weights from its checkpoints. Pass architecture= with a description of a supported "
                "equivalent model, or use FMSSampler(weights=None) to say so."))
        else:
            warn_once("infer-state-dict", (
                f"The architecture of a state dict cannot be inferred from its names and shapes ({err}), "
                "so FMSSampler reads no weights from its checkpoints. Pass the model itself "
                "(save_checkpoint(trial, model, ...), register_pretrained(study, param, value, model)) "
                "or architecture=optuna_fms.describe_architecture(model)."))
        return None


def _reads_weights(study: Study) -> bool:
    from optuna_fms.sampler import FMSSampler

    return not (isinstance(study.sampler, FMSSampler) and study.sampler.graph_source is None)


# --- load ------------------------------------------------------------------------------------


def load_checkpoint(
    trial: optuna.Trial,
    model: torch.nn.Module | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    artifact_store: ArtifactStore | None = None,
    restore_rng: bool | None = None,
) -> Checkpoint | None:
    """The checkpoint the lineage ``trial`` continues resumes from, loaded into the given objects.

    ``restore_rng``: restore the saved RNG states into the process-wide RNGs (True), never
    (False), or (None, default) only when called on the main thread, which is where Optuna runs
    trials with ``n_jobs=1``; a trial in a worker thread (``n_jobs > 1``) leaves the other
    trials' RNGs alone and resumes its own generators with ``Checkpoint.rng()``.

    Returns None for a new configuration (nothing to resume). That checkpoint is the one
    FMSSampler verified (``fms:resume``), else the lineage's newest. One that is missing,
    corrupt or does not fit the given objects (another architecture) is recorded as bad and
    the newest older good one is used instead, with a warning and the user attr
    ``fms:fallback``; the objective then resumes from ``ckpt.step + 1``. When none is left,
    the lineage is failed and :class:`LineageLost` (a ``TrialPruned``) ends this trial, so
    ``study.optimize`` goes on.
    """
    study = trial.study
    frozen = with_backoff("read the trial", lambda: study._storage.get_trial(trial._trial_id))
    lin = lineage_mod.lineage_of(study, trial.number)
    if lin is None:
        return None
    wanted = lineage_mod.resume_record(frozen) or lin.checkpoint_at_or_before(None)
    if wanted is None:
        if lin.n_thaws:
            warn_once(f"nockpt:{lin.id}", f"Trial {trial.number} continues lineage {lin.id}, "
                       "which has no checkpoint: it starts from scratch.")
        return None
    failures = []
    for record in _resume_candidates(lin, wanted):
        try:
            ckpt = read_checkpoint(study, record, artifact_store=artifact_store)
            _restore(ckpt, model, optimizer, scheduler, restore_rng)
        except CheckpointError as err:
            lineage_mod.mark_bad_checkpoint(study, record, str(err))
            failures.append(str(err))
            continue
        if failures:
            _say_fallback(study, frozen, wanted, record, failures)
        return ckpt
    reason = f"no checkpoint of lineage {lin.id} can be resumed: " + "; ".join(failures)
    lineage_mod.mark_lineage_failed(study, lin, reason)
    lineage_mod.set_system_attr(study, frozen, lineage_mod.FAILED, reason)
    lineage_mod.set_user_attr(study, frozen, lineage_mod.USER_DECISION, f"failed: {reason}")
    lineage_mod.set_user_attr(study, frozen, lineage_mod.USER_FAILURE, reason)
    _logger.warning(reason)
    raise LineageLost(reason)


def _resume_candidates(lin: lineage_mod.Lineage, wanted: CheckpointRecord) -> list[CheckpointRecord]:
    """``wanted``, then the lineage's older checkpoints, newest first."""
    older = [c for c in lin.checkpoints if c.step < wanted.step and c.artifact_id != wanted.artifact_id]
    return [wanted] + sorted(older, key=lambda c: (c.step, c.trial_number or -1), reverse=True)


def _say_fallback(
    study: Study, trial: Any, wanted: CheckpointRecord, used: CheckpointRecord, failures: list[str]
) -> None:
    note = (f"the checkpoint at step {wanted.step} of trial {wanted.trial_number} is unusable; resumed "
            f"from step {used.step} of trial {used.trial_number}")
    _logger.warning(f"Trial {trial.number}: {note} ({failures[0]}).")
    lineage_mod.set_user_attr(study, trial, lineage_mod.USER_FALLBACK, note)
    lineage_mod.set_user_attr(study, trial, lineage_mod.USER_START_STEP, used.step + 1)


def verify_checkpoint(
    study: Study, record: CheckpointRecord, *, artifact_store: ArtifactStore | None = None
) -> str | None:
    """None if the checkpoint's bytes are there and match their SHA-256, else why not."""
    store = resolve_artifact_store(study, artifact_store)
    with tempfile.TemporaryDirectory(prefix="optuna-fms-") as tmp:
        try:
            _download_verified(store, record, os.path.join(tmp, "checkpoint.safetensors"))
        except CheckpointError as err:
            return str(err)
    return None


def newest_good_checkpoint(
    study: Study, lineage: lineage_mod.Lineage, *, artifact_store: ArtifactStore | None = None
) -> CheckpointRecord | None:
    """The newest checkpoint of ``lineage`` that verifies. Bad ones on the way are recorded
    (so every worker skips them), and falling back says so in a warning."""
    for record in sorted(lineage.checkpoints, key=lambda c: (c.step, c.trial_number or -1), reverse=True):
        problem = verify_checkpoint(study, record, artifact_store=artifact_store)
        if problem is None:
            return record
        lineage_mod.mark_bad_checkpoint(study, record, problem)
        _logger.warning(f"Lineage {lineage.id}: {problem}; an older checkpoint is tried.")
    return None


def read_checkpoint(
    study: Study, record: CheckpointRecord, *, artifact_store: ArtifactStore | None = None
) -> Checkpoint:
    """Download, verify (size and SHA-256) and parse one checkpoint of ``study``."""
    store = resolve_artifact_store(study, artifact_store)
    with tempfile.TemporaryDirectory(prefix="optuna-fms-") as tmp:
        try:
            path = _download_verified(store, record, os.path.join(tmp, "checkpoint.safetensors"))
        except CheckpointError as err:
            reason = lineage_mod.deleted_checkpoints(study).get(record.artifact_id)
            if reason is None:
                raise
            raise CheckpointError(f"The {_where(record)} was deleted on purpose ({reason}).") from err
        header, tensors = _read_file(path, _where(record))
    return Checkpoint(
        **_contents(header, tensors),
        trial_number=record.trial_number,
        artifact_id=record.artifact_id,
        sha256=record.sha256,
    )


def _restore(
    ckpt: Checkpoint,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    restore_rng: bool | None,
) -> None:
    where = f"checkpoint of trial {ckpt.trial_number} (artifact {ckpt.artifact_id})"
    try:
        if model is not None:
            model.load_state_dict(ckpt.state_dict)
        if optimizer is not None:
            if ckpt.optimizer_state is None:
                raise CheckpointError(f"The {where} holds no optimizer state.")
            optimizer.load_state_dict(ckpt.optimizer_state)
        if scheduler is not None:
            if ckpt.scheduler_state is None:
                raise CheckpointError(f"The {where} holds no scheduler state.")
            scheduler.load_state_dict(ckpt.scheduler_state)
    except (RuntimeError, ValueError, KeyError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"The {where} does not fit the given objects: {err}") from err
    if ckpt.rng_state is None:
        return
    if may_restore_global(restore_rng):
        restore_global(ckpt.rng_state)
    elif restore_rng is None:
        warn_once("rng-not-restored", "load_checkpoint leaves the process-wide RNGs alone off the main thread "
                  "(n_jobs > 1: other trials draw from them); use Checkpoint.rng() for this trial's own "
                  "generators, or pass restore_rng=True.")
