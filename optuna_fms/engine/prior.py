"""A surrogate pretrained on finished work: train it on many histories, save, load, warm-start.

What transfers is the surrogate's *parameters*, for either kernel (engine/surrogate.py):

* ``kernel="input"`` (the default's): a mean function (engine/mean.py: an MLP on the inputs, frozen
  in the new study, which learns only its offset and scale), the learned "unknown" input, the
  weight encoder with the graph metanetwork, and the kernel's hyperparameters (one lengthscale per
  input the prior knows);
* ``kernel="deep"``: the feature extractor (config MLP with its learned "unknown" input, curve
  branch, weight encoder, mixing head) and the GP's hyperparameters.

No source row enters the new study's GP.

NOTE: parameters only, as FSBO (Wistuba & Grabocka 2021) meta-learns a deep kernel. Source rows
as GP observations would assert that the new task takes the old tasks' values wherever the features
are alike, which is wrong exactly where transfer is hard (another task, another optimum), and they
would take rows from the exact GP's cap (``FitSettings.max_rows``) that the new study needs. The
features say what a curve shape, a budget or a set of weights means; the new study's own rows say
what its values are.

The file is safetensors (never pickle): the tensors, and in the header under ``optuna_fms.prior``
a JSON description (format, versions, input layout, network sizes, tensor shapes, a SHA-256 of
every tensor, the sources it was trained on and how). Pretraining follows FSBO: each step draws
one source and a batch of its rows, and maximizes that batch's exact-GP marginal likelihood, so
every source keeps its own value scale (each history standardizes its own values).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
import datetime
import hashlib
import json
import logging
import math
import os
from pathlib import Path
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from optuna_fms.engine.history import History
from optuna_fms.engine.layout import UNKNOWN, InputLayout, InputMap

if TYPE_CHECKING:
    import torch

    from optuna_fms.engine.mean import PriorMean
    from optuna_fms.engine.surrogate import InputFeatures, _ExactGP
    from optuna_fms.graphs.schema import ParameterGraph

FORMAT = "optuna-fms-prior/2"
# NOTE: format 1 held only deep-kernel priors and said so nowhere; it is read as one.
_READABLE = {"optuna-fms-prior/1": "deep", FORMAT: None}
HEADER_KEY = "optuna_fms.prior"
_GP = ("gp.mean", "gp.outputscale", "gp.lengthscale", "gp.noise")
_logger = logging.getLogger(__name__)


class PriorError(ValueError):
    """A prior file that cannot be read, or that does not fit the sampler it is given to."""


@dataclass
class PretrainSettings:
    """How :func:`pretrain` trains. Defaults: about 1 minute per 1,000 steps without weights on one
    CPU thread; the metanetwork's steps cost more (``weight_steps``)."""

    steps: int = 600
    batch_size: int = 128  # rows of one source per step (an exact GP per step)
    learning_rate: float = 1e-2
    unknown_dropout: float = 0.15  # chance that a row's slot reads UNKNOWN, so the unknown input is learned
    weight_steps: int | None = None  # steps in which the weight encoder learns (None: all)
    weight_graphs: int = 16  # graphs the metanetwork learns from per step
    refresh_every: int = 25  # cached embeddings of the other graphs are recomputed this often
    ordered_choices: bool = False  # categoricals of numbers also encode their rank
    noise_floor: float = 1e-4
    mean_hidden: int = 32  # width of the prior mean's two hidden layers (kernel="input")


@dataclass
class Prior:
    """A loaded or freshly trained prior: the description and the tensors it names."""

    description: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        self.layout = InputLayout.from_json(self.description["input"]["slots"])
        if self.kernel not in ("input", "deep"):
            raise ValueError(f"unknown kernel {self.kernel!r}")

    @property
    def kernel(self) -> str:
        return str(self.description.get("kernel", "deep"))

    @property
    def weights(self) -> str | None:
        return self.description["weights"]

    @property
    def network(self) -> dict[str, int]:
        return dict(self.description["network"])

    def check_compatible(self, *, weights: str | None, use_curve: bool | None, curve_length: int | None = None) -> None:
        """Raises PriorError unless a surrogate with these settings can start from this prior
        (``use_curve`` None: as the prior was trained, so any).

        A surrogate without weights can use a prior with weights (every row then has the learned
        "no weights" embedding, folded into the head); one with weights can use a prior without
        (its encoder starts fresh, with zero weight in the head); two different encoders cannot.
        """
        d = self.description
        if weights is not None and d["weights"] is not None and weights != d["weights"]:
            raise PriorError(f"The prior was trained with weights={d['weights']!r}; a surrogate with "
                             f"weights={weights!r} cannot start from it (use {d['weights']!r} or None).")
        if use_curve is not None and use_curve != d["use_curve"]:
            raise PriorError(f"The prior was trained {'with' if d['use_curve'] else 'without'} the learning "
                             f"curve branch; this surrogate is {'with' if use_curve else 'without'} it.")
        if curve_length is not None and curve_length != d["curve_length"]:
            raise PriorError(f"The prior reads curves of {d['curve_length']} steps, this surrogate {curve_length}.")

    def new_mean(self, extractor: InputFeatures, input_map: InputMap) -> PriorMean:
        """The pretrained mean for a surrogate whose inputs are ``extractor``'s over ``input_map``
        (parameters set by :meth:`warm_start`): it reads the columns the prior was trained on, and
        the prior's "no weights" embedding where this surrogate reads no weights."""
        from optuna_fms.engine.mean import PriorMean

        slots, width = input_map.slot_width, input_map.width
        columns = list(range(slots)) + list(range(width, width + 1 + self._curve_width(extractor)))
        fixed = None
        if self.weights is not None:
            if extractor.weights is not None:
                start = width + 1 + self._curve_width(extractor)
                columns += list(range(start, start + extractor.weights.dim))
            else:
                fixed = self.tensors["extractor.weights.missing"]
        return PriorMean(columns, hidden=self.network["mean_hidden"], fixed=fixed)

    @staticmethod
    def _curve_width(extractor: InputFeatures) -> int:
        return extractor.curve_net[0].out_channels if extractor.curve_net is not None else 0

    def warm_start(self, model: _ExactGP, input_map: InputMap) -> None:
        """Copy the prior into a freshly built ``model`` whose inputs follow ``input_map``."""
        if self.kernel == "input":
            self._warm_start_input(model, input_map)
        else:
            self._warm_start_deep(model, input_map)

    def _warm_start_input(self, model: _ExactGP, input_map: InputMap) -> None:
        import torch

        ex, mean = model.extractor, model.mean_module
        slots, width = input_map.slot_width, input_map.width
        tensors = self.tensors
        with torch.no_grad():
            ex.unknown[:slots] = tensors["extractor.unknown"].to(ex.unknown)[:slots]
            for name, target in ex.state_dict().items():
                if name.startswith(("curve_net.", "weights.")) and f"extractor.{name}" in tensors:
                    target.copy_(tensors[f"extractor.{name}"])
            for name, target in mean.net.state_dict().items():
                target.copy_(tensors[f"mean.net.{name}"])
            mean.constant.copy_(tensors["gp.mean"].reshape(()))
            mean.scale.copy_(tensors["mean.scale"].reshape(()))
            # NOTE: the prior's lengthscales are [slots, budget, curve, weights]; this surrogate's
            # inputs put its own parameters after the slots. Those, and a weight embedding the
            # prior lacks, keep the fresh default. The output scale and noise are the prior's too;
            # fresh ones, or going on from the study's last fit, did not help where the prior
            # misleads (arch left out, 2 start-ups: +0.106 / +0.117 / +0.107 at 50 % against no
            # prior; results/transfer/input-prior/).
            prior_ls = tensors["gp.lengthscale"].reshape(-1)
            base = model.covar_module.base_kernel
            ls = base.lengthscale.detach().clone().reshape(-1)
            ls[:slots] = prior_ls[:slots].to(ls)
            tail = 1 + self._curve_width(ex)
            ls[width:width + tail] = prior_ls[slots:slots + tail].to(ls)
            if self.weights is not None and ex.weights is not None:
                ls[width + tail:] = prior_ls[slots + tail:].to(ls)
            base.lengthscale = ls.reshape(base.lengthscale.shape)
            self._copy_scales(model)
        mean.freeze()

    def _copy_scales(self, model: _ExactGP) -> None:
        """The GP's output scale and noise (above this surrogate's noise floor)."""
        floor = float(model.likelihood.noise_covar.raw_noise_constraint.lower_bound)
        model.covar_module.outputscale = self.tensors["gp.outputscale"].to(model.covar_module.outputscale)
        noise = self.tensors["gp.noise"].to(model.likelihood.noise).clamp_min(floor * (1 + 1e-6) + 1e-12)
        model.likelihood.noise = noise

    def _warm_start_deep(self, model: _ExactGP, input_map: InputMap) -> None:
        import torch

        ex = model.extractor
        state = {k.removeprefix("extractor."): v for k, v in self.tensors.items() if k.startswith("extractor.")}
        own = ex.state_dict()
        slots = input_map.slot_width
        with torch.no_grad():
            for name, target in own.items():
                source = state.get(name)
                if name == "config_net.0.weight":
                    # NOTE: the layout's columns, then zeros for this study's own parameters, then the budget.
                    target.zero_()
                    source = source.to(target)
                    target[:, :slots] = source[:, :slots]
                    target[:, -1] = source[:, -1]
                elif name == "unknown":
                    target.zero_()
                    target[:slots] = source.to(target)[:slots]
                elif name == "head.0.weight" and source is not None and source.shape != target.shape:
                    self._fit_head(own, state, input_map)
                elif name == "head.0.bias":
                    continue  # set with the head's weight
                elif source is not None and name.startswith("weights.") and ex.weights is None:
                    continue
                elif source is not None:
                    if source.shape != target.shape:
                        raise PriorError(f"The prior's tensor extractor.{name} has shape {tuple(source.shape)}, "
                                         f"this surrogate's {tuple(target.shape)}.")
                    target.copy_(source)
            if "head.0.weight" in state and state["head.0.weight"].shape == own["head.0.weight"].shape:
                own["head.0.bias"].copy_(state["head.0.bias"])
            model.mean_module.constant = self.tensors["gp.mean"].to(model.mean_module.constant)
            model.covar_module.base_kernel.lengthscale = self.tensors["gp.lengthscale"].to(
                model.covar_module.base_kernel.lengthscale)
            self._copy_scales(model)

    def _fit_head(self, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                  input_map: InputMap) -> None:
        """The head when the weight branch differs: fold the prior's "no weights" embedding into
        the bias (this surrogate reads no weights), or give a fresh encoder zero weight."""
        w, b = own["head.0.weight"], own["head.0.bias"]
        pw, pb = state["head.0.weight"], state["head.0.bias"]
        shared = min(w.shape[1], pw.shape[1])
        w.zero_()
        w[:, :shared] = pw.to(w)[:, :shared]
        b.copy_(pb)
        if pw.shape[1] > w.shape[1]:
            missing = state["weights.missing"].to(pw)
            b.add_((pw[:, shared:] @ missing).to(b))


# --- files ------------------------------------------------------------------------------------


def save_prior(prior: Prior, path: str | os.PathLike[str]) -> Path:
    """Write ``prior`` as one safetensors file (atomically); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in prior.tensors.items()}
    description = dict(prior.description)
    description["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                              for k, v in sorted(tensors.items())}
    description["sha256"] = _digest(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(description, sort_keys=True)})
    os.replace(tmp, path)
    prior.description = description
    return path


def load_prior(path: str | os.PathLike[str]) -> Prior:
    """Read and check a prior file; PriorError says what is wrong with it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PriorError(f"No prior file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise PriorError(f"{path} is not a readable safetensors file ({type(err).__name__}: {err}).") from err
    if HEADER_KEY not in header:
        raise PriorError(f"{path} is a safetensors file but not an optuna-fms prior (no {HEADER_KEY!r} "
                         "description in its header); build one with optuna_fms.pretrain_surrogate.")
    try:
        description = json.loads(header[HEADER_KEY])
    except ValueError as err:
        raise PriorError(f"{path}: the prior's description is not valid JSON ({err}).") from err
    if description.get("format") not in _READABLE:
        raise PriorError(f"{path} is a prior of format {description.get('format')!r}; this optuna-fms reads "
                         f"{sorted(_READABLE)}. Build it again with optuna_fms.pretrain_surrogate.")
    if _READABLE[description["format"]] is not None:
        description["kernel"] = _READABLE[description["format"]]
    listed = description.get("tensors", {})
    if set(listed) != set(tensors):
        raise PriorError(f"{path}: the description lists tensors {sorted(set(listed) ^ set(tensors))} "
                         "that the file does not hold, or the other way round.")
    for name, spec in listed.items():
        if list(tensors[name].shape) != spec["shape"]:
            raise PriorError(f"{path}: tensor {name} has shape {list(tensors[name].shape)}, "
                             f"the description says {spec['shape']}.")
    if _digest(tensors) != description.get("sha256"):
        raise PriorError(f"{path}: the tensors do not match the SHA-256 in the description (the file is corrupt).")
    needed = (("mean.net.0.weight", "mean.scale", "extractor.unknown") if description.get("kernel") == "input"
              else ("extractor.config_net.0.weight", "extractor.head.0.weight"))
    missing = [k for k in (*needed, *_GP) if k not in tensors]
    if missing:
        raise PriorError(f"{path}: the prior lacks the tensors {missing}.")
    try:
        return Prior(description, tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise PriorError(f"{path}: the prior's input description is unreadable ({err}).") from err


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- pretraining --------------------------------------------------------------------------------


def pretrain(
    histories: Sequence[History],
    names: Sequence[str] | None = None,
    *,
    weights: str | None = "gmn",
    settings: PretrainSettings | None = None,
    seed: int = 0,
    device: str | None = None,
    use_curve: bool | None = None,
    kernel: str = "input",
) -> Prior:
    """Train one surrogate on every history (FSBO-style: one source per step); see the module doc.

    ``kernel``: the surrogate kernel the prior is for (engine/surrogate.py's ``KERNELS``); a study
    started from the prior uses it. ``use_curve`` None: the kernel's default (the curve branch for
    the deep kernel only)."""
    import gpytorch
    import torch

    from optuna_fms.engine.device import resolve_device
    from optuna_fms.engine.mean import PriorMean
    from optuna_fms.engine.surrogate import KERNELS, FeatureExtractor, InputFeatures, _ExactGP, _one_thread, pack

    if kernel not in KERNELS:
        raise ValueError(f"Unknown kernel {kernel!r}; use one of {KERNELS}.")
    use_curve = (kernel == "deep") if use_curve is None else use_curve

    settings = settings or PretrainSettings()
    names = list(names) if names is not None else [f"history {i}" for i in range(len(histories))]
    if len(names) != len(histories):
        raise ValueError(f"{len(names)} names for {len(histories)} histories.")
    usable = [(n, h) for n, h in zip(names, histories) if h.n_observations >= 2 and h.space.dimensions]
    if not usable:
        raise ValueError("Nothing to pretrain on: no source has two observations in a non-empty search space.")
    curve_lengths = {h.curve_length for _, h in usable}
    if len(curve_lengths) > 1:
        raise ValueError(f"The sources use different curve lengths {sorted(curve_lengths)}.")
    dev = resolve_device(device)
    layout = InputLayout.union([h.space for _, h in usable], settings.ordered_choices)
    table = _GraphTable([h for _, h in usable])
    reads_weights = weights is not None and len(table) > 0
    sources, described = [], []
    for name, h in usable:
        rows, targets, _ = h.training_rows()
        mapped = layout.input_map(h.space).apply(rows.x)
        graph = np.array([table.index[h.graph_keys[g]] if g >= 0 else -1 for g in rows.graph], dtype=np.int64)
        packed = pack(type(rows)(mapped, rows.budget, rows.curve, rows.mask, graph))
        sources.append((torch.as_tensor(packed, dtype=torch.float64), torch.as_tensor(targets, dtype=torch.float64)))
        described.append({"name": name, "lineages": len(h.lineages), "observations": h.n_observations,
                          "graphs": len(h.graph_keys), "parameters": h.space.names, "max_budget": h.max_budget})
    slot_columns = _slot_columns(layout)
    rng = np.random.default_rng(seed)
    curve_length = usable[0][1].curve_length
    t0 = time.perf_counter()
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        extractor: FeatureExtractor | InputFeatures
        mean = None
        encoder_kind = weights if reads_weights else None
        if kernel == "deep":
            extractor = FeatureExtractor(layout.width, encoder_kind, use_curve=use_curve, curve_length=curve_length,
                                         max_graphs=settings.weight_graphs, unknown=True)
        else:
            extractor = InputFeatures(layout.width, encoder_kind, use_curve=use_curve, curve_length=curve_length,
                                      max_graphs=settings.weight_graphs, unknown=True)
            mean = PriorMean(range(extractor.dim), hidden=settings.mean_hidden)
        likelihood = gpytorch.likelihoods.GaussianLikelihood(
            noise_constraint=gpytorch.constraints.GreaterThan(settings.noise_floor))
        x0, y0 = sources[0]
        model = _ExactGP(x0[:2], y0[:2], likelihood, extractor, mean).to(device=dev, dtype=torch.float64)
        encoder = extractor.weights
        if encoder is not None:
            encoder.net.float()
            encoder.set_table(table.order, table)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
        weight_steps = settings.steps if settings.weight_steps is None else settings.weight_steps
        model.train()
        with gpytorch.settings.cholesky_jitter(1e-6), gpytorch.settings.max_cholesky_size(4096):
            for step in range(settings.steps):
                x, y = sources[int(rng.integers(len(sources)))]
                pick = torch.as_tensor(rng.choice(len(x), size=min(settings.batch_size, len(x)), replace=False))
                batch = x[pick].clone()
                _drop(batch, slot_columns, settings.unknown_dropout, rng)
                batch, target = batch.to(dev), y[pick].to(dev)
                if encoder is not None:
                    encoder.trainable = step < weight_steps
                    if step % settings.refresh_every == 0 or step == weight_steps:
                        encoder.reset_cache()
                model.set_train_data(batch, target, strict=False)
                optimizer.zero_grad()
                loss = -mll(model(batch), target)
                if not math.isfinite(loss.item()):
                    raise ValueError(f"Pretraining diverged at step {step} (non-finite marginal likelihood).")
                loss.backward()
                optimizer.step()
                losses.append(float(loss.item()))
        model.eval()
        if encoder is not None:
            encoder.trainable = False
            encoder.reset_cache()
    tensors = {f"extractor.{k}": v.detach().cpu().clone() for k, v in extractor.state_dict().items()}
    if mean is not None:
        tensors |= {f"mean.net.{k}": v.detach().cpu().clone() for k, v in mean.net.state_dict().items()}
        tensors["mean.scale"] = mean.scale.detach().cpu().clone().reshape(-1)
    tensors |= {
        "gp.mean": model.mean_module.constant.detach().cpu().clone().reshape(-1),
        "gp.outputscale": model.covar_module.outputscale.detach().cpu().clone().reshape(-1),
        "gp.lengthscale": model.covar_module.base_kernel.lengthscale.detach().cpu().clone(),
        "gp.noise": likelihood.noise.detach().cpu().clone().reshape(-1),
    }
    description = {
        "format": FORMAT,
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": {
            "slots": layout.to_json(),
            "width": layout.width,
            "encoding": "per slot as engine.space encodes it (unit scale, log-aware; one-hot, plus the rank "
                        f"when ordered); {UNKNOWN} marks a slot the row's study lacks (the learned extractor.unknown)",
            "budget": "(step + 1) / the source's run length",
            "values": "oriented so higher is better, standardized per source",
        },
        "kernel": kernel,
        "weights": weights if reads_weights else None,
        "use_curve": use_curve,
        "curve_length": curve_length,
        "network": ({"hidden": extractor.config_net[0].out_features, "out": extractor.head[0].out_features,
                     "curve_channels": extractor.curve_net[0].out_channels} if isinstance(extractor, FeatureExtractor)
                    else {"mean_hidden": settings.mean_hidden}),
        "trained_on": described,
        "training": asdict(settings) | {"seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                                        "loss_first_50": _mean(losses[:50]), "loss_last_50": _mean(losses[-50:]),
                                        "graphs": len(table)},
    }
    return Prior(description, tensors)


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def _slot_columns(layout: InputLayout) -> list[slice]:
    out, col = [], 0
    for d in layout.slots:
        out.append(slice(col, col + d.width))
        col += d.width
    return out


def _drop(batch: torch.Tensor, slots: Sequence[slice], p: float, rng: np.random.Generator) -> None:
    """Mark each (row, slot) UNKNOWN with probability ``p``: the unknown input learns what a
    configuration predicts when that parameter is not known."""
    if p <= 0:
        return
    hit = rng.random((len(batch), len(slots))) < p
    for j, cols in enumerate(slots):
        rows = np.flatnonzero(hit[:, j])
        if len(rows):
            batch[rows, cols] = UNKNOWN


class _GraphTable(Mapping[str, "ParameterGraph"]):
    """Every source's graphs as one table (keys are content hashes, so sources never collide)."""

    def __init__(self, histories: Sequence[History]) -> None:
        self._owner: dict[str, History] = {}
        for h in histories:
            for k in h.graph_keys:
                self._owner.setdefault(k, h)
        self.order = list(self._owner)
        self.index = {k: i for i, k in enumerate(self.order)}

    def __getitem__(self, key: str) -> ParameterGraph:
        return self._owner[key].graphs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for package in ("optuna-fms", "torch", "gpytorch", "safetensors", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out
