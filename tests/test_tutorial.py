"""Smoke test of tutorials/01_finetune_model_hub.py: a tiny search end to end."""

from __future__ import annotations

from pathlib import Path
import sys

import optuna
import pytest
import torch
from scripts import load_script

pytest.importorskip("sklearn")

TUTORIAL = Path(__file__).resolve().parents[1] / "tutorials" / "01_finetune_model_hub.py"


def _load_tutorial():
    return load_script("fms_tutorial_01", TUTORIAL)


def test_finetune_model_hub_tutorial(tmp_path, capsys):
    tutorial = _load_tutorial()
    out = tmp_path / "out"
    # A leftover study of the same name from an earlier run: main() must start clean.
    out.mkdir()
    optuna.create_study(storage=f"sqlite:///{out / 'fms.db'}", study_name="finetune-model-hub")
    threads, verbosity = torch.get_num_threads(), optuna.logging.get_verbosity()
    try:
        summary = tutorial.main(["--trials", "12", "--epochs", "4", "--out", str(out)])
    finally:  # main() sets these process-wide; leave the rest of the suite as it was
        torch.set_num_threads(threads)
        optuna.logging.set_verbosity(verbosity)
    printed = capsys.readouterr().out

    db, artifacts = out / "fms.db", out / "fms-artifacts"
    assert db.is_file()
    assert artifacts.is_dir() and any(artifacts.iterdir())

    # Freeze-thaw happened: the start-up design freezes every run after its first epoch.
    assert summary["n_frozen_ever"] >= 1
    assert summary["epochs_trained"] >= 12

    # The printed summary points at the dashboard with absolute paths.
    # NOTE: the venv's own optuna-dashboard, so the command works in a fresh shell
    exe = summary["dashboard"].split()[0]
    assert exe.endswith("optuna-dashboard") and Path(exe).exists()
    assert Path(exe).resolve() == (Path(sys.executable).parent / "optuna-dashboard").resolve()
    command = f"{exe} sqlite:///{db.resolve()} --artifact-dir {artifacts.resolve()}"
    assert summary["dashboard"] == command
    assert command in printed
    assert "=== Summary ===" in printed

    # Better than chance (5 classes) on validation, and the test evaluation ran.
    assert summary["best_val"] > 0.2
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert summary["best_lineage"].checkpoints
    # finish_best ended the search with the best lineage trained to the last epoch
    study, finished = summary["study"], summary["finished"]
    assert finished.state == optuna.trial.TrialState.COMPLETE and finished.last_step == 3
    assert study.best_trial.number == finished.number
    assert summary["best_lineage"].state == "finished" and summary["best_lineage"].tail.number == finished.number
    # The leftover study was not loaded: 12 trials, and the finishing one unless the search itself
    # had run the best lineage to the last epoch (then finish_best has nothing to train; on some
    # CPUs the surrogate's near-tie decisions do that).
    from optuna_fms import lineage as lin_mod

    added = finished.system_attrs.get(lin_mod.FINISH) is not None
    assert len(study.trials) == 12 + added
    assert not added or finished.number == 12

