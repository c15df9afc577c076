"""Leave-one-hub-out transfer: pretrain the surrogate on the other hubs, then search the held-out one.

    python -m bench.transfer --held-out tabular --sources tokens digits arch animal --seeds 0 1 2

Each source hub becomes an engine history (:func:`hub_history`): ``--configs`` random configurations
of its table, each run for a random number of epochs (as a freeze-thaw study leaves most runs short),
with its checkpoints as parameter graphs where the hub's cache has them (``--weight-sources`` are built
on demand, checked against the table; the others enter with their curves only, as "no weights").
Two priors are trained: with the graph metanetwork (``prior-gmn.safetensors``) and without weights
(``prior-none.safetensors``). The held-out hub is then searched through the same runner as
:mod:`bench.compare`, arms (paired seeds):

* ``default``: FMSSampler() + FMSPruner(max_steps), no prior;
* ``default+prior``: the same with ``prior=prior-gmn``;
* ``dyhpo-mk``: weights=None, no prior (bench/methods.py's name for it);
* ``dyhpo-mk+prior``: weights=None with ``prior=prior-none`` (what transfers without the weights);
* ``-s2`` after a prior arm: 2 random start-up configurations instead of 8 (a probe: trusting the
  prior sooner; ``results/transfer/input-prior/startup2``).

The priors are for the default's kernel; ``--kernel deep`` trains deep-kernel priors instead (a study
started from one uses the deep kernel), the kind that ``results/transfer/no-weights/`` measured against
the deep-kernel ``dyhpo`` before 2026-12-08.

Writes ``bench/results/transfer/<held-out>/``: ``runs/*.json`` (one replay each), ``summary.json``,
``regret.png``, ``RESULTS.md`` (:mod:`bench.report`), and ``transfer.json`` (the priors' descriptions,
sizes and times, and regret at 10/25/50/100 % per arm). The parameter ``model`` is left out of the
source histories: a hub's model index names a different model in every hub, so only the weights carry
which model a row fine-tunes.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
import functools
import json
import math
from pathlib import Path
import sys
import time
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "transfer"
DROPPED = ("model",)
ARMS = ("default", "default+prior", "dyhpo-mk", "dyhpo-mk+prior", "default+prior-s2", "dyhpo-mk+prior-s2")


class HubGraphs(Mapping[str, Any]):
    """Parameter graphs of a hub's checkpoints, built from the cache when first asked for."""

    def __init__(self, hub: Any, keys: dict[str, tuple[int | None, int]], on_demand: Any = None) -> None:
        from optuna_fms.graphs.template import TemplatedBuilder

        self.hub, self._keys, self._on_demand = hub, keys, on_demand
        self._build = TemplatedBuilder(coarsen=4096)
        self._graph = functools.lru_cache(maxsize=4096)(self._make)
        self._architectures: dict[int, dict[str, Any]] = {}

    def _architecture(self, zoo_id: int) -> dict[str, Any]:
        import optuna_fms
        from bench.hubs.models import build_model

        if zoo_id not in self._architectures:
            self._architectures[zoo_id] = optuna_fms.describe_architecture(build_model(self.hub.zoo[zoo_id]["arch"]))
        return self._architectures[zoo_id]

    def _make(self, key: str) -> Any:
        from safetensors.torch import load_file

        cid, epoch = self._keys[key]
        if cid is None:  # a zoo member's pretrained weights
            path, zoo_id = self.hub.zoo_checkpoint_path(epoch), epoch
        else:
            if self._on_demand is not None:
                self._on_demand.ensure_config(cid)
            path, zoo_id = self.hub.checkpoint_path(cid, epoch), self.hub.config(cid)["model"]
        return self._build(load_file(str(path)), self._architecture(zoo_id))

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._graph(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def hub_history(hub: Any, *, n_configs: int = 48, seed: int = 0, weights: bool = False,
                on_demand: Any = None) -> Any:
    """An engine History of ``hub``: ``n_configs`` random rows of the table, each observed for a
    random number of epochs (uniform over 1..n_epochs), and with ``weights`` the checkpoint after
    each epoch and the zoo member it starts from as graphs (built on demand)."""
    from optuna.distributions import CategoricalDistribution

    from optuna_fms._bridge import engine_space
    from optuna_fms.engine.history import History, LineageRecord

    space = engine_space({name: CategoricalDistribution(list(levels))
                          for name, levels in hub.grid.factors if name not in DROPPED})
    rng = np.random.default_rng(seed)
    cids = sorted(rng.choice(len(hub), size=min(n_configs, len(hub)), replace=False).tolist())
    keys: dict[str, tuple[int | None, int]] = {}
    records = []
    for cid in cids:
        values = hub.curve(cid)["val_acc"]
        length = int(rng.integers(1, hub.n_epochs + 1))
        steps, vals = [], []
        for s, v in enumerate(values[:length]):
            if v is None or not math.isfinite(v):
                break
            steps.append(s)
            vals.append(float(v))
        checkpoints = {}
        if weights:
            for s in steps:
                key = f"{hub.name}:{hub.checkpoint_sha(cid, s + 1)}"
                keys[key] = (cid, s + 1)
                checkpoints[s] = key
        records.append(LineageRecord(cid, hub.config(cid), steps, vals, checkpoints=checkpoints))
    initial = None
    if weights:
        zoo_keys = {}
        for k in hub.grid.levels["model"]:
            key = f"{hub.name}:zoo:{hub.zoo[k]['sha256']}"
            keys[key] = (None, k)
            zoo_keys[k] = key
        initial = lambda config: zoo_keys.get(config["model"])  # noqa: E731 - the config keeps "model"
    graphs = HubGraphs(hub, keys, on_demand) if weights else None
    return History(space, records, max_steps=hub.n_epochs, graphs=graphs, initial_weights=initial)


def _register(arm: str, prior: Path | None) -> None:
    """Add a transfer arm to the runner's method registry (this process only)."""
    import optuna_fms
    from bench import methods as methods_mod

    weights = "gmn" if arm.startswith("default") else None
    startup = 2 if arm.endswith("-s2") else 8

    def factory(seed: int, hub: Any):
        sampler = optuna_fms.FMSSampler(seed=seed, weights=weights, prior=prior, n_startup_trials=startup)
        return sampler, optuna_fms.FMSPruner(max_steps=hub.n_epochs, weights=weights)

    note = f"FMSSampler(weights={weights!r}, prior={prior.name if prior else None}, n_startup_trials={startup})"
    methods_mod.METHODS[arm] = methods_mod.Method(arm, factory, fms=True, weights=weights, note=note)


def regret_at(rec: dict[str, Any], fractions=(0.10, 0.25, 0.50, 1.00)) -> list[float]:
    trace, oracle = rec["trace"], rec["oracle"]["val_acc"]
    out = []
    for f in fractions:
        spent = max(1, int(round(f * rec["budget"])))
        seen = [b for e, b in zip(trace["epochs"], trace["best_val"]) if e <= spent]
        out.append(oracle - seen[-1] if seen else oracle)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--held-out", default="tabular")
    ap.add_argument("--sources", nargs="+", default=["tokens", "digits", "arch", "animal"])
    ap.add_argument("--weight-sources", nargs="*", default=["tokens"],
                    help="sources whose checkpoints are read (built on demand); the rest give curves only")
    ap.add_argument("--configs", type=int, default=48, help="configurations drawn from each source hub")
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps")
    ap.add_argument("--kernel", default="input", choices=("input", "deep"), help="the priors' surrogate kernel")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--budget", type=int, default=None, help="epochs per search (default: 10 full runs)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report-only", action="store_true", help="summarize the runs and priors already in --out")
    args = ap.parse_args(argv)
    out = args.out or RESULTS / args.held_out
    if args.report_only:
        summarize(out, {"held_out": args.held_out})
        return 0
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from bench.hubs.on_demand import OnDemandCache
    from bench.runner import Replay, load_hub
    from optuna_fms.engine.prior import PretrainSettings, pretrain, save_prior

    if args.held_out in args.sources:
        raise SystemExit(f"the held-out hub {args.held_out!r} is among the sources")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"held_out": args.held_out, "sources": args.sources, "weight_sources": args.weight_sources,
                            "configs_per_source": args.configs, "priors": {}}
    histories, names, caches = [], [], []
    t0 = time.perf_counter()
    for name in args.sources:
        hub = load_hub(name)
        weights = name in args.weight_sources
        cache = OnDemandCache(hub) if weights else None
        if cache is not None:
            cache.ensure_zoo()
            caches.append(cache)
        histories.append(hub_history(hub, n_configs=args.configs, seed=0, weights=weights, on_demand=cache))
        names.append(f"hub {name}" + (" (weights)" if weights else " (curves)"))
    info["history_s"] = round(time.perf_counter() - t0, 1)
    priors: dict[str, Path] = {}
    for kind in ("gmn", None):
        if not any("+prior" in a and (a.startswith("default") == (kind == "gmn")) for a in args.arms):
            continue
        path = out / f"prior-{kind or 'none'}.safetensors"
        t1 = time.perf_counter()
        prior = pretrain(histories, names, weights=kind, settings=PretrainSettings(steps=args.steps),
                         kernel=args.kernel)
        save_prior(prior, path)
        priors[kind or "none"] = path
        info["priors"][kind or "none"] = {"path": path.name, "bytes": path.stat().st_size,
                                          "seconds": round(time.perf_counter() - t1, 1),
                                          "description": prior.description}
        print(f"prior {kind}: {path.stat().st_size / 1e6:.2f} MB in {time.perf_counter() - t1:.0f}s "
              f"(loss {prior.description['training']['loss_first_50']} -> "
              f"{prior.description['training']['loss_last_50']})", flush=True)
    for cache in caches:
        cache.close()
    for arm in args.arms:
        if "+prior" in arm:
            _register(arm, priors["gmn" if arm.startswith("default") else "none"])
    hub = load_hub(args.held_out)
    budget = args.budget or 10 * hub.n_epochs
    for seed in args.seeds:
        for arm in args.arms:
            reads = arm.startswith("default")
            t1 = time.perf_counter()
            rec = Replay(hub, arm, seed, budget, placeholder_checkpoints=not reads, build_missing=reads).run()
            (out / "runs" / f"{arm}-s{seed}.json").write_text(json.dumps(rec, separators=(",", ":")))
            print(f"  {arm:>14} seed {seed}: regret {rec['final']['regret']:.4f} "
                  f"({time.perf_counter() - t1:.0f}s)", flush=True)
    summarize(out, info)
    return 0


def summarize(out: Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """``transfer.json`` and the report from the runs and prior files in ``out`` (also after an
    interrupted run: ``--report-only``)."""
    from bench import report
    from optuna_fms.engine.prior import load_prior

    info = dict(info or {})
    info.setdefault("priors", {})
    for path in sorted(out.glob("prior-*.safetensors")):
        kind = path.stem.removeprefix("prior-")
        if kind not in info["priors"]:
            description = load_prior(path).description
            info["priors"][kind] = {"path": path.name, "bytes": path.stat().st_size,
                                    "seconds": description["training"]["seconds"], "description": description}
    runs = report.load_runs(out)
    info["regret_at_10_25_50_100"] = {
        arm: {"mean": np.mean([regret_at(r) for r in recs], axis=0).round(4).tolist(),
              "se": (np.std([regret_at(r) for r in recs], axis=0, ddof=1) / math.sqrt(len(recs))).round(4).tolist()
              if len(recs) > 1 else None, "seeds": sorted(r["seed"] for r in recs)}
        for arm, recs in runs.items()}
    (out / "transfer.json").write_text(json.dumps(info, indent=1, default=str))
    report.write_report(out)
    print(json.dumps(info["regret_at_10_25_50_100"], indent=1))
    return info


if __name__ == "__main__":
    sys.exit(main())
