"""optuna-dashboard itself, started as a subprocess on a finished study, read through its JSON API;
and tutorial 4 (reading a study in the dashboard) in its smoke mode."""

from __future__ import annotations

import json
from pathlib import Path
import re
import sys
import urllib.request

import optuna
import pytest

pytest.importorskip("optuna_dashboard")
pytest.importorskip("plotly")

import optuna_fms  # noqa: E402
from optuna_fms.dashboard import FIGURE_ID  # noqa: E402
from optuna_fms.engine.surrogate import FitSettings  # noqa: E402

from bench.dashboard_screenshot import dashboard_server  # noqa: E402
from tasks import digits_task, finetune_objective, make_model  # noqa: E402
from scripts import load_script

# NOTE: the decision attrs the dashboard must show; extend these lists as optuna-fms writes more.
EVERY_TRIAL_ATTRS = ["fms:lineage", "fms:decision", "fms:checkpoint_step"]
THAW_ATTRS = ["fms:parent", "fms:start_step", "fms:resume", "fms:thaw_reason"]  # each trial continuing a lineage
NEW_ATTRS = ["fms:new_reason"]  # on each trial that starts a new configuration
CHECKPOINT_NAME = re.compile(r"lineage-(\d{4})-step-(\d{4})\.safetensors")
TUTORIAL_04 = Path(__file__).resolve().parents[1] / "tutorials" / "04_dashboard.py"


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory) -> tuple[optuna.Study, Path, Path]:
    """A small study as tutorial 1 makes it: pretrained weights registered, a thaw, figure and notes."""
    tmp = tmp_path_factory.mktemp("dashboard")
    db, artifacts = tmp / "fms.db", tmp / "fms-artifacts"
    study = optuna.create_study(
        storage=f"sqlite:///{db}", study_name="dashboard-server", direction="maximize",
        # NOTE: promotion_probability=1 thaws the frozen run successive halving promotes, so a thaw
        # comes right after the start-up design on every machine (the GP's choice may differ)
        sampler=optuna_fms.FMSSampler(seed=0, n_startup_trials=3, pool_size=32, promotion_probability=1.0,
                                      fit_settings=FitSettings(full_steps=60, refine_steps=10), dashboard_every=3),
        pruner=optuna_fms.FMSPruner(n_startup_trials=3, max_steps=3),
    )
    task = digits_task()
    for name in ("good", "weak", "scratch"):
        weights = make_model() if name == "scratch" else task.pretrained[name]
        optuna_fms.register_pretrained(study, "model", name, weights)
    objective = finetune_objective(3)

    def run(study: optuna.Study) -> None:
        study.optimize(objective, n_trials=1)

    while not any(lin.n_thaws for lin in optuna_fms.lineages(study)):
        assert len(study.trials) < 8, "no thaw within 8 trials"
        run(study)
    optuna_fms.dashboard.publish(study)
    return study, db, artifacts


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200, url
        return json.loads(r.read())


def test_the_dashboard_shows_decisions_notes_the_figure_and_named_artifacts(finished_study) -> None:
    study, db, artifacts = finished_study
    with dashboard_server(f"sqlite:///{db}", artifacts) as base:
        studies = _get_json(f"{base}/api/studies")["study_summaries"]
        study_id = next(s["study_id"] for s in studies if s["study_name"] == study.study_name)
        detail = _get_json(f"{base}/api/studies/{study_id}?after=0")
        with urllib.request.urlopen(f"{base}/dashboard/studies/{study_id}", timeout=30) as r:
            assert r.status == 200 and b"<script" in r.read()  # the JS app that draws all of this

        trials = {t["number"]: t for t in detail["trials"]}
        assert sorted(trials) == [t.number for t in study.trials]
        lineages = optuna_fms.lineages(study)
        lineage_of = {t.number: lin for lin in lineages for t in lin.trials}
        for trial in study.trials:
            shown = trials[trial.number]
            attrs = {a["key"]: a["value"] for a in shown["user_attrs"]}
            for key in EVERY_TRIAL_ATTRS:
                assert key in attrs, (trial.number, key)
            lin = lineage_of[trial.number]
            assert attrs["fms:lineage"] == str(lin.id)
            if trial.number != lin.id:  # a thaw: where it resumed from
                for key in THAW_ATTRS:
                    assert key in attrs, (trial.number, key)
            else:
                for key in NEW_ATTRS:
                    assert key in attrs, (trial.number, key)
            # The note on every trial tells its lineage's story.
            assert shown["note"]["body"].startswith(f"## Lineage {lin.id} ("), trial.number
            assert f"| {trial.number} (this trial) |" in shown["note"]["body"]
            # Checkpoint cards are named by lineage and step: one per reported step of this trial.
            names = [a["filename"] for a in shown["artifacts"]]
            assert all(CHECKPOINT_NAME.fullmatch(n) for n in names), names
            assert sorted(names) == [f"lineage-{lin.id:04d}-step-{s:04d}.safetensors"
                                     for s in sorted(trial.intermediate_values)], trial.number

        # The registered pretrained weights are the study's artifacts, named by their value.
        assert sorted(a["filename"] for a in detail["artifacts"]) == [
            "pretrained-model=good.safetensors", "pretrained-model=scratch.safetensors",
            "pretrained-model=weak.safetensors"]

        # The lineage figure: one plotly figure, refreshed in place, best lineage and thaws drawn.
        figures = {g["id"]: json.loads(g["graph_object"]) for g in detail["plotly_graph_objects"]}
        assert list(figures) == [FIGURE_ID]
        names = [t.get("name", "") for t in figures[FIGURE_ID]["data"]]
        assert f"lineage {optuna_fms.best_lineage(study).id} (best)" in names
        thawed = next(t for t in figures[FIGURE_ID]["data"] if t.get("name") == "thawed here")
        assert len(thawed["x"]) == sum(lin.n_thaws for lin in lineages) >= 1

        # A checkpoint card downloads the checkpoint itself.
        first = trials[0]
        card = first["artifacts"][0]
        with urllib.request.urlopen(f"{base}/artifacts/{study_id}/{first['trial_id']}/{card['artifact_id']}") as r:
            body = r.read()
        from safetensors.torch import load

        assert any(key.startswith("model/") for key in load(body))


def _tutorial_04():
    return load_script("fms_tutorial_04", TUTORIAL_04)


@pytest.mark.slow
def test_tutorial_04_reads_a_study_in_its_smoke_mode(tmp_path, capsys) -> None:
    pytest.importorskip("sklearn")
    import torch

    threads, verbosity = torch.get_num_threads(), optuna.logging.get_verbosity()
    try:
        summary = _tutorial_04().main(["--smoke", "--out", str(tmp_path)])
    finally:  # tutorial 1 sets these process-wide
        torch.set_num_threads(threads)
        optuna.logging.set_verbosity(verbosity)
    printed = capsys.readouterr().out
    study, best = summary["study"], summary["best_lineage"]
    # Tutorial 1's 8 trials, and one more only where finish_best had to train the best lineage on:
    # that one is then the study's best trial, number 8.
    finished = study.best_trial
    assert finished.state == optuna.trial.TrialState.COMPLETE and finished.last_step == 2
    assert len(study.trials) == (9 if finished.number == 8 else 8)
    # The venv's optuna-dashboard with absolute paths: the command works from a fresh shell.
    exe = Path(sys.executable).parent / "optuna-dashboard"
    assert summary["command"].split()[0].endswith("optuna-dashboard") and exe.exists()
    assert summary["command"] in printed and f"sqlite:///{tmp_path.resolve()}/fms.db" in summary["command"]
    # What it prints is what the study holds: the best lineage's trials and their decisions.
    assert f"Best lineage {best.id}:" in printed
    for trial in best.trials:
        assert f"  trial {trial.number} ({trial.state.name}" in printed
        assert f"fms:decision         {trial.user_attrs['fms:decision']}" in printed
    assert summary["pretrained"] == sorted(f"pretrained-model={name}.safetensors" for name in [
        "scratch", "w12-gelu-bn", "w16-relu-bn", "w16-tanh", "w24-relu-bn", "w8-relu", "w8-relu-bn"])
    # The figure and a note on every trial are in the study.
    from optuna_dashboard._note import get_note_from_system_attrs

    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert any(FIGURE_ID in key for key in attrs)
    for trial in study.trials:
        assert get_note_from_system_attrs(attrs, trial._trial_id)["body"].startswith("## Lineage "), trial.number
