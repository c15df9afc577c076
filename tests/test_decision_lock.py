"""The decision lock covers the engine's decision only: no storage or artifact I/O runs under it,
so a slow download (or storage) in one thread never stalls another thread's decision."""

from __future__ import annotations

import threading

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import TrialState
import pytest
import torch

import optuna_fms
from optuna_fms import lineage as lin_mod
from optuna_fms.engine.surrogate import FitSettings
from test_recovery import make_study, objective, seed_study, value, weights

pytestmark = pytest.mark.usefixtures("isolated_warnings")


class WatchedStorage(optuna.storages.InMemoryStorage):
    """Notes every storage call made while the watched lock is held by the calling thread."""

    watched: threading.RLock | None = None

    def __init__(self) -> None:
        super().__init__()
        self.under_lock: list[str] = []

    def __getattribute__(self, name: str):  # type: ignore[no-untyped-def]
        attr = super().__getattribute__(name)
        if not name.startswith("_") and callable(attr):
            lock = object.__getattribute__(self, "watched")
            if lock is not None and lock._is_owned():
                object.__getattribute__(self, "under_lock").append(name)
        return attr


class WatchedStore(FileSystemArtifactStore):
    """An artifact store that notes reads under the lock, and can hold one download back."""

    def __init__(self, folder: str) -> None:
        super().__init__(folder)
        self.watched: threading.RLock | None = None
        self.under_lock: list[str] = []
        self.hold: threading.Event | None = None  # set: downloads go on
        self.held = threading.Event()  # a download is being held back

    def _note(self, what: str) -> None:
        if self.watched is not None and self.watched._is_owned():
            self.under_lock.append(what)

    def open_reader(self, artifact_id: str):  # type: ignore[no-untyped-def]
        self._note("open_reader")
        if self.hold is not None and not self.hold.is_set():
            self.held.set()
            assert self.hold.wait(120), "the held download was never released"
        return super().open_reader(artifact_id)

    def write(self, artifact_id, content_body) -> None:  # type: ignore[no-untyped-def]
        self._note("write")
        super().write(artifact_id, content_body)


def _watched_study(tmp_path) -> tuple[optuna.Study, WatchedStorage, WatchedStore]:
    storage, store = WatchedStorage(), WatchedStore(str(tmp_path))
    study = make_study(storage, store)
    study.pruner.min_segment_steps = 1  # freeze whenever another run deserves the step
    study.pruner.freeze_margin = 0.0
    storage.watched = store.watched = study.sampler.lock
    return study, storage, store


def test_no_storage_or_artifact_io_happens_under_the_decision_lock(tmp_path) -> None:
    study, storage, store = _watched_study(tmp_path)
    seed_study(study)
    study.optimize(objective, n_trials=6)
    thaws = [t for t in study.trials if t.system_attrs.get(lin_mod.PARENT) is not None]
    frozen = [t for t in study.trials if t.system_attrs.get(lin_mod.FROZEN) and t.number > 3]
    assert thaws and frozen  # the sampler thawed (verify, claim) and the pruner froze
    assert storage.under_lock == [] and store.under_lock == []
    with study.sampler.lock:  # the watch itself sees a call made under the lock
        study.get_trials(deepcopy=False)
    assert storage.under_lock


def test_a_held_download_does_not_stall_another_threads_decision(tmp_path) -> None:
    study, _, store = _watched_study(tmp_path)
    names = seed_study(study)
    # a running segment of its own (enqueued: decided already) that has just reported
    study.enqueue_trial({"x": 0.3})
    running = study.ask()
    running.suggest_float("x", 0.0, 1.0)
    optuna_fms.save_checkpoint(running, weights(0), 0)
    running.report(value(0.3, 0), 0)

    store.hold = threading.Event()
    asked: dict[str, optuna.Trial] = {}
    thawing = threading.Thread(target=lambda: asked.update(trial=study.ask()))
    thawing.start()  # the sampler thaws A and verifies its checkpoint: the download is held
    assert store.held.wait(60)
    decided: dict[str, bool] = {}
    pruning = threading.Thread(target=lambda: decided.update(
        prune=study.pruner.prune(study, study._storage.get_trial(running._trial_id))))
    pruning.start()
    pruning.join(90)
    try:
        assert not pruning.is_alive(), "the pruner's decision waited for another thread's download"
        assert thawing.is_alive() and "prune" in decided
    finally:
        store.hold.set()
        thawing.join(60)
    thaw = asked["trial"]
    assert study.trials[thaw.number].system_attrs[lin_mod.PARENT] == names["A"]
    study.tell(running, state=TrialState.PRUNED)


def test_graphs_evicted_from_the_cache_are_read_before_the_lock_is_taken(tmp_path, monkeypatch) -> None:
    """Fits from scratch re-embed every graph; with a cache of two graphs most are evicted by
    then, and each must be read again between two holds of the lock, never under it."""
    from optuna_fms.graph_source import GraphSource
    from optuna_fms.graphs.cache import GraphCache

    store = WatchedStore(str(tmp_path))
    sampler = optuna_fms.FMSSampler(
        seed=0, n_startup_trials=3, pool_size=16, artifact_store=store, dashboard=False, progress=False,
        fit_settings=FitSettings(full_steps=4, refine_steps=1, weight_steps=2, weight_graphs=2, refit_every=4),
    )
    sampler.graph_source._cache = GraphCache(maxsize=2)
    study = optuna.create_study(direction="maximize", sampler=sampler,
                                pruner=optuna_fms.FMSPruner(max_steps=4, min_segment_steps=1))
    builds: list[tuple[str, bool]] = []
    build = GraphSource._build

    def watched_build(self, study, record):  # type: ignore[no-untyped-def]
        builds.append((record.sha256, sampler.lock._is_owned()))
        return build(self, study, record)

    monkeypatch.setattr(GraphSource, "_build", watched_build)

    def train(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        torch.manual_seed(trial.number)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        ckpt = optuna_fms.load_checkpoint(trial, model)
        start = 0 if ckpt is None else ckpt.step + 1
        for step in range(start, 4):
            with torch.no_grad():
                model[0].weight.mul_(0.9)
            optuna_fms.save_checkpoint(trial, model, step)
            trial.report(value(x, step), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value(x, 3)

    store.watched = sampler.lock
    study.optimize(train, n_trials=12)
    keys = [key for key, _ in builds]
    assert len(set(keys)) > 2 and len(keys) > len(set(keys))  # evicted graphs were read again
    assert [key for key, locked in builds if locked] == []
    assert store.under_lock == []
