import numpy as np
import pytest

from optuna_fms.engine import (
    Candidate,
    GPSurrogate,
    Dimension,
    FitSettings,
    FreezeThawPolicy,
    History,
    LineageRecord,
    PolicySettings,
    SearchSpace,
)
from optuna_fms.engine.acquisition import expected_improvement, incumbents

FAST = FitSettings(full_steps=100)
SPACE = SearchSpace([Dimension("lr", "float", 1e-4, 1e-1, log=True), Dimension("arch", "categorical", choices=("a", "b"))])


def _curve(config: dict, steps: int, rng: np.random.Generator) -> list[float]:
    """Saturating curves whose level depends on lr (best at 1e-2) and the architecture."""
    level = 0.9 - 0.15 * abs(np.log10(config["lr"]) + 2) - (0.1 if config["arch"] == "b" else 0.0)
    return [level * (1 - np.exp(-0.4 * (s + 1))) + rng.normal(0, 0.005) for s in range(steps)]


def _history(n: int, seed: int = 0, thawable: bool = True) -> History:
    rng = np.random.default_rng(seed)
    lineages = []
    for key, config in enumerate(SPACE.sample(n, rng)):
        steps = int(rng.integers(1, 12))
        lineages.append(LineageRecord(key, config, list(range(steps)), _curve(config, steps, rng), thawable=thawable))
    return History(SPACE, lineages, max_steps=12)


@pytest.mark.parametrize(("kernel", "use_curve"), [("input", False), ("input", True), ("deep", True)])
def test_surrogate_predicts_held_out_curve_points_better_than_the_mean(kernel: str, use_curve: bool) -> None:
    history = _history(50)
    rows, y, _ = history.training_rows()
    rng = np.random.default_rng(1)
    order = rng.permutation(len(y))
    train, test = order[: len(y) * 3 // 4], order[len(y) * 3 // 4 :]
    model = GPSurrogate(SPACE.width, kernel=kernel, use_curve=use_curve, settings=FitSettings(full_steps=200))
    model.fit(rows.take(train), y[train])
    mean, std = model.predict(rows.take(test))
    if kernel == "input":  # one lengthscale per input: the configuration's columns, the budget, the curve's features
        assert model._model.covar_module.base_kernel.lengthscale.shape[-1] == SPACE.width + 1 + 4 * use_curve
    rmse = np.sqrt(np.mean((mean - y[test]) ** 2))
    baseline = np.sqrt(np.mean((y[train].mean() - y[test]) ** 2))
    assert rmse < 0.5 * baseline
    assert np.all(std > 0)


def test_input_kernel_is_unsure_far_from_what_it_has_seen() -> None:
    """The default kernel has no learned map of the configuration, so a learning rate two decades
    away from every observation gets (nearly) the prior's spread, not the data's confidence."""
    rng = np.random.default_rng(3)
    lineages = []
    for key in range(12):
        config = {"lr": float(10 ** rng.uniform(-4, -3)), "arch": "a"}
        lineages.append(LineageRecord(key, config, [0, 1, 2], _curve(config, 3, rng)))
    history = History(SPACE, lineages, max_steps=12)
    rows, y, _ = history.training_rows()
    model = GPSurrogate(SPACE.width, settings=FitSettings(full_steps=200))
    model.fit(rows, y)
    seen = model.predict(rows)[1]
    far = model.predict(history.candidate_rows([Candidate({"lr": 1e-1, "arch": "a"}, 1, None)]))[1]
    assert far[0] > 2 * np.median(seen)


def test_noise_floor_bounds_the_noise_and_widens_the_predictive_spread() -> None:
    history = _history(50)
    rows, y, _ = history.training_rows()
    noise, spread = {}, {}
    for floor in (1e-4, 0.1):
        model = GPSurrogate(SPACE.width, settings=FitSettings(full_steps=300, noise_floor=floor))
        model.fit(rows, y)
        noise[floor] = model._model.likelihood.noise.item()
        spread[floor] = model.predict(rows)[1].min()
    assert noise[1e-4] < 0.1 <= noise[0.1]  # these smooth curves ask for less noise than the floor
    # the predictive std includes the noise: no prediction is surer than the floor allows
    assert spread[0.1] >= np.sqrt(0.1) > spread[1e-4]


def test_refit_reuses_the_model_and_subsamples_rows() -> None:
    history = _history(40)
    rows, y, _ = history.training_rows()
    model = GPSurrogate(SPACE.width, settings=FitSettings(full_steps=20, refine_steps=5, max_rows=64))
    model.fit(rows, y)
    first = model._model
    model.fit(rows, y)
    assert model._model is first  # a refinement, not a fit from scratch
    assert len(model._model.train_targets) == 64


def test_between_refinements_new_observations_are_conditioned_on_without_training() -> None:
    """A refinement once the data grew by refine_growth: at ~200 rows and 1.5 %, the next two fits
    keep the kernel's parameters and only condition the GP on the new rows (its prediction there
    moves to them); the third is a refinement again."""
    history = _history(40)
    rows, y, _ = history.training_rows()
    n = len(y) - 3
    growth = 2.5 / n  # 3 new rows are enough, 2 are not
    model = GPSurrogate(SPACE.width, settings=FitSettings(full_steps=20, refine_steps=5, refine_growth=growth))
    model.fit(rows.take(np.arange(n)), y[:n])

    def parameters() -> list[np.ndarray]:
        return [p.detach().clone().numpy() for p in model._model.parameters()]

    fitted = parameters()
    held_out = rows.take(np.array([n]))
    before = model.predict(held_out)[0][0]
    for extra in (1, 2):
        model.fit(rows.take(np.arange(n + extra)), y[: n + extra])
        assert all(np.array_equal(a, b) for a, b in zip(fitted, parameters()))  # no training step
    after = model.predict(held_out)[0][0]
    assert abs(after - y[n]) < abs(before - y[n])  # the GP conditions on the observation it was given
    model.fit(rows.take(np.arange(n + 3)), y[: n + 3])
    assert not all(np.array_equal(a, b) for a, b in zip(fitted, parameters()))  # refined at the third


def test_expected_improvement_properties() -> None:
    ei = expected_improvement(np.array([0.0, 1.0, 0.0, 0.0]), np.array([1.0, 1.0, 2.0, 0.0]), np.zeros(4))
    assert ei[1] > ei[0] > 0  # a higher mean helps
    assert ei[2] > ei[0]  # more uncertainty helps
    assert ei[3] == 0.0  # no uncertainty and no improvement
    assert expected_improvement(np.array([2.0]), np.array([0.0]), np.array([1.0]))[0] == pytest.approx(1.0)
    assert expected_improvement(np.array([0.0]), np.array([1.0]), np.array([0.0]))[0] == pytest.approx(1 / np.sqrt(2 * np.pi))


def test_incumbent_is_per_budget() -> None:
    budgets = np.array([1.0, 1.0, 2.0, 3.0])
    values = np.array([0.2, 0.5, 0.7, 0.9])
    got = incumbents(np.array([1.0, 2.0, 3.0, 5.0]), budgets, values)
    assert list(got) == [0.5, 0.7, 0.9, 0.9]


def test_rows_never_see_their_own_target() -> None:
    lin = LineageRecord(0, {"lr": 1e-2, "arch": "a"}, [0, 1, 2], [0.1, 0.2, 0.3])
    history = History(SPACE, [lin], curve_length=4)
    rows, _, newest = history.training_rows()
    assert list(rows.budget * history.max_budget) == [1.0, 2.0, 3.0]
    assert rows.mask.sum(axis=1).tolist() == [0.0, 1.0, 2.0]
    assert newest.tolist() == [False, False, True]
    cand = history.candidate_rows([Candidate(lin.config, 3, 0)])
    assert cand.mask.sum() == 3.0
    # A forecast query sees the same curve, at a later budget.
    far = history.candidate_rows([Candidate(lin.config, 3, 0, horizon=9)])
    assert far.mask.sum() == 3.0 and far.budget[0] * history.max_budget == 10.0
    # Forecast rows add shorter prefixes of the same observations, never longer ones.
    rows, targets, newest = history.training_rows(forecast_seed=0)
    assert len(rows) == 5 and newest.sum() == 1
    assert all(m <= b * history.max_budget - 1 for m, b in zip(rows.mask.sum(axis=1), rows.budget))


@pytest.mark.parametrize("kernel", ["input", "deep"])
def test_policy_prefers_the_promising_frozen_lineage(kernel: str) -> None:
    """Among frozen lineages, the one whose curve promises most is thawed. NOTE: no new
    configurations here: the input kernel, unsure of the region left empty around the good
    lineage, would rather start one there (the deep kernel thaws)."""
    rng = np.random.default_rng(0)
    good = {"lr": 1e-2, "arch": "a"}
    lineages = [LineageRecord(0, good, [0, 1], _curve(good, 2, rng), thawable=True)]
    for key, config in enumerate(SPACE.sample(30, rng), start=1):
        if abs(np.log10(config["lr"]) + 2) < 1 and config["arch"] == "a":
            continue
        lineages.append(LineageRecord(key, config, list(range(6)), _curve(config, 6, rng), thawable=True))
    history = History(SPACE, lineages, max_steps=12)
    settings = PolicySettings(n_startup=3, fit=FAST, target="next", kernel=kernel, pool_size=0, n_local=0)
    policy = FreezeThawPolicy(settings, seed=0)
    decision = policy.choose_next(history)
    assert decision.action == "thaw" and decision.key == 0, decision
    # Excluding it (a lost claim) moves the choice elsewhere.
    assert policy.choose_next(history, exclude=frozenset({0})).key != 0


def test_policy_start_up_is_random_then_freezes_after_one_step() -> None:
    policy = FreezeThawPolicy(PolicySettings(n_startup=5, fit=FAST), seed=0)
    history = _history(3)
    assert policy.choose_next(history).action == "new"
    decision = policy.should_continue(history, 0, segment_steps=1, can_thaw=True)
    assert decision.action == "freeze"
    assert policy.should_continue(history, 0, segment_steps=1, can_thaw=False).action == "continue"


def test_policy_freezes_a_poor_run_and_the_margin_holds_it_back() -> None:
    rng = np.random.default_rng(3)
    lineages = [
        LineageRecord(key, config, list(range(4)), _curve(config, 4, rng), thawable=True)
        for key, config in enumerate(SPACE.sample(20, rng), start=1)
    ]
    policy = FreezeThawPolicy(PolicySettings(n_startup=3, fit=FAST), seed=0)

    poor = {"lr": 1.2e-4, "arch": "b"}
    history = History(SPACE, [LineageRecord(0, poor, [0, 1, 2, 3], _curve(poor, 4, rng), running=True), *lineages], max_steps=20)
    assert policy.should_continue(history, 0, segment_steps=4, can_thaw=True).action == "freeze"
    assert policy.should_continue(history, 0, segment_steps=1, can_thaw=True, min_segment_steps=2).action == "continue"
    # The last step of the budget is never frozen: the run ends there anyway.
    done = History(SPACE, history.lineages, max_steps=4)
    assert policy.should_continue(done, 0, segment_steps=4, can_thaw=True).action == "continue"

    decent = {"lr": 3e-3, "arch": "a"}
    history = History(SPACE, [LineageRecord(0, decent, [0, 1], _curve(decent, 2, rng), running=True), *lineages], max_steps=20)
    first = policy.should_continue(history, 0, segment_steps=2, can_thaw=True, freeze_margin=0.0)
    assert first.acquisition is not None and first.acquisition > 0
    ratio = max(score for _, score in first.alternatives) / first.acquisition
    held = policy.should_continue(history, 0, segment_steps=2, can_thaw=True, freeze_margin=2 * ratio)
    assert held.action == "continue", held


def test_deepest_run_is_not_frozen_while_the_run_length_is_unknown() -> None:
    rng = np.random.default_rng(5)
    poor = {"lr": 1.2e-4, "arch": "b"}
    lineages = [LineageRecord(0, poor, list(range(6)), _curve(poor, 6, rng), running=True)]
    for key, config in enumerate(SPACE.sample(12, rng), start=1):
        lineages.append(LineageRecord(key, config, [0, 1], _curve(config, 2, rng), thawable=True))
    policy = FreezeThawPolicy(PolicySettings(n_startup=3, fit=FAST), seed=0)
    unknown = policy.should_continue(History(SPACE, lineages), 0, segment_steps=6, can_thaw=True)
    assert unknown.action == "continue" and "unknown" in unknown.reason
    known = policy.should_continue(History(SPACE, lineages, max_steps=12), 0, segment_steps=6, can_thaw=True)
    assert "unknown" not in known.reason and known.acquisition is not None


def test_successive_halving_promotes_the_deepest_lineage_in_the_top_third() -> None:
    from optuna_fms.engine.promotion import promotable

    cfg = {"lr": 1e-2, "arch": "a"}

    def lin(key: int, values: list[float], **kw) -> LineageRecord:
        return LineageRecord(key, cfg, list(range(len(values))), values, **{"thawable": True} | kw)

    # step 0 has six lineages (top two promotable: 0.9, 0.8); step 1 has three (top one: 0.7)
    lineages = [lin(0, [0.9]), lin(1, [0.8]), lin(2, [0.5]), lin(3, [0.4, 0.7]), lin(4, [0.3, 0.6]),
                lin(5, [0.2, 0.1])]
    history = History(SPACE, lineages, max_steps=4)
    assert promotable(history) == 3  # the deepest promotable one, though 0 and 1 score higher
    assert promotable(history, exclude=frozenset({3})) == 0
    assert promotable(history, exclude=frozenset({3, 0})) == 1
    assert promotable(history, exclude=frozenset({3, 0, 1})) is None  # 0.5 is not in the top third
    assert promotable(history, eta=7) is None  # fewer than eta lineages at every step
    # running, unthawable and finished lineages are never promoted
    running = [lin(0, [0.9], thawable=False, running=True), *lineages[1:]]
    assert promotable(History(SPACE, running, max_steps=4), exclude=frozenset({3})) == 1
    assert promotable(History(SPACE, lineages, max_steps=2), exclude=frozenset()) == 0


def test_promotion_hedge_thaws_by_the_rule_only_with_its_probability() -> None:
    history = _history(20, seed=4)
    always = FreezeThawPolicy(PolicySettings(n_startup=3, fit=FAST, promotion_probability=1.0), seed=0)
    decision = always.choose_next(history)
    from optuna_fms.engine.promotion import promotable

    assert decision.action == "thaw" and decision.key == promotable(history)
    assert "successive halving" in decision.reason and decision.acquisition is None
    never = FreezeThawPolicy(PolicySettings(n_startup=3, fit=FAST), seed=0)
    assert "successive halving" not in never.choose_next(history).reason


def _slow_or_fast(config: dict, steps: int, rng: np.random.Generator) -> list[float]:
    """arch "a" starts slowly and ends high (0.3 -> 0.9); arch "b" starts at its plateau (0.6)."""
    if config["arch"] == "a":
        return [0.9 - 0.6 * np.exp(-0.5 * s) + rng.normal(0, 0.003) for s in range(steps)]
    return [0.6 + rng.normal(0, 0.003) for _ in range(steps)]


def _first_decisions(history: History, target: str, n_seeds: int, *, pool_size: int) -> list:
    """The decision of a fresh policy with ``target``, for seeds 0 .. n_seeds - 1."""
    return [FreezeThawPolicy(PolicySettings(n_startup=3, fit=FAST, target=target, pool_size=pool_size, n_local=0),
                             seed=seed).choose_next(history) for seed in range(n_seeds)]


def test_random_horizon_thaws_slow_starters_that_one_step_ahead_passes_over() -> None:
    """EI one step ahead keeps choosing the fast starter; a random horizon also sees the climb."""
    rng = np.random.default_rng(0)
    lineages = []
    for key, config in enumerate(SPACE.sample(24, rng)):
        steps = 12 if key < 6 else 1  # a few full curves of each kind, then one-step runs
        lineages.append(LineageRecord(key, config, list(range(steps)), _slow_or_fast(config, steps, rng),
                                      thawable=steps < 12))
    history = History(SPACE, lineages, max_steps=12)
    slow = {lin.key for lin in lineages if lin.config["arch"] == "a" and len(lin.steps) == 1}
    assert slow and len(slow) < len(lineages) - 6

    def thaws_of_slow(target: str) -> int:
        return sum(d.action == "thaw" and d.key in slow for d in _first_decisions(history, target, 3, pool_size=0))

    assert thaws_of_slow("horizon") >= 2 > thaws_of_slow("next")


def test_new_horizon_starts_slow_starters_that_first_step_ei_passes_over() -> None:
    """New configurations scored at their first step are all fast starters; at a random horizon they
    are not. Lineages are not thawable here, so the pool of new configurations decides alone."""
    rng = np.random.default_rng(0)
    lineages = []
    for key, config in enumerate(SPACE.sample(24, rng)):
        steps = 12 if key < 6 else 1
        lineages.append(LineageRecord(key, config, list(range(steps)), _slow_or_fast(config, steps, rng),
                                      thawable=False))
    history = History(SPACE, lineages, max_steps=12)

    def slow_starts(target: str) -> int:
        decisions = _first_decisions(history, target, 4, pool_size=64)
        assert all(d.action == "new" for d in decisions)
        return sum(d.config["arch"] == "a" for d in decisions)

    assert slow_starts("new-horizon") >= 2 > slow_starts("next")
