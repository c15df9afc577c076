"""Run methods x seeds on one hub (worker processes, one torch thread each), then regenerate the report.

    python -m bench.compare --hub digits --budget 160 --seeds 0 1 2 \
        --methods random tpe tpe-hyperband dyhpo fms-gmn --workers 2

Writes ``bench/results/<hub>/runs/<method>-s<seed>.json`` (one replay each, see :mod:`bench.runner`),
then ``python -m bench.report <hub>`` rewrites ``summary.json``, ``regret.png`` and ``RESULTS.md``.
Existing runs with the same budget on the same hub build (fingerprint) are kept unless ``--force``.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor, as_completed
import json
import multiprocessing as mp
from pathlib import Path
import sys
import time
from typing import Any

from bench import methods as methods_mod

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_METHODS = ("random", "tpe", "tpe-hyperband", "dyhpo", "fms-gmn")

_HUB: Any = None


def _init(table: str, cache: str | None) -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from bench.runner import load_hub

    global _HUB
    _HUB = load_hub(table, cache)


def _task(job: tuple[str, int, int, str, bool, bool]) -> tuple[str, int, float, str]:
    method, seed, budget, out, placeholder, build_missing = job
    from bench.runner import replay

    t0 = time.perf_counter()
    try:
        rec = replay(_HUB, method, seed, budget, placeholder, build_missing)
    except Exception as err:  # noqa: BLE001 - one failed run must not lose the others
        return method, seed, time.perf_counter() - t0, f"FAILED: {type(err).__name__}: {err}"
    Path(out).write_text(json.dumps(rec, separators=(",", ":")))
    f = rec["final"]
    return method, seed, time.perf_counter() - t0, (f"regret {f['regret']:.4f} trials {f['n_trials']} "
                                                    f"thaws {f['n_thaws']} decision {rec['overhead']['sampler_total_s'] + rec['overhead']['pruner_total_s']:.1f}s")


def run_dir(hub_name: str) -> Path:
    return RESULTS / hub_name / "runs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare HPO methods on a hub.")
    ap.add_argument("--hub", default="digits", help="hub name or table path")
    ap.add_argument("--cache", help="checkpoint cache folder")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(methods_mod.METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=None, help="epochs per run (default: 10 full runs)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    ap.add_argument("--out", type=Path, help="results folder (default bench/results/<hub>)")
    ap.add_argument("--placeholder-checkpoints", action="store_true",
                    help="for methods that read no weights, a tiny stand-in for each checkpoint (no cache "
                         "needed; their decisions do not depend on checkpoint bytes)")
    ap.add_argument("--build-missing", action="store_true",
                    help="build the checkpoints a replay needs when it first asks for them, checked against "
                         "the table (no full build; each worker builds in one extra 1-thread process)")
    args = ap.parse_args(argv)
    from bench.runner import load_hub

    hub = load_hub(args.hub, args.cache)
    budget = args.budget or 10 * hub.n_epochs
    out_dir = args.out or RESULTS / hub.name
    runs = out_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    jobs = []
    for seed in args.seeds:
        for method in args.methods:
            path = runs / f"{method}-s{seed}.json"
            if path.is_file() and not args.force:
                try:
                    old = json.loads(path.read_text())
                    if old["budget"] == budget and old.get("hub_fingerprint") == hub.data.get("fingerprint"):
                        continue
                except (ValueError, KeyError):
                    pass
            placeholder = args.placeholder_checkpoints and not methods_mod.reads_weights(method)
            jobs.append((method, seed, budget, str(path), placeholder, args.build_missing))
    # NOTE: seed by seed, so an interrupted comparison still holds whole seeds (the report ranks only
    # seeds every method ran); within a seed the slow (FMS) runs first, so the workers finish together.
    jobs.sort(key=lambda j: (j[1], not methods_mod.get(j[0]).fms, methods_mod.get(j[0]).weights is None))
    print(f"{hub.name}: {len(jobs)} runs of {budget} epochs on {args.workers} workers", flush=True)
    t0 = time.perf_counter()
    failed = 0
    ctx = mp.get_context("spawn")
    # NOTE: ProcessPoolExecutor, not multiprocessing.Pool: its workers are not daemonic, so a replay that
    # builds checkpoints on demand may start its own builder process.
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}  # a fresh process per run
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init, initargs=(str(args.hub), args.cache),
                             **fresh) as pool:
        for future in as_completed([pool.submit(_task, job) for job in jobs]):
            method, seed, dt, msg = future.result()
            failed += msg.startswith("FAILED")
            print(f"  {method:>14} seed {seed}: {dt:7.1f}s  {msg}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    from bench import report

    report.write_report(out_dir)
    print(f"report: {out_dir / 'RESULTS.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
