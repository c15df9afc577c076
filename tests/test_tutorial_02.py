"""Smoke test of tutorials/02_many_workers.py: worker processes on PostgreSQL, one killed mid-run."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState
import pytest
import torch

from conftest import POSTGRES_URL, _postgres_storage
from scripts import load_script

pytest.importorskip("sklearn")

TUTORIAL = Path(__file__).resolve().parents[1] / "tutorials" / "02_many_workers.py"


def _load_tutorial():
    return load_script("fms_tutorial_02", TUTORIAL)


@pytest.mark.postgres
@pytest.mark.slow
def test_many_workers_share_a_study_and_recover_a_killed_one(tmp_path, capsys) -> None:
    _postgres_storage()  # NOTE: skips without a server (fails under CI, as every PostgreSQL test)
    tutorial = _load_tutorial()
    threads, verbosity = torch.get_num_threads(), optuna.logging.get_verbosity()
    summary = None
    try:
        summary = tutorial.main(["--smoke", "--out", str(tmp_path), "--storage", POSTGRES_URL])
        printed = capsys.readouterr().out
        study = summary["study"]
        trials = {t.number: t for t in study.trials}

        # Every worker ran trials of the one study; w0 died in its second (--smoke: crash at 2).
        assert summary["workers"]["w0"] == 2 and summary["workers"]["w1"] == 5
        assert summary["workers"]["replacement"] == 1
        assert len(trials) == 8

        # The killed trial was failed by Optuna's heartbeat, retried, and its lineage continued
        # from the checkpoint it saved in the shared folder before it died.
        [killed] = summary["killed"]
        assert trials[killed].state == TrialState.FAIL
        retry = trials[summary["retries"][killed]]
        assert retry.system_attrs["fms:parent"] == killed
        assert retry.user_attrs["fms:start_step"] == max(trials[killed].intermediate_values) + 1
        assert retry.user_attrs["fms:decision"]  # the retry ran and the pruner or the end decided
        assert str(killed) in retry.user_attrs["fms:resume"]
        lin = next(lin for lin in summary["lineages"] if any(t.number == killed for t in lin.trials))
        assert retry.number in [t.number for t in lin.trials] and lin.crashes == 1

        # Freeze-thaw across processes: the retry at least was resumed by another worker than w0.
        assert summary["cross_worker_thaws"] >= 1
        for lin in summary["lineages"]:
            for prev, seg in zip(lin.trials, lin.trials[1:]):
                assert seg.params == lin.trials[0].params
        checkpoints = list((tmp_path / f"{summary['study_name']}-artifacts").iterdir())
        assert len(checkpoints) >= sum(len(t.intermediate_values) for t in trials.values())

        assert "=== Summary ===" in printed and f"Crash:          trial {killed} [w0]" in printed
        assert summary["dashboard"] in printed and POSTGRES_URL in summary["dashboard"]
    finally:
        torch.set_num_threads(threads)
        optuna.logging.set_verbosity(verbosity)
        if summary is not None:
            optuna.delete_study(study_name=summary["study_name"], storage=POSTGRES_URL)
