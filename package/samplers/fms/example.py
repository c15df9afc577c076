"""FMS through OptunaHub: tune a small MLP's width and learning rate with freeze-thaw.

Runs from the root of a registry checkout (``package/`` beside it) or from anywhere with
``--registry-root``; ``--trials 6 --epochs 3`` is a tiny run (the repository's tests use it).
"""

from __future__ import annotations

import argparse
import math
import tempfile

import optuna
import optunahub
import torch


def make_data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A noisy 1-D regression (y = sin 3x), split 200 / 100."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(300, 1, generator=g) * 4 - 2
    y = torch.sin(3 * x) + 0.1 * torch.randn(300, 1, generator=g)
    return x[:200], y[:200], x[200:], y[200:]


def make_objective(fms, epochs: int):
    x_train, y_train, x_val, y_val = make_data()

    def objective(trial: optuna.Trial) -> float:
        width = trial.suggest_categorical("width", [8, 32, 64])
        lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        # A thawed trial resumes its frozen parent's checkpoint; a new one starts at epoch 0.
        ckpt = fms.load_checkpoint(trial, model, optimizer=opt)
        start = 0 if ckpt is None else ckpt.step + 1
        loss = math.nan
        for epoch in range(start, epochs):
            for _ in range(20):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x_train), y_train).backward()
                opt.step()
            with torch.no_grad():
                loss = torch.nn.functional.mse_loss(model(x_val), y_val).item()
            fms.save_checkpoint(trial, model, step=epoch, optimizer=opt)  # before report
            trial.report(loss, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()  # with FMSPruner: frozen, thawable later
        return loss

    return objective


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--registry-root", default="./package/")
    args = parser.parse_args(argv)

    fms = optunahub.load_local_module(package="samplers/fms", registry_root=args.registry_root)
    # From the published registry instead: optunahub.load_module(package="samplers/fms").
    with tempfile.TemporaryDirectory() as tmp:
        # NOTE: checkpoints go to a folder next to the storage file (fms.db -> fms-artifacts/)
        study = optuna.create_study(
            direction="minimize", storage=f"sqlite:///{tmp}/fms.db",
            sampler=fms.FMSSampler(seed=0, n_startup_trials=4),
            pruner=fms.FMSPruner(max_steps=args.epochs),
        )
        study.optimize(make_objective(fms, args.epochs), n_trials=args.trials)
        best = fms.best_lineage(study)
        step, value = best.best(study.direction)
        print(f"best lineage {best.id}: {best.params}, val MSE {value:.4f} at epoch {step}, "
              f"{len(best.trials)} segment(s), {best.n_thaws} thaw(s)")
        lins = fms.lineages(study)
        states = {s: sum(lin.state == s for lin in lins) for s in ("running", "frozen", "finished", "failed", "pruned")}
        print("lineages by state:", states)
        return {"n_trials": len(study.trials), "best_value": value, "best_params": best.params,
                "states": states, "n_thaws": sum(lin.n_thaws for lin in lins)}


if __name__ == "__main__":
    main()
