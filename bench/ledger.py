"""The epoch ledger of one replayed study: what was charged, the best value so far, and the trace.

Shared by the Optuna replay (:mod:`bench.runner`) and the outside reference drivers
(:mod:`bench.synetune`), so every method's run is charged and recorded the same way. Depends on
numpy and the hub table only (no Optuna, no torch): Syne Tune runs in its own virtual environment.
"""

from __future__ import annotations

from collections import defaultdict
import math
import os
from pathlib import Path
import platform
import subprocess
from typing import Any

import numpy as np

from bench.hubs.recipe import HubTable, cpu_model

TRACE_KEYS = ("epochs", "train_s", "decision_s", "best_val", "inc_test", "trial", "config", "step")


class Ledger:
    """Charges (lineage, step) pairs of ``hub`` against ``budget`` epochs; a pair is charged once."""

    def __init__(self, hub: HubTable, budget: int) -> None:
        if budget < 1:
            raise ValueError("budget must be >= 1 epoch")
        self.hub, self.budget, self.n = hub, budget, hub.n_epochs
        self.curves = [hub.curve(c) for c in range(len(hub))]
        self.oracle = hub.best_accuracy()
        self.spent = 0
        self.train_s = 0.0
        self.charged: dict[tuple[int, int], int] = {}  # (lineage, step) -> trial number
        self.by_trial: dict[int, list[int]] = defaultdict(list)  # trial -> steps charged
        self.best_val = -math.inf
        self.incumbent: tuple[int, int] | None = None  # (config id, epoch)
        self.inc_test: float | None = None
        self.trace: dict[str, list[Any]] = {k: [] for k in TRACE_KEYS}

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.budget

    def charge(self, number: int, lineage: int, cid: int, step: int, decision_s: float) -> float:
        """Charge epoch ``step + 1`` of configuration ``cid`` to trial ``number`` of ``lineage``;
        returns its validation accuracy. ``decision_s``: decision seconds spent so far."""
        key = (lineage, step)
        if key in self.charged:
            raise AssertionError(f"lineage {lineage} step {step} charged twice (trials {self.charged[key]}, {number})")
        self.charged[key] = number
        self.by_trial[number].append(step)
        curve = self.curves[cid]
        self.spent += 1
        self.train_s += float(curve["epoch_s"][step])
        val = curve["val_acc"][step]
        if val is not None and val > self.best_val:
            self.best_val, self.incumbent, self.inc_test = float(val), (cid, step + 1), curve["test_acc"][step]
        t = self.trace
        for k, v in zip(TRACE_KEYS, (self.spent, round(self.train_s, 4), round(decision_s, 4), self.best_val,
                                     self.inc_test, number, cid, step)):
            t[k].append(v)
        return float("nan") if val is None else float(val)

    def record(self, method: str, method_note: str, seed: int) -> dict[str, Any]:
        """The fields every run record shares (see :meth:`bench.runner.Replay.run` for the rest)."""
        best = self.hub.best()
        return {
            "hub": self.hub.name,
            "hub_fingerprint": self.hub.data.get("fingerprint"),
            "method": method,
            "method_note": method_note,
            "seed": seed,
            "budget": self.budget,
            "n_epochs": self.n,
            "oracle": {"val_acc": self.oracle, "config": best["id"], "epoch": best["epoch"],
                       "test_acc": best["test_acc"]},
            "final": {
                "epochs": self.spent,
                "train_s": round(self.train_s, 3),
                "best_val": self.best_val,
                "regret": self.oracle - self.best_val,
                "incumbent": {"config": self.incumbent[0], "epoch": self.incumbent[1]} if self.incumbent else None,
                "inc_test": self.inc_test,
            },
            "trace": self.trace,
        }

    def overhead(self, sampler_calls: list[float], pruner_calls: list[float], sampler_total: float,
                 pruner_total: float) -> dict[str, Any]:
        """Decision overhead of a run: totals, p50/p95 of one sampler and one pruner decision (each
        caller says what one decision is), and decision seconds per epoch charged."""
        return {
            "sampler_total_s": round(sampler_total, 4), "pruner_total_s": round(pruner_total, 4),
            "sampler_p50_s": quantile(sampler_calls, 0.5), "sampler_p95_s": quantile(sampler_calls, 0.95),
            "pruner_p50_s": quantile(pruner_calls, 0.5), "pruner_p95_s": quantile(pruner_calls, 0.95),
            "per_epoch_s": round((sampler_total + pruner_total) / max(self.spent, 1), 5),
        }


def quantile(values: list[float], q: float) -> float | None:
    return round(float(np.quantile(values, q)), 6) if values else None


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpu": cpu_model(), "load_avg": list(os.getloadavg())}


def code_version() -> dict[str, Any]:
    """The commit and uncommitted changes of the code that ran (a study reads optuna_fms at import)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "optuna_fms", "bench"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head, "dirty": [line.strip() for line in dirty if line.strip().endswith(".py")]}
