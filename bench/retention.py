"""Checkpoint retention's effect on search quality and disk: one hub replayed with and without it.

Each arm replays the hub through :mod:`bench.runner` (the real Optuna API) with the same method and
seeds; the retention arms add :class:`optuna_fms.RetentionCallback` after every trial. Recorded per
run: regret at 10 / 25 / 50 / 100 % of the budget, the checkpoint bytes and files left at the end,
the peak bytes during the study, and how many checkpoints retention deleted.

    python -m bench.hubs.digits build --micro          # seconds
    python -m bench.retention --hub bench/cache/digits-micro/table.json --seeds 0 1 2 3 4 5 6 7 8 9

Writes ``bench/results/retention/summary.json`` and ``regret.png``.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
import json
from pathlib import Path
import sys
import time
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "retention"
# NOTE: arm name -> RetentionCallback settings (None: no retention). keep_last=0 keeps only what
# retention always protects, the most the surrogate can lose.
ARMS: dict[str, dict[str, int] | None] = {"none": None, "keep_last=1": {"keep_last": 1}, "keep_last=0": {"keep_last": 0}}


def _checkpoint_bytes(study: Any) -> tuple[int, int]:
    """(files, bytes) of the trial checkpoints the study still has."""
    import optuna_fms

    records = {c.artifact_id: c.size for lin in optuna_fms.lineages(study) for c in lin.checkpoints}
    return len(records), sum(records.values())


def run_arm(hub_path: str, method: str, seed: int, budget: int, arm: str) -> dict[str, Any]:
    """One replay of ``arm``; a compact record (no per-trial trace beyond the best-value curve)."""
    import optuna
    import torch

    import optuna_fms
    from bench.runner import Replay, load_hub

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = ARMS[arm]
    callback = optuna_fms.RetentionCallback(**settings) if settings is not None else None
    peak = {"bytes": 0, "files": 0}

    class RetainedReplay(Replay):
        def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            files, size = _checkpoint_bytes(study)  # NOTE: measured before the pass: the disk's high-water mark
            peak["bytes"], peak["files"] = max(peak["bytes"], size), max(peak["files"], files)
            if callback is not None:
                callback(study, trial)
            super().after_trial(study, trial)

    replay = RetainedReplay(load_hub(hub_path), method, seed, budget)
    t0 = time.perf_counter()
    rec = replay.run()
    files, size = _checkpoint_bytes(replay.study)
    return {
        "arm": arm, "seed": seed, "hub": rec["hub"], "method": method, "budget": budget, "oracle": rec["oracle"],
        "trace": {"best_val": rec["trace"]["best_val"]}, "final": rec["final"],
        "kept_files": files, "kept_bytes": size, "peak_files": peak["files"], "peak_bytes": peak["bytes"],
        "deleted": len(optuna_fms.lineage.deleted_checkpoints(replay.study)),
        "wall_s": round(time.perf_counter() - t0, 2), "machine": rec["machine"],
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    from bench.report import FRACTIONS, _best_val_matrix, _mean_se, checkpoint_epochs

    budget = max(r["budget"] for r in runs)
    points = checkpoint_epochs(budget)
    out: dict[str, Any] = {"hub": runs[0]["hub"], "oracle": runs[0]["oracle"], "method": runs[0]["method"], "budget": budget,
                           "fractions": list(FRACTIONS), "arms": {}}
    for arm in ARMS:
        recs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if not recs:
            continue
        regret = recs[0]["oracle"]["val_acc"] - _best_val_matrix(recs, budget)
        mean, se = _mean_se(regret)
        out["arms"][arm] = {
            "settings": ARMS[arm], "seeds": [r["seed"] for r in recs],
            "regret": {f"{f:g}": round(float(mean[e - 1]), 5) for f, e in zip(FRACTIONS, points)},
            "regret_se": {f"{f:g}": round(float(se[e - 1]), 5) for f, e in zip(FRACTIONS, points)},
            "final_regret_per_seed": [round(float(r["final"]["regret"]), 5) for r in recs],
            **{key: float(np.mean([r[key] for r in recs])) for key in
               ("kept_bytes", "kept_files", "peak_bytes", "peak_files", "deleted", "wall_s")},
            "mean_regret_curve": [round(float(v), 5) for v in mean],
        }
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, s in summary["arms"].items():
        curve = s["mean_regret_curve"]
        ax.plot(range(1, len(curve) + 1), curve, label=arm)
    ax.set(xlabel="epochs spent", ylabel="mean regret", yscale="log",
           title=f"{summary['method']}, {len(next(iter(summary['arms'].values()))['seeds'])} seeds")
    ax.legend()
    arms = list(summary["arms"])
    bx.bar([a + "\nkept" for a in arms], [summary["arms"][a]["kept_bytes"] / 2**20 for a in arms])
    bx.bar([a + "\npeak" for a in arms], [summary["arms"][a]["peak_bytes"] / 2**20 for a in arms], alpha=0.6)
    bx.set(ylabel="checkpoint MiB (mean over seeds)", title="disk")
    bx.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _job(args: tuple[str, str, int, int, str]) -> dict[str, Any]:
    return run_arm(*args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hub", default="bench/cache/digits-micro/table.json", help="hub name or table path")
    ap.add_argument("--method", default="fms-gmn-next", help="a method of bench.methods (one that reads weights)")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    ap.add_argument("--budget", type=int, default=60, help="epochs per run (default: 10 full micro-hub runs)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    jobs = [(args.hub, args.method, s, args.budget, arm) for arm in args.arms for s in args.seeds]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        runs = []
        for rec in pool.map(_job, jobs):
            print(f"{rec['arm']:>12} seed {rec['seed']}: regret {rec['final']['regret']:.4f}, "
                  f"kept {rec['kept_files']} files / {rec['kept_bytes'] / 2**20:.2f} MiB, "
                  f"deleted {rec['deleted']}, {rec['wall_s']:.0f} s", flush=True)
            runs.append(rec)
    summary = summarize(runs)
    summary["machine"] = runs[0]["machine"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, args.out / "regret.png")
    for arm, s in summary["arms"].items():
        print(f"{arm:>12}: regret {s['regret']} kept {s['kept_bytes'] / 2**20:.2f} MiB "
              f"(peak {s['peak_bytes'] / 2**20:.2f} MiB), {s['kept_files']:.1f} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
