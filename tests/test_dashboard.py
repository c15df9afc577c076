"""optuna-dashboard shows the lineage attributes and the checkpoint artifacts of an FMS study."""

import io
import json

import optuna
from optuna.artifacts import FileSystemArtifactStore

import optuna_fms

from tasks import finetune_objective


def _get(app, path: str) -> tuple[str, bytes]:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path.split("?")[0], "QUERY_STRING": path.partition("?")[2],
               "SERVER_NAME": "localhost", "SERVER_PORT": "80", "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http"}
    status = []
    body = b"".join(app(environ, lambda s, headers, exc=None: status.append(s)))
    return status[0], body


def test_dashboard_serves_lineages_and_checkpoints(tmp_path) -> None:
    from optuna_dashboard import wsgi

    storage = f"sqlite:///{tmp_path / 'fms.db'}"
    study = optuna.create_study(
        storage=storage, direction="maximize",
        sampler=optuna_fms.FMSSampler(seed=0, n_startup_trials=3, pool_size=32), pruner=optuna_fms.FMSPruner(),
    )
    study.optimize(finetune_objective(3), n_trials=6)
    app = wsgi(optuna.storages.RDBStorage(storage), artifact_store=FileSystemArtifactStore(str(tmp_path / "fms-artifacts")))
    status, body = _get(app, f"/api/studies/{study._study_id}?after=0")
    assert status.startswith("200")
    trials = json.loads(body)["trials"]
    attrs = [{a["key"]: a["value"] for a in t["user_attrs"]} for t in trials]
    assert all("fms:lineage" in a for a in attrs) and any("fms:decision" in a for a in attrs)
    artifacts = [a for t in trials for a in t["artifacts"]]
    assert artifacts and all(a["mimetype"] == "application/x-safetensors" for a in artifacts)
    # NOTE: the card optuna-dashboard draws shows the filename: lineage and step
    assert "lineage-0000-step-0000.safetensors" in {a["filename"] for a in trials[0]["artifacts"]}
    first = trials[0]
    status, body = _get(app, f"/artifacts/{study._study_id}/{first['trial_id']}/{first['artifacts'][0]['artifact_id']}")
    assert status.startswith("200")
    from safetensors.torch import load

    assert any(key.startswith("model/") for key in load(body))  # the download is the checkpoint itself


def test_dashboard_shows_the_lineage_figure_and_a_note_per_trial(tmp_path) -> None:
    from optuna_dashboard import wsgi

    from optuna_fms.dashboard import FIGURE_ID, publish

    storage = f"sqlite:///{tmp_path / 'fms.db'}"
    study = optuna.create_study(
        storage=storage, direction="maximize",
        sampler=optuna_fms.FMSSampler(seed=0, n_startup_trials=3, pool_size=32, dashboard_every=3),
        pruner=optuna_fms.FMSPruner(),
    )
    study.optimize(finetune_objective(3), n_trials=7)
    publish(study)
    app = wsgi(optuna.storages.RDBStorage(storage))
    status, body = _get(app, f"/api/studies/{study._study_id}?after=0")
    assert status.startswith("200")
    detail = json.loads(body)
    figures = {g["id"]: json.loads(g["graph_object"]) for g in detail["plotly_graph_objects"]}
    assert list(figures) == [FIGURE_ID]  # refreshed in place, not one figure per refresh
    figure = figures[FIGURE_ID]
    lineages = optuna_fms.lineages(study)
    best = optuna_fms.best_lineage(study)
    names = [t.get("name", "") for t in figure["data"]]
    assert f"lineage {best.id} (best)" in names
    assert sum(n.startswith("lineage ") for n in names) == len([lin for lin in lineages if lin.curve])
    thawed = [t for t in figure["data"] if t.get("name") == "thawed here"][0]
    n_thaws = sum(lin.n_thaws for lin in lineages)
    assert len(thawed.get("x", [])) == n_thaws
    notes = {t["number"]: t["note"]["body"] for t in detail["trials"]}
    for trial in study.trials:
        assert notes[trial.number].startswith("## Lineage "), trial.number
        assert f"| {trial.number} (this trial) |" in notes[trial.number]


def _delete(app, path: str) -> str:
    environ = {"REQUEST_METHOD": "DELETE", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "localhost",
               "SERVER_PORT": "80", "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http",
               "wsgi.errors": io.StringIO()}
    status = []
    b"".join(app(environ, lambda s, headers, exc=None: status.append(s)))
    return status[0]


def test_a_checkpoint_deleted_in_the_dashboard_falls_back_to_the_newest_good_one(tmp_path, isolated_warnings) -> None:
    from optuna_dashboard import wsgi
    from test_recovery import add_lineage, make_study, objective

    from optuna_fms import lineage as lin_mod

    storage = f"sqlite:///{tmp_path / 'fms.db'}"
    store = FileSystemArtifactStore(str(tmp_path))
    study = make_study(storage, store)
    a = add_lineage(study, 0.9, 3, frozen=True)  # the best frozen lineage: the next trial thaws it
    for x in (0.5, 0.1, 0.2):
        add_lineage(study, x, 3 if x == 0.5 else 6, frozen=x == 0.5)
    newest = optuna_fms.lineages(study)[0].checkpoint_at_or_before(None)
    app = wsgi(optuna.storages.RDBStorage(storage), artifact_store=store)
    # NOTE: what the delete button does: remove the file, then clear the artifact's attrs (the
    # trial's write fails, as the trial is finished; the file is gone all the same).
    _delete(app, f"/api/artifacts/{study._study_id}/{newest.trial_id}/{newest.artifact_id}")
    assert not (tmp_path / newest.artifact_id).exists()
    study.optimize(objective, n_trials=2)  # nothing crashes
    thaw = study.trials[4]
    assert thaw.system_attrs[lin_mod.PARENT] == a and thaw.state == optuna.trial.TrialState.COMPLETE
    assert lin_mod.resume_record(thaw).step == 1 and thaw.user_attrs[lin_mod.USER_START_STEP] == 2
    assert "unusable" in thaw.user_attrs[lin_mod.USER_FALLBACK]
    lin = optuna_fms.lineages(study)[0]
    assert newest.artifact_id not in {c.artifact_id for c in lin.checkpoints} and sorted(lin.curve) == list(range(6))
