"""Priors over weights: objects you pass, one for every node or a dict keyed like the posterior.

Each prior is a ``NamedTuple`` of scalars or tensors with an element-wise ``log_prob`` and a
``distribution`` (a ``torch.distributions`` object) for reference and plotting.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Laplace, MixtureSameFamily, Normal

from tbfunc._checks import check_positive, check_tensor, fail
from tbfunc._concurrency import exclusive
from tbfunc.posterior import GAUSSIAN_FAMILIES

__all__ = [
    "GaussianPrior",
    "LaplacePrior",
    "ScaleMixturePrior",
    "empirical_prior",
    "pretrained_prior",
]

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
        check_positive(sigma, "sigma")
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
    with exclusive(module):  # not while another thread's draw is swapped into the module
        params = dict(module.named_parameters(remove_duplicate=False))
    missing = [name for name in posterior if name not in params]
    if missing:
        raise ValueError(
            f"posterior names {missing} are not parameters of {type(module).__name__}."
        )
    return {name: GaussianPrior.from_param(params[name], sigma=sigma) for name in posterior}


def empirical_prior(
    posterior: dict[str, Any],
    prior: GaussianPrior | dict[str, GaussianPrior] = GaussianPrior(),  # noqa: B008 - immutable
    *,
    per: Literal["node", "layer"] = "node",
    min_sigma: float = 1e-4,
) -> dict[str, GaussianPrior]:
    """The Gaussian prior scale that maximises the ELBO for the current posterior (empirical
    Bayes, type-II maximum likelihood inside variational inference).

    For a node with posterior ``N(mu_i, sigma_i^2)``, ``i = 1..n``, and prior ``N(m_i, s^2)``
    with one scale ``s``, ``d KL / d s = 0`` gives ``s^2 = (1/n) sum_i (mu_i - m_i)^2 +
    sigma_i^2`` (MacKay 1992 for the same fixed point under Laplace). The centres ``m`` are
    kept from ``prior``; only the scales are replaced. Calling it every step and minimising
    ``nelbo`` with the result is coordinate ascent on the ELBO in ``(q, s)``.

    The scale is computed without gradient: at ``s`` optimal ``d KL / d s = 0``, so the
    gradient of the KL in ``(mu, rho)`` at fixed ``s`` equals the total one (envelope theorem)
    and nothing is lost by detaching it.

    Args:
        posterior: ``dict[name, node]`` of Gaussian nodes (``tb.from_module``).
        prior: the centres: one ``GaussianPrior`` for every node (its ``mu``; default 0) or a
            dict keyed like the posterior (e.g. ``tb.pretrained_prior``, centred on the
            pretrained weights). Its ``sigma`` is ignored.
        per: ``"node"``: one scale per posterior node; ``"layer"``: one scale per module, the
            nodes whose names share everything before the last ``.`` (``fc.weight`` and
            ``fc.bias``) pooled.
        min_sigma: a floor on ``s``: with little data the fixed point can shrink ``s`` and the
            sigmas together towards the centre (over-pruning); the floor stops it there.

    Returns:
        ``dict[name, GaussianPrior]`` with 0-dim tensor scales, for ``nelbo(prior=...)`` and
        ``kl_divergence``.

    Example:
        >>> import torch, tbfunc as tb
        >>> net = torch.nn.Linear(3, 2)
        >>> post = tb.from_module(net, sigma=0.05)
        >>> prior = tb.empirical_prior(post, tb.pretrained_prior(net, post))
        >>> round(float(prior["weight"].sigma), 3)  # mu = w0: s = the posterior's 0.05
        0.05
    """
    centres = _centres(posterior, prior)
    if per not in ("node", "layer"):
        fail("per", "'node' or 'layer'", per)
    if not isinstance(min_sigma, int | float) or isinstance(min_sigma, bool) or not min_sigma > 0:
        fail("min_sigma", "a positive float", min_sigma)
    groups: dict[str, list[str]] = {}
    for name in posterior:
        groups.setdefault(name.rpartition(".")[0] if per == "layer" else name, []).append(name)
    scales: dict[str, GaussianPrior] = {}
    with torch.no_grad():
        for members in groups.values():
            total, count = 0.0, 0
            for name in members:
                node, centre = posterior[name], centres[name]
                wide = node.mu.to(torch.promote_types(node.mu.dtype, torch.float32))
                spread = (wide - centre) ** 2 + node.sigma.to(wide.dtype) ** 2
                total, count = total + spread.sum(), count + spread.numel()
            scale = torch.as_tensor(total / max(count, 1)).sqrt().clamp_min(min_sigma)
            for name in members:
                mu = posterior[name].mu
                scales[name] = GaussianPrior(centres[name], scale.to(mu.dtype).to(mu.device))
    return scales


def is_prior(value: object) -> bool:
    return isinstance(value, PRIORS) or (
        hasattr(type(value), "log_prob") and not isinstance(value, dict | Tensor)
    )


def _centres(posterior: Any, prior: Any) -> dict[str, float | Tensor]:
    """Each node's prior centre, checking that the nodes are Gaussian and the priors too."""
    if not isinstance(posterior, dict) or not posterior:
        fail(
            "posterior",
            "a non-empty dict of parameter name -> Gaussian posterior node",
            posterior,
            "Build one with tb.from_module(module).",
            TypeError,
        )
    if isinstance(prior, dict):
        missing = sorted(set(posterior) - set(prior))
        if missing:
            raise ValueError(f"prior has no entry for posterior names {missing}.")
    elif not isinstance(prior, GaussianPrior):
        fail(
            "prior",
            "a tb.GaussianPrior or a dict of them keyed like the posterior",
            prior,
            error=TypeError,
        )
    centres: dict[str, float | Tensor] = {}
    for name, node in posterior.items():
        if not isinstance(node, GAUSSIAN_FAMILIES):
            fail(f"posterior[{name!r}]", "a Gaussian posterior node", node, error=TypeError)
        chosen = prior[name] if isinstance(prior, dict) else prior
        if not isinstance(chosen, GaussianPrior):
            fail(f"prior[{name!r}]", "a tb.GaussianPrior", chosen, error=TypeError)
        centres[name] = chosen.mu
    return centres


def _tensor(value: float | Tensor, like: Tensor | None = None) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if like is None:
        return torch.tensor(float(value))
    return torch.tensor(float(value), dtype=like.dtype, device=like.device)


def _check_mixture(prior: ScaleMixturePrior) -> None:
    if not 0 < prior.pi < 1:
        fail("pi", "in (0, 1)", prior.pi)
    check_positive(prior.sigma1, "sigma1")
    check_positive(prior.sigma2, "sigma2")
