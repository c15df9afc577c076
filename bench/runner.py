"""Replay a benchmark hub through the real Optuna API for one method and seed.

The search space is the hub's grid, every factor a ``suggest_categorical``, so any sampler can only
pick real rows. The objective looks each (configuration, epoch) up in the table and reports its
validation accuracy at step ``epoch - 1`` (steps ``0 .. n_epochs - 1``; FMS budgets are ``step + 1``).
For FMS methods it first saves the hub's own checkpoint of that epoch with
:func:`optuna_fms.save_checkpoint` (with the architecture when the surrogate reads weights, and the
zoo's pretrained weights registered for ``"model"``), so FMS sees exactly what it would see live.
A thaw continues its lineage at ``fms:start_step``: no epoch is ever charged twice in a lineage.
With ``placeholder_checkpoints`` (only for methods that read no weights, whose decisions do not depend
on checkpoint bytes: ``tests/test_weights_study.py``) a tiny tensor stands in for the hub's checkpoint, so
those methods replay a hub whose checkpoint cache was never built. With ``build_missing`` the
checkpoints a replay needs are built when first asked for (:mod:`bench.hubs.on_demand`).

Budget: epochs charged in total. The study stops as soon as the budget is spent (mid-trial too:
that trial is pruned). The table's ``epoch_s`` give a second axis in seconds, and the sampler's and
pruner's calls are timed (decision overhead). Test accuracy is only recorded, never used.

    python -m bench.runner --hub digits --method fms-gmn --seed 0 --budget 160 --out run.json
"""

from __future__ import annotations

import argparse
from collections import defaultdict
import functools
import json
import math
from pathlib import Path
import sys
import time
from typing import Any, Callable

import numpy as np
import optuna

import optuna_fms
from bench import methods as methods_mod
from bench.ledger import Ledger, code_version, machine
from bench.hubs.recipe import TABLE_DIR, HubTable, kendall_tau

START_STEP = "fms:start_step"  # optuna_fms.lineage.USER_START_STEP
LINEAGE = "fms:lineage"  # optuna_fms.lineage.USER_LINEAGE


def load_hub(name_or_table: str | Path, cache_dir: str | Path | None = None) -> HubTable:
    """A hub by name (``bench/hubs/tables/<name>.json``, cache ``bench/cache/<name>``) or table path."""
    path = Path(name_or_table)
    if not path.suffix:
        path = TABLE_DIR / f"{name_or_table}.json"
    if cache_dir is None and (path.parent / "configs").is_dir():
        cache_dir = path.parent  # a micro hub keeps its table in its cache
    return HubTable.load(path, cache_dir)


# --------------------------------------------------------------------------------------------------
# timing of sampler and pruner calls


class CallTimer:
    """Wraps methods of one object (instance attributes, so ``isinstance`` checks still hold) and
    adds their wall time per trial number. Nested calls (a method calling another wrapped one) are
    counted once."""

    def __init__(self) -> None:
        self.per_trial: dict[int, float] = defaultdict(float)
        self.calls: dict[int, int] = defaultdict(int)
        self.total = 0.0
        self._depth = 0

    def wrap(self, obj: Any, names: tuple[str, ...]) -> None:
        for name in names:
            setattr(obj, name, self._timed(getattr(obj, name)))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(study: Any, trial: Any, *args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(study, trial, *args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(study, trial, *args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self._depth -= 1
                self.per_trial[trial.number] += dt
                self.calls[trial.number] += 1
                self.total += dt

        return timed


SAMPLER_CALLS = ("before_trial", "infer_relative_search_space", "sample_relative", "sample_independent",
                 "after_trial")
PRUNER_CALLS = ("prune",)


# --------------------------------------------------------------------------------------------------
# the replay


class Replay:
    """One study replaying ``hub`` for ``method`` and ``seed`` until ``budget`` epochs are spent."""

    def __init__(self, hub: HubTable, method: str, seed: int, budget: int,
                 placeholder_checkpoints: bool = False, build_missing: bool = False) -> None:
        self.hub, self.method, self.seed, self.budget = hub, methods_mod.get(method), seed, budget
        if placeholder_checkpoints and self.method.weights is not None:
            raise ValueError(f"{method} reads weights: it needs the hub's checkpoints, not placeholders")
        self.placeholder_checkpoints = placeholder_checkpoints
        self.on_demand = None
        if build_missing and self.method.fms and not placeholder_checkpoints:
            from bench.hubs.on_demand import OnDemandCache

            self.on_demand = OnDemandCache(hub)
        self.ledger = Ledger(hub, budget)
        self.n = hub.n_epochs
        self.trials: list[dict[str, Any]] = []
        self._arch: dict[int, dict[str, Any]] = {}

    # --- hub access ------------------------------------------------------------------------------

    def architecture(self, zoo_id: int) -> dict[str, Any]:
        """``describe_architecture`` of the zoo member's model, once per zoo member."""
        if zoo_id not in self._arch:
            from bench.hubs.models import build_model

            self._arch[zoo_id] = optuna_fms.describe_architecture(build_model(self.hub.zoo[zoo_id]["arch"]))
        return self._arch[zoo_id]

    def state_dict(self, cid: int, epoch: int) -> dict[str, Any]:
        if self.placeholder_checkpoints:
            import torch

            return {"placeholder": torch.tensor([cid, epoch], dtype=torch.int64)}
        from safetensors.torch import load_file

        if self.on_demand is not None:
            self.on_demand.ensure_config(cid)
        return load_file(str(self.hub.checkpoint_path(cid, epoch)))

    # --- the study -------------------------------------------------------------------------------

    def make_study(self) -> optuna.Study:
        sampler, pruner = self.method.factory(self.seed, self.hub)
        self.sampler_timer, self.pruner_timer = CallTimer(), CallTimer()
        self.sampler_timer.wrap(sampler, SAMPLER_CALLS)
        self.pruner_timer.wrap(pruner, PRUNER_CALLS)
        study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner,
                                    study_name=f"{self.hub.name}-{self.method.name}-{self.seed}")
        if self.method.weights is not None:
            if self.on_demand is not None:
                self.on_demand.ensure_zoo()
            for k in self.hub.grid.levels["model"]:
                optuna_fms.register_pretrained(study, "model", k, self.state_dict_zoo(k),
                                               architecture=self.architecture(k))
        return study

    def state_dict_zoo(self, k: int) -> dict[str, Any]:
        from safetensors.torch import load_file

        return load_file(str(self.hub.zoo_checkpoint_path(k)))

    def decision_s(self) -> float:
        return self.sampler_timer.total + self.pruner_timer.total

    def objective(self, trial: optuna.Trial) -> float:
        params = {name: trial.suggest_categorical(name, list(levels)) for name, levels in self.hub.grid.factors}
        cid = self.hub.id_of(params)
        start = int(trial.user_attrs.get(START_STEP, 0))
        lineage = int(trial.user_attrs.get(LINEAGE, trial.number))
        trial.set_user_attr("bench:config", cid)
        value = math.nan
        for step in range(start, self.n):
            if self.ledger.exhausted:
                trial.set_user_attr("bench:stopped", "budget spent")
                trial.study.stop()
                raise optuna.TrialPruned("epoch budget spent")
            value = self.ledger.charge(trial.number, lineage, cid, step, self.decision_s())
            if self.method.fms:
                # NOTE: save before report: the pruner may freeze the run at this very step.
                arch = self.architecture(params["model"]) if self.method.weights is not None else None
                optuna_fms.save_checkpoint(trial, self.state_dict(cid, step + 1), step=step, architecture=arch,
                                           save_rng=False)
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        led = self.ledger
        steps = led.by_trial.get(trial.number, [])
        self.trials.append({
            "number": trial.number,
            "state": trial.state.name,
            "config": trial.user_attrs.get("bench:config"),
            "lineage": int(trial.user_attrs.get(LINEAGE, trial.number)),
            "thaw": "fms:parent" in trial.system_attrs,
            "start_step": int(trial.user_attrs.get(START_STEP, 0)),
            "steps": steps,
            "reported": sorted(int(s) for s in trial.intermediate_values),
            "epochs_charged": len(steps),
            "cum_epochs": led.spent,
            "cum_train_s": round(led.train_s, 4),
            "best_val": led.best_val if led.best_val > -math.inf else None,
            "inc_test": led.inc_test,
            "sampler_s": round(self.sampler_timer.per_trial.get(trial.number, 0.0), 6),
            "pruner_s": round(self.pruner_timer.per_trial.get(trial.number, 0.0), 6),
            "pruner_calls": self.pruner_timer.calls.get(trial.number, 0),
            "decision": trial.user_attrs.get("fms:decision"),
        })
        if led.exhausted:
            study.stop()

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            if self.on_demand is not None:
                self.on_demand.close()

    def _run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        study = self.make_study()
        # NOTE: n_trials is only a safety net: the budget stops the study (a trial charges >= 1 epoch
        # or is the one that finds the budget spent).
        study.optimize(self.objective, n_trials=self.budget + 1, callbacks=[self.after_trial],
                       gc_after_trial=False)
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        tau = surrogate_tau(study, self.hub, self.seed) if self.method.fms else None
        tau_s = time.perf_counter() - t1
        self.study = study
        sampler_calls = [v for v in self.sampler_timer.per_trial.values()]
        pruner_calls = [t["pruner_s"] / t["pruner_calls"] for t in self.trials if t["pruner_calls"]]
        lins = {lin.id: lin for lin in optuna_fms.lineages(study)}
        rec = self.ledger.record(self.method.name, self.method.note, self.seed)
        rec["final"] |= {
            "n_trials": len(self.trials),
            "n_lineages": len({t["lineage"] for t in self.trials if t["epochs_charged"]}),
            "n_thaws": sum(t["thaw"] for t in self.trials),
            "n_full_runs": sum(len(v.curve) >= self.n for v in lins.values()),
        }
        return rec | {
            "overhead": self.ledger.overhead(sampler_calls, pruner_calls, self.sampler_timer.total,
                                             self.pruner_timer.total),
            "tau": tau,
            "tau_probe_s": round(tau_s, 3),
            "wall_s": round(wall, 3),
            "checkpoints": "placeholder" if self.placeholder_checkpoints else "hub",
            "built_on_demand": len(self.on_demand.built) if self.on_demand is not None else 0,
            "trials": self.trials,
            "machine": {**machine(), "optuna": optuna.__version__, "torch_threads": _torch_threads(),
                        **code_version()},
        }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------------
# how well the FMS surrogate ranks final values


def surrogate_tau(study: optuna.Study, hub: HubTable, seed: int, n_unseen: int = 200) -> dict[str, Any] | None:
    """Kendall tau-b between the surrogate's forecast of each configuration's final validation accuracy
    and the hub's true final value, on aligned vectors (same configs, same order).

    * ``partial``: lineages of the study not run to the end, forecast from the epochs they ran
      (their final value was never observed); ``partial_last_value`` ranks the same set by the last
      observed value (the naive baseline), ``partial_early`` restricts to lineages with <= 25 % of
      the epochs.
    * ``unseen``: up to ``n_unseen`` grid configurations never started, forecast from no epochs
      (configuration and pretrained weights only).
    """
    from optuna_fms import lineage as lin_mod
    from optuna_fms._bridge import engine_space, make_history, optuna_search_space
    from optuna_fms.engine.history import Candidate

    sampler = study.sampler
    policy = getattr(sampler, "policy", None)
    if policy is None:
        return None
    n = hub.n_epochs
    final = np.array([hub.curve(c)["val_acc"][-1] for c in range(len(hub))], dtype=float)
    lineages = lin_mod.build_lineages(study.get_trials(deepcopy=False))
    space = engine_space(optuna_search_space(study), policy.settings.ordered_choices)
    history = make_history(study, lineages, space, max_steps=n, graph_source=sampler.graph_source)
    partial = [r for r in history.lineages if r.steps and r.next_step < n]
    started = {hub.id_of(dict(lin.params)) for lin in lineages if lin.params}
    rng = np.random.default_rng(seed)
    pool = [c for c in range(len(hub)) if c not in started]
    unseen = sorted(rng.choice(pool, size=min(n_unseen, len(pool)), replace=False).tolist()) if pool else []
    cands = [Candidate(r.config, r.next_step, r.key, horizon=n - 1) for r in partial]
    cands += [Candidate(hub.config(c), 0, None, horizon=n - 1) for c in unseen]
    if not cands:
        return None
    try:
        mean, _ = policy.predict(history, cands)
    except RuntimeError as err:
        return {"error": str(err)}
    k = len(partial)
    by_key = {lin.id: lin for lin in lineages}
    p_ids = [hub.id_of(dict(by_key[r.key].params)) for r in partial]
    p_true, p_pred = final[p_ids], mean[:k]
    p_last = np.array([r.values[-1] for r in partial])
    early = np.array([r.next_step <= max(1, n // 4) for r in partial], dtype=bool)

    def tau(a: np.ndarray, b: np.ndarray) -> float | None:
        return round(kendall_tau(a, b), 4) if len(a) >= 3 else None

    return {
        "n_partial": k, "partial": tau(p_pred, p_true), "partial_last_value": tau(p_last, p_true),
        "n_partial_early": int(early.sum()), "partial_early": tau(p_pred[early], p_true[early]),
        "partial_early_last_value": tau(p_last[early], p_true[early]),
        "n_unseen": len(unseen), "unseen": tau(mean[k:], final[unseen]),
    }


# --------------------------------------------------------------------------------------------------


def replay(hub: HubTable, method: str, seed: int, budget: int,
           placeholder_checkpoints: bool = False, build_missing: bool = False) -> dict[str, Any]:
    """Run one (method, seed) on ``hub`` with ``budget`` epochs; returns the JSON-able record."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return Replay(hub, method, seed, budget, placeholder_checkpoints, build_missing).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hub", default="digits", help="hub name (bench/hubs/tables/<hub>.json) or table path")
    ap.add_argument("--cache", type=Path, help="checkpoint cache (default bench/cache/<hub>)")
    ap.add_argument("--method", required=True, choices=sorted(methods_mod.METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, required=True, help="epochs in total")
    ap.add_argument("--out", type=Path, help="write the run's JSON here (default: summary to stdout)")
    ap.add_argument("--placeholder-checkpoints", action="store_true",
                    help="methods that read no weights: save a tiny stand-in, no checkpoint cache needed")
    ap.add_argument("--build-missing", action="store_true",
                    help="build the checkpoints the replay needs when first asked for (checked against the table)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rec = replay(load_hub(args.hub, args.cache), args.method, args.seed, args.budget,
                 args.placeholder_checkpoints, args.build_missing)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rec, separators=(",", ":")))
    print(json.dumps({k: rec[k] for k in ("method", "seed", "final", "overhead", "tau", "wall_s")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
