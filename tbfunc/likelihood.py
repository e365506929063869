"""Gaussian likelihoods for regression, as ``log_likelihood=`` callables for ``nelbo``.

Both return the per-point log-density ``log N(y; f(x), noise^2)``, summed over output
dimensions, so ``nelbo(..., log_likelihood=lik)`` averages it over the batch. The observation
noise is learned: ``GaussianLikelihood`` holds one (or one per output) pre-softplus ``rho``,
a tensor to hand to an optimizer beside the posterior's (homoscedastic); ``HeteroscedasticGaussian
Likelihood`` reads a noise per example from a second head of the model's output.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tbfunc._checks import check_tensor, fail

__all__ = ["GaussianLikelihood", "HeteroscedasticGaussianLikelihood"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class GaussianLikelihood(NamedTuple):
    """``N(y; f(x), noise^2)`` with a learned homoscedastic ``noise = softplus(rho)``.

    Example:
        >>> import torch, tbfunc as tb
        >>> lik = tb.GaussianLikelihood.from_noise(0.5)
        >>> opt = torch.optim.Adam([lik.rho.requires_grad_()], lr=1e-2)  # beside the posterior's
        >>> lik(torch.zeros(4, 1), torch.zeros(4, 1)).shape
        torch.Size([4])
    """

    rho: Tensor

    @classmethod
    def from_noise(
        cls, noise: float = 1.0, *, shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float32
    ) -> GaussianLikelihood:
        """A likelihood with initial noise standard deviation ``noise`` (shape ``()``: one for
        every output; ``(D,)``: one per output dimension)."""
        if not isinstance(noise, int | float) or isinstance(noise, bool) or not noise > 0:
            fail("noise", "a positive float", noise)
        sigma = torch.full(shape, float(noise), dtype=dtype)
        return cls(sigma + torch.log(-torch.expm1(-sigma)))

    @property
    def noise(self) -> Tensor:
        """The observation noise standard deviation, ``softplus(rho)``."""
        return F.softplus(self.rho)

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-point ``log N(target; output, noise^2)``, summed over trailing dimensions."""
        output, target = _pair(output, target)
        return _log_normal(output, target, self.noise.to(output.dtype))


class HeteroscedasticGaussianLikelihood(NamedTuple):
    """``N(y; mean(x), noise(x)^2)`` from a model whose last axis holds ``2 D`` values: the
    first ``D`` the mean, the last ``D`` the pre-softplus noise, ``noise = softplus(raw) +
    min_noise`` (the floor keeps the density bounded; Nix & Weigend 1994, Lakshminarayanan
    et al. 2017)."""

    min_noise: float = 1e-6

    def split(self, output: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, noise)`` of an output of shape ``(..., 2 D)``."""
        output = check_tensor(output, "output")
        if output.dim() < 1 or output.shape[-1] % 2:
            fail("output", "a tensor whose last axis holds 2 D values (mean, raw noise)", output)
        mean, raw = output.chunk(2, dim=-1)
        return mean, F.softplus(raw) + self.min_noise

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-point ``log N(target; mean, noise^2)``, summed over trailing dimensions."""
        mean, noise = self.split(output)
        mean, target = _pair(mean, target)
        return _log_normal(mean, target, noise)


def _pair(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    output, target = check_tensor(output, "output"), check_tensor(target, "target")
    if output.shape != target.shape:
        fail(
            "target",
            f"a tensor of the mean's shape {tuple(output.shape)}",
            target,
            "A (N,) target against an (N, 1) output would broadcast to (N, N): reshape one.",
        )
    return output, target


def _log_normal(mean: Tensor, target: Tensor, noise: Tensor) -> Tensor:
    per_element = -0.5 * ((target - mean) / noise) ** 2 - torch.log(noise) - _LOG_SQRT_2PI
    return (
        per_element.reshape(per_element.shape[0], -1).sum(-1)
        if per_element.dim() > 1
        else per_element
    )
