"""The chaos test: worker processes on PostgreSQL, SIGKILLed at random moments and restarted.

Four workers share one study and one artifact folder. The objective trains a tiny model, saves
a checkpoint with ``optuna_fms.save_checkpoint`` before each report and resumes with
``load_checkpoint``. A supervisor kills a random busy worker (SIGKILL) at random moments and
starts a new one in its place, until the study has run ``--budget`` steps. Dead segments are
found by Optuna's heartbeat (``--mode heartbeat``: ``RDBStorage(heartbeat_interval=...)`` with
``RetryHeartbeatStaleTrialCallback``) or by our lease (``--mode lease``:
``RecoverySettings(lease_seconds=...)``). Afterwards the storage and the workers' step logs are
read back:

- double thaws: two segments of one lineage that trained at the same time (must be 0);
- lineages lost: a lineage that saved a checkpoint but can neither finish nor be resumed (0);
- steps with a missing checkpoint: a step of a stitched curve whose checkpoint record is absent
  or whose file is missing or corrupt (0);
- crashed lineages resumed: lineages with a killed segment that a later segment continued
  (when the budget is spent, the dead segments are found as the next worker would find them,
  and one more worker runs the retries that wait, so a kill near the end is resumed too);
- compute spent (steps trained, the killed ones' included) against useful compute (the steps
  of the stitched curves).

Writes ``<out>/chaos-<mode>.json``.

    python -m bench.chaos [--mode heartbeat lease] [--budget 300] [--workers 4] [--seed 0]
                          [--storage postgresql+psycopg2://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any
import uuid

RESULTS = Path(__file__).resolve().parent / "results" / "chaos"
POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
MAX_STEPS = 6
STEP_SECONDS = 0.15  # the "training" of one step, so that kills land mid-run
# NOTE: longer than the slowest step plus its decision, as README asks: on 2 shared cores under a
# load of 10, 6 s was not, and one worker outlived its lease (a zombie, stopped at its next report
# as "superseded", but it trained beside the thaw that resumed its lineage for one step).
LEASE_SECONDS = 20.0
HEARTBEAT, GRACE = 1, 4


# --- the worker ----------------------------------------------------------------------------------


def _storage(url: str, mode: str) -> Any:
    import optuna

    if mode == "heartbeat":
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT, grace_period=GRACE,
            failed_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=20),
        )
    return optuna.storages.RDBStorage(url)


def _make_study(url: str, mode: str, name: str, folder: str, seed: int) -> Any:
    import optuna

    import optuna_fms
    from optuna_fms.engine.surrogate import FitSettings

    sampler = optuna_fms.FMSSampler(
        seed=seed, n_startup_trials=4, pool_size=32, weights=None,
        fit_settings=FitSettings(full_steps=30, refine_steps=5),
        artifact_store=optuna.artifacts.FileSystemArtifactStore(folder),
        recovery=optuna_fms.RecoverySettings(lease_seconds=LEASE_SECONDS, max_retries=50),
    )
    pruner = optuna_fms.FMSPruner(max_steps=MAX_STEPS, min_segment_steps=2)
    return optuna.create_study(storage=_storage(url, mode), study_name=name, load_if_exists=True,
                               direction="minimize", sampler=sampler, pruner=pruner)


def _steps_run(study: Any) -> int:
    return sum(len(t.intermediate_values) for t in study.get_trials(deepcopy=False))


def worker(url: str, mode: str, name: str, folder: str, budget: int, log: str, seed: int,
           drain: bool = False) -> None:
    import optuna
    import torch

    import optuna_fms

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.set_num_threads(1)
    study = _make_study(url, mode, name, folder, seed)
    data = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=data)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(64, generator=data)
    events = open(log, "a", buffering=1)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-3, 0.3, log=True)
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        ckpt = optuna_fms.load_checkpoint(trial, model, optimizer=opt, restore_rng=False)
        start = 0 if ckpt is None else ckpt.step + 1
        loss = float("inf")
        for step in range(start, MAX_STEPS):
            for _ in range(5):
                opt.zero_grad()
                loss_t = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
                loss_t.backward()
                opt.step()
            time.sleep(STEP_SECONDS)
            loss = float(loss_t.detach())
            events.write(json.dumps({"trial": trial.number, "step": step, "t": time.time()}) + "\n")
            optuna_fms.save_checkpoint(trial, model, step, optimizer=opt, save_rng=False)
            trial.report(loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
            if step < MAX_STEPS - 1:  # the segment goes on: a kill from here on has a checkpoint behind it
                events.write(json.dumps({"trial": trial.number, "step": step, "t": time.time(), "continues": True}) + "\n")
        return loss

    def enough(study: optuna.Study, _: Any) -> None:
        if _steps_run(study) >= budget:
            study.stop()

    if drain:  # only the retries that wait (a restarted worker after the budget is spent)
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if waiting:
            study.optimize(objective, n_trials=len(waiting))
    elif _steps_run(study) < budget:
        study.optimize(objective, n_trials=10_000, callbacks=[enough])


# --- the supervisor ------------------------------------------------------------------------------


def _start(args: argparse.Namespace, mode: str, name: str, folder: str, logs: str, i: int,
           drain: bool = False) -> subprocess.Popen:
    log = os.path.join(logs, f"worker-{i}.jsonl")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "bench.chaos", "--worker", "--storage", args.storage, "--mode", mode,
         "--study", name, "--artifacts", folder, "--budget", str(args.budget), "--log", log,
         "--seed", str(args.seed + i), *(["--drain"] if drain else [])],
        cwd=Path(__file__).resolve().parent.parent, env=env,
    )


def _mid_run(log: str, since: float) -> bool:
    """Is this worker (started at ``since``) inside a segment that has saved a checkpoint: its
    newest line says the segment goes on past a checkpointed step?

    NOTE: "two recent steps of one trial" was not enough: a worker just past its segment's last
    step is already deciding its next trial, which has no checkpoint yet.
    """
    try:
        with open(log) as f:
            lines = f.readlines()
    except OSError:
        return False
    if not lines:
        return False
    last = json.loads(lines[-1])
    return last["t"] > since and last.get("continues", False) and time.time() - last["t"] < 2.0


def run(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rng = random.Random(args.seed)
    name = f"chaos-{mode}-{uuid.uuid4().hex[:10]}"
    tmp = tempfile.mkdtemp(prefix="fms-chaos-")
    folder, logs = os.path.join(tmp, "artifacts"), os.path.join(tmp, "logs")
    os.makedirs(folder), os.makedirs(logs)
    _make_study(args.storage, mode, name, folder, args.seed)  # created once, before the workers race
    t0 = time.time()
    workers = {i: _start(args, mode, name, folder, logs, i) for i in range(args.workers)}
    started_at = {i: time.time() for i in workers}
    next_index, kills = args.workers, 0
    study = optuna.load_study(study_name=name, storage=_storage(args.storage, mode))
    deadline = t0 + args.time_limit
    while time.time() < deadline:
        time.sleep(rng.uniform(*args.kill_interval))
        running = {i: p for i, p in workers.items() if p.poll() is None}
        if not running:
            break
        if kills >= args.kills or _steps_run(study) >= 0.8 * args.budget:
            continue  # NOTE: no more kills: let the workers finish the budget
        log_of = {i: os.path.join(logs, f"worker-{i}.jsonl") for i in running}
        # NOTE: a kill before a segment's first checkpoint leaves nothing to resume (that
        # lineage fails, by design); the kills that test recovery land after one.
        busy = [i for i in running if _mid_run(log_of[i], started_at[i])]
        if not busy:
            continue
        victim = rng.choice(busy)
        os.kill(workers[victim].pid, signal.SIGKILL)
        workers[victim].wait()
        kills += 1
        del workers[victim]
        workers[next_index] = _start(args, mode, name, folder, logs, next_index)
        started_at[next_index] = time.time()
        next_index += 1
    for p in workers.values():
        if p.poll() is None:
            p.kill()  # NOTE: over the time limit: these count as kills, too
            kills += 1
        p.wait()
    if mode == "heartbeat" and time.time() < deadline:  # NOTE: a lease frees its lineage for thaws instead
        _find_dead_segments(study, mode)
        drain = _start(args, mode, name, folder, logs, next_index, drain=True)
        next_index += 1
        try:
            drain.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            drain.kill()
            drain.wait()
            kills += 1
    _find_dead_segments(study, mode)
    wall = time.time() - t0
    return {"mode": mode, "study": name, "kills": kills, "workers_started": next_index, "wall_seconds": wall,
            **account(study, folder, logs, mode)}


def _find_dead_segments(study: Any, mode: str) -> None:
    """Wait until every dead segment is detectable, and detect it as the next worker would."""
    import optuna

    if mode == "heartbeat":
        time.sleep(GRACE + 1)
        optuna.storages.fail_stale_trials(study)  # what the next worker does first: retries wait
    else:
        time.sleep(LEASE_SECONDS + 1)  # every dead segment's lease has expired


def account(study: Any, folder: str, logs: str, mode: str) -> dict[str, Any]:
    """Read the storage and the step logs back: the figures of the chaos test."""
    import optuna

    import optuna_fms
    from optuna_fms import lineage as lin_mod
    from optuna_fms.checkpoints import verify_checkpoint

    store = optuna.artifacts.FileSystemArtifactStore(folder)
    recovery = optuna_fms.RecoverySettings(lease_seconds=LEASE_SECONDS, max_retries=50)
    view = lin_mod.study_view(study, recovery)
    lineages = lin_mod.build_lineages(study.get_trials(deepcopy=False), view)
    events: list[dict[str, Any]] = []
    for log in Path(logs).glob("*.jsonl"):
        events += [e for e in map(json.loads, filter(str.strip, log.read_text().splitlines()))
                   if not e.get("continues")]  # only the steps trained
    active: dict[int, tuple[float, float]] = {}  # trial -> (first, last) time it trained a step
    for e in events:
        first, last = active.get(e["trial"], (e["t"], e["t"]))
        active[e["trial"]] = (min(first, e["t"]), max(last, e["t"]))

    double = 0
    for lin in lineages:
        spans = sorted(active[t.number] for t in lin.trials if t.number in active)
        double += sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1])
    lost = [lin.id for lin in lineages if lin.checkpoints and (
        lin.state == "failed" or (lin.state == "running" and lin.tail.state.name == "RUNNING"))]
    no_checkpoint = [lin.id for lin in lineages if not lin.checkpoints and lin.state == "failed"]
    missing = 0
    for lin in lineages:
        by_step = {c.step: c for c in lin.checkpoints}
        for step in lin.curve:
            record = by_step.get(step)
            if record is None or verify_checkpoint(study, record, artifact_store=store) is not None:
                missing += 1
    superseded = sum("superseded" in str(t.user_attrs.get(lin_mod.USER_DECISION, "")) for t in study.get_trials())
    resumed = [lin.id for lin in lineages if any(view.crashed(t) for t in lin.trials[:-1])]
    useful = sum(len(lin.curve) for lin in lineages)
    return {
        "double_thaws": double, "lineages_lost": len(lost), "lost_ids": lost,
        "steps_with_missing_checkpoint": missing, "crashed_lineages_resumed": len(resumed),
        "crashed_before_first_checkpoint": len(no_checkpoint), "superseded_zombies": superseded,
        "lineages": len(lineages), "states": {s: sum(lin.state == s for lin in lineages)
                                              for s in sorted({lin.state for lin in lineages})},
        "crashed_segments": sum(lin.crashes for lin in lineages),
        "steps_lost_to_crashes": sum(lin.lost_steps for lin in lineages),
        "compute_spent_steps": len(events), "useful_compute_steps": useful,
        "useful_share": useful / len(events) if events else None,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("OPTUNA_FMS_POSTGRES", POSTGRES))
    parser.add_argument("--mode", nargs="+", default=["heartbeat", "lease"], choices=["heartbeat", "lease"])
    parser.add_argument("--budget", type=int, default=300, help="steps the study runs in all")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--kills", type=int, default=12, help="SIGKILLs at most")
    parser.add_argument("--kill-interval", type=float, nargs=2, default=(0.5, 2.0), help="seconds between kills")
    parser.add_argument("--time-limit", type=float, default=900.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--study", help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    parser.add_argument("--drain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.storage, args.mode[0], args.study, args.artifacts, args.budget, args.log, args.seed,
               drain=args.drain)
        return []
    results = []
    for mode in args.mode:
        result = run(args, mode)
        print(json.dumps(result), flush=True)
        results.append(result)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"chaos-{mode}.json").write_text(json.dumps(result, indent=2))
    return results


if __name__ == "__main__":
    main()
