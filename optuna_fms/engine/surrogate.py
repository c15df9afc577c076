"""The GP surrogate: an exact GP on (configuration, budget[, curve][, weights]), fitted incrementally.

Two kernels. The default reads the configuration encoding and the budget as they are, with one
Matern-5/2 lengthscale per input, plus the learned weight embedding (and curve features) as more
inputs. The deep kernel of DyHPO/FMS maps everything through a learned feature extractor first.
A pretrained prior (engine/prior.py) carries one of the two, and a surrogate started from it uses
that one; the default kernel's prior adds a pretrained mean (engine/mean.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
import logging
import math
import threading
from typing import TYPE_CHECKING

import gpytorch
from linear_operator.utils.errors import NotPSDError
import numpy as np
import torch

from optuna_fms.engine.device import resolve_device
from optuna_fms.engine.history import Rows
from optuna_fms.engine.mean import PriorMean
from optuna_fms.engine.weights import WeightEncoder
from optuna_fms.graphs.schema import ParameterGraph

if TYPE_CHECKING:
    from optuna_fms.engine.prior import Prior
    from optuna_fms.engine.space import SearchSpace

_logger = logging.getLogger(__name__)


class CurveBranch(torch.nn.Sequential):
    """A 1-D convolution over the learning curve, max-pooled over time. It reads two channels, the
    standardized values and a mask of real entries, so a padded zero is not taken for a value."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__(
            torch.nn.Conv1d(2, channels, kernel_size=3, padding=1),
            torch.nn.AdaptiveMaxPool1d(1),
            torch.nn.Flatten(),
        )

    def read(self, curve: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self(torch.stack([curve * mask, mask], dim=1))


class FeatureExtractor(torch.nn.Module):
    """psi(x, b, curve, w) of the deep kernel: config MLP, curve branch and weight embedding,
    concatenated and mixed by one more layer, as in DyHPO/FMS."""

    def __init__(
        self,
        config_dim: int,
        weights: str | None = None,
        *,
        hidden: int = 64,
        out: int = 32,
        curve_channels: int = 4,
        use_curve: bool = True,
        curve_length: int = 16,
        max_graphs: int = 16,
        unknown: bool = False,
    ) -> None:
        """``unknown``: the configuration columns may hold the layout's UNKNOWN marker (a prior's
        slot no parameter fills), replaced by a learned input (engine/layout.py)."""
        super().__init__()
        self.config_dim = config_dim
        self.curve_length = curve_length
        self.use_curve = use_curve
        self.weights = WeightEncoder(weights, max_graphs=max_graphs) if weights is not None else None
        embedding_dim = self.weights.dim if self.weights is not None else 0
        self.config_net = torch.nn.Sequential(torch.nn.Linear(config_dim + 1, hidden), torch.nn.LeakyReLU())
        self.curve_net = CurveBranch(curve_channels)
        width = hidden + (curve_channels if use_curve else 0) + embedding_dim
        self.head = torch.nn.Sequential(torch.nn.Linear(width, out), torch.nn.LeakyReLU())
        # NOTE: created last and only with a prior, so the default network is the one it always was.
        self.unknown = torch.nn.Parameter(torch.zeros(config_dim)) if unknown else None

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        length = self.curve_length
        x, budget, curve, mask, graph = torch.split(packed, [self.config_dim, 1, length, length, 1], dim=-1)
        if self.unknown is not None:
            x = torch.where(x < -0.5, self.unknown.expand_as(x), x)  # -0.5: below any encoded value
        parts = [self.config_net(torch.cat([x, budget], dim=-1))]
        if self.use_curve:
            parts.append(self.curve_net.read(curve, mask))
        if self.weights is not None:
            parts.append(self.weights(graph[:, 0].round()))
        return self.head(torch.cat(parts, dim=-1))


class InputFeatures(torch.nn.Module):
    """(x, b[, curve][, w]) for a kernel on the inputs themselves: the configuration encoding and
    the budget unchanged, then the curve branch's features and the weight encoder's embedding.

    NOTE: the configuration and budget get no learned map. A deep kernel that learns one fits a few
    dozen observations too well and writes off a region of the space for good: on the arch hub 9
    of 40 seeds ended stuck on a family that peaks lower, none with this kernel (40 paired seeds per
    design hub, bench/results/probes/kernel/). Only what has no fixed encoding is learned.
    """

    def __init__(
        self,
        config_dim: int,
        weights: str | None = None,
        *,
        curve_channels: int = 4,
        use_curve: bool = False,
        curve_length: int = 16,
        max_graphs: int = 16,
        unknown: bool = False,
    ) -> None:
        """``unknown``: as :class:`FeatureExtractor`'s (a prior's slot no parameter fills)."""
        super().__init__()
        self.config_dim = config_dim
        self.curve_length = curve_length
        self.weights = WeightEncoder(weights, max_graphs=max_graphs) if weights is not None else None
        self.curve_net = CurveBranch(curve_channels) if use_curve else None
        self.dim = (config_dim + 1 + (curve_channels if use_curve else 0)
                    + (self.weights.dim if self.weights is not None else 0))
        self.unknown = torch.nn.Parameter(torch.zeros(config_dim)) if unknown else None

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        length = self.curve_length
        x, budget, curve, mask, graph = torch.split(packed, [self.config_dim, 1, length, length, 1], dim=-1)
        if self.unknown is not None:
            x = torch.where(x < -0.5, self.unknown.expand_as(x), x)  # -0.5: below any encoded value
        parts = [x, budget]
        if self.curve_net is not None:
            parts.append(self.curve_net.read(curve, mask))
        if self.weights is not None:
            parts.append(self.weights(graph[:, 0].round()))
        return torch.cat(parts, dim=-1)


def pack(rows: Rows) -> np.ndarray:
    """Rows -> one matrix, because an ExactGP takes a single input tensor."""
    return np.concatenate([rows.x, rows.budget[:, None], rows.curve, rows.mask, rows.graph[:, None]], axis=1)


@dataclass
class FitSettings:
    """How the surrogate is trained: a full fit from scratch, then short refinements."""

    full_steps: int = 300
    # NOTE: 20, not 30: at 1,000 observations on a 2-core AMD EPYC the pruner's p50 was 0.61 s with
    # 30 steps (weights on) and 0.44 s with 20, and on the animal hub (10 seeds) the regret did not
    # suffer (fms-gmn-next 0.0055 at 100 % with 20 steps, 0.0057 with 30).
    refine_steps: int = 20
    # NOTE: a refinement runs once the observations grew by this fraction since the last one (at
    # least one new observation): every observation up to 100, then every 1 %. In between, the GP
    # is conditioned on the new observations exactly (new training data, no gradient step); only
    # the kernel's hyperparameters and features lag behind. Refining at every 3rd observation
    # from the start (Syne Tune DyHPO's opt_skip_period=3) cost early regret on arch (+0.048 +/-
    # 0.023 at 10 %, 10 paired seeds), where data is scarce; 0: every observation is a refinement.
    refine_growth: float = 0.01
    learning_rate: float = 1e-2
    refit_every: int = 50  # a fit from scratch every this many new observations
    # NOTE: the exact GP's cost grows with the cube of the rows. 256 rows and 20 refinement
    # steps were 3x cheaper but, on the tutorial over 3 seeds, reached 0.87-0.92 validation
    # accuracy in 60 trials against 0.98-0.996 with these defaults.
    max_rows: int = 384  # exact GP on at most this many rows (the newest of each lineage kept)
    # NOTE: the metanetwork's forward and backward dominate a full fit on CPU (bench/runner.py
    # measured 60-140 s per full fit with 30 steps of 32 graphs), hence few steps of few graphs.
    weight_steps: int = 20  # steps of a full fit in which the weight encoder learns too
    weight_graphs: int = 16  # graphs the weight encoder learns from per such step
    dtype: torch.dtype = torch.float64
    noise_floor: float = 1e-4  # lower bound of the GP's noise variance (standardized units)


KERNELS = ("input", "deep")


class GPSurrogate:
    """An exact GP on the rows' inputs, with one of ``KERNELS``; thread-safe, refit incrementally.

    ``kernel="input"`` (default): a Matern-5/2 kernel with one lengthscale per input on
    :class:`InputFeatures`. ``"deep"``: DyHPO/FMS's deep kernel, an RBF kernel on the learned
    :class:`FeatureExtractor`. A surrogate with a ``prior`` uses the prior's kernel.
    """

    def __init__(
        self,
        config_dim: int,
        weights: str | None = None,
        *,
        use_curve: bool | None = None,
        curve_length: int = 16,
        kernel: str = "input",
        settings: FitSettings | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        prior: Prior | None = None,
        space: SearchSpace | None = None,
    ) -> None:
        """``prior`` (with the ``space`` the rows encode): every fit from scratch starts from the
        pretrained parameters instead of a random initialization (engine/prior.py), with the
        prior's kernel. ``use_curve`` None: as the prior was trained, else no curve branch."""
        if kernel not in KERNELS:
            raise ValueError(f"Unknown kernel {kernel!r}; use one of {KERNELS}.")
        self.config_dim = config_dim
        self.weights = weights
        self.kernel = prior.kernel if prior is not None else kernel
        self.curve_length = curve_length
        self.use_curve = bool(prior.description["use_curve"] if use_curve is None and prior is not None else use_curve)
        self.settings = settings or FitSettings()
        self.device = resolve_device(device)
        self.dtype = self.settings.dtype
        self._seed = seed
        self._n_fits = 0
        self._model: _ExactGP | None = None
        self._fitted_on = 0  # observations at the last fit from scratch
        self._refined_on = 0  # observations at the last fit or refinement
        self._graph_table: tuple[list[str], Mapping[str, ParameterGraph]] = ([], {})
        self._lock = threading.RLock()
        self.prior = prior
        self.space = space
        if prior is not None:
            if space is None or space.width != config_dim:
                raise ValueError("A surrogate with a prior needs the search space its rows encode.")
            prior.check_compatible(weights=weights, use_curve=self.use_curve, curve_length=curve_length)
        self._input_map = prior.layout.input_map(space) if prior is not None and space is not None else None

    def _pack(self, rows: Rows) -> np.ndarray:
        # NOTE: with a prior the configuration columns are those of the prior's layout.
        return pack(rows if self._input_map is None else replace(rows, x=self._input_map.apply(rows.x)))

    @property
    def ready(self) -> bool:
        return self._model is not None

    def set_graphs(self, keys: Sequence[str], graphs: Mapping[str, ParameterGraph]) -> None:
        """The parameter graphs that rows' ``graph`` indices refer to."""
        with self._lock:
            self._graph_table = (list(keys), graphs)
            encoder = self._encoder()
            if encoder is not None:
                encoder.set_table(*self._graph_table)

    def _encoder(self) -> WeightEncoder | None:
        return self._model.extractor.weights if self._model is not None else None

    def fit(self, rows: Rows, targets: np.ndarray, *, keep: np.ndarray | None = None) -> None:
        """Fit on ``rows``; from scratch the first time and every ``refit_every`` observations.

        ``keep`` flags rows that must survive subsampling (each lineage's newest observation).
        """
        with self._lock:
            index = self.training_index(len(rows), keep)
            inputs = torch.as_tensor(self._pack(rows.take(index)), dtype=self.dtype, device=self.device)
            y = torch.as_tensor(targets[index], dtype=self.dtype, device=self.device)
            from_scratch = self.refits_from_scratch(len(rows))
            # NOTE: fork_rng keeps the user's global torch RNG stream untouched, so a training
            # loop that calls the pruner between epochs stays reproducible.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._seed + self._n_fits)
                if from_scratch:
                    self._model = self._new_model(inputs, y)
                    self._fitted_on = len(rows)
                else:
                    assert self._model is not None
                    self._model.set_train_data(inputs, y, strict=False)
                grown = len(rows) - self._refined_on
                refine = from_scratch or grown >= max(1.0, self.settings.refine_growth * self._refined_on)
                steps = self.settings.full_steps if from_scratch else self.settings.refine_steps if refine else 0
                if refine:
                    self._refined_on = len(rows)
                try:
                    with _one_thread():
                        encoder = self._encoder()
                        if from_scratch and encoder is not None and self.settings.weight_steps:
                            # NOTE: the weight encoder learns jointly with the GP only in the
                            # first steps of a full fit; then it is frozen and its embeddings cached.
                            encoder.trainable = True
                            self._train(min(steps, self.settings.weight_steps))
                            steps -= min(steps, self.settings.weight_steps)
                            encoder.trainable = False
                            encoder.reset_cache()
                        if steps:  # NOTE: none between refinements: set_train_data alone conditions the GP
                            self._train(steps)
                except (RuntimeError, ValueError, NotPSDError) as err:
                    # NOTE: a numerical failure (e.g. Cholesky) restarts from scratch next time.
                    _logger.warning("Surrogate fit failed (%s); it restarts from scratch.", err)
                    self._model = None
            self._n_fits += 1

    def training_index(self, n: int, keep: np.ndarray | None) -> np.ndarray:
        """The rows the next fit on ``n`` rows trains on (at most ``max_rows``; ``keep`` survives)."""
        with self._lock:
            return subsample_rows(n, self.settings.max_rows, keep, seed=self._seed + self._n_fits)

    def refits_from_scratch(self, n: int) -> bool:
        """Whether the next fit on ``n`` rows starts from scratch (and embeds every graph anew)."""
        with self._lock:
            return self._model is None or n - self._fitted_on >= self.settings.refit_every

    def needs_graph(self, key: str) -> bool:
        """Whether embedding ``key`` would read its graph: no embedding of it is cached now."""
        with self._lock:
            encoder = self._encoder()
            return encoder is None or encoder.needs_graph(key)

    def predict(self, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
        """Predictive mean and standard deviation of an observation (standardized units)."""
        with self._lock:
            if self._model is None:
                raise RuntimeError("The surrogate has not been fitted.")
            model = self._model
            model.eval()
            inputs = torch.as_tensor(self._pack(rows), dtype=self.dtype, device=self.device)
            with torch.no_grad(), _one_thread(), gpytorch.settings.fast_pred_var(), gpytorch.settings.cholesky_jitter(1e-6):
                # NOTE: the predictive distribution includes the observation noise, as in DyHPO;
                # without it a well-observed run's EI collapses to ~0 and it thrashes.
                posterior = model.likelihood(model(inputs))
                mean = posterior.mean
                std = posterior.variance.clamp_min(1e-12).sqrt()
            return mean.cpu().numpy(), std.cpu().numpy()

    def _new_model(self, inputs: torch.Tensor, y: torch.Tensor) -> _ExactGP:
        extractor: FeatureExtractor | InputFeatures
        mean = None
        prior = self.prior if self._input_map is not None else None
        width = self._input_map.width if self._input_map is not None else self.config_dim
        common = dict(use_curve=self.use_curve, curve_length=self.curve_length, max_graphs=self.settings.weight_graphs)
        if self.kernel == "deep":
            network = {"unknown": True, **prior.network} if prior is not None else {}
            extractor = FeatureExtractor(width, self.weights, **common, **network)
        else:
            extractor = InputFeatures(width, self.weights, **common, unknown=prior is not None)
            if prior is not None:
                mean = prior.new_mean(extractor, self._input_map)
        likelihood = gpytorch.likelihoods.GaussianLikelihood(
            noise_constraint=gpytorch.constraints.GreaterThan(self.settings.noise_floor)
        )
        model = _ExactGP(inputs, y, likelihood, extractor, mean).to(device=self.device, dtype=self.dtype)
        if prior is not None:
            prior.warm_start(model, self._input_map)
        if extractor.weights is not None:
            extractor.weights.net.float()  # NOTE: the metanetwork runs in float32: twice as fast
            extractor.weights.set_table(*self._graph_table)
        if isinstance(mean, PriorMean):
            with torch.no_grad():
                mean.fit_affine(extractor(inputs), y)
        return model

    def _train(self, steps: int) -> None:
        assert self._model is not None
        model = self._model
        model.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.settings.learning_rate)
        inputs, y = model.train_inputs[0], model.train_targets
        with gpytorch.settings.cholesky_jitter(1e-6), gpytorch.settings.max_cholesky_size(4096):
            for _ in range(steps):
                optimizer.zero_grad()
                loss = -mll(model(inputs), y)
                if not math.isfinite(loss.item()):
                    raise ValueError("non-finite marginal likelihood")
                loss.backward()
                optimizer.step()
        model.eval()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Fit and predict on one thread: faster for these small matrices, and it leaves the
    other cores to the user's training (Optuna's GPSampler does the same).

    NOTE: torch's thread count is process-wide in part (MKL, the intra-op pool), so it is
    narrowed only on the main thread and restored after; a decision in a worker thread (Optuna's
    ``n_jobs > 1``) leaves it alone rather than slow the training of the threads beside it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def subsample_rows(n: int, cap: int, keep: np.ndarray | None, *, seed: int) -> np.ndarray:
    """At most ``cap`` of ``n`` row indices, sorted: every ``keep`` row, then a seeded random draw."""
    if n <= cap:
        return np.arange(n)
    kept = np.flatnonzero(keep) if keep is not None else np.zeros(0, dtype=int)
    if len(kept) >= cap:
        return kept[-cap:]
    rest = np.setdiff1d(np.arange(n), kept)
    rng = np.random.default_rng(seed)
    extra = rng.choice(rest, size=cap - len(kept), replace=False)
    return np.sort(np.concatenate([kept, extra]))


class _ExactGP(gpytorch.models.ExactGP):
    """A constant (or a prior's) mean and a scaled kernel on the features: RBF on the deep
    kernel's learned features, Matern-5/2 with one lengthscale per input on :class:`InputFeatures`."""

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        likelihood: gpytorch.likelihoods.GaussianLikelihood,
        extractor: FeatureExtractor | InputFeatures,
        mean: gpytorch.means.Mean | None = None,
    ) -> None:
        """``mean``: a prior's pretrained mean (engine/mean.py); else a constant."""
        super().__init__(inputs, targets, likelihood)
        self.extractor = extractor
        self.mean_module = mean if mean is not None else gpytorch.means.ConstantMean()
        base = (gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=extractor.dim)
                if isinstance(extractor, InputFeatures) else gpytorch.kernels.RBFKernel())
        self.covar_module = gpytorch.kernels.ScaleKernel(base)

    def forward(self, packed: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        z = self.extractor(packed)
        return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))
