"""Shared fixtures: every Optuna storage kind, and a tiny real fine-tuning task."""

from __future__ import annotations

import os
import uuid

import optuna
import pytest

optuna.logging.set_verbosity(optuna.logging.WARNING)

POSTGRES_URL = os.environ.get("OPTUNA_FMS_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def _postgres_storage() -> optuna.storages.RDBStorage:
    try:
        return optuna.storages.RDBStorage(POSTGRES_URL, engine_kwargs={"pool_pre_ping": True})
    except Exception as err:  # noqa: BLE001 - any failure to connect means "no server here"
        if os.environ.get("CI"):
            raise RuntimeError(f"CI must run the PostgreSQL tests, but {POSTGRES_URL} failed: {err}") from err
        pytest.skip(f"no PostgreSQL server answers at {POSTGRES_URL} ({err})")


@pytest.fixture(params=["inmemory", "sqlite", "journal", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage(request: pytest.FixtureRequest, tmp_path):
    """Each storage kind; file-backed ones put the default artifact folder next to the file."""
    kind = request.param
    if kind == "inmemory":
        return optuna.storages.InMemoryStorage()
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    return _postgres_storage()


@pytest.fixture
def study_name() -> str:
    return f"fms-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def isolated_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warnings a test triggers stay its own: later tests still see their first warn_once."""
    from optuna_fms import _warnings

    monkeypatch.setattr(_warnings, "_seen", set(_warnings._seen))
