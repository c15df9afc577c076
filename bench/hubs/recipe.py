"""Shared machinery of the benchmark hubs: recipe, deterministic builder, table reader, verifier and CLI.

A :class:`HubRecipe` names a pretraining source and a fine-tuning target (:mod:`bench.hubs.data`), a zoo of
model specs with pretraining hyperparameters (a zoo member with ``epochs=0`` is a from-scratch
initialisation) and a full-factorial :class:`Grid` over ``model`` (zoo index), ``batch_size``, ``lr``,
``momentum``, ``weight_decay`` and ``freeze_backbone``. :func:`build` runs it in worker processes with one
torch thread each and PORTABLE_NUMERICS (bit-identical across runs, and meant to be across x86-64 CPUs) and writes

* ``<cache>/zoo/zKK.safetensors`` and ``<cache>/configs/cNNNN/eEE.safetensors``: fp32 state dicts
  (``e00`` is the starting point, the zoo weights with a freshly initialised head; ``eEE`` is after epoch
  EE), plus one JSON shard per zoo member / config, so an interrupted build resumes where it stopped;
* the table: compact JSON with the recipe, grid, zoo and per-config curves (validation accuracy and
  loss, mean training loss, held-out test accuracy, epoch wall time) and a sha256 prefix per checkpoint.

:class:`HubTable` reads a table; :func:`verify` checks a cache (and optionally a partial rebuild) against it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from bench.hubs.data import Split

FORMAT = "optuna-fms-hub/1"
FACTORS = ("model", "batch_size", "lr", "momentum", "weight_decay", "freeze_backbone")
BUILDER_VERSION = 2  # bump when the training / saving code changes results: it is part of the fingerprint
# NOTE: the same seeds give different weights on different CPUs: torch dispatches its kernels, oneDNN
# its convolutions and MKL its BLAS by the instruction set (a rebuild on an AVX-512 AMD EPYC differed
# from the committed table in 73 % of its accuracies). Workers therefore run the portable code paths
# that every x86-64 CPU takes alike (about 10 % slower): generic ATen kernels, oneDNN capped at
# SSE4.1, MKL's conditional-numerical-reproducibility "compatible" mode.
PORTABLE_NUMERICS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"}
HASH_CHARS = 12  # sha256 hex prefix kept per checkpoint (48 bits: ample to detect a changed file)
REPO_ROOT = Path(__file__).resolve().parents[2]
TABLE_DIR = Path(__file__).resolve().parent / "tables"
CACHE_ROOT = REPO_ROOT / "bench" / "cache"


# --------------------------------------------------------------------------------------------------
# grid and zoo definitions


@dataclass(frozen=True)
class Grid:
    """A full factorial over named factors; config ids are row-major (the last factor varies fastest)."""

    factors: tuple[tuple[str, tuple[Any, ...]], ...]

    @classmethod
    def of(cls, **levels: Sequence[Any]) -> "Grid":
        return cls(tuple((k, tuple(v)) for k, v in levels.items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.factors)

    @property
    def levels(self) -> dict[str, tuple[Any, ...]]:
        return dict(self.factors)

    @property
    def size(self) -> int:
        return math.prod(len(v) for _, v in self.factors)

    def index(self, cid: int) -> tuple[int, ...]:
        """Level indices of config ``cid``."""
        if not 0 <= cid < self.size:
            raise IndexError(f"config id {cid} outside grid of {self.size}")
        out = []
        for _, levels in reversed(self.factors):
            cid, r = divmod(cid, len(levels))
            out.append(r)
        return tuple(reversed(out))

    def config(self, cid: int) -> dict[str, Any]:
        return {k: v[i] for (k, v), i in zip(self.factors, self.index(cid))}

    def id_of(self, config: dict[str, Any]) -> int:
        """Inverse of :meth:`config` (exact level values; floats compared with a relative tolerance)."""
        cid = 0
        for name, levels in self.factors:
            value = config[name]
            hits = [i for i, lv in enumerate(levels) if lv == value or (
                isinstance(lv, float) and math.isclose(lv, float(value), rel_tol=1e-9))]
            if not hits:
                raise KeyError(f"{name}={value!r} is not a level of {levels}")
            cid = cid * len(levels) + hits[0]
        return cid

    def to_json(self) -> dict[str, Any]:
        return {"factors": [[k, list(v)] for k, v in self.factors], "size": self.size,
                "order": "row-major, last factor fastest"}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Grid":
        return cls(tuple((k, tuple(v)) for k, v in d["factors"]))


def make_zoo(n: int, seed: int, *, widths: Sequence[int] = (4, 8, 12),
             acts: Sequence[str] = ("relu", "tanh", "gelu"), bns: Sequence[bool] = (False, True),
             lrs: Sequence[float] = (0.01, 0.03, 0.1), wds: Sequence[float] = (0.0, 1e-4, 1e-3),
             epochs: Sequence[int] = (1, 2, 4), batch_size: int = 64, n_classes: int = 10,
             in_channels: int = 1) -> list[dict[str, Any]]:
    """``n`` GAP-CNN zoo specs: architectures cycle through shuffled (width, act, bn) combinations so they
    stay balanced; pretraining lr / wd / epochs are drawn from a seeded RNG; member ``k`` has seed ``k``."""
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(widths, acts, bns))
    archs: list[tuple[int, str, bool]] = []
    while len(archs) < n:
        archs += [combos[i] for i in rng.permutation(len(combos))]
    zoo = []
    for k, (w, a, b) in enumerate(archs[:n]):
        zoo.append({
            "arch": {"family": "gap_cnn", "width": int(w), "act": str(a), "bn": bool(b),
                     "in_channels": in_channels, "n_classes": n_classes},
            "pretrain": {"lr": float(rng.choice(lrs)), "weight_decay": float(rng.choice(wds)),
                         "epochs": int(rng.choice(epochs)), "batch_size": batch_size, "momentum": 0.9,
                         "seed": k},
        })
    return zoo


def pretrained_and_scratch(architectures: dict[str, dict[str, Any]],
                           pretrain: Callable[[int], dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """A zoo of each architecture twice: pretrained with ``pretrain(k)`` (even id, seed 2k) and from
    scratch (odd id, the same settings with 0 epochs, seed 2k + 1)."""
    out = []
    for k, (name, arch) in enumerate(architectures.items()):
        pre = pretrain(k)
        out.append({"name": f"{name}-pretrained", "arch": arch, "pretrain": dict(pre, seed=2 * k)})
        out.append({"name": f"{name}-scratch", "arch": arch, "pretrain": dict(pre, epochs=0, seed=2 * k + 1)})
    return tuple(out)


def pick_diverse(zoo: Sequence[dict[str, Any]], n: int) -> list[int]:
    """Greedy max-min Hamming diversity over architecture and pretraining fields (ties: lowest index)."""
    def key(m: dict[str, Any]) -> tuple[Any, ...]:
        a, p = m["arch"], m["pretrain"]
        return a["width"], a["act"], a["bn"], p["lr"], p["weight_decay"], p["epochs"]

    keys = [key(m) for m in zoo]
    chosen = [0]
    while len(chosen) < min(n, len(zoo)):
        dist = [min(sum(x != y for x, y in zip(keys[i], keys[j])) for j in chosen) if i not in chosen else -1
                for i in range(len(zoo))]
        chosen.append(int(np.argmax(dist)))
    return sorted(chosen)


@dataclass(frozen=True)
class HubRecipe:
    """Everything that determines a hub. ``source``/``target`` are module-level loaders (picklable)."""

    name: str
    source: Callable[[], Split]
    target: Callable[[], Split]
    zoo: tuple[dict[str, Any], ...]
    grid: Grid
    n_epochs: int
    seed: int = 0
    pretrain_all: bool = True  # pretrain zoo members that the grid does not use too
    eval_batch: int = 1000
    notes: str = ""

    def __post_init__(self) -> None:
        if self.grid.names != FACTORS:
            raise ValueError(f"grid factors must be {FACTORS}, got {self.grid.names}")
        bad = [m for m in self.grid.levels["model"] if not 0 <= m < len(self.zoo)]
        if bad:
            raise ValueError(f"model levels {bad} are not zoo indices")

    def zoo_ids(self) -> list[int]:
        return list(range(len(self.zoo))) if self.pretrain_all else sorted(set(self.grid.levels["model"]))

    def definition(self) -> dict[str, Any]:
        """The JSON-able recipe (everything that affects results; timings excluded)."""
        return {"builder": BUILDER_VERSION, "name": self.name, "source": f"{self.source.__module__}.{self.source.__qualname__}",
                "target": f"{self.target.__module__}.{self.target.__qualname__}", "n_epochs": self.n_epochs,
                "seed": self.seed, "eval_batch": self.eval_batch, "grid": self.grid.to_json(),
                "zoo": list(self.zoo), "pretrain_all": self.pretrain_all}

    def fingerprint(self) -> str:
        blob = json.dumps(self.definition(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:HASH_CHARS]


# --------------------------------------------------------------------------------------------------
# worker side (one torch thread per process)


@dataclass
class _Worker:
    recipe: HubRecipe
    cache: Path
    data: dict[str, Any] = field(default_factory=dict)

    def split(self, which: str) -> Any:
        if which not in self.data:
            import torch

            s: Split = getattr(self.recipe, which)()
            t = torch.from_numpy
            self.data[which] = (s, t(s.x_train), t(s.y_train), t(s.x_val), t(s.y_val), t(s.x_test), t(s.y_test))
        return self.data[which]


_WORKER: _Worker | None = None


def _init_worker(recipe: HubRecipe, cache: str) -> None:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "DEFAULT":  # NOTE: the environment must be set before torch starts
        raise RuntimeError(f"hub worker runs torch's {capability} kernels; start it with {PORTABLE_NUMERICS}")
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    global _WORKER
    _WORKER = _Worker(recipe, Path(cache))


def _derived_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


def _rnd(x: float, nd: int = 5) -> float | None:
    return round(float(x), nd) if math.isfinite(x) else None


def _save_state(model: Any, path: Path) -> str:
    """Write the fp32 state dict as safetensors (atomically) and return its sha256 hex prefix."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return hashlib.sha256(blob).hexdigest()[:HASH_CHARS]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


def _train_epoch(model: Any, x: Any, y: Any, bs: int, opt: Any, gen: Any, frozen: Any) -> float:
    """One pass in a seeded random order; returns the mean minibatch training loss (per example)."""
    import torch
    import torch.nn.functional as F

    model.train()
    if frozen is not None:
        frozen.eval()  # a frozen backbone is a fixed feature extractor: BN statistics stay put too
    perm = torch.randperm(len(y), generator=gen)
    total = 0.0
    for i in range(0, len(y), bs):
        idx = perm[i:i + bs]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(y)


def _evaluate(model: Any, x: Any, y: Any, bs: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i:i + bs]) for i in range(0, len(y), bs)])
        return F.cross_entropy(out, y).item(), (out.argmax(1) == y).double().mean().item()


def _zoo_shard(cache: Path, k: int) -> Path:
    return cache / "zoo" / f"z{k:02d}.json"


def _config_shard(cache: Path, cid: int) -> Path:
    return cache / "configs" / f"c{cid:04d}.json"


def zoo_checkpoint(cache: Path, k: int) -> Path:
    return cache / "zoo" / f"z{k:02d}.safetensors"


def config_checkpoint(cache: Path, cid: int, epoch: int) -> Path:
    return cache / "configs" / f"c{cid:04d}" / f"e{epoch:02d}.safetensors"


def _pretrain_task(k: int) -> dict[str, Any]:
    """Pretrain zoo member ``k`` on the source split (``epochs=0``: random init only)."""
    import torch

    from bench.hubs.models import build_model, n_params

    assert _WORKER is not None
    w = _WORKER
    shard = _zoo_shard(w.cache, k)
    if shard.is_file() and zoo_checkpoint(w.cache, k).is_file():
        return json.loads(shard.read_text())
    spec = w.recipe.zoo[k]
    p = spec["pretrain"]
    torch.manual_seed(_derived_seed(w.recipe.seed, "zoo", p["seed"]))
    model = build_model(spec["arch"])
    t0 = time.perf_counter()
    src_acc = None
    if p["epochs"] > 0:
        _, xtr, ytr, xva, yva, _, _ = w.split("source")
        opt = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"],
                              weight_decay=p["weight_decay"])
        gen = torch.Generator().manual_seed(_derived_seed(w.recipe.seed, "zoo-data", p["seed"]))
        for _ in range(p["epochs"]):
            _train_epoch(model, xtr, ytr, p["batch_size"], opt, gen, None)
        src_acc = _rnd(_evaluate(model, xva, yva, w.recipe.eval_batch)[1])
    res = {"id": k, "params": n_params(model), "source_val_acc": src_acc,
           "sha256": _save_state(model, zoo_checkpoint(w.cache, k)),
           "pretrain_s": round(time.perf_counter() - t0, 3)}
    _write_json(shard, res)
    return res


def _finetune_task(cid: int) -> dict[str, Any]:
    """Fine-tune config ``cid`` for ``n_epochs``, saving a checkpoint and metrics after every epoch."""
    import torch
    from safetensors.torch import load_file

    from bench.hubs.models import build_model, head_name

    assert _WORKER is not None
    w, r = _WORKER, _WORKER.recipe
    shard = _config_shard(w.cache, cid)
    if shard.is_file() and all(config_checkpoint(w.cache, cid, e).is_file() for e in range(r.n_epochs + 1)):
        return json.loads(shard.read_text())
    cfg = r.grid.config(cid)
    spec = r.zoo[cfg["model"]]
    _, xtr, ytr, xva, yva, xte, yte = w.split("target")
    model = build_model(spec["arch"])
    model.load_state_dict(load_file(str(zoo_checkpoint(w.cache, cfg["model"]))))
    seed = _derived_seed(r.seed, "finetune", cid)
    torch.manual_seed(seed)
    head = head_name(model)
    getattr(model, head).reset_parameters()
    frozen = None  # the backbone (every child but the head) when it is frozen
    params = list(model.parameters())
    if cfg["freeze_backbone"]:
        frozen = torch.nn.ModuleList(m for n, m in model.named_children() if n != head).requires_grad_(False)
        params = list(getattr(model, head).parameters())
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"id": cid, "x": list(r.grid.index(cid)), "val_acc": [], "val_loss": [],
                           "train_loss": [], "test_acc": [], "epoch_s": [],
                           "sha256": [_save_state(model, config_checkpoint(w.cache, cid, 0))]}
    for epoch in range(1, r.n_epochs + 1):
        t0 = time.perf_counter()
        tr_loss = _train_epoch(model, xtr, ytr, cfg["batch_size"], opt, gen, frozen)
        va_loss, va_acc = _evaluate(model, xva, yva, r.eval_batch)
        dt = time.perf_counter() - t0  # what an HPO run pays per epoch: training plus validation
        _, te_acc = _evaluate(model, xte, yte, r.eval_batch)
        out["val_acc"].append(_rnd(va_acc))
        out["val_loss"].append(_rnd(va_loss, 4))
        out["train_loss"].append(_rnd(tr_loss, 4))
        out["test_acc"].append(_rnd(te_acc))
        out["epoch_s"].append(round(dt, 3))
        out["sha256"].append(_save_state(model, config_checkpoint(w.cache, cid, epoch)))
    _write_json(shard, out)
    return out


# --------------------------------------------------------------------------------------------------
# orchestration


Mapper = Callable[[Callable[[int], dict[str, Any]], Sequence[int]], Iterable[dict[str, Any]]]


@contextlib.contextmanager
def _workers(recipe: HubRecipe, cache: Path, workers: int) -> Iterator[Mapper]:
    """A map over ids in ``max(workers, 1)`` spawned 1-thread processes with PORTABLE_NUMERICS."""
    before = {k: os.environ.get(k) for k in PORTABLE_NUMERICS}
    os.environ.update(PORTABLE_NUMERICS)  # NOTE: spawned children copy the environment at start
    try:
        pool = mp.get_context("spawn").Pool(max(workers, 1), _init_worker, (recipe, str(cache)))
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with pool:
        yield lambda fn, ids: pool.imap_unordered(fn, ids, chunksize=1)


def _run(mapper: Mapper, fn: Callable[[int], dict[str, Any]], ids: Sequence[int],
         log: Callable[[str], None] | None, what: str) -> list[dict[str, Any]]:
    """Run ``fn`` over ``ids``; results sorted by id (so the order of completion never matters)."""
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    step = max(1, len(ids) // 10)
    for res in mapper(fn, ids):
        results.append(res)
        if log and (len(results) % step == 0 or len(results) == len(ids)):
            log(f"{what} {len(results)}/{len(ids)}  {time.perf_counter() - t0:.1f}s")
    return sorted(results, key=lambda d: d["id"])


def cpu_model() -> str:
    """This machine's CPU, for the record (a hub's results must not depend on it)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _prepare_cache(recipe: HubRecipe, cache: Path, fresh: bool) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    stamp = cache / "recipe.json"
    if fresh:
        for sub in ("zoo", "configs"):
            shutil.rmtree(cache / sub, ignore_errors=True)
    elif stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") != recipe.fingerprint():
        raise RuntimeError(f"{cache} holds a build of a different recipe; rebuild with --fresh "
                           f"(or delete {cache})")
    (cache / "zoo").mkdir(exist_ok=True)
    (cache / "configs").mkdir(exist_ok=True)
    _write_json(stamp, {"fingerprint": recipe.fingerprint(), "recipe": recipe.definition()})


def build(recipe: HubRecipe, cache: Path | str, table_path: Path | str, workers: int = 2, fresh: bool = False,
          log: Callable[[str], None] | None = None) -> "HubTable":
    """Build (or resume) a hub into ``cache`` and write its table to ``table_path``."""
    import torch

    cache, table_path = Path(cache), Path(table_path)
    _prepare_cache(recipe, cache, fresh)
    reused = len(list((cache / "configs").glob("c*.json"))) + len(list((cache / "zoo").glob("z*.json")))
    say = (lambda s: log(f"[{recipe.name}] {s}")) if log else None  # noqa: E731
    with _workers(recipe, cache, workers) as mapper:
        t0 = time.perf_counter()
        zoo = _run(mapper, _pretrain_task, recipe.zoo_ids(), say, "zoo")
        t_zoo = time.perf_counter() - t0
        rows = _run(mapper, _finetune_task, range(recipe.grid.size), say, "configs")
        t_ft = time.perf_counter() - t0 - t_zoo
    by_id = {z["id"]: z for z in zoo}
    epochs = recipe.grid.size * recipe.n_epochs
    table = {
        "format": FORMAT, "hub": recipe.name, "fingerprint": recipe.fingerprint(), "notes": recipe.notes,
        "data": {"source": recipe.source().describe(), "target": recipe.target().describe()},
        "n_epochs": recipe.n_epochs, "seed": recipe.seed,
        "checkpoints": {"format": "safetensors state_dict", "dtype": "float32",
                        "zoo": "zoo/z{model:02d}.safetensors",
                        "config": "configs/c{id:04d}/e{epoch:02d}.safetensors",
                        "epoch0": "start of fine-tuning: zoo weights with a freshly initialised head",
                        "hash": f"sha256 hex prefix ({HASH_CHARS} chars) of the file bytes"},
        "optimizer": "SGD(lr, momentum, weight_decay), cross-entropy; freeze_backbone=1 trains only the "
                     "head and keeps the backbone in eval mode",
        "metrics": {"val_acc": "validation accuracy", "val_loss": "validation cross-entropy (null if not finite)",
                    "train_loss": "mean minibatch training loss over the epoch",
                    "test_acc": "held-out test accuracy: reporting only, never for decisions",
                    "epoch_s": "wall seconds of training + validation in one 1-thread process"},
        "grid": recipe.grid.to_json(),
        "zoo": [dict(spec, id=k, **{f: by_id[k][f] for f in ("params", "source_val_acc", "sha256", "pretrain_s")})
                if k in by_id else dict(spec, id=k) for k, spec in enumerate(recipe.zoo)],
        "configs": rows,
        "build": {"workers": workers, "torch": torch.__version__, "numerics": PORTABLE_NUMERICS,
                  "cpu": cpu_model(), "shards_reused": reused,
                  "zoo_cpu_s": round(sum(z["pretrain_s"] for z in zoo), 1),
                  "finetune_cpu_s": round(sum(sum(r["epoch_s"]) for r in rows), 1),
                  # wall times of this invocation: a full build only when no shard was reused
                  "zoo_wall_s": round(t_zoo, 1), "finetune_wall_s": round(t_ft, 1),
                  "wall_s_per_config_epoch": round(t_ft / max(epochs, 1), 4) if not reused else None},
    }
    table_path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(table_path, table)
    return HubTable(table, cache)


# --------------------------------------------------------------------------------------------------
# reading tables


_NONDETERMINISTIC = ("epoch_s", "pretrain_s", "build")


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _NONDETERMINISTIC}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b (O(n^2) memory; fine for a few thousand points)."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    dx, dy = np.sign(x[:, None] - x[None, :]), np.sign(y[:, None] - y[None, :])
    den = math.sqrt(float((dx ** 2).sum() * (dy ** 2).sum()))
    return float((dx * dy).sum() / den) if den else float("nan")


class HubTable:
    """A built hub: grid, zoo, per-config curves and checkpoint locations.

    ``curve(cid)`` gives lists over epochs 1..n_epochs; ``checkpoint_path(cid, 0)`` is the starting point.
    ``test_acc`` is for reporting only: HPO decisions must use the validation metrics."""

    def __init__(self, data: dict[str, Any], cache_dir: Path | str | None = None) -> None:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a hub table (format {data.get('format')!r})")
        self.data = data
        self.name: str = data["hub"]
        self.grid = Grid.from_json(data["grid"])
        self.n_epochs: int = data["n_epochs"]
        self.zoo: list[dict[str, Any]] = data["zoo"]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else CACHE_ROOT / self.name
        self._rows: list[dict[str, Any]] = data["configs"]
        if [r["id"] for r in self._rows] != list(range(self.grid.size)):
            raise ValueError("table rows must be config ids 0..grid.size-1 in order")

    @classmethod
    def load(cls, path: Path | str, cache_dir: Path | str | None = None) -> "HubTable":
        return cls(json.loads(Path(path).read_text()), cache_dir)

    def __len__(self) -> int:
        return len(self._rows)

    def configs(self) -> list[dict[str, Any]]:
        """Every config as ``{"id": cid, factor: value, ...}``, ordered by id."""
        return [dict(id=r["id"], **self.grid.config(r["id"])) for r in self._rows]

    def config(self, cid: int) -> dict[str, Any]:
        return self.grid.config(cid)

    def id_of(self, config: dict[str, Any]) -> int:
        return self.grid.id_of(config)

    def curve(self, cid: int) -> dict[str, list[float | None]]:
        """Per-epoch ``val_acc``, ``val_loss``, ``train_loss``, ``test_acc`` and ``epoch_s`` of ``cid``."""
        r = self._rows[cid]
        return {k: list(r[k]) for k in ("val_acc", "val_loss", "train_loss", "test_acc", "epoch_s")}

    def checkpoint_path(self, cid: int, epoch: int) -> Path:
        if not 0 <= epoch <= self.n_epochs:
            raise IndexError(f"epoch {epoch} outside 0..{self.n_epochs}")
        return config_checkpoint(self.cache_dir, cid, epoch)

    def checkpoint_sha(self, cid: int, epoch: int) -> str:
        return self._rows[cid]["sha256"][epoch]

    def zoo_checkpoint_path(self, k: int) -> Path:
        return zoo_checkpoint(self.cache_dir, k)

    def model_spec(self, cid: int) -> dict[str, Any]:
        return self.zoo[self.config(cid)["model"]]["arch"]

    def load_model(self, cid: int, epoch: int) -> Any:
        """The ``nn.Module`` of ``cid`` with its checkpoint after ``epoch`` loaded."""
        from safetensors.torch import load_file

        from bench.hubs.models import build_model

        model = build_model(self.model_spec(cid))
        model.load_state_dict(load_file(str(self.checkpoint_path(cid, epoch))))
        return model

    def best(self, metric: str = "val_acc") -> dict[str, Any]:
        """The (config, epoch) with the highest ``metric``, first by id then epoch on ties."""
        top: tuple[float, int, int] | None = None
        for r in self._rows:
            for e, v in enumerate(r[metric], 1):
                if v is not None and (top is None or v > top[0]):
                    top = (v, r["id"], e)
        assert top is not None, "empty table"
        _, cid, ep = top
        r = self._rows[cid]
        return {"id": cid, "epoch": ep, "val_acc": r["val_acc"][ep - 1], "test_acc": r["test_acc"][ep - 1]}

    def best_accuracy(self, metric: str = "val_acc") -> float:
        """Best ``metric`` over all configs and epochs: the oracle that HPO regret is measured against."""
        return max(v for r in self._rows for v in r[metric] if v is not None)

    def deterministic(self) -> dict[str, Any]:
        """The table without timings: equal across rebuilds."""
        return _strip(self.data)

    def summary(self) -> dict[str, Any]:
        """Benchmark quality: final-accuracy quartiles, dead fraction, rank correlation of early epochs,
        curves that peak and fall, and pretrained against from-scratch zoo members (when both exist)."""
        acc = np.array([r["val_acc"] for r in self._rows], dtype=float)
        final, best = acc[:, -1], acc.max(axis=1)
        chance = 1.0 / self.data["data"]["target"]["n_classes"]
        out: dict[str, Any] = {
            "configs": len(self), "epochs": self.n_epochs, "best_val_acc": float(best.max()),
            "final_val_acc_quantiles": [round(float(np.quantile(final, q)), 4) for q in (0, .25, .5, .75, 1)],
            "frac_dead": round(float((best < 1.5 * chance).mean()), 4),
            "mean_epoch_s": round(float(np.mean([r["epoch_s"] for r in self._rows])), 4),
        }
        for e in sorted({1, 3, 6, self.n_epochs // 2} & set(range(1, self.n_epochs))):
            out[f"kendall_tau_epoch{e}_vs_final"] = round(kendall_tau(acc[:, e - 1], final), 3)
        return {**out, **self._curve_shapes(acc)}

    def _curve_shapes(self, acc: np.ndarray) -> dict[str, Any]:
        """How curves end (peaks that fall, gaps between best and final) and what pretraining buys."""
        best, final = acc.max(axis=1), acc[:, -1]
        fall = best - final
        peaked = acc.argmax(axis=1) < self.n_epochs - 1  # first best epoch before the last
        out: dict[str, Any] = {
            "best_val_acc_quantiles": [round(float(np.quantile(best, q)), 4) for q in (0, .25, .5, .75, 1)],
            "frac_peak_before_last": round(float(peaked.mean()), 4),
            "frac_fall_over_0.02": round(float((fall > 0.02).mean()), 4),
            "frac_fall_over_0.05": round(float((fall > 0.05).mean()), 4),
            "fall_quantiles_of_peaked": ([round(float(np.quantile(fall[peaked], q)), 4) for q in (.5, .9, 1)]
                                         if peaked.any() else None),
        }
        pretrained = np.array([self.zoo[self.config(r["id"])["model"]].get("pretrain", {}).get("epochs", 1) > 0
                               for r in self._rows])
        if pretrained.any() and not pretrained.all():
            for name, mask in (("pretrained", pretrained), ("scratch", ~pretrained)):
                out[f"{name}_mean_val_acc_epoch1"] = round(float(acc[mask, 0].mean()), 4)
                out[f"{name}_mean_best_val_acc"] = round(float(best[mask].mean()), 4)
                out[f"{name}_max_val_acc"] = round(float(best[mask].max()), 4)
        return out


# --------------------------------------------------------------------------------------------------
# verification


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:HASH_CHARS]


def verify(table: HubTable, rebuild: Iterable[int] = (), workers: int = 2,
           recipe: HubRecipe | None = None) -> list[str]:
    """Problems found (empty list: all good). Checks every cached checkpoint's sha256 against the table;
    with ``rebuild`` ids (needs ``recipe``) also re-runs those configs in a scratch cache and compares
    curves and hashes (the zoo checkpoints are reused once their hashes check out)."""
    problems: list[str] = []

    def check(path: Path, want: str, what: str) -> None:
        if not path.is_file():
            problems.append(f"missing {what}: {path}")
        elif _sha(path) != want:
            problems.append(f"sha256 mismatch for {what}: {path}")

    for z in table.zoo:
        if "sha256" in z:
            check(table.zoo_checkpoint_path(z["id"]), z["sha256"], f"zoo model {z['id']}")
    for r in table._rows:
        for e in range(table.n_epochs + 1):
            check(table.checkpoint_path(r["id"], e), r["sha256"][e], f"config {r['id']} epoch {e}")
    ids = sorted(set(rebuild))
    if ids:
        if recipe is None or recipe.fingerprint() != table.data["fingerprint"]:
            return problems + ["rebuild needs the recipe that built this table (fingerprint differs)"]
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp)
            _prepare_cache(recipe, scratch, fresh=False)
            for k in {table.config(i)["model"] for i in ids}:
                shutil.copy(table.zoo_checkpoint_path(k), zoo_checkpoint(scratch, k))
            with _workers(recipe, scratch, workers) as mapper:
                rebuilt = _run(mapper, _finetune_task, ids, None, "rebuild")
            for res in rebuilt:
                if _strip(res) != _strip(table._rows[res["id"]]):
                    problems.append(f"rebuild of config {res['id']} differs from the table")
    return problems


# --------------------------------------------------------------------------------------------------
# micro hub and CLI


def build_micro_hub(cache_dir: Path | str, workers: int = 2, log: Callable[[str], None] | None = None) -> HubTable:
    """Build the scikit-learn-only digits micro-hub (4 zoo models x 32 configs x 6 epochs) into
    ``cache_dir`` (table at ``cache_dir/table.json``); about 10-20 s on two cores."""
    from bench.hubs.digits import recipe

    cache_dir = Path(cache_dir)
    return build(recipe(micro=True), cache_dir, cache_dir / "table.json", workers=workers, log=log)


def default_paths(recipe: HubRecipe, micro: bool) -> tuple[Path, Path]:
    """(cache folder, table path): micro tables live in their cache, full tables in ``bench/hubs/tables``."""
    cache = CACHE_ROOT / recipe.name
    return cache, (cache / "table.json" if micro else TABLE_DIR / f"{recipe.name}.json")


def main(make_recipe: Callable[[bool], HubRecipe], argv: Sequence[str] | None = None) -> int:
    """CLI shared by the hub modules: ``build``, ``verify`` and ``info``."""
    ap = argparse.ArgumentParser(description="Build, verify or summarise a benchmark hub.")
    ap.add_argument("command", choices=("build", "verify", "info"))
    ap.add_argument("--micro", action="store_true", help="the small smoke-test variant")
    ap.add_argument("--workers", type=int, default=2, help="worker processes, one torch thread each")
    ap.add_argument("--cache", type=Path, help="checkpoint cache folder (default bench/cache/<hub>)")
    ap.add_argument("--table", type=Path, help="table path (default bench/hubs/tables/<hub>.json)")
    ap.add_argument("--fresh", action="store_true", help="build: discard cached shards first")
    ap.add_argument("--rebuild", type=int, default=0, metavar="K",
                    help="verify: also re-run K evenly spaced configs and compare them with the table")
    args = ap.parse_args(argv)
    recipe = make_recipe(args.micro)
    cache, table_path = default_paths(recipe, args.micro)
    cache, table_path = args.cache or cache, args.table or table_path
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.command == "build":
        t0 = time.perf_counter()
        table = build(recipe, cache, table_path, workers=args.workers, fresh=args.fresh, log=say)
        say(f"built {recipe.name}: {len(table)} configs x {table.n_epochs} epochs in "
            f"{time.perf_counter() - t0:.1f}s -> {table_path}")
        print(json.dumps({**table.summary(), "build": table.data["build"]}, indent=1))
        return 0
    table = HubTable.load(table_path, cache)
    if args.command == "info":
        print(json.dumps({**table.summary(), "build": table.data["build"]}, indent=1))
        return 0
    n = len(table)
    ids = sorted({round(i * (n - 1) / max(args.rebuild - 1, 1)) for i in range(args.rebuild)}) if args.rebuild else []
    problems = verify(table, ids, args.workers, recipe)
    for p in problems[:50]:
        print(p)
    print(f"{recipe.name}: {'OK' if not problems else f'{len(problems)} problem(s)'}"
          f" ({n} configs, {len(ids)} rebuilt)")
    return 1 if problems else 0
