"""The weight branch: checkpoint graphs let the surrogate tell apart what hyperparameters can't."""

import numpy as np
import torch

from optuna_fms.engine import Candidate, GPSurrogate, Dimension, FitSettings, History, LineageRecord, SearchSpace
from optuna_fms.engine.weights import WeightEncoder
from optuna_fms.graphs import graph_from_module

SPACE = SearchSpace([Dimension("lr", "float", 1e-3, 1e-1, log=True)])


def _pretrained(scale: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def _history(n: int, rng: np.random.Generator) -> tuple[History, dict[int, float]]:
    """Lineages that differ by their pretrained weights (scale drives the level), not by lr much."""
    graphs, lineages, scales = {}, [], {}
    for key in range(n):
        scale = float(rng.uniform(0.2, 2.0))
        graphs[f"g{key}"] = graph_from_module(_pretrained(scale, key))
        config = {"lr": float(10 ** rng.uniform(-3, -1))}
        level = 0.3 + 0.3 * scale
        steps = int(rng.integers(1, 5))
        values = [level * (1 - np.exp(-0.5 * (s + 1))) + rng.normal(0, 0.005) for s in range(steps)]
        lineages.append(LineageRecord(key, config, list(range(steps)), values))
        scales[key] = scale
    starts = {tuple(lin.config.items()): f"g{lin.key}" for lin in lineages}
    history = History(SPACE, lineages, graphs=graphs, initial_weights=lambda c: starts.get(tuple(c.items())))
    return history, scales


def test_weights_predict_what_hyperparameters_cannot() -> None:
    weights = "gmn"
    rng = np.random.default_rng(0)
    history, _ = _history(48, rng)
    test_keys = [lin.key for lin in history.lineages[-12:]]
    train = History(
        SPACE, history.lineages[:-12], graphs=history.graphs,
        initial_weights=history._initial_weights,
    )
    rows, y, keep = train.training_rows()
    queries = [Candidate(history.by_key[k].config, 0, None) for k in test_keys]
    truth = history.standardize([history.by_key[k].values[0] for k in test_keys])
    errors = {}
    for kind in (weights, None):
        settings = FitSettings(full_steps=150, weight_steps=60, weight_graphs=32)
        model = GPSurrogate(1, kind, settings=settings, seed=0)
        model.set_graphs(train.graph_keys, train.graphs)
        model.fit(rows, y, keep=keep)
        mean, _ = model.predict(train.candidate_rows(queries))
        errors[kind] = float(np.sqrt(np.mean((mean - train.standardize(history.y_std * truth + history.y_mean)) ** 2)))
    assert errors[weights] < 0.7 * errors[None], errors


def test_flat_sketch_fits_any_architecture() -> None:
    encoder = WeightEncoder("flat").double()
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2))
    graphs = {"mlp": graph_from_module(_pretrained(1.0, 0)), "cnn": graph_from_module(cnn)}
    encoder.set_table(["mlp", "cnn"], graphs)
    out = encoder(torch.tensor([0, 1, -1]))
    assert out.shape == (3, encoder.dim) and not torch.allclose(out[0], out[1])
    again = WeightEncoder("flat").double()
    again.load_state_dict(encoder.state_dict())
    again.set_table(["mlp", "cnn"], graphs)
    assert torch.allclose(again(torch.tensor([0, 1])), out[:2])  # the hashing is deterministic


def test_rows_use_the_checkpoint_the_step_starts_from() -> None:
    graphs = {k: graph_from_module(_pretrained(1.0, i)) for i, k in enumerate(("init", "c0", "c1"))}
    lin = LineageRecord(0, {"lr": 0.01}, [0, 1, 2], [0.1, 0.2, 0.3], checkpoints={0: "c0", 1: "c1"})
    history = History(SPACE, [lin], graphs=graphs, initial_weights=lambda c: "init")
    rows, _, _ = history.training_rows()
    index = {k: i for i, k in enumerate(history.graph_keys)}
    # step 0 starts from the pretrained weights, step 1 from epoch 0's checkpoint, step 2 from epoch 1's
    assert rows.graph.tolist() == [index["init"], index["c0"], index["c1"]]
    next_step = history.candidate_rows([Candidate(lin.config, 3, 0)])
    assert next_step.graph.tolist() == [index["c1"]]
    new = history.candidate_rows([Candidate({"lr": 0.05}, 0, None)])
    assert new.graph.tolist() == [index["init"]]
    bare = History(SPACE, [lin])
    assert bare.training_rows()[0].graph.tolist() == [-1, -1, -1]


def test_encoder_learns_only_while_trainable_and_caches() -> None:
    encoder = WeightEncoder("gmn").double()
    graphs = {f"g{i}": graph_from_module(_pretrained(1.0 + i, i)) for i in range(3)}
    encoder.set_table(list(graphs), graphs)
    index = torch.tensor([0, 1, -1, 1])
    frozen = encoder(index)
    assert torch.equal(frozen[2], encoder.missing) and torch.equal(frozen[1], frozen[3])
    assert not any(p.grad is not None for p in encoder.net.parameters())
    frozen.sum().backward()
    assert all(p.grad is None for p in encoder.net.parameters())  # cached, detached
    encoder.trainable = True
    encoder.train()
    encoder(index).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.net.parameters())


def test_a_graph_that_cannot_be_read_counts_as_no_weights() -> None:
    class Vanishing(dict):
        def __getitem__(self, key):  # type: ignore[no-untyped-def]
            if key == "gone":
                raise KeyError(key)
            return super().__getitem__(key)

    encoder = WeightEncoder("gmn").double()
    graphs = Vanishing(ok=graph_from_module(_pretrained(1.0, 0)))
    encoder.set_table(["ok", "gone"], graphs)
    out = encoder(torch.tensor([0, 1, -1]))
    assert torch.equal(out[1], encoder.missing) and torch.equal(out[2], encoder.missing)
    assert not torch.equal(out[0], encoder.missing)


class _Watched(dict):
    """Graphs that note which keys a decision reads."""

    def __init__(self, graphs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(graphs)
        self.read: set[str] = set()

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        self.read.add(key)
        return super().__getitem__(key)


def test_a_decision_reads_only_the_graphs_the_engine_named_before() -> None:
    """graphs_to_read is what an adapter loads ahead of the decision lock: a decision that read a
    graph outside it would read under the lock. It must also be smaller than everything once
    the surrogate has embedded the graphs, or loading ahead would cost a read of every graph."""
    from optuna_fms.engine import FreezeThawPolicy, PolicySettings

    rng = np.random.default_rng(0)
    graphs = {"init": graph_from_module(_pretrained(1.0, 99))}
    settings = PolicySettings(n_startup=2, pool_size=16, n_local=4, weights="gmn", fit=FitSettings(
        full_steps=3, refine_steps=1, weight_steps=2, weight_graphs=2, refit_every=6, max_rows=10))
    policy = FreezeThawPolicy(settings, seed=0)
    lineages: list[LineageRecord] = []
    planned, named_less = 0, 0
    for n in range(14):
        lineages.append(LineageRecord(n, {"lr": float(10 ** rng.uniform(-3, -1))}, [], [], thawable=True))
        for lin in lineages[-3:]:  # the newest three lineages take a step each, with a checkpoint
            step = len(lin.steps)
            key = f"l{lin.key}s{step}"
            graphs[key] = graph_from_module(_pretrained(0.5 + 0.1 * step, 100 * lin.key + step))
            lin.steps.append(step)
            lin.values.append(float(rng.uniform()))
            lin.checkpoints[step] = key
        lineages[-1].running, lineages[-1].thawable = True, False
        for decide in ("choose_next", "should_continue"):
            watched = _Watched(graphs)
            history = History(SPACE, [LineageRecord(lin.key, lin.config, list(lin.steps), list(lin.values),
                                                    thawable=lin.thawable, running=lin.running,
                                                    checkpoints=dict(lin.checkpoints)) for lin in lineages],
                              max_steps=8, graphs=watched, initial_weights=lambda c: "init")
            named = policy.graphs_to_read(history)
            if decide == "choose_next":
                policy.choose_next(history)
            else:
                policy.should_continue(history, lineages[-1].key, segment_steps=1, can_thaw=True)
            assert watched.read <= named, (n, decide, watched.read - named)
            planned += bool(watched.read)
            named_less += len(named) < len(graphs) // 2
    assert planned >= 5 and named_less >= 5
