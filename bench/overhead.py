"""Decision cost of FMSPruner and FMSSampler at 100 to 10,000 observations.

Each timed decision goes through the real Optuna adapters on an in-memory study: the pruner
after a new report (refine the surrogate with it, score the alternatives), the sampler when a
trial starts (read the lineages, score frozen lineages and a pool of new configurations). With
weights, every step saves a real checkpoint of a small CNN with its architecture, so decisions
also read the new checkpoint, build its graph and embed it.
Each decision is also split into its phases: reading the lineages (the shared index), building
the engine's history (search space, checkpoint graphs) and the engine's decision (GP refinement on
at most ``FitSettings.max_rows`` rows, scoring) and, before it, naming the graphs the decision may
read (``graph_plan``): the only parts under the decision lock.
Writes ``<out>/<name>.json`` and ``<name>.png`` (default ``bench/results/overhead.*``).

    python -m bench.overhead [--sizes 100 300 1000] [--decisions 30] [--weights none gmn]
                             [--device auto|cpu|cuda] [--out bench/results] [--name overhead]
    python -m bench.overhead --sizes 1000 10000 --decisions 10 \
        --out bench/results/decision-cost --name decision-cost       # the scale targets

``--device`` is the surrogate's (default: the GPU when there is one); the targets are for 2 CPU
cores, with the metanetwork: p50 <= 0.2 s at 1,000 observations and <= 0.5 s at 10,000.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
import platform
import tempfile
import time

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
import torch

import optuna_fms
from optuna_fms.engine.surrogate import FitSettings
from optuna_fms import lineage as lin_mod

RESULTS = Path(__file__).resolve().parent / "results"
DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "momentum": FloatDistribution(0.0, 0.99),
    "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
    "model": CategoricalDistribution([f"m{i}" for i in range(8)]),
}
STEPS_PER_LINEAGE = 10
TARGETS = {1000: 0.2, 10000: 0.5}  # observations -> p50 seconds a decision may take (weights gmn)
PHASES = {  # module attribute -> phase name; timed around every call during a decision
    ("optuna_fms.sampler", "study_lineages"): "lineages", ("optuna_fms.pruner", "study_lineages"): "lineages",
    ("optuna_fms.sampler", "make_history"): "history", ("optuna_fms.pruner", "make_history"): "history",
    ("optuna_fms.sampler", "optuna_search_space"): "history", ("optuna_fms.pruner", "optuna_search_space"): "history",
}


class _Phases:
    """Seconds spent per phase since the last ``take()``: module functions and the engine's calls."""

    def __init__(self, policy) -> None:  # type: ignore[no-untyped-def]
        import importlib

        self.spent: dict[str, float] = {}
        for (module, name), phase in PHASES.items():
            mod = importlib.import_module(module)
            setattr(mod, name, self._timed(getattr(mod, name), phase))
        for name in ("choose_next", "should_continue"):
            setattr(policy, name, self._timed(getattr(policy, name), "engine"))
        policy.graphs_to_read = self._timed(policy.graphs_to_read, "graph_plan")

    def _timed(self, fn, phase: str):  # type: ignore[no-untyped-def]
        if getattr(fn, "_bench_phase", None):
            fn = fn.__wrapped__

        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[phase] = self.spent.get(phase, 0.0) + time.perf_counter() - t0

        timed._bench_phase = phase  # type: ignore[attr-defined]
        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def take(self) -> dict[str, float]:
        out, self.spent = self.spent, {}
        return out


def _curve(params: dict, steps: range, rng: np.random.Generator) -> list[float]:
    level = 0.9 - 0.1 * abs(math.log10(params["lr"]) + 2) - 0.02 * int(params["model"][1:])
    return [level * (1 - math.exp(-0.3 * (s + 1))) + float(rng.normal(0, 0.01)) for s in steps]


def _cnn() -> torch.nn.Module:
    """A ~1.2k-parameter GAP-CNN, the size of the hub's zoo members."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10),
    )


class _Run:
    """Reports (and, with weights, checkpoints) of one segment, as an objective would make them."""

    def __init__(self, weights: bool) -> None:
        self.model = _cnn()
        self.architecture = optuna_fms.describe_architecture(self.model) if weights else None

    def step(self, trial: optuna.Trial, step: int, value: float) -> None:
        if self.architecture is not None:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            optuna_fms.save_checkpoint(trial, self.model, step, architecture=self.architecture, save_rng=False)
        else:
            # NOTE: a real (tiny) file: a thaw verifies the checkpoint it resumes, so a record
            # without one would fail the lineage instead of thawing it.
            optuna_fms.save_checkpoint(trial, {"w": torch.zeros(1)}, step, save_rng=False)
        trial.report(value, step)


def _seed_study(
    n_observations: int, weights: str | None, folder: str, rng: np.random.Generator, device: str | None
) -> optuna.Study:
    """A study with ``n_observations`` reports in frozen lineages of 10 steps, each step checkpointed."""
    store = optuna.artifacts.FileSystemArtifactStore(folder)
    sampler = optuna_fms.FMSSampler(seed=0, weights=weights, artifact_store=store, device=device,
                                    dashboard=False, progress=False)  # NOTE: the decisions' cost alone
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=optuna_fms.FMSPruner())
    random = optuna.samplers.RandomSampler(seed=0)
    for _ in range(n_observations // STEPS_PER_LINEAGE):
        # NOTE: enqueued params are decided already, so seeding costs no FMS decision.
        study.enqueue_trial({n: random.sample_independent(study, None, n, d) for n, d in DISTRIBUTIONS.items()})  # type: ignore[arg-type]
        trial = study.ask(DISTRIBUTIONS)
        run = _Run(weights is not None)
        for step, value in zip(range(STEPS_PER_LINEAGE), _curve(trial.params, range(STEPS_PER_LINEAGE), rng)):
            run.step(trial, step, value)
        study._storage.set_trial_system_attr(trial._trial_id, lin_mod.FROZEN, "seed")
        study.tell(trial, state=TrialState.PRUNED)
    return study


def measure(
    n_observations: int, decisions: int, weights: str | None, seed: int = 0, device: str | None = None
) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as folder:
        study = _seed_study(n_observations, weights, folder, rng, device)
        pruner = study.pruner
        t0 = time.perf_counter()
        study.ask()  # warm-up: the first fit from scratch (and graph reads) happen once per study
        warm_up = time.perf_counter() - t0
        phases = _Phases(study.sampler.policy)
        sampler_times, pruner_times, sampler_cpu, pruner_cpu = [], [], [], []
        split: dict[str, list[float]] = {}
        for _ in range(decisions):
            phases.take()
            t0, c0 = time.perf_counter(), time.process_time()
            trial = study.ask()
            sampler_times.append(time.perf_counter() - t0)
            sampler_cpu.append(time.process_time() - c0)
            for phase, spent in phases.take().items():
                split.setdefault(f"sampler_{phase}", []).append(spent)
            params = {n: trial._suggest(n, d) for n, d in DISTRIBUTIONS.items()}
            start = trial.user_attrs.get(lin_mod.USER_START_STEP, 0)
            _Run(weights is not None).step(trial, start, _curve(params, range(start, start + 1), rng)[0])
            t0, c0 = time.perf_counter(), time.process_time()
            pruner.prune(study, study._storage.get_trial(trial._trial_id))
            pruner_times.append(time.perf_counter() - t0)
            pruner_cpu.append(time.process_time() - c0)
            for phase, spent in phases.take().items():
                split.setdefault(f"pruner_{phase}", []).append(spent)
            study.tell(trial, state=TrialState.PRUNED)
    # NOTE: CPU seconds of this process as well as wall seconds: on a shared machine the wall
    # clock also counts time spent waiting for other jobs.
    return {"sampler": sampler_times, "pruner": pruner_times, "sampler_cpu": sampler_cpu, "pruner_cpu": pruner_cpu,
            **split, "warm_up": [warm_up]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--decisions", type=int, default=30)
    parser.add_argument("--weights", nargs="+", default=["none", "gmn"],
                        help="surrogate variants to time: none (DyHPO), gmn, flat")
    parser.add_argument("--device", default="auto", help="the surrogate's device: auto, cpu, cuda")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="overhead", help="stem of the JSON and PNG written into --out")
    args = parser.parse_args()
    from optuna_fms.engine.device import resolve_device

    device = resolve_device(args.device)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results = {
        "machine": {
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "torch": torch.__version__, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average_at_start": list(os.getloadavg()),
        },
        "targets_p50_seconds": {str(k): v for k, v in TARGETS.items()},
        "targets": "weights gmn, 2 CPU cores: p50 <= 0.2 s at 1,000 observations and <= 0.5 s at 10,000",
        "gp_max_rows": FitSettings().max_rows,
        "sizes": {},
    }
    for weights in args.weights:
        variant = results["sizes"].setdefault(weights, {})
        for n in args.sizes:
            times = measure(n, args.decisions, None if weights == "none" else weights, device=str(device))
            row = {
                name: {"p50": float(np.percentile(t, 50)), "p95": float(np.percentile(t, 95)),
                       "max": float(np.max(t)), "n": len(t)}
                for name, t in times.items()
            }
            variant[str(n)] = row
            print(f"weights={weights:<5} {n:5d} observations: "
                  + ", ".join(f"{k} p50 {v['p50']:.3f} s p95 {v['p95']:.3f} s" for k, v in row.items()),
                  flush=True)
            args.out.mkdir(parents=True, exist_ok=True)  # NOTE: written as it goes: a long run keeps what it measured
            (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    _plot(results, args.out / f"{args.name}.png")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(results["sizes"])
    sizes = list(results["sizes"][variants[0]])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(sizes))
    bars = [(w, name) for w in variants for name in ("pruner", "sampler")]
    width = 0.8 / len(bars)
    for i, (w, name) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width
        p50 = [results["sizes"][w][s][name]["p50"] for s in sizes]
        p95 = [results["sizes"][w][s][name]["p95"] for s in sizes]
        ax.bar(x + offset, p50, width, label=f"{name} p50 (weights {w})")
        ax.scatter(x + offset, p95, marker="_", s=120, color="k", label="p95" if i == 0 else None)
    for i, s in enumerate(sizes):
        if int(s) in TARGETS:
            ax.hlines(TARGETS[int(s)], i - 0.45, i + 0.45, color="r", ls="--", lw=1,
                      label="target p50 (gmn)" if i == 0 or int(sizes[0]) not in TARGETS else None)
    ax.set_xticks(x, [f"{s} obs." for s in sizes])
    ax.set_ylabel("seconds per decision")
    ax.set_title(f"FMS decision overhead ({results['machine']['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
