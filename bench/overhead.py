"""Decision overhead of FMSPruner and FMSSampler at 100, 300 and 1,000 observations.

Each timed decision goes through the real Optuna adapters on an in-memory study: the pruner
after a new report (refine the surrogate with it, score the alternatives), the sampler when a
trial starts (read the lineages, score frozen lineages and a pool of new configurations).
Writes ``bench/results/overhead.json`` and ``overhead.png``.

    python -m bench.overhead [--sizes 100 300 1000] [--decisions 30]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
import platform
import time

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
import torch

import optuna_fms
from optuna_fms import lineage as lin_mod

RESULTS = Path(__file__).resolve().parent / "results"
DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "momentum": FloatDistribution(0.0, 0.99),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    "model": CategoricalDistribution([f"m{i}" for i in range(8)]),
}
STEPS_PER_LINEAGE = 10


def _curve(params: dict, steps: range, rng: np.random.Generator) -> list[float]:
    level = 0.9 - 0.1 * abs(math.log10(params["lr"]) + 2) - 0.02 * int(params["model"][1:])
    return [level * (1 - math.exp(-0.3 * (s + 1))) + float(rng.normal(0, 0.01)) for s in steps]


def _seed_study(n_observations: int, rng: np.random.Generator) -> optuna.Study:
    """A study with ``n_observations`` reports in frozen lineages of 10 steps, each with a checkpoint."""
    sampler = optuna_fms.FMSSampler(seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=optuna_fms.FMSPruner())
    random = optuna.samplers.RandomSampler(seed=0)
    for i in range(n_observations // STEPS_PER_LINEAGE):
        params = {n: random.sample_independent(study, None, n, d) for n, d in DISTRIBUTIONS.items()}  # type: ignore[arg-type]
        steps = range(STEPS_PER_LINEAGE)
        curve = _curve(params, steps, rng)
        study.add_trial(
            create_trial(
                state=TrialState.PRUNED, params=params, distributions=DISTRIBUTIONS,
                intermediate_values=dict(zip(steps, curve)), value=curve[-1],
                system_attrs={
                    lin_mod.FROZEN: "seed",
                    # NOTE: a checkpoint record makes the lineage thawable; the bench never loads it.
                    f"{lin_mod.CHECKPOINT_PREFIX}{STEPS_PER_LINEAGE - 1:09d}": json.dumps(
                        {"artifact_id": f"a{i}", "sha256": "0" * 64, "size": 1, "step": STEPS_PER_LINEAGE - 1}
                    ),
                },
            )
        )
    return study


def measure(n_observations: int, decisions: int, seed: int = 0) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    study = _seed_study(n_observations, rng)
    sampler, pruner = study.sampler, study.pruner
    # Warm-up: the first fit from scratch happens once per study, not per decision.
    trial = study.ask()
    sampler_times, pruner_times = [], []
    for _ in range(decisions):
        t0 = time.perf_counter()
        trial = study.ask()
        sampler_times.append(time.perf_counter() - t0)
        params = {n: trial._suggest(n, d) for n, d in DISTRIBUTIONS.items()}
        start = trial.user_attrs.get(lin_mod.USER_START_STEP, 0)
        study._storage.set_trial_system_attr(
            trial._trial_id, f"{lin_mod.CHECKPOINT_PREFIX}{start:09d}",
            json.dumps({"artifact_id": f"t{trial.number}", "sha256": "0" * 64, "size": 1, "step": start}),
        )
        trial.report(_curve(params, range(start, start + 1), rng)[0], start)
        t0 = time.perf_counter()
        frozen = pruner.prune(study, study._storage.get_trial(trial._trial_id))
        pruner_times.append(time.perf_counter() - t0)
        study.tell(trial, state=TrialState.PRUNED) if frozen else study.tell(trial, state=TrialState.PRUNED)
    return {"sampler": sampler_times, "pruner": pruner_times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--decisions", type=int, default=30)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results = {
        "machine": {
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "torch": torch.__version__, "device": "cpu",
        },
        "bar": "p50 <= 0.5 s at 1000 observations",
        "sizes": {},
    }
    for n in args.sizes:
        times = measure(n, args.decisions)
        row = {
            name: {"p50": float(np.percentile(t, 50)), "p95": float(np.percentile(t, 95)), "n": len(t)}
            for name, t in times.items()
        }
        results["sizes"][str(n)] = row
        print(f"{n:5d} observations: " + ", ".join(f"{k} p50 {v['p50']:.3f} s p95 {v['p95']:.3f} s" for k, v in row.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(results, indent=2))
    _plot(results, RESULTS / "overhead.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results["sizes"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(sizes))
    for i, name in enumerate(("pruner", "sampler")):
        p50 = [results["sizes"][s][name]["p50"] for s in sizes]
        p95 = [results["sizes"][s][name]["p95"] for s in sizes]
        ax.bar(x + (i - 0.5) * 0.35, p50, 0.35, label=f"{name} p50")
        ax.scatter(x + (i - 0.5) * 0.35, p95, marker="_", s=300, color="k", label="p95" if i == 0 else None)
    ax.axhline(0.5, color="r", ls="--", lw=1, label="bar: p50 0.5 s")
    ax.set_xticks(x, [f"{s} obs." for s in sizes])
    ax.set_ylabel("seconds per decision")
    ax.set_title("FMS decision overhead (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
