"""Weights by default: descriptions found for modules (torch.fx) and inferred for state dicts."""

from __future__ import annotations

import threading

import optuna
from optuna.artifacts import get_all_artifact_meta
import pytest
import torch
from torch import Tensor, nn

import optuna_fms
from optuna_fms import _warnings
from optuna_fms.graphs import build_graph, describe_architecture
from optuna_fms.graphs import infer as infer_mod
from optuna_fms.graphs.infer import NotInferableError, find_architecture, infer_architecture

from test_graphs import ResNet, cnn, encoder, mlp


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch) -> None:
    """Every test sees its own "found once" cache and "warned once" set."""
    monkeypatch.setattr(infer_mod, "_found", {})
    monkeypatch.setattr(_warnings, "_seen", set())


def normed_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 12, bias=False),
                         nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4))


def depthwise_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 8, 3), nn.GroupNorm(2, 8), nn.Conv1d(8, 8, 3, groups=8),
                         nn.Conv1d(8, 4, 1), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))


class TokenBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.emb(tokens).mean(dim=1))


@pytest.mark.parametrize("factory", [mlp, normed_mlp, cnn, depthwise_cnn, TokenBag])
def test_a_sequential_state_dict_gives_the_graph_torch_fx_gives(factory) -> None:
    torch.manual_seed(0)
    model = factory()
    state = model.state_dict()
    inferred = infer_architecture(state)
    traced = describe_architecture(model)
    assert inferred["inputs"] == traced["inputs"] and inferred["parameters"] == traced["parameters"]
    assert build_graph(state, inferred).equals(build_graph(state, traced))


class FlatResidual(nn.Module):
    """Residual, but its flat layer names and sizes chain: a state dict cannot tell."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize(("factory", "why"), [
    (ResNet, "nested 3 levels"),
    (encoder, "'self_attn'"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)), "flatten"),
    (lambda: nn.Sequential(nn.Linear(5, 5, bias=False)), "Linear or an Embedding"),
])
def test_what_a_state_dict_cannot_show_is_refused(factory, why) -> None:
    with pytest.raises(NotInferableError, match=why):
        infer_architecture(factory().state_dict())


def test_a_flat_residual_reads_as_a_chain_but_its_module_keeps_the_residual() -> None:
    model = FlatResidual()
    assert [op["type"] for op in infer_architecture(model.state_dict())["layers"]] == ["Linear", "Linear"]
    assert "residual" in [op["type"] for op in find_architecture(model)["layers"]]


def test_a_module_is_described_once_per_architecture(monkeypatch) -> None:
    calls = []
    real = infer_mod.describe_architecture
    monkeypatch.setattr(infer_mod, "describe_architecture", lambda m: calls.append(m) or real(m))
    first, second = find_architecture(mlp()), find_architecture(mlp())
    assert first is second and len(calls) == 1
    find_architecture(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)))  # other shapes
    assert len(calls) == 2
    for _ in range(2):  # failures are remembered too, and raised again
        with pytest.raises(optuna_fms.graphs.UnsupportedLayerError, match="Bilinear"):
            find_architecture(nn.Sequential(nn.Bilinear(2, 2, 2)))
    assert len(calls) == 3


def test_tracing_leaves_modules_run_by_other_threads_untouched() -> None:
    """torch.fx patches nn.Module for the whole process while it traces; a thread training meanwhile
    must get its real outputs (before the fix: 'module is not installed as a submodule')."""
    tracing, done = threading.Event(), threading.Event()

    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            tracing.set()
            assert done.wait(10)  # the other thread runs its model while the patch is active
            return self.fc(x)

    other, x = mlp(), torch.randn(3, 5)
    expected = other(x).detach()
    seen: list[object] = []

    def train() -> None:
        tracing.wait(10)
        try:
            out = other(x)
            out.sum().backward()
            seen.append(out.detach())
        except Exception as err:  # noqa: BLE001 - the test reports whatever breaks
            seen.append(err)
        done.set()

    thread = threading.Thread(target=train)
    thread.start()
    description = describe_architecture(Slow())
    thread.join()
    assert isinstance(seen[0], Tensor), seen[0]
    assert torch.equal(seen[0], expected)
    assert [op["type"] for op in description["layers"]] == ["Linear"]


def _study(tmp_path, **sampler) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", sampler=optuna_fms.FMSSampler(**sampler),
                               pruner=optuna_fms.FMSPruner())


def test_save_and_register_describe_what_they_are_given(tmp_path) -> None:
    study = _study(tmp_path)
    trial = study.ask()
    model = normed_mlp()
    for what in (model, model.state_dict()):
        record = optuna_fms.save_checkpoint(trial, what, 0)
        assert record.has_graph
        ckpt = optuna_fms.read_checkpoint(study, record)
        assert build_graph(ckpt.state_dict, ckpt.architecture).equals(build_graph(ckpt.state_dict, describe_architecture(model)))
    assert optuna_fms.register_pretrained(study, "model", "small", model.state_dict()).has_graph


def test_a_state_dict_that_cannot_be_read_warns_once_how_to_fix_it(tmp_path, caplog) -> None:
    study = _study(tmp_path)
    trial = study.ask()
    with caplog.at_level("WARNING", logger="optuna_fms"):
        records = [optuna_fms.save_checkpoint(trial, factory().state_dict(), step)
                   for step, factory in enumerate([ResNet, encoder, ResNet])]
        traced = optuna_fms.save_checkpoint(trial, ResNet(), 3)  # the module itself is understood
    assert not any(r.has_graph for r in records) and traced.has_graph
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "Pass the model itself" in warnings[0] and "describe_architecture(model)" in warnings[0]


def test_no_warning_when_the_sampler_reads_no_weights(tmp_path, caplog) -> None:
    study = _study(tmp_path, weights=None)
    with caplog.at_level("WARNING", logger="optuna_fms"):
        record = optuna_fms.save_checkpoint(study.ask(), {"placeholder": torch.zeros(2)}, 0)
    assert not record.has_graph and not caplog.records


def test_an_untraceable_module_warns_once_naming_it(tmp_path, caplog) -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x) if x.sum() > 0 else x  # data-dependent: torch.fx cannot trace it

    study = _study(tmp_path)
    trial = study.ask()
    with caplog.at_level("WARNING", logger="optuna_fms"):
        records = [optuna_fms.save_checkpoint(trial, Gate(), step) for step in range(2)]
    assert not any(r.has_graph for r in records)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["The architecture of Gate cannot be described"]


def test_a_study_reading_no_graphs_says_so_once(caplog) -> None:
    from optuna_fms.engine.surrogate import FitSettings

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in range(3):
            optuna_fms.save_checkpoint(trial, {"placeholder": torch.tensor([x, step])}, step)
            trial.report(x * (step + 1), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return x

    study = optuna.create_study(direction="maximize", pruner=optuna_fms.FMSPruner(max_steps=3),
                                sampler=optuna_fms.FMSSampler(seed=0, n_startup_trials=2, pool_size=16,
                                                              fit_settings=FitSettings(full_steps=20, refine_steps=5)))
    with caplog.at_level("WARNING", logger="optuna_fms"):
        study.optimize(objective, n_trials=7)
    said = [r.getMessage() for r in caplog.records if "reads no weights in study" in r.getMessage()]
    assert len(said) == 1 and "describe_architecture(model)" in said[0]


def test_artifacts_are_named_by_lineage_step_and_pretrained_value(tmp_path) -> None:
    from optuna_dashboard.artifact._backend import list_study_artifacts

    study = _study(tmp_path)
    trial = study.ask()
    optuna_fms.save_checkpoint(trial, mlp(), 4)
    trial.set_user_attr("fms:lineage", 17)  # as FMSSampler labels a thaw of lineage 17
    optuna_fms.save_checkpoint(trial, mlp(), 5)
    for value in ("resnet small/v2", 3):
        optuna_fms.register_pretrained(study, "model", value, mlp())
    assert sorted(m.filename for m in get_all_artifact_meta(trial)) == [
        "lineage-0000-step-0004.safetensors", "lineage-0017-step-0005.safetensors"]
    names = sorted(m["filename"] for m in list_study_artifacts(study._storage.get_study_system_attrs(study._study_id)))
    assert names == ["pretrained-model=3.safetensors", "pretrained-model=resnet_small_v2.safetensors"]


def test_several_threads_save_modules_described_once(tmp_path, monkeypatch) -> None:
    calls = []
    real = infer_mod.describe_architecture
    monkeypatch.setattr(infer_mod, "describe_architecture", lambda m: calls.append(1) or real(m))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    x, y = torch.randn(32, 5), torch.randn(32, 3)

    def objective(trial: optuna.Trial) -> float:
        torch.manual_seed(trial.number)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=trial.suggest_float("lr", 1e-3, 1e-1))
        for step in range(3):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            optuna_fms.save_checkpoint(trial, model, step, optimizer=opt)
        return float(loss)

    study.optimize(objective, n_trials=8, n_jobs=4)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    records = [r for lin in optuna_fms.lineages(study) for r in lin.checkpoints]
    assert len(records) == 24 and all(r.has_graph for r in records)
    assert len(calls) == 1


def test_a_checkpoint_under_the_old_name_still_loads(tmp_path) -> None:
    """Studies saved before readable names (``step-000003.safetensors``) load as before."""
    from optuna_fms import lineage as lin_mod
    from optuna_fms.checkpoint_format import FORMAT, _model_tensors
    from optuna_fms.checkpoint_store import _write_and_upload

    study = _study(tmp_path)
    trial = study.ask()
    model = mlp()
    header = {"format": FORMAT, "step": 3, "trial_number": trial.number, "metadata": {},
              "optimizer": None, "scheduler": None, "rng": None, "architecture": None}
    artifact_id, digest, size = _write_and_upload(
        study, trial, _model_tensors(model), header, None, "step-000003", "old")
    lin_mod.record_checkpoint(study, trial._trial_id, lin_mod.CheckpointRecord(
        trial.number, trial._trial_id, 3, artifact_id, digest, size))
    assert [m.filename for m in get_all_artifact_meta(trial)] == ["step-000003.safetensors"]
    fresh = mlp()
    assert optuna_fms.load_checkpoint(trial, fresh).step == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_a_nan_report_warns(caplog) -> None:
    study = optuna.create_study(sampler=optuna_fms.FMSSampler(seed=0), pruner=optuna_fms.FMSPruner())
    trial = study.ask()
    trial.report(float("nan"), 0)
    with caplog.at_level("WARNING", logger="optuna_fms"):
        assert trial.should_prune()
    assert [r.getMessage() for r in caplog.records] == [
        "Trial 0 step 0 reported nan: its lineage is marked failed and never thawed."]
