"""Safetensors checkpoints as Optuna trial artifacts: save, load, verify (never pickle)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
import errno
import hashlib
import json
import logging
import math
import os
from pathlib import Path
import re
import tempfile
import threading
from typing import TYPE_CHECKING, Any
import weakref

import numpy as np
import optuna
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
import torch

from optuna_fms import lineage as lineage_mod
from optuna_fms._retry import with_backoff
from optuna_fms._warnings import warn_once
from optuna_fms.graphs.schema import UnsupportedLayerError
from optuna_fms.lineage import CheckpointRecord
from optuna_fms.rng import TrialRNG, global_state, may_restore_global, restore_global

if TYPE_CHECKING:
    from optuna.artifacts._protocol import ArtifactStore
    from optuna.study import Study

_logger = logging.getLogger(__name__)

MIMETYPE = "application/x-safetensors"
FORMAT = "optuna-fms/1"
_META_KEY = "optuna_fms"
USER_CHECKPOINT_STEP = "fms:checkpoint_step"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or cannot be written or restored."""


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


# --- the artifact store ----------------------------------------------------------------------

_memory_stores: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_memory_lock = threading.Lock()


def resolve_artifact_store(study: Study, artifact_store: ArtifactStore | None = None) -> ArtifactStore:
    """The store to use: the one given, else the sampler's or pruner's, else a default folder.

    The default is a folder next to the storage file (``fms.db`` -> ``fms-artifacts/``) for
    SQLite and journal files, and a temporary folder living as long as the process for an
    in-memory study. Server databases have no "next to", so they need an explicit store.
    """
    if artifact_store is not None:
        return artifact_store
    for component in (study.sampler, study.pruner):
        store = getattr(component, "artifact_store", None)
        if store is not None:
            return store
    return FileSystemArtifactStore(str(default_artifact_dir(study._storage)))


def default_artifact_dir(storage: Any) -> Path:
    from optuna.storages import InMemoryStorage, JournalStorage, RDBStorage
    from optuna.storages._cached_storage import _CachedStorage
    from optuna.storages.journal import JournalFileBackend

    backend = storage._backend if isinstance(storage, _CachedStorage) else storage
    if isinstance(backend, RDBStorage) and backend.url.startswith("sqlite:///"):
        db = backend.url[len("sqlite:///") :].split("?", 1)[0]
        if db and db != ":memory:":
            return _ensure_dir(Path(db).with_name(Path(db).stem + "-artifacts"))
    if isinstance(backend, JournalStorage) and isinstance(backend._backend, JournalFileBackend):
        log = Path(backend._backend._file_path)
        return _ensure_dir(log.with_name(log.stem + "-artifacts"))
    if isinstance(backend, InMemoryStorage):
        with _memory_lock:
            if backend not in _memory_stores:
                folder = tempfile.TemporaryDirectory(prefix="optuna-fms-")
                _memory_stores[backend] = folder.name
                weakref.finalize(backend, folder.cleanup)
            return Path(_memory_stores[backend])
    raise ValueError(
        f"optuna-fms has no default artifact folder for {type(backend).__name__}; pass one, e.g. "
        "FMSSampler(artifact_store=optuna.artifacts.FileSystemArtifactStore('<shared folder>'))."
    )


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def _file_name(text: str, limit: int = 120) -> str:
    """``text`` as a portable file name: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)[:limit]


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


def _model_tensors(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        state = model_or_state_dict.state_dict()
    else:
        state = dict(model_or_state_dict)
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"State dict entry {key!r} is a {type(value).__name__}, not a tensor.")
        tensors[f"model/{key}"] = _storable(value)
    return tensors


def _write_and_upload(
    study: Study,
    owner: optuna.Trial | Study,
    tensors: dict[str, torch.Tensor],
    header: dict[str, Any],
    artifact_store: ArtifactStore | None,
    name: str,
    what: str,
) -> tuple[str, str, int]:
    """One safetensors file, uploaded as an artifact of ``owner``: (artifact id, SHA-256, size)."""
    from safetensors.torch import save_file

    store = resolve_artifact_store(study, artifact_store)
    with tempfile.TemporaryDirectory(prefix="optuna-fms-") as tmp:
        path = os.path.join(tmp, f"{name}.safetensors")
        try:
            save_file(tensors, path, metadata={_META_KEY: json.dumps(header)})
            digest, size = _sha256(path), os.path.getsize(path)
            artifact_id = upload_artifact(artifact_store=store, file_path=path, study_or_trial=owner, mimetype=MIMETYPE)
        except OSError as err:
            hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
            raise CheckpointError(
                f"Could not write the checkpoint {what}{hint}: {err}. Earlier checkpoints are untouched."
            ) from err
    return artifact_id, digest, size


def _storable(t: torch.Tensor) -> torch.Tensor:
    # NOTE: safetensors refuses shared or strided storage; a contiguous CPU copy is always valid.
    return t.detach().to("cpu", copy=True).contiguous()


# NOTE: the JSON skeleton of nested states. Tensors go to the safetensors body and leave a
# reference; dicts keep their key types (optimizer states are keyed by int); tuples stay tuples.
def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = _storable(obj)
        return {"__tensor__": path}
    if isinstance(obj, Mapping):
        return {"__dict__": [[_encode(k, f"{path}/k{i}", tensors), _encode(v, f"{path}/{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
    raise CheckpointError(f"Cannot store a {type(obj).__name__} at {path!r} in a checkpoint.")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
    return obj


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    from safetensors import SafetensorError, safe_open

    store = resolve_artifact_store(study, artifact_store)
    with tempfile.TemporaryDirectory(prefix="optuna-fms-") as tmp:
        try:
            path = _download_verified(store, record, os.path.join(tmp, "checkpoint.safetensors"))
        except CheckpointError as err:
            reason = lineage_mod.deleted_checkpoints(study).get(record.artifact_id)
            if reason is None:
                raise
            raise CheckpointError(f"The {_where(record)} was deleted on purpose ({reason}).") from err
        try:
            with safe_open(path, framework="pt") as f:
                header = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, KeyError, ValueError, OSError) as err:
            raise CheckpointError(f"The {_where(record)} cannot be parsed: {err}") from err
    state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    return Checkpoint(
        step=int(header["step"]),
        state_dict=state,
        metadata=_decode(header.get("metadata"), tensors) or {},
        optimizer_state=_decode(header.get("optimizer"), tensors),
        scheduler_state=_decode(header.get("scheduler"), tensors),
        trial_number=record.trial_number,
        artifact_id=record.artifact_id,
        sha256=record.sha256,
        architecture=header.get("architecture"),
        rng_state=_decode(header.get("rng"), tensors),
    )


def _where(record: CheckpointRecord) -> str:
    owner = "the study" if record.trial_number is None else f"trial {record.trial_number}"
    return f"checkpoint of {owner} at step {record.step} (artifact {record.artifact_id})"


def _download_verified(store: ArtifactStore, record: CheckpointRecord, path: str) -> str:
    """Download ``record`` to ``path`` and check its size and SHA-256; CheckpointError if not."""
    try:
        # NOTE: a lost connection is retried, never taken for a missing file (that would mark
        # a good checkpoint bad); StorageUnavailable after the last try.
        with_backoff(f"download the {_where(record)}", lambda: download_artifact(
            artifact_store=store, file_path=path, artifact_id=record.artifact_id))
    except (ArtifactNotFound, FileNotFoundError, OSError) as err:
        raise CheckpointError(f"The {_where(record)} is missing from the artifact store: {err}") from err
    if os.path.getsize(path) != record.size or _sha256(path) != record.sha256:
        raise CheckpointError(f"The {_where(record)} is corrupt: its content does not match the recorded SHA-256.")
    return path


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
