"""Tutorial 1: pick and fine-tune a pretrained model from a small model hub with optuna-fms.

The setting is the one Forecasting Model Search (FMS) was made for: you own a *hub* of
pretrained checkpoints and a new task, and you want the best (model, fine-tuning recipe)
pair without training every candidate to the end. FMS is freeze-thaw Bayesian optimization:

* :class:`optuna_fms.FMSPruner` looks at every reported epoch and, when another candidate
  deserves the next epoch more, *freezes* the run: the Optuna trial ends PRUNED, but its
  checkpoint stays in the artifact store.
* :class:`optuna_fms.FMSSampler` decides, before every new trial, whether to *thaw* a frozen
  run (the new trial gets the same parameters and resumes from the parent's checkpoint) or to
  start a new configuration.

Your objective stays an ordinary Optuna objective. The two extra lines are
``optuna_fms.load_checkpoint`` (resume if this trial continues a frozen run) and
``optuna_fms.save_checkpoint`` (make every epoch resumable).

Everything here runs on a laptop CPU in a few minutes, on data that ships with scikit-learn:

* source task (for the hub): ``load_digits`` classes 0-4;
* target task (to fine-tune on): classes 5-9, relabelled 0-4, split once into
  train / validation / test. Validation accuracy drives the search; the test split is only
  looked at once, at the very end, to report the chosen checkpoint honestly.

Run it::

    python tutorials/01_finetune_model_hub.py                 # defaults: 150 trials, runs of 12 epochs
    python tutorials/01_finetune_model_hub.py --trials 20 --epochs 6 --out fms-demo

then open the study with the optuna-dashboard command it prints (installed by the ``tutorial`` extra).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
import shutil
import sys
import time

import optuna
from sklearn.datasets import load_digits
import torch
from torch import nn

import optuna_fms

HERE = Path(__file__).resolve().parent


# --- 1. Data: one source task for pretraining, one target task for fine-tuning ---------------


@dataclass
class Split:
    x: torch.Tensor  # float [N, 1, 8, 8], pixel values scaled to [0, 1]
    y: torch.Tensor  # long [N], labels 0-4


def make_data(seed: int = 0) -> dict[str, Split]:
    """Digits 0-4 as the source task; digits 5-9 (relabelled 0-4) split 50/25/25 as the target.

    The split is fixed by ``seed``, so every trial (and every thawed segment) sees the same
    training and validation sets.
    """
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    source, target = y < 5, y >= 5
    xt, yt = x[target], y[target] - 5
    order = torch.randperm(len(yt), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = len(order) // 2, len(order) // 4
    tr, va, te = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    return {
        "source": Split(x[source], y[source]),
        "train": Split(xt[tr], yt[tr]),
        "val": Split(xt[va], yt[va]),
        "test": Split(xt[te], yt[te]),
    }


# --- 2. The model hub: small GAP-CNNs pretrained on the source task -------------------------

N_CLASSES = 5


@dataclass(frozen=True)
class Arch:
    width: int
    act: str  # "relu", "tanh" or "gelu"
    bn: bool

    def build(self) -> nn.Sequential:
        """conv block x2 -> global average pooling -> linear head (the last module)."""
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[self.act]
        w = self.width

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not self.bn)]
            if self.bn:
                layers.append(nn.BatchNorm2d(c_out))
            return [*layers, act()]

        return nn.Sequential(
            *block(1, w),
            *block(w, 2 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * w, N_CLASSES),
        )


# name -> architecture; every entry but "scratch" is pretrained on the source task.
ZOO: dict[str, Arch] = {
    "w8-relu": Arch(8, "relu", bn=False),
    "w8-relu-bn": Arch(8, "relu", bn=True),
    "w16-relu-bn": Arch(16, "relu", bn=True),
    "w16-tanh": Arch(16, "tanh", bn=False),
    "w12-gelu-bn": Arch(12, "gelu", bn=True),
    "w24-relu-bn": Arch(24, "relu", bn=True),
    "scratch": Arch(16, "relu", bn=True),  # random initialization: the no-transfer baseline
}


@dataclass
class HubEntry:
    arch: Arch
    state_dict: dict[str, torch.Tensor] | None  # None: train from scratch
    source_acc: float | None  # training accuracy on the source task after pretraining


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: Split, batch_size: int,
                frozen_backbone: bool = False) -> None:
    model.train()
    if frozen_backbone:
        model[:-1].eval()  # a frozen backbone also keeps its BatchNorm statistics
    order = torch.randperm(len(data.y))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
        opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    model.eval()
    return (model(data.x).argmax(1) == data.y).float().mean().item()


def pretrain_hub(source: Split, *, epochs: int = 10, seed: int = 0) -> dict[str, HubEntry]:
    """Pretrain each zoo member on the source task (a few seconds each, deterministic)."""
    hub = {}
    for i, (name, arch) in enumerate(ZOO.items()):
        if name == "scratch":
            hub[name] = HubEntry(arch, None, None)
            continue
        torch.manual_seed(seed * 1000 + i)
        model = arch.build()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        for _ in range(epochs):
            train_epoch(model, opt, source, batch_size=32)
        hub[name] = HubEntry(arch, {k: v.clone() for k, v in model.state_dict().items()},
                             accuracy(model, source))
    return hub


# --- 3. Fine-tuning: build a model from the hub with one recipe -----------------------------


def build(hub: dict[str, HubEntry], name: str, *, lr: float, momentum: float, weight_decay: float,
          freeze_backbone: bool, seed: int = 0) -> tuple[nn.Sequential, torch.optim.SGD]:
    """The hub model with a fresh 5-way head, and an SGD optimizer over what is trained.

    The fresh head is initialized deterministically; on a thaw, load_checkpoint overwrites
    all of this (weights, optimizer state and RNG state) with the parent's checkpoint.
    """
    entry = hub[name]
    torch.manual_seed(seed)
    model = entry.arch.build()
    if entry.state_dict is not None:
        model.load_state_dict(entry.state_dict)
        model[-1].reset_parameters()  # new task, new head
    if freeze_backbone:
        for p in model[:-1].parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_objective(hub: dict[str, HubEntry], data: dict[str, Split], epochs: int, seed: int):
    def objective(trial: optuna.Trial) -> float:
        # An ordinary search space. FMSSampler fills it with a new configuration, or, on a
        # thaw, with exactly the parameters of the frozen run it continues.
        name = trial.suggest_categorical("model", list(hub))
        lr = trial.suggest_float("lr", 1e-3, 3e-1, log=True)
        momentum = trial.suggest_float("momentum", 0.0, 0.95)
        weight_decay = trial.suggest_float("weight_decay", 1e-5, 1e-2, log=True)
        batch_size = trial.suggest_categorical("batch_size", [8, 16, 32, 64])
        freeze_backbone = trial.suggest_categorical("freeze_backbone", [False, True])

        model, opt = build(hub, name, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           freeze_backbone=freeze_backbone, seed=seed)

        # Resume: None for a new configuration; on a thaw, the newest checkpoint of the frozen
        # run, already loaded into the model, the optimizer and the RNGs.
        ckpt = optuna_fms.load_checkpoint(trial, model, optimizer=opt)
        start = 0 if ckpt is None else ckpt.step + 1
        acc = float("nan") if ckpt is None else ckpt.metadata["val_acc"]

        for epoch in range(start, epochs):
            train_epoch(model, opt, data["train"], batch_size, frozen_backbone=freeze_backbone)
            acc = accuracy(model, data["val"])
            # Save *before* reporting: the pruner may freeze this run at this very step, and a
            # frozen run can only be thawed from a checkpoint. Given the module, save_checkpoint
            # describes its architecture (once per architecture), so the surrogate also reads
            # the weights themselves (a graph metanetwork embeds them).
            optuna_fms.save_checkpoint(trial, model, step=epoch, optimizer=opt, metadata={"val_acc": acc})
            trial.report(acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()  # with FMSPruner: the run is frozen, not lost
        return acc

    return objective


def log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per trial: which lineage it belongs to, the epochs it ran, and why it stopped."""
    steps = sorted(trial.intermediate_values)
    span = f"epochs {steps[0]:>2}-{steps[-1]:<2}" if steps else "no epoch   "
    last = trial.intermediate_values[steps[-1]] if steps else float("nan")
    lineage = trial.user_attrs.get("fms:lineage", trial.number)
    kind = "thaw" if "fms:parent" in trial.user_attrs else "new "
    end = "frozen" if "fms:freeze_reason" in trial.user_attrs else trial.state.name.lower()
    print(f"  trial {trial.number:>3}  {kind} lineage {lineage:>3}  {span}  val_acc {last:.3f}  "
          f"-> {end}  [{trial.params.get('model')}]", flush=True)


# --- 4. Putting it together ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=150,
                        help="Optuna trials; each new configuration and each thaw is one trial")
    parser.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs of a full run")
    parser.add_argument("--out", type=Path, default=HERE / "out",
                        help="output folder for fms.db and fms-artifacts/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", choices=["next", "final"], default="next",
                        help="acquisition target (see FMSSampler): EI one step ahead, or of the forecast final value")
    parser.add_argument("--weights", choices=["gmn", "flat", "none"], default="gmn",
                        help="how the surrogate reads checkpointed weights (none: DyHPO-style)")
    parser.add_argument("--device", default=None,
                        help="the surrogate's device, e.g. cpu or cuda (default: CUDA when available); "
                             "exact reruns need cpu")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and deterministic
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    # Output: a SQLite file; optuna-fms puts checkpoints in fms-artifacts/ next to it. Start
    # clean, so that reruns do not mix with an older study.
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    db, artifacts = out / "fms.db", out / "fms-artifacts"
    db.unlink(missing_ok=True)
    shutil.rmtree(artifacts, ignore_errors=True)

    print("Pretraining the model hub on digits 0-4 ...", flush=True)
    data = make_data(args.seed)
    hub = pretrain_hub(data["source"], seed=args.seed)
    for name, entry in hub.items():
        src = "random init" if entry.source_acc is None else f"source acc {entry.source_acc:.3f}"
        print(f"  {name:<12} {src}")
    print(f"  ({time.perf_counter() - t0:.1f} s; target: {len(data['train'].y)} train / "
          f"{len(data['val'].y)} val / {len(data['test'].y)} test images of digits 5-9)\n")

    study = optuna.create_study(
        direction="maximize",
        storage=f"sqlite:///{db}",
        study_name="finetune-model-hub",
        load_if_exists=False,
        sampler=optuna_fms.FMSSampler(
            seed=args.seed, weights=None if args.weights == "none" else args.weights, target=args.target,
            device=args.device,
        ),
        # max_steps tells the pruner the full run length from the start (otherwise it learns
        # it from the first finished run), so a run is never frozen at its last epoch.
        pruner=optuna_fms.FMSPruner(max_steps=args.epochs),
    )
    if args.weights != "none":
        # Register every hub model's starting weights: configurations not tried yet are then
        # scored by the weights they start from.
        for name in hub:
            start, _ = build(hub, name, lr=0.1, momentum=0.0, weight_decay=0.0, freeze_backbone=False, seed=args.seed)
            optuna_fms.register_pretrained(study, "model", name, start)
    print(f"Searching: {args.trials} trials, runs of {args.epochs} epochs", flush=True)
    t_search = time.perf_counter()
    # FMSSampler writes a note on each trial that tells its lineage's story and refreshes
    # optuna-dashboard's lineage figure every 10 trials (FMSSampler(dashboard=False): neither).
    objective = make_objective(hub, data, args.epochs, args.seed)
    study.optimize(objective, n_trials=args.trials, callbacks=[log_trial])
    # The search froze most runs early; finish_best trains the best lineage to the last epoch
    # in one more trial, so the study ends with a full run as its best COMPLETE trial.
    finished = optuna_fms.finish_best(study, objective, callbacks=[log_trial])
    search_s = time.perf_counter() - t_search

    # --- 5. What happened: lineages, freezes, thaws ----------------------------------------
    # A lineage is one configuration's run across all the trials (segments) it took.
    lins = optuna_fms.lineages(study)
    states = Counter(lin.state for lin in lins)
    n_thaws = sum(lin.n_thaws for lin in lins)
    n_frozen_ever = sum(lin.state == "frozen" or lin.n_thaws > 0 for lin in lins)
    epochs_trained = sum(len(t.intermediate_values) for t in study.trials)
    full_runs = sum(lin.state == "finished" and lin.next_step >= args.epochs for lin in lins)

    best = next(lin for lin in lins if lin.tail.number == finished.number)
    assert study.best_trial.number == finished.number
    best_step, best_val = best.best(study.direction)

    # --- 6. The test split, used once: the best lineage's best checkpoint -----------------
    record = next(c for c in best.checkpoints if c.step == best_step)
    ckpt = optuna_fms.read_checkpoint(study, record)
    p = best.params
    model, _ = build(hub, p["model"], lr=p["lr"], momentum=p["momentum"],
                     weight_decay=p["weight_decay"], freeze_backbone=p["freeze_backbone"])
    model.load_state_dict(ckpt.state_dict)
    test_acc = accuracy(model, data["test"])

    wall_s = time.perf_counter() - t0
    dashboard = optuna_fms.dashboard.command(f"sqlite:///{db}", artifacts)
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
    print(f"""
=== Summary ===
Best lineage:        {best.id} ({best.state}, trials {[t.number for t in best.trials]}; trial {finished.number} finished it: study.best_trial)
  params:            {params}
  best val accuracy: {best_val:.4f} at epoch {best_step}
  test accuracy:     {test_acc:.4f} (checkpoint of trial {record.trial_number}, epoch {record.step})
Lineages:            {len(lins)} configurations, by state: {dict(sorted(states.items()))}
Frozen / thawed:     {n_frozen_ever} runs were frozen at least once, {states.get('frozen', 0)} are still frozen; {n_thaws} thaws in all
Runs to the end:     {full_runs} (all {args.epochs} epochs)
Epochs trained:      {epochs_trained} (vs {len(lins) * args.epochs} to train every configuration to the end)
Wall time:           {wall_s:.1f} s (search {search_s:.1f} s)

Inspect the study (trials, learning curves, fms:* decisions, checkpoints):
  {dashboard}
""", flush=True)

    return {
        "study": study,
        "db": db,
        "artifacts": artifacts,
        "best_lineage": best,
        "best_val": best_val,
        "best_step": best_step,
        "test_acc": test_acc,
        "states": dict(states),
        "n_frozen_ever": n_frozen_ever,
        "n_thaws": n_thaws,
        "epochs_trained": epochs_trained,
        "wall_s": wall_s,
        "dashboard": dashboard,
        "finished": finished,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
