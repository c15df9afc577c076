"""Smoke test of tutorials/03_transfer.py: a first study, a prior from it, a second study from the prior."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from scripts import load_script

pytest.importorskip("sklearn")

TUTORIAL = Path(__file__).resolve().parents[1] / "tutorials" / "03_transfer.py"


def test_transfer_tutorial(tmp_path, capsys):
    tutorial = load_script("fms_tutorial_03", TUTORIAL)
    threads, verbosity = torch.get_num_threads(), optuna.logging.get_verbosity()
    try:
        summary = tutorial.main(["--smoke", "--out", str(tmp_path / "out")])
    finally:  # main() sets these process-wide
        torch.set_num_threads(threads)
        optuna.logging.set_verbosity(verbosity)
    printed = capsys.readouterr().out
    assert summary["prior"].is_file()
    source = summary["description"]["trained_on"][0]
    assert source["name"] == "digits-0-4" and source["graphs"] > 0
    # the second study's extra parameter gets inputs of its own; the shared ones are matched
    assert summary["input_map"].extra == ("weight_decay",)
    assert set(summary["input_map"].matched) == {"model", "lr", "momentum"}
    second = summary["second"]
    assert second.sampler.policy._surrogate.prior is not None  # it did start from the prior
    assert len(second.trials) == 6 and summary["best_second"] > 0.2  # better than chance (5 classes)
    assert "matched to the prior: lr, model, momentum" in printed
