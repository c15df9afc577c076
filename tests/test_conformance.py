"""Optuna's sampler conformance kit (``optuna.testing.pytest_samplers``) run against FMSSampler.

The kit's classes take a ``sampler`` fixture (a factory); each case builds its own study. FMSSampler
runs with small but real settings: the surrogate decides after one observation, on a small pool.

NOTE: the kit has no ``SingleOnlySamplerTestCase`` here: it checks that a sampler *refuses*
multi-objective studies, and GPSampler fails it (it supports them); FMSSampler's multi-objective
``sample_independent`` is checked by ``MultiObjectiveSamplerTestCase`` like GPSampler's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import functools

import optuna
from optuna.testing.pytest_samplers import (
    BasicSamplerTestCase,
    MultiObjectiveSamplerTestCase,
    RelativeSamplerTestCase,
)
import pytest

import optuna_fms
from optuna_fms.engine.surrogate import FitSettings

pytestmark = pytest.mark.usefixtures("isolated_warnings")
SMALL = FitSettings(full_steps=20, refine_steps=5)


def _fms_sampler() -> optuna_fms.FMSSampler:
    return optuna_fms.FMSSampler(seed=0, n_startup_trials=1, pool_size=16, weights=None, fit_settings=SMALL)


@pytest.fixture(params=["no pruner", "FMSPruner"])
def _pruner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # NOTE: the kit's cases call optuna.study.create_study(sampler=...) and take no pruner; the
    # FMSPruner run gives every study it creates one, so before_trial takes its freeze-thaw path.
    if request.param == "FMSPruner":
        create = optuna.study.create_study
        monkeypatch.setattr(
            optuna.study, "create_study",
            functools.partial(create, pruner=optuna_fms.FMSPruner(n_startup_trials=1, weights=None)),
        )
    yield


class _FMS:
    @pytest.fixture
    def sampler(self, _pruner: None) -> Callable[[], optuna.samplers.BaseSampler]:
        return _fms_sampler


class TestBasic(_FMS, BasicSamplerTestCase):
    pass


class TestRelative(_FMS, RelativeSamplerTestCase):
    pass


class TestMultiObjective(_FMS, MultiObjectiveSamplerTestCase):
    pass
