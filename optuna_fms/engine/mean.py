"""A pretrained prior mean: what other studies' values were at these inputs, fitted to this study.

m(z) = constant + scale * net(z[columns]). ``net`` is a small MLP that a prior pretrains on other
studies' rows (engine/prior.py); in a new study it is frozen and only ``constant`` and ``scale``
are learned, by the marginal likelihood, with the kernel's hyperparameters. A prior that says
nothing about the new study is switched off by the data (``scale`` -> 0): the GP is then the
plain default one. Each fit from scratch starts them at the least-squares fit to the study's
values, since a study standardizes its values on its own scale. ``columns`` leaves out the inputs
the prior never saw (a new study's own parameters); the kernel still reads them.

NOTE: frozen, not fine-tuned: an MLP fitted to a few dozen observations would write off a region
for good, the failure that the default's kernel avoids by learning no map of the inputs
(surrogate.py, InputFeatures). Far from the new study's data the prediction is the prior's, with
the kernel's full spread.
"""

from __future__ import annotations

from collections.abc import Sequence

import gpytorch
import torch


class PriorMean(gpytorch.means.Mean):
    """constant + scale * net(z[:, columns]); see the module doc."""

    def __init__(self, columns: Sequence[int], hidden: int = 32, fixed: torch.Tensor | None = None) -> None:
        """``fixed``: inputs appended to every row's (the prior's "no weights" embedding, for a
        surrogate that reads no weights from a prior that did)."""
        super().__init__()
        self.register_buffer("columns", torch.as_tensor(list(columns), dtype=torch.long))
        self.register_buffer("fixed", torch.zeros(0) if fixed is None else fixed.detach().clone().reshape(-1))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(len(columns) + len(self.fixed), hidden), torch.nn.LeakyReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.LeakyReLU(),
            torch.nn.Linear(hidden, 1),
        )
        self.constant = torch.nn.Parameter(torch.zeros(()))
        self.scale = torch.nn.Parameter(torch.ones(()))

    @torch.no_grad()
    def fit_affine(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Start ``constant`` and ``scale`` at the least-squares fit of ``y`` on the net's output
        (``scale`` >= 0; kept as they are below 3 rows)."""
        if len(y) < 3:
            return
        f = self.net(self._inputs(z)).squeeze(-1)
        fc, yc = f - f.mean(), y - y.mean()
        scale = (fc @ yc / (fc @ fc).clamp_min(1e-12)).clamp_min(0.0)
        self.scale.copy_(scale)
        self.constant.copy_(y.mean() - scale * f.mean())

    def freeze(self) -> None:
        """Learn only ``constant`` and ``scale`` from now on."""
        self.net.requires_grad_(False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.constant + self.scale * self.net(self._inputs(z)).squeeze(-1)

    def _inputs(self, z: torch.Tensor) -> torch.Tensor:
        inputs = z[..., self.columns]
        if len(self.fixed):
            inputs = torch.cat([inputs, self.fixed.to(inputs).expand(*inputs.shape[:-1], -1)], dim=-1)
        return inputs
