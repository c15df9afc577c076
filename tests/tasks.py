"""A tiny real fine-tuning task for tests: an MLP pretrained on digits 0-4, tuned on 5-9."""

from __future__ import annotations

from dataclasses import dataclass
import functools

import optuna
import torch

import optuna_fms


@dataclass
class DigitsTask:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    pretrained: dict[str, dict[str, torch.Tensor]]


def make_model(hidden: int = 16) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 5))


@functools.lru_cache(maxsize=1)
def digits_task() -> DigitsTask:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    source, target = y < 5, y >= 5
    xs, ys = x[source], y[source]
    xt, yt = x[target], y[target] - 5
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(xt), generator=g)
    train, val = perm[:300], perm[300:600]
    pretrained = {}
    for name, seed, epochs in (("good", 0, 30), ("weak", 1, 1)):
        torch.manual_seed(seed)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(epochs):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs), ys).backward()
            opt.step()
        pretrained[name] = {k: v.clone() for k, v in model.state_dict().items()}
    return DigitsTask(xt[train], yt[train], xt[val], yt[val], pretrained)


def train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, task: DigitsTask, batch: int = 32) -> float:
    """One shuffled epoch (the torch RNG drives the order), then validation accuracy."""
    order = torch.randperm(len(task.x_train))
    model.train()
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(task.x_train[idx]), task.y_train[idx]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(task.x_val).argmax(1) == task.y_val).float().mean())


def build(params: dict, task: DigitsTask) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = make_model()
    if params["model"] != "scratch":
        model.load_state_dict(task.pretrained[params["model"]])
    opt = torch.optim.SGD(model.parameters(), lr=params["lr"], momentum=params["momentum"])
    return model, opt


def finetune_objective(epochs: int = 6, save: bool = True, architecture: dict | None = None):
    """The user's objective of the README, on the digits task (``architecture``: saved with
    each checkpoint, so the surrogate reads the weights)."""
    task = digits_task()

    def objective(trial: optuna.Trial) -> float:
        params = {
            "model": trial.suggest_categorical("model", ["good", "weak", "scratch"]),
            "lr": trial.suggest_float("lr", 1e-3, 0.5, log=True),
            "momentum": trial.suggest_float("momentum", 0.0, 0.9),
        }
        model, opt = build(params, task)
        ckpt = optuna_fms.load_checkpoint(trial, model, optimizer=opt) if save else None
        start = 0 if ckpt is None else ckpt.step + 1
        acc = float("nan")
        for epoch in range(start, epochs):
            acc = train_epoch(model, opt, task)
            if save:
                optuna_fms.save_checkpoint(trial, model, step=epoch, optimizer=opt, architecture=architecture)
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return acc

    return objective


def uninterrupted_weights(params: dict, epochs: int) -> dict[str, torch.Tensor]:
    """The final weights of one run of ``params`` without any freeze."""
    task = digits_task()
    model, opt = build(params, task)
    for _ in range(epochs):
        train_epoch(model, opt, task)
    return model.state_dict()


def optimize_until(
    study: optuna.Study,
    objective,
    enough,
    *,
    chunk: int,
    max_trials: int,
    n_jobs: int = 1,
) -> None:
    """Optimize in chunks until ``enough(study)`` holds, or fail after ``max_trials``.

    NOTE: how many trials a thaw takes depends on floating point and, with threads, on timing
    (both differ between machines), so tests wait for the event they check instead of
    assuming it happens within a fixed count.
    """
    while not enough(study):
        assert len(study.trials) < max_trials, f"condition not met within {len(study.trials)} trials"
        study.optimize(objective, n_trials=chunk, n_jobs=n_jobs)


def optimize_worker(storage_path: str, study_name: str, n_trials: int, seed: int) -> None:
    """One worker process of a shared study on a journal file (for multi-process tests)."""
    from optuna.storages.journal import JournalFileBackend

    from optuna_fms.engine.surrogate import FitSettings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    storage = optuna.storages.JournalStorage(JournalFileBackend(storage_path))
    # NOTE: half the decisions thaw by successive halving's rule, so two workers often want the same
    # lineage (the default surrogate, unsure of this wide space, would rather start new runs here).
    sampler = optuna_fms.FMSSampler(
        seed=seed, n_startup_trials=4, pool_size=64, fit_settings=FitSettings(full_steps=100, refine_steps=15),
        promotion_probability=0.5,
    )
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=optuna_fms.FMSPruner())
    study.optimize(finetune_objective(6), n_trials=n_trials)
