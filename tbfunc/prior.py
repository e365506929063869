"""Priors over weights: objects you pass, one for every node or a dict keyed like the posterior.

Each prior is a ``NamedTuple`` of scalars or tensors with an element-wise ``log_prob`` and a
``distribution`` (a ``torch.distributions`` object) for reference and plotting.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Laplace, MixtureSameFamily, Normal

from tbfunc._checks import check_tensor, fail

__all__ = ["GaussianPrior", "LaplacePrior", "ScaleMixturePrior", "pretrained_prior"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class GaussianPrior(NamedTuple):
    """N(mu, sigma**2) element-wise; ``mu`` and ``sigma`` are scalars or tensors.

    The default N(0, 1) is torchbayesian's default prior too.
    """

    mu: float | Tensor = 0.0
    sigma: float | Tensor = 1.0

    @classmethod
    def from_param(cls, param: Tensor, sigma: float | Tensor = 1.0) -> GaussianPrior:
        """A prior centred on an existing (pretrained) tensor: N(param, sigma**2).

        Shrinks towards the pretrained weights instead of towards zero, which is what a
        fine-tuned Bayesian model usually wants.
        """
        param = check_tensor(param, "param")
        _check_positive(sigma, "sigma")
        return cls(param.detach().clone(), sigma)

    @property
    def distribution(self) -> Normal:
        return Normal(_tensor(self.mu), _tensor(self.sigma))

    def log_prob(self, value: Tensor) -> Tensor:
        """``-((value - mu) / sigma)**2 / 2 - log(sigma) - log(2 pi) / 2`` element-wise."""
        sigma = _tensor(self.sigma, value)
        return -0.5 * ((value - self.mu) / sigma) ** 2 - torch.log(sigma) - _LOG_SQRT_2PI


class ScaleMixturePrior(NamedTuple):
    """``pi N(0, sigma1**2) + (1 - pi) N(0, sigma2**2)`` element-wise (Blundell et al. 2015).

    Typically ``sigma1`` is large and ``sigma2`` small, so most weights are shrunk hard towards
    zero while a few may be large. No closed-form KL: ``kl_divergence`` uses Monte Carlo.
    """

    pi: float
    sigma1: float
    sigma2: float

    @property
    def distribution(self) -> MixtureSameFamily:
        mixing = Categorical(probs=torch.tensor([self.pi, 1 - self.pi]))
        return MixtureSameFamily(
            mixing, Normal(torch.zeros(2), torch.tensor([self.sigma1, self.sigma2]))
        )

    def log_prob(self, value: Tensor) -> Tensor:
        """``logsumexp`` of the two weighted component log-densities (stable in the tails)."""
        _check_mixture(self)
        first = math.log(self.pi) - 0.5 * (value / self.sigma1) ** 2 - math.log(self.sigma1)
        second = math.log1p(-self.pi) - 0.5 * (value / self.sigma2) ** 2 - math.log(self.sigma2)
        return torch.logaddexp(first, second) - _LOG_SQRT_2PI


class LaplacePrior(NamedTuple):
    """Laplace(mu, b) element-wise: density ``exp(-|w - mu| / b) / (2 b)``; sparsity-inducing."""

    mu: float | Tensor = 0.0
    b: float | Tensor = 1.0

    @property
    def distribution(self) -> Laplace:
        return Laplace(_tensor(self.mu), _tensor(self.b))

    def log_prob(self, value: Tensor) -> Tensor:
        b = _tensor(self.b, value)
        return -(value - self.mu).abs() / b - torch.log(2 * b)


PRIORS = (GaussianPrior, ScaleMixturePrior, LaplacePrior)


def pretrained_prior(
    module: nn.Module, posterior: dict[str, Any], *, sigma: float | Tensor = 1.0
) -> dict[str, GaussianPrior]:
    """``GaussianPrior.from_param`` on the module's current weight for every posterior name.

    Build it from the pretrained module before training: the prior then pulls the posterior
    mean back towards the pretrained weights (a Bayesian form of weight decay towards them).
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    missing = [name for name in posterior if name not in params]
    if missing:
        raise ValueError(
            f"posterior names {missing} are not parameters of {type(module).__name__}."
        )
    return {name: GaussianPrior.from_param(params[name], sigma=sigma) for name in posterior}


def is_prior(value: object) -> bool:
    return isinstance(value, PRIORS) or (
        hasattr(type(value), "log_prob") and not isinstance(value, dict | Tensor)
    )


def _tensor(value: float | Tensor, like: Tensor | None = None) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if like is None:
        return torch.tensor(float(value))
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def _check_positive(value: float | Tensor, arg: str) -> None:
    positive = bool((value > 0).all()) if isinstance(value, Tensor) else value > 0
    if not positive:
        fail(arg, "positive", value)


def _check_mixture(prior: ScaleMixturePrior) -> None:
    if not 0 < prior.pi < 1:
        fail("pi", "in (0, 1)", prior.pi)
    _check_positive(prior.sigma1, "sigma1")
    _check_positive(prior.sigma2, "sigma2")
