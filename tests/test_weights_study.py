"""Studies whose surrogate reads checkpointed and pretrained weights."""

import optuna
import pytest
import torch

import optuna_fms
from optuna_fms.engine.surrogate import FitSettings

from tasks import digits_task, finetune_objective, make_model

EPOCHS = 5
ARCH = optuna_fms.describe_architecture(make_model())


def _study(weights: str, tmp_path, weight_graphs: int = 16, device: str | None = None) -> optuna.Study:
    sampler = optuna_fms.FMSSampler(
        seed=0, n_startup_trials=4, pool_size=64, weights=weights, device=device,
        fit_settings=FitSettings(full_steps=80, refine_steps=10, weight_steps=20, weight_graphs=weight_graphs),
    )
    study = optuna.create_study(
        direction="maximize", storage=f"sqlite:///{tmp_path / 's.db'}", sampler=sampler,
        pruner=optuna_fms.FMSPruner(max_steps=EPOCHS),
    )
    task = digits_task()
    for name, state in task.pretrained.items():
        optuna_fms.register_pretrained(study, "model", name, state, architecture=ARCH)
    torch.manual_seed(7)
    optuna_fms.register_pretrained(study, "model", "scratch", make_model(), architecture=ARCH)
    return study


@pytest.mark.parametrize("weights", ["gmn", "flat"])
def test_study_with_weights_freezes_and_embeds_checkpoints(weights: str, tmp_path) -> None:
    study = _study(weights, tmp_path)
    study.optimize(finetune_objective(EPOCHS, architecture=ARCH), n_trials=16)
    lineages = optuna_fms.lineages(study)
    assert any(lin.state == "frozen" for lin in lineages)
    assert all(c.has_graph for lin in lineages for c in lin.checkpoints)
    encoder = study.sampler.policy._surrogate._model.extractor.weights
    assert encoder is not None and encoder.kind == weights
    assert len(encoder._cache) > 3  # checkpoints and pretrained weights were embedded
    assert len(optuna_fms.lineage.pretrained_records(study)) == 3


def test_a_corrupt_checkpoint_is_left_out_of_the_weights(tmp_path, caplog) -> None:
    study = _study("gmn", tmp_path)
    study.optimize(finetune_objective(EPOCHS, architecture=ARCH), n_trials=6)
    victim = optuna_fms.lineages(study)[0].checkpoints[0]
    path = tmp_path / "s-artifacts" / victim.artifact_id
    path.write_bytes(path.read_bytes()[:-5])
    source = study.sampler.graph_source
    source._cache._items.clear()  # as in a fresh process
    source._checked.clear()
    with caplog.at_level("WARNING", logger="optuna_fms"):
        study.optimize(finetune_objective(EPOCHS, architecture=ARCH), n_trials=4)
    assert len(study.trials) == 10
    assert any("not featurized" in r.getMessage() for r in caplog.records)


def test_weights_none_is_dyhpo(tmp_path) -> None:
    study = _study(None, tmp_path)  # type: ignore[arg-type]
    study.optimize(finetune_objective(EPOCHS, architecture=ARCH), n_trials=8)
    assert study.sampler.policy._surrogate._model.extractor.weights is None


def test_a_huge_checkpoint_becomes_a_small_graph(tmp_path) -> None:
    from optuna_fms.graph_source import GraphSource

    big = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512),
                              torch.nn.ReLU(), torch.nn.Linear(512, 10))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    trial = study.ask()
    record = optuna_fms.save_checkpoint(trial, big, 0, architecture=optuna_fms.describe_architecture(big))
    graphs = GraphSource(coarsen=4096).graphs(study, [record])
    graph = graphs[record.sha256]
    n_weights = sum(p.numel() for p in big.parameters())
    assert n_weights > 500_000 and graph.num_edges < 20_000


def test_decisions_do_not_depend_on_checkpoint_bytes(tmp_path) -> None:
    """Two runs that differ only in bytes a checkpoint carries besides the weights (here Python's
    RNG state, which save_checkpoint stores) make the same decisions: the surrogate never orders
    anything by content hash."""
    import random

    studies = []
    for py_seed in (1, 2):
        random.seed(py_seed)
        folder = tmp_path / str(py_seed)
        folder.mkdir()
        # NOTE: on the CPU: on a GPU, PyG's scatter sums use atomic adds, so two identical runs
        # already differ in the last bits (README: exact reruns need device="cpu").
        study = _study("gmn", folder, weight_graphs=3, device="cpu")  # few graphs learn per step: which ones matters
        study.optimize(finetune_objective(EPOCHS, architecture=ARCH), n_trials=12)
        studies.append(study)
    a, b = (optuna_fms.lineages(s) for s in studies)
    assert {c.sha256 for lin in a for c in lin.checkpoints}.isdisjoint(c.sha256 for lin in b for c in lin.checkpoints)
    for ta, tb in zip(*(s.trials for s in studies)):
        assert ta.params == tb.params and ta.intermediate_values == tb.intermediate_values
        assert ta.user_attrs.get("fms:decision") == tb.user_attrs.get("fms:decision"), ta.number
