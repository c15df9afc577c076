"""The record of one-step predictions against what was then observed (engine/calibration.py)."""

import numpy as np
import pytest

from optuna_fms.engine import Candidate, Dimension, FitSettings, FreezeThawPolicy, History, LineageRecord, PolicySettings, SearchSpace
from optuna_fms.engine.calibration import LINEAGE, NEW, PredictionRecord

SPACE = SearchSpace([Dimension("lr", "float", 1e-4, 1e-1, log=True), Dimension("arch", "categorical", choices=("a", "b"))])


def _history(lineages: list[LineageRecord]) -> History:
    return History(SPACE, lineages, max_steps=12)


def _grow(record: PredictionRecord, errors: np.ndarray, *, kind: str, std: float = 0.1) -> None:
    """Predict one value per error and then observe it ``error`` predicted stds away."""
    rng = np.random.default_rng(0)
    config = SPACE.sample(1, rng)[0]
    lineages = [LineageRecord(0, config, [0], [0.5])]
    for i, z in enumerate(errors):
        history = _history(lineages)
        if kind == NEW:
            fresh = SPACE.sample(1, rng)[0]
            candidate, key = Candidate(fresh, 0, None), len(lineages)
        else:
            lin = lineages[0]
            candidate, key, fresh = Candidate(lin.config, lin.next_step, 0), 0, lin.config
        mean = np.array([(0.6 - history.y_mean) / history.y_std])
        record.record(history, [candidate], mean, np.array([std / history.y_std]))
        value = 0.6 + z * std
        if kind == NEW:
            lineages = [*lineages, LineageRecord(key, fresh, [0], [value])]
        else:
            lin = lineages[0]
            lineages = [LineageRecord(0, lin.config, [*lin.steps, lin.next_step], [*lin.values, value])]
        record.observe(_history(lineages))


@pytest.mark.parametrize("kind", [NEW, LINEAGE])
def test_errors_three_stds_off_give_a_factor_near_three_for_their_kind_only(kind: str) -> None:
    record = PredictionRecord(prior_count=0.0)
    z = np.random.default_rng(1).normal(0.0, 3.0, 200)
    _grow(record, z, kind=kind)
    other = LINEAGE if kind == NEW else NEW
    assert record.summary()[kind][0] == 100  # the window keeps the newest 100 errors
    assert 2.4 < record.factor(kind) < 3.6
    assert record.factor(other) == 1.0  # no errors of the other kind: unchanged


def test_calibrated_predictions_keep_a_factor_near_one() -> None:
    record = PredictionRecord(prior_count=0.0)
    _grow(record, np.random.default_rng(2).normal(0.0, 1.0, 100), kind=NEW)
    assert 0.8 < record.factor(NEW) < 1.25


def test_few_errors_are_shrunk_towards_one_and_factors_are_bounded() -> None:
    record = PredictionRecord(prior_count=5.0)
    _grow(record, np.full(2, 10.0), kind=LINEAGE)  # two huge errors
    few = record.factor(LINEAGE)
    assert 1.0 < few < 10.0 / 2  # 2 errors of z^2 = 100 against 5 pseudo-errors at 1
    _grow(record, np.full(50, 10.0), kind=LINEAGE)
    assert record.factor(LINEAGE) == record.bounds[1]


def test_a_value_is_matched_once_and_only_with_a_one_step_prediction() -> None:
    record = PredictionRecord(prior_count=0.0)
    config = SPACE.sample(1, np.random.default_rng(3))[0]
    history = _history([LineageRecord(0, config, [0], [0.5])])
    # a prediction at a horizon is not a one-step prediction: never matched
    record.record(history, [Candidate(config, 1, 0, horizon=5)], np.zeros(1), np.ones(1))
    grown = _history([LineageRecord(0, config, [0, 1], [0.5, 0.6])])
    record.observe(grown)
    record.observe(grown)
    assert record.summary()[LINEAGE][0] == 0
    record.record(grown, [Candidate(config, 2, 0)], np.zeros(1), np.ones(1))
    last = _history([LineageRecord(0, config, [0, 1, 2], [0.5, 0.6, 0.7])])
    record.observe(last)
    record.observe(last)  # observing the same history again counts nothing twice
    assert record.summary()[LINEAGE][0] == 1


def test_the_policy_scales_each_kind_of_candidate_by_its_own_factor() -> None:
    rng = np.random.default_rng(4)
    lineages = []
    for key, config in enumerate(SPACE.sample(12, rng)):
        steps = int(rng.integers(1, 5))
        lineages.append(LineageRecord(key, config, list(range(steps)), list(rng.uniform(0.3, 0.7, steps)), thawable=True))
    history = _history(lineages)
    settings = dict(n_startup=4, weights=None, fit=FitSettings(full_steps=30))
    plain = FreezeThawPolicy(PolicySettings(**settings), seed=0)
    calibrated = FreezeThawPolicy(PolicySettings(**settings, calibrate=True), seed=0)
    calibrated._record._errors[NEW].extend([9.0 * 0.454936] * 100)  # as if new configurations were 3 stds off
    candidates = [Candidate(lineages[0].config, lineages[0].next_step, 0), Candidate(SPACE.sample(1, rng)[0], 0, None)]
    scores = {}
    for name, policy in (("plain", plain), ("calibrated", calibrated)):
        scores[name] = policy._score(history, candidates)
    _, mean, std = scores["plain"]
    _, mean_c, std_c = scores["calibrated"]
    np.testing.assert_allclose(mean_c, mean)
    np.testing.assert_allclose(std_c[0], std[0])  # the lineage's kind has no errors: unchanged
    assert std_c[1] == pytest.approx(std[1] * calibrated._record.factor(NEW))
    assert calibrated._record.factor(NEW) == pytest.approx(np.sqrt((5 + 100 * 9.0) / 105), rel=1e-4)
