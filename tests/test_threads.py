"""Trials in threads (``study.optimize(n_jobs > 1)``): RNG states and torch's thread count."""

from __future__ import annotations

import threading

import optuna
import pytest
import torch

import optuna_fms
from optuna_fms import lineage as lin_mod
from optuna_fms.engine.surrogate import FitSettings

pytestmark = pytest.mark.usefixtures("isolated_warnings")
SPACE = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


def _thawed_trial(study: optuna.Study, x: float, seed: int) -> tuple[optuna.Trial, torch.Tensor]:
    """A lineage checkpointed with its own generators, thawed in a new trial; and what its
    generator would have drawn next, had it never been frozen."""
    study.enqueue_trial({"x": x})
    first = study.ask(SPACE)
    rng = optuna_fms.TrialRNG.seeded(seed)
    torch.rand(3, generator=rng.torch)  # the segment draws before it saves
    optuna_fms.save_checkpoint(first, {"w": torch.zeros(2)}, 0, rng=rng)
    expected = torch.rand(8, generator=rng.torch)
    first.report(x, 0)
    study._storage.set_trial_system_attr(first._trial_id, lin_mod.FROZEN, "test")
    study.tell(first, state=optuna.trial.TrialState.PRUNED)
    second = study.ask()
    lin = lin_mod.lineage_of(study, first.number)
    assert lin_mod.claim(study, second._cached_frozen_trial, lin.tail.number)
    lin_mod.mark_thaw(study, second._cached_frozen_trial, lin, "test")
    return second, expected


def test_two_threads_loading_checkpoints_keep_their_own_rng_streams() -> None:
    study = optuna.create_study()
    trials = [_thawed_trial(study, 0.2, seed=1), _thawed_trial(study, 0.7, seed=2)]
    torch.manual_seed(99)
    global_before = torch.get_rng_state()
    loaded, drawn = threading.Barrier(2), {}

    def resume(i: int) -> None:
        trial, _ = trials[i]
        rng = optuna_fms.load_checkpoint(trial).rng()
        loaded.wait()  # both have loaded before either draws: a shared state would be clobbered
        drawn[i] = torch.cat([torch.rand(4, generator=rng.torch) for _ in range(2)])

    workers = [threading.Thread(target=resume, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for i, (_, expected) in enumerate(trials):
        assert torch.equal(drawn[i], expected)
    assert not torch.equal(drawn[0], drawn[1])
    assert torch.equal(torch.get_rng_state(), global_before)  # worker threads left the process RNG alone


def test_a_worker_thread_restores_the_process_rng_only_when_asked() -> None:
    study = optuna.create_study()
    trial, expected = _thawed_trial(study, 0.5, seed=3)
    torch.manual_seed(5)
    done: dict[str, torch.Tensor] = {}

    def resume() -> None:
        optuna_fms.load_checkpoint(trial, restore_rng=True)
        done["draw"] = torch.rand(8)

    worker = threading.Thread(target=resume)
    worker.start()
    worker.join()
    assert torch.equal(done["draw"], expected)  # a TrialRNG state resumes the process RNG too


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_a_decision_leaves_torch_thread_count_as_it_was(n_jobs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bool, int]] = []
    set_threads = torch.set_num_threads

    def spy(n: int) -> None:
        calls.append((threading.current_thread() is threading.main_thread(), n))
        set_threads(n)

    monkeypatch.setattr(torch, "set_num_threads", spy)
    before = torch.get_num_threads()
    sampler = optuna_fms.FMSSampler(
        seed=0, n_startup_trials=2, pool_size=16, weights=None, fit_settings=FitSettings(full_steps=20, refine_steps=5)
    )
    study = optuna.create_study(sampler=sampler)
    seen: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        seen.append(torch.get_num_threads())
        return (trial.suggest_float("x", 0.0, 1.0) - 0.3) ** 2

    study.optimize(objective, n_trials=6, n_jobs=n_jobs)
    decisions = [t.user_attrs.get(lin_mod.USER_DECISION, "") for t in study.trials]
    assert any("expected gain" in d for d in decisions), decisions  # the surrogate decided
    assert torch.get_num_threads() == before
    if n_jobs == 1:
        assert calls and seen == [before] * len(seen)  # narrowed for each fit, restored before training
    else:
        assert not [n for on_main, n in calls if not on_main]  # never from a worker thread
