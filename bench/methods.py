"""The HPO methods the hub benchmark compares: name -> factory(seed, hub) -> (sampler, pruner).

Every method sees the same objective (:mod:`bench.runner`): a hub's grid as categorical
parameters, one report per epoch at steps ``0 .. n_epochs - 1``. Hyperband / successive halving
count resources in those steps; FMS knows the run length through ``FMSPruner(max_steps=...)``.

``reads_weights(name)`` says whether the runner must save checkpoints *with* an architecture and
register the zoo's pretrained weights (the surrogate embeds them); ``resumable(name)`` whether it
must save checkpoints at all (FMSPruner only freezes a run it can resume).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
import warnings

import optuna

import optuna_fms
from optuna_fms.engine.surrogate import FitSettings

Factory = Callable[[int, Any], tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner]]


@dataclass(frozen=True)
class Method:
    name: str
    factory: Factory
    fms: bool = False  # FMSSampler + FMSPruner: runs are frozen and thawed
    weights: str | None = None  # what the FMS surrogate reads from checkpoints
    note: str = ""


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _random(seed: int, hub: Any):
    return optuna.samplers.RandomSampler(seed=seed), optuna.pruners.NopPruner()


def _tpe(seed: int, hub: Any):
    return optuna.samplers.TPESampler(seed=seed), optuna.pruners.NopPruner()


def _tpe_hyperband(seed: int, hub: Any):
    return (optuna.samplers.TPESampler(seed=seed),
            optuna.pruners.HyperbandPruner(min_resource=1, max_resource=hub.n_epochs, reduction_factor=3))


def _tpe_sha(seed: int, hub: Any):
    return (optuna.samplers.TPESampler(seed=seed),
            optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))


def _gp_median(seed: int, hub: Any):
    _quiet()
    return (optuna.samplers.GPSampler(seed=seed),
            optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1))


def _default(seed: int, hub: Any):
    # NOTE: what a user gets from the plain constructors; only the seed and the run length are set.
    return optuna_fms.FMSSampler(seed=seed), optuna_fms.FMSPruner(max_steps=hub.n_epochs)


def _fms(*, weights: str | None, target: str, use_learning_curve: bool = True, ordered: bool = False,
         promotion: float = 0.0, freeze_margin: float = 0.2, kernel: str = "deep",
         n_startup: int = 8, noise_floor: float | None = None,
         refine_growth: float | None = None, pool_size: int = 256, n_local: int | None = None) -> Factory:
    # NOTE: kernel "deep" with the learning curve was the engine's only surrogate until 2026-12-08,
    # so the arms named before then keep it and reproduce their committed traces.
    def factory(seed: int, hub: Any):
        changed = {k: v for k, v in (("noise_floor", noise_floor), ("refine_growth", refine_growth)) if v is not None}
        fit = FitSettings(**changed) if changed else None
        sampler = optuna_fms.FMSSampler(seed=seed, weights=weights, target=target,
                                        use_learning_curve=use_learning_curve, ordered_choices=ordered,
                                        promotion_probability=promotion,
                                        n_startup_trials=n_startup, fit_settings=fit, pool_size=pool_size)
        if n_local is not None:  # NOTE: probe only; the local moves are not a constructor argument
            sampler.policy.settings.n_local = n_local
        sampler.policy.settings.kernel = kernel  # NOTE: not a constructor argument (a prior brings its own)
        pruner = optuna_fms.FMSPruner(max_steps=hub.n_epochs, weights=weights, freeze_margin=freeze_margin)
        return sampler, pruner

    return factory


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("random", _random, note="RandomSampler, full runs"),
    Method("tpe", _tpe, note="TPESampler, full runs"),
    Method("tpe-hyperband", _tpe_hyperband, note="TPE + HyperbandPruner(min 1, max n_epochs, eta 3)"),
    Method("tpe-sha", _tpe_sha, note="TPE + SuccessiveHalvingPruner(min 1, eta 3)"),
    Method("gp-median", _gp_median, note="GPSampler + MedianPruner(5 start-up trials, 1 warm-up step)"),
    Method("default", _default, fms=True, weights="gmn",
           note="FMSSampler(seed) + FMSPruner(max_steps): the product's default, whatever it is"),
    Method("dyhpo", _fms(weights=None, target="next"), fms=True,
           note="FMS engine as DyHPO: no weights, EI one step ahead"),
    Method("fms", _fms(weights=None, target="final"), fms=True,
           note="FMS engine, no weights, forecast target (EI of the forecast at the deepest step)"),
    Method("fms-gmn", _fms(weights="gmn", target="final"), fms=True, weights="gmn",
           note="graph-metanetwork weights + learning curve, forecast target (target='final')"),
    Method("fms-gmn-next", _fms(weights="gmn", target="next"), fms=True, weights="gmn",
           note="FMS as in the paper and optuna-fms's default: graph metanetwork + learning curve, "
                "EI one step ahead"),
    Method("fms-gmn-nolc", _fms(weights="gmn", target="next", use_learning_curve=False), fms=True,
           weights="gmn", note="as fms-gmn-next without the learning-curve branch"),
    Method("fms-gmn-next-ord", _fms(weights="gmn", target="next", ordered=True), fms=True, weights="gmn",
           note="as fms-gmn-next, numeric grid levels also encoded by their rank (ordered_choices=True)"),
    Method("dyhpo-ord", _fms(weights=None, target="next", ordered=True), fms=True,
           note="as dyhpo, numeric grid levels also encoded by their rank (ordered_choices=True)"),
    Method("dyhpo-ord-sh", _fms(weights=None, target="next", ordered=True, promotion=0.25), fms=True,
           note="as dyhpo-ord, a quarter of the sampler's decisions thaw by successive halving's rule"),
    Method("dyhpo-ord-m0", _fms(weights=None, target="next", ordered=True, freeze_margin=0.0), fms=True,
           note="as dyhpo-ord, the pruner freezes as soon as any alternative's EI is higher (margin 0)"),
    Method("dyhpo-ord-sh-m0", _fms(weights=None, target="next", ordered=True, promotion=0.25, freeze_margin=0.0),
           fms=True, note="dyhpo-ord-sh and dyhpo-ord-m0 together"),
    Method("dyhpo-s16", _fms(weights=None, target="next", n_startup=16), fms=True,
           note="as dyhpo, 16 random one-step configurations before the surrogate decides (default 8)"),
    Method("dyhpo-n2", _fms(weights=None, target="next", noise_floor=1e-2), fms=True,
           note="as dyhpo, the GP's noise variance at least 1e-2 (standardized; default 1e-4)"),
    Method("dyhpo-n1", _fms(weights=None, target="next", noise_floor=1e-1), fms=True,
           note="as dyhpo, the GP's noise variance at least 0.1 (standardized; default 1e-4)"),
    Method("fms-gmn-next-n1", _fms(weights="gmn", target="next", noise_floor=1e-1), fms=True, weights="gmn",
           note="as fms-gmn-next, the GP's noise variance at least 0.1 (standardized; default 1e-4)"),
    Method("dyhpo-h", _fms(weights=None, target="horizon"), fms=True,
           note="as dyhpo, EI at a horizon drawn afresh for each decision (target='horizon')"),
    Method("dyhpo-hn", _fms(weights=None, target="new-horizon"), fms=True,
           note="as dyhpo, new configurations scored at a random horizon, lineages one step ahead "
                "(target='new-horizon')"),
    Method("dyhpo-sh", _fms(weights=None, target="next", promotion=0.25), fms=True,
           note="as dyhpo, a quarter of the sampler's decisions thaw by successive halving's rule "
                "(Syne Tune's DyHPO hedge)"),
    Method("dyhpo-nl", _fms(weights=None, target="next", n_local=0), fms=True,
           note="as dyhpo, new configurations drawn at random only: no local moves around the best "
                "lineages (PolicySettings(n_local=0); Syne Tune's DyHPO pool)"),
    Method("dyhpo-mk", _fms(weights=None, target="next", use_learning_curve=False, kernel="input"), fms=True,
           note="as dyhpo, but the GP's kernel is a Matern-5/2 with one lengthscale per raw input "
                "(configuration and budget) and no deep kernel: Syne Tune DyHPO's kind of model; "
                "FMSSampler(weights=None) since 2026-12-08"),
    Method("dyhpo-mkl", _fms(weights=None, target="next", kernel="input"), fms=True,
           note="as dyhpo-mk, the curve branch's features also inputs of that kernel (one lengthscale each)"),
    Method("fms-gmn-mkw", _fms(weights="gmn", target="next", use_learning_curve=False, kernel="input"),
           fms=True, weights="gmn",
           note="as dyhpo-mk, with the graph metanetwork's embedding of the weights as more inputs (no curve)"),
    Method("dyhpo-nl-p64", _fms(weights=None, target="next", n_local=0, pool_size=64), fms=True,
           note="as dyhpo-nl with 64 random new configurations per decision instead of 256"),
    Method("dyhpo-g0", _fms(weights=None, target="next", refine_growth=0.0), fms=True,
           note="as dyhpo, the surrogate refined at every new observation (FitSettings(refine_growth=0), "
                "the default before 2026-12-07)"),
    Method("fms-gmn-next-hn", _fms(weights="gmn", target="new-horizon"), fms=True, weights="gmn",
           note="as fms-gmn-next, target='new-horizon'"),
    Method("dyhpo-n1-h", _fms(weights=None, target="horizon", noise_floor=1e-1), fms=True,
           note="dyhpo-n1 and dyhpo-h together"),
    Method("fms-gmn-next-h", _fms(weights="gmn", target="horizon"), fms=True, weights="gmn",
           note="as fms-gmn-next, EI at a random horizon (target='horizon')"),
    Method("fms-gmn-next-n1-h", _fms(weights="gmn", target="horizon", noise_floor=1e-1), fms=True, weights="gmn",
           note="fms-gmn-next-n1 and fms-gmn-next-h together"),
    Method("fms-flat", _fms(weights="flat", target="final"), fms=True, weights="flat",
           note="flat weight sketch + learning curve, forecast target (target='final')"),
    Method("fms-flat-next", _fms(weights="flat", target="next"), fms=True, weights="flat",
           note="flat weight sketch (FMS-Flat) + learning curve, EI one step ahead"),
]}


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose from {sorted(METHODS)}") from None


def reads_weights(name: str) -> bool:
    return get(name).weights is not None


def resumable(name: str) -> bool:
    return get(name).fms
