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
