"""package/samplers/fms/: the folder OptunaHub loads, loaded the way OptunaHub loads it."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

import optuna_fms
from scripts import load_script

REGISTRY_ROOT = Path(__file__).resolve().parents[1] / "package"
PACKAGE = REGISTRY_ROOT / "samplers" / "fms"
FRONT_MATTER_KEYS = {"author", "title", "description", "tags", "optuna_versions", "license"}


def _front_matter() -> dict[str, str]:
    text = (PACKAGE / "README.md").read_text()
    assert text.startswith("---\n"), "OptunaHub reads the README's front matter from its first line"
    block = text[4 : text.index("\n---\n", 4)]
    return dict(line.split(": ", 1) for line in block.splitlines())


def _list(value: str) -> list[str]:
    assert value.startswith("[") and value.endswith("]"), value
    return [item.strip() for item in value[1:-1].split(",")]


def test_the_folder_has_the_registry_layout_and_front_matter() -> None:
    for name in ("README.md", "__init__.py", "example.py", "LICENSE", "requirements.txt"):
        assert (PACKAGE / name).is_file(), name
    meta = _front_matter()
    assert set(meta) == FRONT_MATTER_KEYS
    assert "sampler" in _list(meta["tags"])  # NOTE: the registry requires it under package/samplers/
    assert optuna.__version__ in _list(meta["optuna_versions"])
    assert meta["license"] == "MIT License" and (PACKAGE / "LICENSE").read_text().startswith("MIT License")
    assert "optuna-fms" in (PACKAGE / "requirements.txt").read_text()
    # It re-exports the library and copies none of it.
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "example.py"]


def _load_like_optunahub():
    """What ``optunahub.load_local_module(package="samplers/fms", registry_root="package")`` does."""
    try:
        import optunahub
    except ImportError:  # NOTE: the same import by path, for an environment without it
        name = "optunahub_registry.package.samplers.fms"
        return load_script(name, PACKAGE / "__init__.py")
    return optunahub.load_local_module(package="samplers/fms", registry_root=str(REGISTRY_ROOT))


def test_the_hub_module_is_the_installed_library() -> None:
    module = _load_like_optunahub()
    assert module.__name__ == "optunahub_registry.package.samplers.fms"
    for name in module.__all__:
        assert getattr(module, name) is getattr(optuna_fms, name), name
    assert isinstance(module.FMSSampler(seed=0), optuna.samplers.BaseSampler)
    assert isinstance(module.FMSPruner(), optuna.pruners.BasePruner)


def test_the_example_runs_in_a_tiny_mode(capsys) -> None:
    pytest.importorskip("optunahub")  # the example is OptunaHub's: it imports optunahub itself
    example = load_script("fms_hub_example", PACKAGE / "example.py")
    summary = example.main(["--trials", "6", "--epochs", "3", "--registry-root", str(REGISTRY_ROOT)])
    printed = capsys.readouterr().out
    assert summary["n_trials"] == 6
    assert sum(summary["states"].values()) >= 4  # the start-up design alone starts 4 configurations
    assert summary["states"]["frozen"] >= 1  # freeze-thaw happened: start-up runs are frozen after epoch 0
    assert 0.0 < summary["best_value"] < 1.0  # sin(3x) has variance 0.5: a fit beats the mean
    assert "best lineage" in printed and "lineages by state" in printed
