"""Checkpoint retention: what collect_garbage deletes, what it never deletes, and who notices."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
import pytest
import torch

import optuna_fms
from optuna_fms import lineage as lin_mod
from optuna_fms._bridge import engine_space, make_history, optuna_search_space
from optuna_fms.checkpoint_store import default_artifact_dir
from optuna_fms.engine.history import Candidate
from optuna_fms.engine.surrogate import FitSettings
from optuna_fms.graph_source import GraphSource

from tasks import digits_task, finetune_objective, make_model

SPACE = {"model": CategoricalDistribution(["good", "weak"]), "x": FloatDistribution(0, 1)}
ARCH = optuna_fms.describe_architecture(make_model())


def _lineage(study: optuna.Study, values: list[float], end: str, model: str = "good") -> optuna.Trial:
    """One single-trial lineage that reports ``values`` (a checkpoint before each) and ends as
    ``end``: "finished", "frozen", "running" or "failed" (a NaN report, as FMSPruner marks it)."""
    study.enqueue_trial({"model": model, "x": 0.5})
    trial = study.ask(SPACE)
    model_ = make_model()
    model_.load_state_dict(digits_task().pretrained[model])
    for step, value in enumerate(values):
        with torch.no_grad():
            next(model_.parameters()).add_(0.01 * (step + 1))
        optuna_fms.save_checkpoint(trial, model_, step, architecture=ARCH)
        trial.report(value, step)
    if end == "finished":
        study.tell(trial, values[-1])
    elif end == "frozen":
        study._storage.set_trial_system_attr(trial._trial_id, lin_mod.FROZEN, "test")
        study.tell(trial, state=TrialState.PRUNED)
    elif end == "failed":
        study._storage.set_trial_system_attr(trial._trial_id, lin_mod.FAILED, "a non-finite value was reported")
        study.tell(trial, state=TrialState.PRUNED)
    else:
        assert end == "running"
    return trial


@pytest.fixture
def study() -> optuna.Study:
    """Five lineages in memory (with the default artifact folder) and a pretrained model."""
    study = optuna.create_study(direction="maximize")
    optuna_fms.register_pretrained(study, "model", "good", digits_task().pretrained["good"], architecture=ARCH)
    _lineage(study, [0.1, 0.2, 0.3, 0.4], "finished")  # 0: finished, mediocre
    _lineage(study, [0.5, 0.9, 0.7, 0.6], "finished")  # 1: the best lineage, best at step 1
    _lineage(study, [0.2, 0.3, 0.35], "frozen")  # 2: may be thawed
    _lineage(study, [0.1, 0.15, 0.2], "running")  # 3: still training
    _lineage(study, [0.3, 0.05, math.nan], "failed")  # 4: NaN, never runs again
    return study


def _folder(study: optuna.Study) -> Path:
    return default_artifact_dir(study._storage)


def _steps(study: optuna.Study) -> dict[int, list[int]]:
    return {lin.id: [c.step for c in lin.checkpoints] for lin in optuna_fms.lineages(study)}


def test_keep_last_zero_keeps_only_what_must_stay(study: optuna.Study, caplog) -> None:
    every = {c.artifact_id: c for lin in optuna_fms.lineages(study) for c in lin.checkpoints}
    files_before = set(p.name for p in _folder(study).iterdir())

    dry = optuna_fms.collect_garbage(study, keep_last=0, dry_run=True)
    assert set(p.name for p in _folder(study).iterdir()) == files_before  # a dry run removes nothing
    assert lin_mod.deleted_checkpoints(study) == {}

    with caplog.at_level(logging.INFO, logger="optuna_fms.retention"):
        report = optuna_fms.collect_garbage(study, keep_last=0)
    assert {r.artifact_id for r in report.deleted} == {r.artifact_id for r in dry.deleted}
    # frozen and running lineages keep their newest; the best lineage its best step and newest;
    # the finished mediocre lineage and the NaN lineage keep nothing
    assert _steps(study) == {0: [], 1: [1, 3], 2: [2], 3: [2], 4: []}
    assert report.files == 17 - 4 == len(every) - len(report.kept)
    assert report.bytes == sum(r.size for r in report.deleted) > 0
    assert report.protected == 4
    assert "retention freed 13 checkpoints" in caplog.text
    files_after = set(p.name for p in _folder(study).iterdir())
    assert files_after == files_before - {r.artifact_id for r in report.deleted}
    # the pretrained weights are a study artifact: never touched
    pretrained = next(iter(lin_mod.pretrained_records(study).values()))
    assert pretrained.artifact_id in files_after
    # each deletion is noted in the study, so every worker knows
    assert set(lin_mod.deleted_checkpoints(study)) == {r.artifact_id for r in report.deleted}
    # a second pass finds nothing more to free
    assert optuna_fms.collect_garbage(study, keep_last=0).files == 0


def test_a_deleted_checkpoint_says_so_when_asked_for(study: optuna.Study) -> None:
    old = next(c for c in optuna_fms.lineages(study)[0].checkpoints if c.step == 0)
    optuna_fms.collect_garbage(study, keep_last=1)
    with pytest.raises(optuna_fms.CheckpointError, match="deleted on purpose \\(retention\\)"):
        optuna_fms.read_checkpoint(study, old)


def test_keep_last_one_keeps_each_lineages_newest(study: optuna.Study) -> None:
    optuna_fms.collect_garbage(study, keep_last=1)
    assert _steps(study) == {0: [3], 1: [1, 3], 2: [2], 3: [2], 4: [2]}


def test_max_bytes_frees_worst_lineages_oldest_first(study: optuna.Study) -> None:
    sizes = {c.size for lin in optuna_fms.lineages(study) for c in lin.checkpoints}
    assert len(sizes) == 1  # all checkpoints here are equally large
    size = sizes.pop()
    report = optuna_fms.collect_garbage(study, max_bytes=10 * size)
    assert report.kept_bytes <= 10 * size and len(report.kept) == 10 and not report.over_budget
    # worst first (best values 0.2, 0.3, 0.35, 0.4, 0.9): lineages 3, 4, then 2, oldest steps first
    assert _steps(study) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [2], 3: [2], 4: []}


def test_protected_checkpoints_stay_above_max_bytes(study: optuna.Study) -> None:
    report = optuna_fms.collect_garbage(study, max_bytes=0)
    assert report.over_budget and "exceed max_bytes" in str(report)
    assert _steps(study) == {0: [], 1: [1, 3], 2: [2], 3: [2], 4: []}


@pytest.mark.parametrize("damage", ["corrupt", "deleted by hand"])
def test_a_damaged_newest_checkpoint_is_no_resume_point(study: optuna.Study, damage: str) -> None:
    frozen = optuna_fms.lineages(study)[2]
    newest = frozen.checkpoint_at_or_before(None)
    path = _folder(study) / newest.artifact_id
    path.write_bytes(b"garbage") if damage == "corrupt" else path.unlink()
    report = optuna_fms.collect_garbage(study, keep_last=0)
    assert newest in report.deleted and not path.exists()  # a missing file is noted as gone
    assert _steps(study)[2] == [1]  # the newest good one is kept
    # a thaw of that lineage resumes from the checkpoint retention kept
    child = study.ask()
    lin_mod.mark_thaw(study, child._cached_frozen_trial, optuna_fms.lineages(study)[2], "test")
    ckpt = optuna_fms.load_checkpoint(child, make_model())
    assert ckpt is not None and ckpt.step == 1


def test_the_surrogate_reads_the_newest_kept_checkpoint_before_a_step(study: optuna.Study) -> None:
    source = GraphSource()
    space = engine_space(optuna_search_space(study))
    pretrained = next(iter(lin_mod.pretrained_records(study).values())).sha256

    def start_graph(history, key: int, step: int) -> str | None:
        lin = history.by_key[key]
        index = history.candidate_rows([Candidate(lin.config, step, key)]).graph[0]
        return None if index < 0 else history.graph_keys[index]

    before = make_history(study, lin_mod.lineages(study), space, graph_source=source)
    mediocre = optuna_fms.lineages(study)[0]
    assert start_graph(before, 0, 3) == mediocre.checkpoints[2].sha256
    report = optuna_fms.collect_garbage(study, keep_last=1)
    # the sampler's lineages (built with the study's view) leave out what was deleted
    lineages = lin_mod.build_lineages(lin_mod.all_trials(study), lin_mod.study_view(study))
    after = make_history(study, lineages, space, graph_source=source)
    gone = {r.sha256 for r in report.deleted}
    assert gone and not gone & set(after.graph_keys)
    assert pretrained in after.graph_keys
    assert start_graph(after, 0, 3) == pretrained  # steps 0-2 are gone: the pretrained start
    best = optuna_fms.lineages(study)[1]
    assert start_graph(after, 1, 3) == best.checkpoints[0].sha256  # the kept step 1, not the lost step 2


def test_bad_settings_are_clear_errors(study: optuna.Study) -> None:
    n = len(list(_folder(study).iterdir()))
    for kwargs in ({}, {"keep_last": -1}, {"max_bytes": -5}, {"keep_last": 1.5}, {"keep_last": 1, "keep_best": -1}):
        with pytest.raises(ValueError):
            optuna_fms.collect_garbage(study, **kwargs)
    with pytest.raises(ValueError, match="every"):
        optuna_fms.RetentionCallback(keep_last=1, every=0)
    assert len(list(_folder(study).iterdir())) == n


def test_callback_keeps_a_freeze_thaw_study_resumable() -> None:
    """A whole study with retention after each trial: thaws resume, disk stays bounded."""
    callback = optuna_fms.RetentionCallback(keep_last=1)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna_fms.FMSSampler(seed=0, weights=None, n_startup_trials=3, pool_size=32,
                                      fit_settings=FitSettings(full_steps=60, refine_steps=10)),
        pruner=optuna_fms.FMSPruner(max_steps=4),
    )
    study.optimize(finetune_objective(epochs=4), n_trials=12, callbacks=[callback])
    assert all(t.state != TrialState.FAIL for t in study.trials)
    lineages = optuna_fms.lineages(study)
    assert any(lin.n_thaws for lin in lineages)  # some thaw resumed after a pass had run
    assert callback.last_report is not None and lin_mod.deleted_checkpoints(study)
    files = {p.name for p in _folder(study).iterdir()}
    kept = {c.artifact_id for lin in lineages for c in lin.checkpoints}
    assert files == kept  # every kept record has its file, and nothing else is left
    assert all(len(lin.checkpoints) <= 2 for lin in lineages)  # newest, and the best lineage's best step
    for lin in lineages:
        if lin.state == "frozen":
            assert optuna_fms.read_checkpoint(study, lin.checkpoint_at_or_before(None)).step == lin.next_step - 1
