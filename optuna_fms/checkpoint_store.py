"""Where checkpoint files live and how they move: store, default folder, names, upload, verified download."""

from __future__ import annotations

import errno
import os
from pathlib import Path
import re
import tempfile
import threading
from typing import TYPE_CHECKING, Any
import weakref

from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound

from optuna_fms._retry import with_backoff
from optuna_fms.checkpoint_format import MIMETYPE, CheckpointError, _sha256, _write_file

if TYPE_CHECKING:
    import optuna
    from optuna.artifacts._protocol import ArtifactStore
    from optuna.study import Study
    import torch

    from optuna_fms.lineage import CheckpointRecord

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


def _file_name(text: str, limit: int = 120) -> str:
    """``text`` as a portable file name: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)[:limit]


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
    store = resolve_artifact_store(study, artifact_store)
    with tempfile.TemporaryDirectory(prefix="optuna-fms-") as tmp:
        path = os.path.join(tmp, f"{name}.safetensors")
        try:
            _write_file(path, tensors, header)
            digest, size = _sha256(path), os.path.getsize(path)
            artifact_id = upload_artifact(artifact_store=store, file_path=path, study_or_trial=owner, mimetype=MIMETYPE)
        except OSError as err:
            hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
            raise CheckpointError(
                f"Could not write the checkpoint {what}{hint}: {err}. Earlier checkpoints are untouched."
            ) from err
    return artifact_id, digest, size


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
