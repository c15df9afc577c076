import errno
import json
import os

import optuna
from optuna.artifacts import FileSystemArtifactStore
import pytest
import torch

import optuna_fms
from optuna_fms import lineage as lin_mod
from optuna_fms.checkpoint_format import MIMETYPE
from optuna_fms.checkpoint_store import default_artifact_dir
from optuna_fms.checkpoints import CheckpointError

from tasks import build, digits_task, train_epoch, uninterrupted_weights


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(8, 3)).sum().backward()
    opt.step()
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def test_round_trip_of_weights_optimizer_scheduler_and_metadata(tmp_path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    trial = study.ask()
    model, opt, sched = _model()
    sched.step()
    record = optuna_fms.save_checkpoint(trial, model, 3, optimizer=opt, scheduler=sched, metadata={"note": "x", "n": 2})
    assert record.step == 3 and len(record.sha256) == 64 and record.size > 0
    assert (tmp_path / "s-artifacts" / record.artifact_id).exists()  # the default folder sits next to s.db
    meta = optuna.artifacts.get_all_artifact_meta(trial)
    assert [m.mimetype for m in meta] == [MIMETYPE]

    ckpt = optuna_fms.read_checkpoint(study, record)
    assert ckpt.step == 3 and ckpt.metadata == {"note": "x", "n": 2}
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.state_dict[key], value)
    fresh, fresh_opt, fresh_sched = _model()
    torch.nn.init.zeros_(fresh[0].weight)
    fresh_opt.load_state_dict(ckpt.optimizer_state)
    fresh_sched.load_state_dict(ckpt.scheduler_state)
    fresh.load_state_dict(ckpt.state_dict)
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert fresh_sched.state_dict() == sched.state_dict()
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_file_is_plain_safetensors_without_pickle(tmp_path) -> None:
    from safetensors import safe_open

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    trial = study.ask()
    model, opt, _ = _model()
    record = optuna_fms.save_checkpoint(trial, model, 0, optimizer=opt)
    path = tmp_path / "s-artifacts" / record.artifact_id
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["optuna_fms"])
        assert "model/0.weight" in f.keys()
    assert header["format"] == "optuna-fms/1" and header["step"] == 0
    assert b"\x80\x04" not in path.read_bytes()[:64]  # no pickle protocol header


def test_a_new_configuration_has_nothing_to_load() -> None:
    study = optuna.create_study()
    assert optuna_fms.load_checkpoint(study.ask()) is None


def _freeze_then_thaw(study: optuna.Study, freeze_after: int, epochs: int, params: dict) -> dict[str, torch.Tensor]:
    """Run params to ``freeze_after`` epochs, freeze, thaw in a new trial, finish; the final weights."""
    task = digits_task()
    first = study.ask(params_to_distributions(params))
    model, opt = build(first.params, task)
    for epoch in range(freeze_after):
        first.report(train_epoch(model, opt, task), epoch)
        optuna_fms.save_checkpoint(first, model, epoch, optimizer=opt)
    study._storage.set_trial_system_attr(first._trial_id, lin_mod.FROZEN, "test")
    study.tell(first, state=optuna.trial.TrialState.PRUNED)
    torch.randn(100)  # other work between freeze and thaw moves the global RNG on
    second = study.ask()
    lin = lin_mod.lineage_of(study, first.number)
    assert lin_mod.claim(study, second._cached_frozen_trial, lin.tail.number)
    lin_mod.mark_thaw(study, second._cached_frozen_trial, lin, "test")
    model, opt = build(params, task)  # fresh objects, as in a new process
    ckpt = optuna_fms.load_checkpoint(second, model, optimizer=opt)
    assert ckpt.step == freeze_after - 1
    for epoch in range(ckpt.step + 1, epochs):
        second.report(train_epoch(model, opt, task), epoch)
        optuna_fms.save_checkpoint(second, model, epoch, optimizer=opt)
    study.tell(second, 0.0)
    return model.state_dict()


def params_to_distributions(params: dict) -> dict:
    return {
        "model": optuna.distributions.CategoricalDistribution(["good", "weak", "scratch"]),
        "lr": optuna.distributions.FloatDistribution(1e-3, 0.5, log=True),
        "momentum": optuna.distributions.FloatDistribution(0.0, 0.9),
    }


def test_freeze_and_thaw_continue_exactly() -> None:
    params = {"model": "good", "lr": 0.05, "momentum": 0.9}
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(params)
    torch.manual_seed(123)
    resumed = _freeze_then_thaw(study, freeze_after=3, epochs=7, params=params)
    straight = uninterrupted_weights(params, epochs=7)
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    lin = optuna_fms.lineages(study)[0]
    assert lin.state == "finished" and lin.n_thaws == 1 and lin.steps == list(range(7))
    assert [c.step for c in lin.checkpoints] == list(range(7))


def _frozen_lineage_with_checkpoint(study: optuna.Study):
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    model, opt, _ = _model()
    record = optuna_fms.save_checkpoint(trial, model, 0, optimizer=opt)
    trial.report(0.5, 0)
    study._storage.set_trial_system_attr(trial._trial_id, lin_mod.FROZEN, "test")
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    child = study.ask()
    lin = lin_mod.lineage_of(study, trial.number)
    lin_mod.mark_thaw(study, child._cached_frozen_trial, lin, "test")
    return record, child


def test_corrupt_checkpoint_is_a_clear_error_and_fails_the_lineage(tmp_path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    record, child = _frozen_lineage_with_checkpoint(study)
    path = tmp_path / "s-artifacts" / record.artifact_id
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"trial {record.trial_number}.*{record.artifact_id}.*corrupt"):
        optuna_fms.load_checkpoint(child)
    study.tell(child, state=optuna.trial.TrialState.FAIL)
    lin = optuna_fms.lineages(study)[0]
    assert lin.state == "failed" and "corrupt" in lin.failure


def test_missing_checkpoint_is_a_clear_error(tmp_path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    record, child = _frozen_lineage_with_checkpoint(study)
    os.remove(tmp_path / "s-artifacts" / record.artifact_id)
    with pytest.raises(CheckpointError, match=rf"{record.artifact_id}.*missing"):
        optuna_fms.load_checkpoint(child)
    assert optuna_fms.lineages(study)[0].failure is not None


class _FullDisk(FileSystemArtifactStore):
    def write(self, artifact_id, content_body) -> None:  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_is_reported_and_loses_no_earlier_checkpoint(tmp_path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    trial = study.ask()
    model, opt, _ = _model()
    good = optuna_fms.save_checkpoint(trial, model, 0)
    with pytest.raises(CheckpointError, match="disk is full"):
        optuna_fms.save_checkpoint(trial, model, 1, artifact_store=_FullDisk(str(tmp_path)))
    study.tell(trial, 1.0)
    lin = optuna_fms.lineages(study)[0]
    assert [c.artifact_id for c in lin.checkpoints] == [good.artifact_id]
    assert optuna_fms.read_checkpoint(study, lin.checkpoints[0]).step == 0


def test_explicit_store_and_bad_steps(tmp_path) -> None:
    store = FileSystemArtifactStore(str(tmp_path))
    study = optuna.create_study()
    trial = study.ask()
    record = optuna_fms.save_checkpoint(trial, {"w": torch.ones(2)}, 0, artifact_store=store)
    assert (tmp_path / record.artifact_id).exists()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="non-negative int"):
            optuna_fms.save_checkpoint(trial, {"w": torch.ones(2)}, bad, artifact_store=store)


def test_server_storage_needs_an_explicit_store() -> None:
    class Server:
        pass

    with pytest.raises(ValueError, match="no default artifact folder"):
        default_artifact_dir(Server())


def test_architecture_travels_with_the_checkpoint(tmp_path) -> None:
    from optuna_fms.graphs import build_graph, describe_architecture, graph_from_module

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    trial = study.ask()
    model, _, _ = _model()
    record = optuna_fms.save_checkpoint(trial, model, 0, architecture=describe_architecture(model))
    ckpt = optuna_fms.read_checkpoint(study, record)
    assert build_graph(ckpt.state_dict, ckpt.architecture).equals(graph_from_module(model))
    # NOTE: without architecture=, the module is described by save_checkpoint itself
    plain_record = optuna_fms.save_checkpoint(trial, model, 1)
    assert plain_record.has_graph
    assert optuna_fms.read_checkpoint(study, plain_record).architecture == describe_architecture(model)
