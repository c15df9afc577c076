import numpy as np
import pytest

from optuna_fms.engine.space import Dimension, SearchSpace


def _space() -> SearchSpace:
    return SearchSpace(
        [
            Dimension("lr", "float", 1e-4, 1e-1, log=True),
            Dimension("momentum", "float", 0.0, 0.9),
            Dimension("batch", "int", 16, 256, log=True),
            Dimension("layers", "int", 1, 5, step=1),
            Dimension("model", "categorical", choices=("a", "b", None)),
        ]
    )


def test_log_scale_is_honoured() -> None:
    space = _space()
    low = space.encode({"lr": 1e-4, "momentum": 0.0, "batch": 16, "layers": 1, "model": "a"})
    mid = space.encode({"lr": 10 ** -2.5, "momentum": 0.45, "batch": 64, "layers": 3, "model": "b"})
    assert low[0] == pytest.approx(0.0) and mid[0] == pytest.approx(0.5)
    assert mid[1] == pytest.approx(0.5) and mid[2] == pytest.approx(0.5) and mid[3] == pytest.approx(0.5)


def test_categoricals_are_one_hot() -> None:
    space = _space()
    assert space.width == 4 + 3
    code = space.encode({"lr": 1e-3, "momentum": 0.1, "batch": 32, "layers": 2, "model": None})
    assert list(code[4:]) == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="not a choice"):
        space.encode({"lr": 1e-3, "momentum": 0.1, "batch": 32, "layers": 2, "model": "zzz"})


def test_samples_are_valid_and_cover_the_log_range() -> None:
    space = _space()
    configs = space.sample(2000, np.random.default_rng(0))
    assert all(space.contains(c) for c in configs)
    assert all(isinstance(c["batch"], int) and isinstance(c["layers"], int) for c in configs)
    lrs = np.array([c["lr"] for c in configs])
    # NOTE: uniform on the log scale puts about a third of the mass in each decade.
    assert 0.25 < np.mean(lrs < 1e-3) < 0.42
    assert {c["model"] for c in configs} == {"a", "b", None}


def test_perturb_stays_inside_the_space() -> None:
    space = _space()
    rng = np.random.default_rng(1)
    base = space.sample(1, rng)[0]
    assert all(space.contains(space.perturb(base, rng)) for _ in range(200))


def test_bad_dimensions_are_rejected() -> None:
    with pytest.raises(ValueError, match="log scale"):
        Dimension("x", "float", 0.0, 1.0, log=True)
    with pytest.raises(ValueError, match="Duplicate"):
        SearchSpace([Dimension("x", "float"), Dimension("x", "float")])


def test_ordered_choices_add_their_rank_after_the_one_hot() -> None:
    lr = Dimension("lr", "categorical", choices=(0.1, 0.003, 0.03, 0.01), ordered=True)  # listed unsorted
    space = SearchSpace([lr, Dimension("model", "categorical", choices=("a", "b"))])
    assert space.width == 4 + 1 + 2
    codes = {v: space.encode({"lr": v, "model": "a"}) for v in (0.003, 0.01, 0.03, 0.1)}
    assert [codes[v][4] for v in (0.003, 0.01, 0.03, 0.1)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert list(codes[0.03][:4]) == [0.0, 0.0, 1.0, 0.0] and list(codes[0.03][5:]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="only a categorical of numbers"):
        Dimension("model", "categorical", choices=("a", 1), ordered=True)
    with pytest.raises(ValueError, match="only a categorical of numbers"):
        Dimension("flag", "categorical", choices=(True, False), ordered=True)


def test_engine_space_orders_only_numeric_categoricals_and_only_when_asked() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from optuna_fms._bridge import engine_space

    dists = {"lr": CategoricalDistribution((0.01, 0.1)), "model": CategoricalDistribution(("a", "b")),
             "wd": FloatDistribution(1e-5, 1e-2, log=True), "frozen": CategoricalDistribution((True, False))}
    assert not any(d.ordered for d in engine_space(dists).dimensions)
    ordered = {d.name: d.ordered for d in engine_space(dists, ordered_choices=True).dimensions}
    assert ordered == {"frozen": False, "lr": True, "model": False, "wd": False}


def test_a_study_with_ordered_choices_runs_freeze_thaw_on_the_ordered_space() -> None:
    """Sampler and pruner share the ordered encoding (a width mismatch between the two would fail
    the surrogate), and the study freezes and thaws as usual."""
    import warnings

    import optuna
    import torch

    import optuna_fms

    levels = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_categorical("lr", levels)
        value = 0.0
        start = int(trial.user_attrs.get("fms:start_step", 0))
        for step in range(start, 4):
            value = (1 - abs(np.log10(lr) - np.log10(0.05)) / 3) * (step + 1) / 4
            optuna_fms.save_checkpoint(trial, {"w": torch.full((2,), value)}, step=step)
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = optuna_fms.FMSSampler(seed=0, weights=None, n_startup_trials=3, ordered_choices=True)
        study = optuna.create_study(direction="maximize", sampler=sampler,
                                    pruner=optuna_fms.FMSPruner(max_steps=4, weights=None))
        study.optimize(objective, n_trials=24)
    assert [d.ordered for d in sampler._last_space.dimensions] == [True]
    assert sum("fms:parent" in t.system_attrs for t in study.trials) >= 1  # thawed at least once
    assert study.best_value > 0.8
