"""Syne Tune 0.14.2's DyHPO replayed on a hub: the outside reference implementation of issue 4.

Runs in its own virtual environment (Syne Tune pins numpy < 1.27 and scipy < 1.15.3, which the
project's environment does not), from the repository root::

    python3 -m venv .venv-synetune
    .venv-synetune/bin/pip install torch==2.13.0 \
        "syne-tune[gpsearchers,bore,botorch,kde,blackbox-repository]==0.14.2" huggingface_hub \
        "numpy<1.27" "scikit-learn<1.6"
    .venv-synetune/bin/python -m bench.synetune --hub digits --seeds 0 1 2 --budget 160

One worker, driven in process the way Syne Tune's ``Tuner`` drives a scheduler: ``suggest`` starts a
new configuration or resumes a paused trial from where it stopped (checkpointing), each epoch's
validation accuracy goes to ``on_trial_result``, whose PAUSE/STOP ends the segment; a trial that
reaches the last epoch gets ``on_trial_complete``. With one worker this is exactly what the
simulator backend would do, and the hub's epochs are charged through the same
:class:`bench.ledger.Ledger` as every Optuna method (budget = epochs; the table's epoch seconds plus
the measured scheduler time give the seconds axis). DyHPO as Syne Tune ships it (``DyHPO`` from
``syne_tune.optimizer.legacy_baselines``, its GP surrogate and its default share of successive-halving
promotions), with rung levels 1, 2, 3, ... (one epoch per decision, as in the DyHPO paper and as Syne
Tune recommends) and the run length as ``max_resource_attr``. The search
space is the hub's grid, so every suggestion is a real row: every factor a ``choice``, as the Optuna
methods see it (``--encoding categorical``, method ``synetune-dyhpo``), or learning rate and weight
decay as ``logordinal`` and batch size and momentum as ``ordinal`` (``--encoding ordinal``, method
``synetune-dyhpo-ordinal``), which also tells it the order of the levels.
Writes ``bench/results/<hub>/runs/synetune-dyhpo[-ordinal]-s<seed>.json``; then ``python -m bench.report <hub>``
(in the project's environment) includes it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from pathlib import Path
import sys
import time
from typing import Any, Callable

from bench.hubs.recipe import TABLE_DIR, HubTable
from bench.ledger import Ledger, code_version, machine

# NOTE: two encodings of the grid. "categorical" gives Syne Tune what every Optuna method sees (the
# runner suggests each factor as a categorical); "ordinal" also tells it the order of the numeric levels.
METHODS = {
    "categorical": ("synetune-dyhpo", "Syne Tune 0.14.2 DyHPO (legacy_baselines.DyHPO, rung levels 1, 2, 3, ..., "
                                      "otherwise its defaults), every factor a choice as for the Optuna methods"),
    "ordinal": ("synetune-dyhpo-ordinal", "as synetune-dyhpo, but learning rate and weight decay as logordinal, "
                                          "batch size and momentum as ordinal: it knows the levels' order"),
}
RESULTS = Path(__file__).resolve().parent / "results"
METRIC, RESOURCE, MAX_EPOCHS = "val_acc", "epoch", "epochs"


def config_space(hub: HubTable, encoding: str) -> dict[str, Any]:
    from syne_tune.config_space import choice, logordinal, ordinal

    kinds = {"lr": logordinal, "weight_decay": logordinal, "batch_size": ordinal, "momentum": ordinal}
    if encoding == "categorical":
        kinds = {}
    return {name: kinds.get(name, choice)(list(levels)) for name, levels in hub.grid.factors}


def _row(hub: HubTable, config: dict[str, Any]) -> int:
    """The hub row of a suggested configuration (values matched to the grid's own levels)."""
    params = {}
    for name, levels in hub.grid.factors:
        value = config[name]
        match = [lv for lv in levels if lv == value or (isinstance(lv, float) and abs(lv - value) <= 1e-12 * abs(lv))]
        if len(match) != 1:
            raise ValueError(f"Syne Tune suggested {name}={value!r}, not one of the grid's levels {levels}")
        params[name] = match[0]
    return hub.id_of(params)


def replay(hub: HubTable, seed: int, budget: int, encoding: str = "categorical") -> dict[str, Any]:
    """One study of Syne Tune's DyHPO on ``hub`` until ``budget`` epochs are spent."""
    from syne_tune.backend.trial_status import Trial
    from syne_tune.optimizer.legacy_baselines import DyHPO

    # NOTE: rung levels 1, 2, 3, ... (grace period = rung increment = 1), as the DyHPO paper steps and
    # as Syne Tune itself recommends (its default increment of 2 logs "not recommended").
    scheduler = DyHPO({**config_space(hub, encoding), MAX_EPOCHS: hub.n_epochs}, metric=METRIC, mode="max",
                      resource_attr=RESOURCE, max_resource_attr=MAX_EPOCHS, grace_period=1, rung_increment=1,
                      random_seed=seed)

    def new_trial(trial_id: int, config: dict[str, Any]) -> Any:
        return Trial(trial_id=trial_id, config=config, creation_time=datetime.datetime.now())

    rec = drive(hub, scheduler, new_trial, budget).record(*METHODS[encoding], seed)
    rec["machine"] |= {"syne_tune": _version()}
    return rec


class Drive:
    """A Syne Tune scheduler driven over a hub by one in-process worker, epoch by epoch."""

    def __init__(self, hub: HubTable, budget: int) -> None:
        self.hub, self.n = hub, hub.n_epochs
        self.ledger = Ledger(hub, budget)
        self.suggest_s: list[float] = []
        self.result_s: list[float] = []
        self.trials: dict[int, Any] = {}  # trial id -> Syne Tune trial
        self.rows: dict[int, int] = {}  # trial id -> hub row
        self.next_step: dict[int, int] = {}  # trial id -> the step it resumes at
        self.segments = self.resumes = 0
        self.t_start = time.perf_counter()

    def decision_s(self) -> float:
        return sum(self.suggest_s) + sum(self.result_s)

    def record(self, method: str, note: str, seed: int) -> dict[str, Any]:
        s, r = self.suggest_s, self.result_s  # one sampler decision: a suggest; one pruner decision: a result
        rec = self.ledger.record(method, note, seed)
        rec["final"] |= {"n_trials": self.segments, "n_lineages": len(self.trials), "n_thaws": self.resumes,
                         "n_full_runs": sum(k >= self.n for k in self.next_step.values())}
        return rec | {
            "overhead": self.ledger.overhead(s, r, sum(s), sum(r)),
            "tau": None,
            "wall_s": round(time.perf_counter() - self.t_start, 3),
            "machine": {**machine(), **code_version()},
        }


def drive(hub: HubTable, scheduler: Any, new_trial: Callable[[int, dict[str, Any]], Any], budget: int) -> Drive:
    """Run ``scheduler`` (Syne Tune's legacy scheduler API: ``suggest(trial_id)``, ``on_trial_add``,
    ``on_trial_result`` -> "CONTINUE" / "PAUSE" / "STOP", ``on_trial_complete``) until ``budget``
    epochs are spent or it suggests nothing. A resumed trial continues at the step after its last."""
    d = Drive(hub, budget)
    led, n = d.ledger, d.n
    while not led.exhausted:
        t0 = time.perf_counter()
        suggestion = scheduler.suggest(len(d.trials))
        if suggestion is not None and suggestion.spawn_new_trial_id:
            trial = new_trial(len(d.trials), dict(suggestion.config))
            scheduler.on_trial_add(trial)
        d.suggest_s.append(time.perf_counter() - t0)
        if suggestion is None:
            break  # the grid is exhausted
        if suggestion.spawn_new_trial_id:
            d.trials[trial.trial_id], d.next_step[trial.trial_id] = trial, 0
            d.rows[trial.trial_id] = _row(hub, trial.config)
        else:
            trial = d.trials[suggestion.checkpoint_trial_id]
            if d.next_step[trial.trial_id] >= n:
                raise RuntimeError(f"the scheduler resumed trial {trial.trial_id}, which has finished")
            if suggestion.config is not None:
                trial.config = dict(suggestion.config)
            d.resumes += 1
        d.segments += 1
        tid = trial.trial_id
        result: dict[str, Any] = {}
        while d.next_step[tid] < n and not led.exhausted:
            step = d.next_step[tid]
            value = led.charge(d.segments - 1, tid, d.rows[tid], step, d.decision_s())
            d.next_step[tid] = step + 1
            result = {METRIC: value, RESOURCE: step + 1}
            t0 = time.perf_counter()
            decision = scheduler.on_trial_result(trial, result)
            d.result_s.append(time.perf_counter() - t0)
            if decision != "CONTINUE":
                break
        if d.next_step[tid] >= n:
            t0 = time.perf_counter()
            scheduler.on_trial_complete(trial, result)
            d.result_s[-1] += time.perf_counter() - t0
    return d


def _version() -> str:
    from importlib.metadata import version

    return version("syne-tune")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hub", default="digits", help="hub name (bench/hubs/tables/<hub>.json) or table path")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budget", type=int, default=None, help="epochs per run (default: 10 full runs)")
    ap.add_argument("--out", type=Path, help="results folder (default bench/results/<hub>)")
    ap.add_argument("--encoding", choices=sorted(METHODS), default="categorical",
                    help="how Syne Tune sees the grid's numeric factors (method synetune-dyhpo[-ordinal])")
    ap.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    args = ap.parse_args(argv)
    logging.getLogger("syne_tune").setLevel(logging.WARNING)
    path = Path(args.hub)
    hub = HubTable.load(path if path.suffix else TABLE_DIR / f"{args.hub}.json")
    budget = args.budget or 10 * hub.n_epochs
    runs = (args.out or RESULTS / hub.name) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        method = METHODS[args.encoding][0]
        out = runs / f"{method}-s{seed}.json"
        if out.is_file() and not args.force:
            old = json.loads(out.read_text())
            if old.get("budget") == budget and old.get("hub_fingerprint") == hub.data.get("fingerprint"):
                continue
        rec = replay(hub, seed, budget, args.encoding)
        out.write_text(json.dumps(rec, separators=(",", ":")))
        f = rec["final"]
        print(f"{hub.name} {method} seed {seed}: regret {f['regret']:.4f}, {f['n_lineages']} configurations, "
              f"{f['n_thaws']} resumes, decision {rec['overhead']['sampler_total_s'] + rec['overhead']['pruner_total_s']:.1f} s, "
              f"wall {rec['wall_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
