"""Tutorial 3: start a new search from what an earlier one learned (a pretrained surrogate).

A finished study knows more than its best trial: its surrogate has learned which learning rates
work, what a promising learning curve looks like after two epochs, and which checkpointed weights
fine-tune well. ``optuna_fms.pretrain_surrogate`` trains the whole surrogate (a mean function of the
configuration, budget and weights, the graph metanetwork, the GP's hyperparameters) on finished
studies and writes it to one safetensors file;
``FMSSampler(prior=path)`` starts every fit of a new study from it, and keeps learning from the
new study's own trials.

1. A first study fine-tunes small MLPs on scikit-learn digits 0-4.
2. A prior is built from it.
3. A second study, on a related task (digits 5-9), starts from the prior. Its search space is a
   little different, as it often is in practice: it adds ``weight_decay``. The parameters the two
   share (``model``, ``lr``, ``momentum``) are matched by name and distribution; ``weight_decay``
   gets inputs of its own that the prior's mean does not read; the budget and weight inputs carry over.

Run it::

    python tutorials/03_transfer.py            # 40 trials x 8 epochs per study (not timed yet)
    python tutorials/03_transfer.py --smoke    # 6 trials x 3 epochs per study, what the tests run
"""

from __future__ import annotations

import argparse
from pathlib import Path
import shutil
import sys
import time

import optuna
from sklearn.datasets import load_digits
import torch
from torch import nn

import optuna_fms
from optuna_fms.engine import FitSettings

HERE = Path(__file__).resolve().parent
MODELS = {"mlp-16": 16, "mlp-48": 48}


def task(digits: range, seed: int = 0) -> dict[str, torch.Tensor]:
    """Classes ``digits`` of scikit-learn digits, relabelled 0.., split train / validation."""
    x, y = load_digits(return_X_y=True)
    keep = torch.tensor([int(v) in digits for v in y])
    x = torch.tensor(x / 16.0, dtype=torch.float32)[keep]
    y = torch.tensor(y)[keep] - digits.start
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:300], perm[300:600]
    return {"x_train": x[train], "y_train": y[train], "x_val": x[val], "y_val": y[val]}


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)  # NOTE: the same starting weights for every run of one model
    return nn.Sequential(nn.Linear(64, MODELS[name]), nn.ReLU(), nn.Linear(MODELS[name], 5))


def objective_for(data: dict[str, torch.Tensor], epochs: int, weight_decay: bool):
    def objective(trial: optuna.Trial) -> float:
        name = trial.suggest_categorical("model", list(MODELS))
        lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
        momentum = trial.suggest_float("momentum", 0.0, 0.95)
        wd = trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True) if weight_decay else 0.0
        model = make_model(name)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
        ckpt = optuna_fms.load_checkpoint(trial, model, optimizer=opt)
        acc = float("nan")
        for epoch in range(0 if ckpt is None else ckpt.step + 1, epochs):
            order = torch.randperm(len(data["x_train"]))
            for i in range(0, len(order), 32):
                idx = order[i:i + 32]
                opt.zero_grad()
                nn.functional.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx]).backward()
                opt.step()
            with torch.no_grad():
                acc = float((model(data["x_val"]).argmax(1) == data["y_val"]).float().mean())
            optuna_fms.save_checkpoint(trial, model, step=epoch, optimizer=opt)  # before report
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return acc

    return objective


def run_study(name: str, storage: str, objective, trials: int, epochs: int, seed: int,
              prior: Path | None = None, fit: FitSettings | None = None) -> optuna.Study:
    sampler = optuna_fms.FMSSampler(seed=seed, prior=prior, n_startup_trials=4, fit_settings=fit)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", sampler=sampler,
                                pruner=optuna_fms.FMSPruner(max_steps=epochs))
    for model_name in MODELS:  # the weights each configuration starts from
        optuna_fms.register_pretrained(study, "model", model_name, make_model(model_name))
    study.optimize(objective, n_trials=trials)
    return study


def best_seen(study: optuna.Study) -> float:
    """The best validation accuracy any epoch reached (a frozen run counts: it was measured)."""
    return max((v for t in study.trials for v in t.intermediate_values.values()), default=float("nan"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a tiny run (the tests use it)")
    ap.add_argument("--out", type=Path, default=HERE / "out" / "transfer")
    args = ap.parse_args(argv)
    if args.smoke:
        args.trials, args.epochs, args.pretrain_steps = 6, 3, 15
    # NOTE: in smoke mode the surrogate also trains less, so the whole tutorial takes seconds
    fit = FitSettings(full_steps=40, refine_steps=5, weight_steps=10, weight_graphs=8) if args.smoke else None
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    storage = f"sqlite:///{args.out / 'studies.db'}"  # checkpoints go to studies-artifacts/

    # 1. The first study: digits 0-4.
    t0 = time.perf_counter()
    first = run_study("digits-0-4", storage, objective_for(task(range(0, 5)), args.epochs, weight_decay=False),
                      args.trials, args.epochs, args.seed, fit=fit)
    print(f"first study (digits 0-4): best {best_seen(first):.3f} in {len(first.trials)} trials "
          f"({time.perf_counter() - t0:.0f}s)")

    # 2. The prior: the whole surrogate, trained on the finished study (its checkpoints included).
    t0 = time.perf_counter()
    prior_path = args.out / "prior.safetensors"
    description = optuna_fms.pretrain_surrogate([first], prior_path, steps=args.pretrain_steps)
    source = description["trained_on"][0]
    print(f"prior: {prior_path.stat().st_size / 1e3:.0f} kB, trained on {source['observations']} observations "
          f"and {source['graphs']} checkpoints of {source['name']!r} ({time.perf_counter() - t0:.0f}s)")

    # 3. The second study: digits 5-9, one more parameter, starting from the prior.
    from optuna_fms.engine.prior import load_prior
    from optuna_fms._bridge import engine_space, optuna_search_space

    t0 = time.perf_counter()
    second = run_study("digits-5-9", storage, objective_for(task(range(5, 10)), args.epochs, weight_decay=True),
                       args.trials, args.epochs, args.seed, prior=prior_path, fit=fit)
    fit = load_prior(prior_path).layout.input_map(engine_space(optuna_search_space(second)))
    print(f"second study (digits 5-9, from the prior): best {best_seen(second):.3f} in {len(second.trials)} "
          f"trials ({time.perf_counter() - t0:.0f}s)")
    print(f"  matched to the prior: {', '.join(fit.matched)}; own inputs: {', '.join(fit.extra) or 'none'}; "
          f"unknown: {', '.join(fit.unknown) or 'none'}")
    print(f"  thaws: {sum('fms:parent' in t.system_attrs for t in second.trials)}")
    return {"best_first": best_seen(first), "best_second": best_seen(second), "first": first, "second": second, "prior": prior_path, "description": description, "input_map": fit}


if __name__ == "__main__":
    main()
    sys.exit(0)
