"""Artifact stores: the default folder and S3 (Optuna's Boto3ArtifactStore against a local moto
server on 127.0.0.1): save, load, verify, collect_garbage and a whole study on each."""

from __future__ import annotations

from collections.abc import Iterator
import socket
import uuid

import optuna
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import TrialState
import pytest
import torch

import optuna_fms
from optuna_fms import lineage as lin_mod
from optuna_fms.checkpoint_store import resolve_artifact_store
from optuna_fms.engine.surrogate import FitSettings

from tasks import finetune_objective, make_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A boto3 client of a moto S3 server this module starts on 127.0.0.1 (no other network)."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
            aws_access_key_id="test", aws_secret_access_key="test",
        )
    finally:
        server.stop()


@pytest.fixture(params=["filesystem", "s3"])
def study_and_store(request: pytest.FixtureRequest, tmp_path) -> tuple[optuna.Study, object | None]:
    """A SQLite study with its store: the default folder beside the file (None: nothing passed), or
    a fresh bucket (passed explicitly, as a user of S3 must)."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    if request.param == "filesystem":
        return optuna.create_study(direction="maximize", storage=storage), None
    client = request.getfixturevalue("s3_client")
    bucket = f"fms-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    store = optuna.artifacts.Boto3ArtifactStore(bucket, client=client)
    return optuna.create_study(direction="maximize", storage=storage), store


def _exists(store, artifact_id: str) -> bool:
    try:
        store.open_reader(artifact_id).close()
        return True
    except ArtifactNotFound:
        return False


def test_save_load_verify_and_collect_garbage(study_and_store) -> None:
    study, explicit = study_and_store
    store = resolve_artifact_store(study, explicit)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    records = []
    for step in range(3):
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        records.append(optuna_fms.save_checkpoint(trial, model, step, optimizer=opt, artifact_store=explicit))
        trial.report(0.1 * step, step)
    study._storage.set_trial_system_attr(trial._trial_id, lin_mod.FROZEN, "test")
    study.tell(trial, state=TrialState.PRUNED)

    ckpt = optuna_fms.read_checkpoint(study, records[-1], artifact_store=explicit)  # verifies the SHA-256
    assert ckpt.step == 2 and all(torch.equal(ckpt.state_dict[k], v) for k, v in model.state_dict().items())

    report = optuna_fms.collect_garbage(study, keep_last=0, artifact_store=explicit)
    assert [r.step for r in report.deleted] == [1, 0] and [r.step for r in report.kept] == [2]
    assert [_exists(store, r.artifact_id) for r in records] == [False, False, True]

    # a thaw resumes from the kept checkpoint, through the same store
    child = study.ask()
    lin_mod.mark_thaw(study, child._cached_frozen_trial, optuna_fms.lineages(study)[0], "test")
    fresh = make_model()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    resumed = optuna_fms.load_checkpoint(child, fresh, optimizer=fresh_opt, artifact_store=explicit)
    assert resumed.step == 2 and torch.equal(fresh.state_dict()["0.weight"], model.state_dict()["0.weight"])
    with pytest.raises(optuna_fms.CheckpointError, match="deleted on purpose"):
        optuna_fms.read_checkpoint(study, records[0], artifact_store=explicit)


def test_a_whole_study_with_retention(study_and_store) -> None:
    study, explicit = study_and_store
    study.sampler = optuna_fms.FMSSampler(seed=1, weights=None, n_startup_trials=2, pool_size=32,
                                          artifact_store=explicit,
                                          fit_settings=FitSettings(full_steps=60, refine_steps=10))
    study.pruner = optuna_fms.FMSPruner(max_steps=3, artifact_store=explicit)
    callback = optuna_fms.RetentionCallback(keep_last=1)  # the store comes from the sampler
    study.optimize(finetune_objective(epochs=3), n_trials=8, callbacks=[callback])
    assert all(t.state != TrialState.FAIL for t in study.trials)
    store = resolve_artifact_store(study, explicit)
    lineages = optuna_fms.lineages(study)
    deleted = lin_mod.deleted_checkpoints(study)
    assert deleted and not any(_exists(store, a) for a in deleted)
    for lin in lineages:
        assert len(lin.checkpoints) <= 2
        for record in lin.checkpoints:
            assert optuna_fms.read_checkpoint(study, record, artifact_store=explicit).step == record.step
    best = optuna_fms.best_lineage(study)
    assert best is not None and best.checkpoint_at_or_before(best.best(study.direction)[0]) is not None
