"""Tutorial 2: many worker processes on one FMS study (PostgreSQL + a shared artifact folder).

Freeze-thaw needs two shared things: the study (any Optuna RDB storage; here PostgreSQL) and the
checkpoints (any Optuna artifact store that every worker reaches; here a folder, which on
several machines would be a shared mount, or S3 with ``Boto3ArtifactStore``). Then a run frozen by
one worker can be thawed by another: the thaw is a new trial, in whichever worker asks next, that
loads the frozen run's checkpoint from the shared store.

Workers also die. This tutorial kills one of them on purpose (SIGKILL, in the middle of a run,
right after it saved a checkpoint) and shows the recovery the README describes under "Crashes
and retries": the storage has Optuna's heartbeat (``RDBStorage(heartbeat_interval=...,
grace_period=...)``), so once the dead trial's heartbeat is stale, the next trial started in any
worker marks it FAIL, ``RetryHeartbeatStaleTrialCallback`` re-creates it as a WAITING trial, and
FMSSampler continues that lineage from its newest checkpoint (``fms:decision`` "retry of trial
...", ``fms:start_step``). Steps the dead trial reported after its last checkpoint are counted as
``lost_steps``. Without a heartbeat (other storages), ``FMSSampler(recovery=RecoverySettings(
lease_seconds=...))`` frees a silent trial's lineage after its lease instead.

Run it (PostgreSQL on 127.0.0.1:5432, database ``test``; ``--storage`` for another)::

    python tutorials/02_many_workers.py            # 4 workers x 20 trials, runs of 12 epochs
    python tutorials/02_many_workers.py --smoke    # 2 workers, 8 trials in all (2 min on a shared 2-core machine)

The coordinator (this script without ``--worker``) creates the study under a unique name,
registers the pretrained weights, starts the workers as subprocesses of this same file
(``--worker``), starts one more worker after the crash (the replacement machine), and prints the
best lineage, the lineages by state and which worker ran which segment. On real machines, run
the ``--worker`` command it prints on each of them instead.
"""

from __future__ import annotations

import argparse
from collections import Counter
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
import uuid
import warnings

import optuna
from optuna.artifacts import FileSystemArtifactStore
import torch
from torch import nn

import optuna_fms

HERE = Path(__file__).resolve().parent
POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
WORKER_ATTR = "worker"  # user attr: which worker ran a trial (the tutorial's own bookkeeping)
CRASH_ATTR = "crash"  # user attr on the trial a worker kills itself in

HUB = {"mlp32": 32, "mlp64": 64, "scratch": 64}  # name -> hidden width; all but scratch pretrained


# --- the task: MLPs pretrained on digits 0-4, fine-tuned on digits 5-9 ------------------------


def make_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    src, tgt = y < 5, y >= 5
    xt, yt = x[tgt], y[tgt] - 5
    order = torch.randperm(len(yt), generator=torch.Generator().manual_seed(0))
    train, val = order[:300], order[300:600]  # NOTE: few labels, where pretraining matters
    return {"source": (x[src], y[src]), "train": (xt[train], yt[train]), "val": (xt[val], yt[val])}


def make_model(name: str) -> nn.Sequential:
    width = HUB[name]
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 5))


def pretrained_hub(data) -> dict[str, dict[str, torch.Tensor]]:
    """Every worker builds the same hub (seeded, full-batch, under a second)."""
    hub = {}
    xs, ys = data["source"]
    for i, name in enumerate(HUB):
        torch.manual_seed(i)
        model = make_model(name)
        if name != "scratch":
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(60):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xs), ys).backward()
                opt.step()
        hub[name] = {k: v.clone() for k, v in model.state_dict().items()}
    return hub


def make_objective(hub, data, epochs: int, store, worker: str, crash_at: int | None):
    started = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal started
        started += 1
        trial.set_user_attr(WORKER_ATTR, worker)
        name = trial.suggest_categorical("model", list(hub))
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        weight_decay = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
        torch.manual_seed(0)
        model = make_model(name)
        model.load_state_dict(hub[name])
        model[-1].reset_parameters()  # a fresh head for the new task
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        ckpt = optuna_fms.load_checkpoint(trial, model, optimizer=opt, artifact_store=store)
        start = 0 if ckpt is None else ckpt.step + 1
        (x, y), (xv, yv) = data["train"], data["val"]
        acc = float("nan")
        for epoch in range(start, epochs):
            model.train()
            for idx in torch.randperm(len(y)).split(32):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                acc = (model(xv).argmax(1) == yv).float().mean().item()
            optuna_fms.save_checkpoint(trial, model, step=epoch, optimizer=opt, artifact_store=store)
            trial.report(acc, epoch)
            if crash_at is not None and started >= crash_at:
                # NOTE: a machine lost mid-run: no exception, no tell(); the trial stays RUNNING
                # until its heartbeat goes stale.
                trial.set_user_attr(CRASH_ATTR, f"SIGKILL after step {epoch}")
                os.kill(os.getpid(), signal.SIGKILL)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return acc

    return objective


# --- one worker ------------------------------------------------------------------------------


def storage_of(url: str, grace: int) -> optuna.storages.RDBStorage:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, retries
    return optuna.storages.RDBStorage(
        url, engine_kwargs={"pool_pre_ping": True},
        heartbeat_interval=1, grace_period=grace,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
    )


def fms(args, store) -> tuple[optuna_fms.FMSSampler, optuna_fms.FMSPruner]:
    from optuna_fms.engine.surrogate import FitSettings

    # NOTE: smaller surrogate fits in smoke mode only, so the tutorial's test stays short
    fit = FitSettings(full_steps=100, refine_steps=15) if args.smoke else None
    sampler = optuna_fms.FMSSampler(seed=args.seed, n_startup_trials=args.startup, pool_size=64 if args.smoke else 256,
                                    fit_settings=fit, artifact_store=store)
    pruner = optuna_fms.FMSPruner(max_steps=args.epochs, n_startup_trials=args.startup, fit_settings=fit,
                                  artifact_store=store)
    return sampler, pruner


def run_worker(args) -> None:
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = FileSystemArtifactStore(str(args.artifacts))
    sampler, pruner = fms(args, store)
    study = optuna.load_study(study_name=args.study, storage=storage_of(args.storage, args.grace),
                              sampler=sampler, pruner=pruner)
    data = make_data()
    objective = make_objective(pretrained_hub(data), data, args.epochs, store, args.worker_name, args.crash_at)
    study.optimize(objective, n_trials=args.trials)


# --- the coordinator -------------------------------------------------------------------------


def worker_command(args, name: str, trials: int, crash_at: int | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--worker-name", name,
           "--study", args.study, "--storage", args.storage, "--artifacts", str(args.artifacts),
           "--trials", str(trials), "--epochs", str(args.epochs), "--startup", str(args.startup),
           "--grace", str(args.grace), "--seed", str(args.seed)]
    if crash_at is not None:
        cmd += ["--crash-at", str(crash_at)]
    return cmd + (["--smoke"] if args.smoke else [])


def summarize(study: optuna.Study, store) -> dict:
    lins = optuna_fms.lineages(study)
    by_number = {t.number: t for t in study.trials}
    worker = {t.number: t.user_attrs.get(WORKER_ATTR, "?") for t in study.trials}
    thaws = [t for lin in lins for t in lin.trials[1:]]
    cross = [t for t in thaws if (p := t.system_attrs.get("fms:parent")) is not None and worker[p] != worker[t.number]]
    # NOTE: a retry copies its failed trial's user attrs, so the killed trials are those not retried from one
    killed = [t for t in study.trials if CRASH_ATTR in t.user_attrs and t.system_attrs.get("failed_trial") is None]
    retries = {t.system_attrs["failed_trial"]: t for t in study.trials if t.system_attrs.get("failed_trial") is not None}
    best = optuna_fms.best_lineage(study, artifact_store=store)  # NOTE: it verifies the best checkpoint
    step, value = best.best(study.direction)
    segments = ", ".join(f"trial {t.number} [{worker[t.number]}] steps "
                         + (f"{min(t.intermediate_values)}-{max(t.intermediate_values)}" if t.intermediate_values else "-")
                         for t in best.trials)
    lines = [
        "",
        "=== Summary ===",
        f"Best lineage:   {best.id} ({best.state}): val accuracy {value:.4f} at epoch {step}",
        f"  params:       {', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in best.params.items())}",
        f"  segments:     {segments}",
        f"Lineages:       {len(lins)}, by state {dict(sorted(Counter(lin.state for lin in lins).items()))}",
        f"Trials:         {len(study.trials)}, by worker {dict(sorted(Counter(worker.values()).items()))}",
        f"Thaws:          {len(thaws)}, {len(cross)} of them in another worker than the one that froze the run",
    ]
    for dead in killed:
        lin = next(lin for lin in lins if any(t.number == dead.number for t in lin.trials))
        retry = retries.get(dead.number)
        lines.append(f"Crash:          trial {dead.number} [{worker[dead.number]}] {dead.user_attrs[CRASH_ATTR]} -> "
                     f"{by_number[dead.number].state.name} (stale heartbeat)")
        if retry is not None:
            lines.append(f"  recovered:    trial {retry.number} [{worker[retry.number]}] resumed lineage {lin.id} at "
                         f"step {retry.user_attrs.get('fms:start_step')}; it ended {retry.state.name}: "
                         f"\"{retry.user_attrs.get('fms:decision')}\"")
        lines.append(f"  lineage {lin.id}:   state {lin.state}, crashes {lin.crashes}, lost steps {lin.lost_steps}")
    print("\n".join(lines), flush=True)
    return {"lineages": lins, "best": best, "thaws": len(thaws), "cross_worker_thaws": len(cross),
            "killed": [t.number for t in killed], "retries": {k: v.number for k, v in retries.items()},
            "workers": dict(Counter(worker.values()))}


def run_coordinator(args) -> dict:
    t0 = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    args.study = args.study or f"many-workers-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    args.artifacts = (args.artifacts or args.out / f"{args.study}-artifacts").resolve()
    args.artifacts.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(args.artifacts))
    storage = storage_of(args.storage, args.grace)
    study = optuna.create_study(study_name=args.study, storage=storage, direction="maximize")
    data = make_data()
    for name, weights in pretrained_hub(data).items():
        model = make_model(name)
        model.load_state_dict(weights)
        optuna_fms.register_pretrained(study, "model", name, model, artifact_store=store)
    print(f"Study {args.study} on {args.storage}\nCheckpoints in {args.artifacts}\n"
          f"Each worker runs:\n  {' '.join(worker_command(args, 'NAME', args.trials))}\n", flush=True)

    procs = {}
    for i in range(args.workers):
        name = f"w{i}"
        crash_at = args.crash_at if i == 0 else None  # NOTE: worker w0 is the one that dies
        procs[name] = subprocess.Popen(worker_command(args, name, args.trials, crash_at))
    codes = {name: proc.wait() for name, proc in procs.items()}
    print(f"Workers ended: {codes} (w0 killed itself: {-signal.SIGKILL} is SIGKILL)", flush=True)
    failed = {n: c for n, c in codes.items() if c != 0 and not (n == "w0" and c == -signal.SIGKILL)}
    if failed:
        raise SystemExit(f"workers failed: {failed}")

    # The replacement machine: a new worker, started once the dead trial's heartbeat is stale,
    # picks up whatever is left (the retry, if the others have not run it already).
    time.sleep(args.grace + 1)
    subprocess.run(worker_command(args, "replacement", 1 if args.smoke else 2), check=True)

    study = optuna.load_study(study_name=args.study, storage=storage)
    summary = summarize(study, store)
    dashboard = optuna_fms.dashboard.command(args.storage, args.artifacts)
    print(f"Wall time:      {time.perf_counter() - t0:.1f} s\n\nInspect it:\n  {dashboard}\n", flush=True)
    return {**summary, "study": study, "study_name": args.study, "dashboard": dashboard}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=POSTGRES, help="an RDB URL every worker reaches")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="where the artifact folder goes")
    parser.add_argument("--artifacts", type=Path, default=None, help="the shared artifact folder")
    parser.add_argument("--study", default=None, help="study name (default: a new unique one)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=20, help="trials per worker")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--startup", type=int, default=8, help="random start-up configurations")
    parser.add_argument("--crash-at", type=int, default=None, help="w0 kills itself in its N-th trial (default 3)")
    parser.add_argument("--grace", type=int, default=5, help="seconds until a silent trial's heartbeat is stale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="2 workers x 5 trials, runs of 4 epochs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-name", default="w?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return None
    args.crash_at = 3 if args.crash_at is None else args.crash_at
    if args.smoke:
        args.workers, args.trials, args.epochs, args.startup, args.crash_at, args.grace = 2, 5, 4, 3, 2, 3
    return run_coordinator(args)


if __name__ == "__main__":
    main(sys.argv[1:])
