"""Variational posteriors over one tensor: mean-field Gaussians as NamedTuples of tensors.

A posterior node holds ``mu`` and ``rho`` with ``sigma = softplus(rho)`` (Blundell et al. 2015,
"Weight Uncertainty in Neural Networks"). Nodes are ``NamedTuple`` s, so optree and
``torch.utils._pytree`` (which ``torch.func`` uses) see them as pytree nodes without
registration, and ``torch.func.grad`` returns gradients of the same type.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.distributions import Normal

from tbfunc import _noise, random
from tbfunc._checks import check_key, check_tensor, fail
from tbfunc._softplus import softplus

__all__ = ["GaussianPosterior", "PretrainedGaussianPosterior", "VariationalPosterior"]

DEFAULT_RHO = -3.0  # sigma = softplus(-3) ~= 0.049, as in torchbayesian and Blundell et al.
DEFAULT_MU_STD = 0.1
DEFAULT_SIGMA_FLOOR = 1e-3


@runtime_checkable
class VariationalPosterior(Protocol):
    """What tbfunc needs of a posterior family over one tensor.

    A family is a pytree node type (a ``NamedTuple`` of tensors is simplest) with a
    ``from_param`` classmethod, a ``sigma`` and a ``distribution`` property, and
    ``sample(key)`` returning one draw shaped like the parameter.
    """

    @classmethod
    def from_param(cls, param: Tensor, **kwargs: Any) -> VariationalPosterior: ...

    @property
    def sigma(self) -> Tensor: ...

    @property
    def distribution(self) -> torch.distributions.Distribution: ...

    def sample(self, key: Tensor) -> Tensor: ...


class GaussianPosterior(NamedTuple):
    """N(mu, softplus(rho)**2) element-wise, with ``mu`` initialised at random (a model trained
    from scratch)."""

    mu: Tensor
    rho: Tensor

    @classmethod
    def from_param(
        cls,
        param: Tensor,
        *,
        key: Tensor,
        rho: float | Tensor = DEFAULT_RHO,
        mu_std: float = DEFAULT_MU_STD,
    ) -> GaussianPosterior:
        """A posterior shaped like ``param``: ``mu ~ N(0, mu_std**2)`` drawn with ``key``.

        Args:
            param: a floating-point tensor; only its shape, dtype and device are used.
            key: the key for ``mu``.
            rho: the initial ``rho`` (a float, or a tensor broadcastable to ``param``'s shape).
            mu_std: the standard deviation of the initial ``mu``.
        """
        param = check_tensor(param, "param")
        key = check_key(key)
        if not mu_std >= 0:
            fail("mu_std", "a non-negative float", mu_std)
        noise = random.normal(key, param.shape, dtype=param.dtype, device=param.device)
        return cls(noise * mu_std, _fill_rho(param, rho))

    @property
    def sigma(self) -> Tensor:
        """``softplus(rho)``: positive for every finite ``rho``, linear for large ``rho``; the
        same bits at every thread count (``_softplus``)."""
        return softplus(self.rho)

    @property
    def distribution(self) -> Normal:
        """``torch.distributions.Normal(mu, sigma)``."""
        return Normal(self.mu, self.sigma)

    def sample(self, key: Tensor) -> Tensor:
        """``mu + sigma * eps``, ``eps = tb.random.normal(key, mu.shape)`` (reparametrised)."""
        return _reparametrized(self.mu, self.sigma, key)

    def reset_parameters(
        self, *, key: Tensor, rho: float | Tensor = DEFAULT_RHO, mu_std: float = DEFAULT_MU_STD
    ) -> GaussianPosterior:
        """A new posterior with ``mu`` redrawn with ``key`` and ``rho`` reset."""
        return GaussianPosterior.from_param(self.mu, key=key, rho=rho, mu_std=mu_std)


class PretrainedGaussianPosterior(NamedTuple):
    """N(mu, softplus(rho)**2) element-wise, centred on an existing (pretrained) tensor."""

    mu: Tensor
    rho: Tensor

    @classmethod
    def from_param(
        cls,
        param: Tensor,
        *,
        rho: float | Tensor | None = None,
        sigma: float | Tensor | None = None,
        sigma_scale: float | None = None,
        sigma_floor: float = DEFAULT_SIGMA_FLOOR,
    ) -> PretrainedGaussianPosterior:
        """A posterior with ``mu`` a detached copy of ``param``.

        Give at most one of ``rho``, ``sigma`` and ``sigma_scale`` (default: ``rho = -3``):

        - ``rho``: the pre-softplus scale, a float or a tensor broadcastable to ``param``;
        - ``sigma``: the absolute standard deviation (> 0), float or broadcastable tensor;
        - ``sigma_scale``: ``sigma = max(sigma_scale * |param|, sigma_floor)``, noise relative
          to each weight; the floor keeps weights at zero stochastic and ``rho`` finite.

        ``rho`` is computed from ``sigma`` with the stable inverse softplus
        ``sigma + log(-expm1(-sigma))``.
        """
        param = check_tensor(param, "param")
        mu = param.detach().clone()
        return cls(mu, _initial_rho(mu, rho, sigma, sigma_scale, sigma_floor))

    @property
    def sigma(self) -> Tensor:
        """``softplus(rho)``: positive for every finite ``rho``, linear for large ``rho``; the
        same bits at every thread count (``_softplus``)."""
        return softplus(self.rho)

    @property
    def distribution(self) -> Normal:
        """``torch.distributions.Normal(mu, sigma)``."""
        return Normal(self.mu, self.sigma)

    def sample(self, key: Tensor) -> Tensor:
        """``mu + sigma * eps``, ``eps = tb.random.normal(key, mu.shape)`` (reparametrised)."""
        return _reparametrized(self.mu, self.sigma, key)

    def reset_parameters(
        self,
        *,
        rho: float | Tensor | None = None,
        sigma: float | Tensor | None = None,
        sigma_scale: float | None = None,
        sigma_floor: float = DEFAULT_SIGMA_FLOOR,
    ) -> PretrainedGaussianPosterior:
        """A new posterior with the same ``mu`` and ``rho`` re-initialised as in ``from_param``
        (``sigma_scale`` is relative to the current ``mu``)."""
        return PretrainedGaussianPosterior(
            self.mu, _initial_rho(self.mu, rho, sigma, sigma_scale, sigma_floor)
        )


GAUSSIAN_FAMILIES = (GaussianPosterior, PretrainedGaussianPosterior)


def check_node(node: Any, where: str) -> None:
    """A Gaussian node's fields: tensors, ``rho`` shaped, typed and placed like ``mu``."""
    if not isinstance(node, GAUSSIAN_FAMILIES):
        return
    mu, rho = node.mu, node.rho
    if not isinstance(mu, Tensor) or not mu.is_floating_point():
        fail(f"{where}.mu", "a floating-point tensor", mu, error=TypeError)
    if (
        not isinstance(rho, Tensor)
        or rho.shape != mu.shape
        or rho.dtype != mu.dtype
        # no device objects in the common case: both on the CPU
        or (not (rho.is_cpu and mu.is_cpu) and rho.device != mu.device)
    ):
        expected = f"a tensor like mu (shape {tuple(mu.shape)}, {mu.dtype}, {mu.device.type})"
        fail(f"{where}.rho", expected, rho, error=TypeError if rho is None else ValueError)


def is_posterior(node: object) -> bool:
    """True for a posterior node: one of ours or any class with the protocol's members.

    Checked on the type, not the instance, so no ``sigma`` is computed while flattening a tree.
    """
    return isinstance(node, GAUSSIAN_FAMILIES) or is_posterior_type(type(node))


def is_posterior_type(kind: type) -> bool:
    """True for a class with the members of ``VariationalPosterior``."""
    return all(hasattr(kind, name) for name in ("from_param", "sigma", "distribution", "sample"))


# ----------------------------------------------------------------------------------------------


def _reparametrized(mu: Tensor, sigma: Tensor, key: Tensor) -> Tensor:
    """``mu + sigma * eps``: differentiable in ``mu`` and ``sigma`` (Kingma & Welling 2014).

    The same ``_noise.gaussian`` call as a whole tree's, so a node drawn alone and in a tree agree
    bit for bit (two roundings, as the kernel: not ``addcmul``, which fuses into an FMA)."""
    key = check_key(key)
    if not isinstance(sigma, Tensor) or sigma.shape != mu.shape:
        sigma = torch.as_tensor(sigma, dtype=mu.dtype, device=mu.device).expand(mu.shape)
    return _noise.gaussian(key[None], None, [mu], [sigma])[0][0]


def _initial_rho(
    mu: Tensor,
    rho: float | Tensor | None,
    sigma: float | Tensor | None,
    sigma_scale: float | None,
    sigma_floor: float,
) -> Tensor:
    given = [
        name
        for name, v in (("rho", rho), ("sigma", sigma), ("sigma_scale", sigma_scale))
        if v is not None
    ]
    if len(given) > 1:
        raise ValueError(f"give at most one of rho, sigma and sigma_scale, got {', '.join(given)}.")
    if sigma is not None:
        return _rho_from_sigma(_broadcast(mu, sigma, "sigma"), "sigma")
    if sigma_scale is not None:
        for arg, value in (("sigma_scale", sigma_scale), ("sigma_floor", sigma_floor)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                fail(arg, "a positive float", value, error=TypeError)
            if not 0 < value < math.inf:
                fail(arg, "a positive finite float", value)
        scale = (mu.abs() * sigma_scale).clamp_min(sigma_floor)
        return _rho_from_sigma(scale, "sigma_scale * |param|")
    return _fill_rho(mu, DEFAULT_RHO if rho is None else rho)


def _fill_rho(like: Tensor, rho: float | Tensor) -> Tensor:
    value = _broadcast(like, rho, "rho")
    if value.device.type != "meta" and not bool(torch.isfinite(value).all()):
        fail("rho", "finite", rho)
    return value


def _broadcast(like: Tensor, value: float | Tensor, arg: str) -> Tensor:
    """``value`` as a new tensor of ``like``'s shape, dtype and device, or a shape error."""
    if isinstance(value, Tensor):
        try:
            shape = torch.broadcast_shapes(value.shape, like.shape)
        except RuntimeError:
            shape = None
        if shape != like.shape:
            fail(arg, f"a float or a tensor broadcastable to shape {tuple(like.shape)}", value)
        value = value.detach()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        fail(arg, "a float or a tensor", value, error=TypeError)
    return torch.empty_like(like).copy_(
        torch.as_tensor(value, dtype=like.dtype, device=like.device).expand(like.shape)
    )


def _rho_from_sigma(sigma: Tensor, arg: str) -> Tensor:
    if not bool((sigma > 0).all()) or not bool(torch.isfinite(sigma).all()):
        low = sigma.min().item()
        raise ValueError(f"{arg} must be positive and finite everywhere, got a minimum of {low}.")
    # log(-expm1(-s)) is log(1 - exp(-s)) without cancellation for small s; work in at least
    # float32 so bfloat16 parameters get an accurate rho.
    wide = sigma.to(torch.promote_types(sigma.dtype, torch.float32))
    return (wide + torch.log(-torch.expm1(-wide))).to(sigma.dtype)
