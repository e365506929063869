"""KL(q || p) between a posterior tree and its priors: closed form where one exists, else MC.

The closed forms take ``log sigma`` from ``rho`` directly (``log_softplus``), so they stay finite
and differentiable for very negative ``rho``, where ``log(softplus(rho))`` underflows to
``log(0) = -inf`` in float32 (at ``rho < -103``) and its gradient becomes ``nan``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import optree
import torch
import torch.nn.functional as F
from torch import Tensor

from tbfunc import random
from tbfunc._checks import check_key, check_optional_positive_int, fail
from tbfunc.module import _sample_many
from tbfunc.posterior import GAUSSIAN_FAMILIES, is_posterior
from tbfunc.prior import GaussianPrior, LaplacePrior, _check_positive, is_prior

__all__ = ["kl_divergence", "log_softplus"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_LOG_2_OVER_PI_HALF = 0.5 * math.log(2 / math.pi)
_SMALL_RHO = (
    -20.0
)  # below this, softplus(rho) = exp(rho) (1 - exp(rho)/2 + ...) to float64 precision


def kl_divergence(
    posterior: Any,
    prior: Any = GaussianPrior(),  # noqa: B008 - an immutable NamedTuple of floats
    *,
    reduction: Literal["sum", "mean"] = "sum",
    key: Tensor | None = None,
    num_samples: int | None = None,
) -> Tensor:
    """KL(q || p) summed (or averaged) over every element of every posterior node.

    Closed form for a Gaussian posterior against ``GaussianPrior`` and ``LaplacePrior``;
    Monte Carlo ``mean_s [log q(w_s) - log p(w_s)]`` with ``w_s = sample(posterior, key,
    num_samples=S)[s]`` otherwise (e.g. ``ScaleMixturePrior``). Passing ``key`` and
    ``num_samples`` where a closed form exists uses Monte Carlo anyway, with a warning.

    Args:
        posterior: a posterior node or a tree of them (e.g. from ``from_module``).
        prior: one prior for every node, or a dict with exactly the posterior's names.
        reduction: ``"sum"`` (the ELBO's KL) or ``"mean"`` (divided by the number of elements).
        key, num_samples: for the Monte-Carlo estimate.

    Returns:
        A scalar tensor, differentiable in every ``mu`` and ``rho``.
    """
    if reduction not in ("sum", "mean"):
        fail("reduction", "'sum' or 'mean'", reduction)
    count = check_optional_positive_int(num_samples, "num_samples")
    if key is not None:
        check_key(key)
    stochastic, nodes, priors = _pair_with_priors(posterior, prior)
    monte_carlo = key is not None or count is not None
    if monte_carlo and (key is None or count is None):
        raise ValueError(
            "key and num_samples must be given together for a Monte-Carlo KL, "
            f"got key={'a key' if key is not None else None} and "
            f"num_samples={num_samples!r}."
        )
    closed = [
        None if monte_carlo else closed_form(node, p) for node, p in zip(nodes, priors, strict=True)
    ]
    needs_mc = [i for i, value in enumerate(closed) if value is None]
    if needs_mc and not monte_carlo:
        kinds = sorted(
            {f"{type(nodes[i]).__name__} vs {type(priors[i]).__name__}" for i in needs_mc}
        )
        raise ValueError(
            f"no closed-form KL for {', '.join(kinds)}: pass key= and num_samples= for a "
            "Monte-Carlo estimate."
        )
    if monte_carlo and any(
        closed_form(n, p) is not None for n, p in zip(nodes, priors, strict=True)
    ):
        warnings.warn(
            "kl_divergence: a closed form exists for some nodes but key/num_samples ask for "
            "Monte Carlo; drop them for the exact, cheaper value.",
            UserWarning,
            stacklevel=2,
        )
    if monte_carlo:
        assert key is not None and count is not None
        drawn = optree.tree_leaves(_sample_many(posterior, random._split(key, count)))
        terms = [
            monte_carlo_term(node, p, drawn[i])
            for i, node, p in zip(stochastic, nodes, priors, strict=True)
        ]
    else:
        terms = [value for value in closed if value is not None]
    total = torch.stack([term.sum() for term in terms]).sum() if terms else torch.zeros(())
    if reduction == "mean":
        total = total / sum(node.mu.numel() for node in nodes)
    return total


def kl_from_draws(posterior: Any, prior: Any, draws: Any, *, stop_gradient: bool = False) -> Tensor:
    """Monte-Carlo KL summed over all elements, from draws already made (``sample`` with a
    leading sample axis): the Bayes-by-Backprop estimator that reuses the likelihood's draws."""
    stochastic, nodes, priors = _pair_with_priors(posterior, prior)
    drawn = optree.tree_leaves(draws)
    terms = [
        monte_carlo_term(node, p, drawn[i], stop_gradient=stop_gradient).sum()
        for i, node, p in zip(stochastic, nodes, priors, strict=True)
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def has_closed_form(posterior: Any, prior: Any) -> bool:
    """Whether every node of ``posterior`` has a closed-form KL against its prior."""
    _, nodes, priors = _pair_with_priors(posterior, prior)
    return all(_closed_form_kind(node, p) for node, p in zip(nodes, priors, strict=True))


def closed_form(node: Any, prior: Any) -> Tensor | None:
    """Element-wise KL(node || prior), or None where tbfunc knows no closed form."""
    if not _closed_form_kind(node, prior):
        return None
    if isinstance(prior, GaussianPrior):
        _check_positive(prior.sigma, "prior.sigma")
        return gaussian_kl(node.mu, node.rho, prior.mu, prior.sigma)
    _check_positive(prior.b, "prior.b")
    return gaussian_laplace_kl(node.mu, node.rho, prior.mu, prior.b)


def _closed_form_kind(node: Any, prior: Any) -> bool:
    return isinstance(node, GAUSSIAN_FAMILIES) and isinstance(prior, GaussianPrior | LaplacePrior)


def gaussian_kl(mu: Tensor, rho: Tensor, prior_mu: Any, prior_sigma: Any) -> Tensor:
    """KL(N(mu, sigma^2) || N(m, s^2)) element-wise, ``sigma = softplus(rho)``:
    ``log s - log sigma + (sigma^2 + (mu - m)^2) / (2 s^2) - 1/2``."""
    sigma = F.softplus(rho)
    ratio = sigma / prior_sigma
    log_s = torch.log(torch.as_tensor(prior_sigma, dtype=mu.dtype, device=mu.device))
    return log_s - log_softplus(rho) + 0.5 * (ratio**2 + ((mu - prior_mu) / prior_sigma) ** 2) - 0.5


def gaussian_laplace_kl(mu: Tensor, rho: Tensor, prior_mu: Any, b: Any) -> Tensor:
    """KL(N(mu, sigma^2) || Laplace(m, b)) = -H(q) + log(2 b) + E|w - m| / b, where
    ``E|w - m| = sigma sqrt(2/pi) exp(-d^2 / (2 sigma^2)) + d (1 - 2 Phi(-d / sigma))``,
    ``d = mu - m`` (the folded-normal mean)."""
    sigma = F.softplus(rho)
    d = mu - prior_mu
    # Beyond |d| > 20 sigma the folded mean is |d| to within exp(-200); computing d / sigma
    # there would overflow its gradient (-d / sigma^2) and give inf * 0 = nan. Both branches
    # get safe inputs, so the unused one stays finite.
    moderate = d.abs() < 20 * sigma
    safe_sigma = torch.where(moderate, sigma, torch.ones_like(sigma))
    safe_d = torch.where(moderate, d, torch.zeros_like(d))
    z = safe_d / safe_sigma
    near = safe_sigma * torch.exp(_LOG_2_OVER_PI_HALF - 0.5 * z**2) + safe_d * torch.erf(
        z / math.sqrt(2)
    )
    folded = torch.where(moderate, near, d.abs())
    entropy = 0.5 + _LOG_SQRT_2PI + log_softplus(rho)
    log_2b = torch.log(2 * torch.as_tensor(b, dtype=mu.dtype, device=mu.device))
    return -entropy + log_2b + folded / b


def monte_carlo_term(
    node: Any, prior: Any, draws: Tensor, *, stop_gradient: bool = False
) -> Tensor:
    """``mean_s [log q(w_s) - log p(w_s)]`` element-wise, for draws with a leading sample axis.

    With ``stop_gradient`` the density of q is evaluated at detached ``(mu, rho)``: the
    "sticking the landing" estimator (Roeder et al. 2017), whose gradient has zero variance
    when q equals the true posterior.
    """
    log_q = _log_q(node, draws, stop_gradient)
    return (log_q - prior.log_prob(draws)).mean(0)


def log_softplus(rho: Tensor) -> Tensor:
    """``log(softplus(rho))`` without underflow: ``rho + log1p(-exp(rho) / 2)`` for very negative
    ``rho`` (the series of ``log(log1p(e^rho))``). Both branches get clamped inputs, so the
    unused one never makes ``inf * 0 = nan`` in the gradient."""
    small = torch.clamp(rho, max=_SMALL_RHO)
    large = torch.clamp(rho, min=_SMALL_RHO)
    return torch.where(
        rho < _SMALL_RHO, small + torch.log1p(-0.5 * torch.exp(small)), torch.log(F.softplus(large))
    )


# ----------------------------------------------------------------------------------------------


def _log_q(node: Any, draws: Tensor, stop_gradient: bool) -> Tensor:
    if isinstance(node, GAUSSIAN_FAMILIES):
        mu, rho = (node.mu.detach(), node.rho.detach()) if stop_gradient else (node.mu, node.rho)
        return -0.5 * ((draws - mu) / F.softplus(rho)) ** 2 - log_softplus(rho) - _LOG_SQRT_2PI
    if stop_gradient:
        node = optree.tree_map(torch.Tensor.detach, node)
    return node.distribution.log_prob(draws)


def _pair_with_priors(posterior: Any, prior: Any) -> tuple[list[int], list[Any], list[Any]]:
    """The posterior nodes (with their flat leaf indices) and the prior of each."""
    paths, leaves, _ = optree.tree_flatten_with_path(posterior, is_leaf=is_posterior)
    stochastic = [i for i, leaf in enumerate(leaves) if is_posterior(leaf)]
    names = [".".join(str(part) for part in paths[i]) for i in stochastic]
    return stochastic, [leaves[i] for i in stochastic], _match_priors(names, prior)


def _match_priors(names: list[str], prior: Any) -> list[Any]:
    """One prior per node: the shared one, or the dict's entry for each node's name."""
    if not isinstance(prior, dict):
        if not is_prior(prior):
            fail(
                "prior",
                "a prior (e.g. tb.GaussianPrior()) or a dict of them",
                prior,
                error=TypeError,
            )
        return [prior] * len(names)
    missing = [n for n in names if n not in prior]
    extra = [n for n in prior if n not in names]
    if missing or extra:
        raise ValueError(
            "prior must have exactly the posterior's names, got "
            + "; ".join(
                part
                for part in (
                    f"missing {missing}" if missing else "",
                    f"extra {extra}" if extra else "",
                )
                if part
            )
            + "."
        )
    for name in names:
        if not is_prior(prior[name]):
            fail(f"prior[{name!r}]", "a prior", prior[name], error=TypeError)
    return [prior[n] for n in names]
