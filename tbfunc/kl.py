"""KL(q || p) between a posterior tree and its priors: closed form where one exists, else MC.

The closed forms take ``log sigma`` from ``rho`` directly (``log_softplus``), so they stay finite
and differentiable for very negative ``rho``, where ``log(softplus(rho))`` underflows to
``log(0) = -inf`` in float32 (at ``rho < -103``) and its gradient becomes ``nan``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Literal

import optree
import torch
import torch.nn.functional as F
from torch import Tensor

from tbfunc import _fused, _kernel_calls, _threefry
from tbfunc._checks import check_key, check_optional_positive_int, check_positive, fail
from tbfunc._sampling import check_finite, check_tree, posterior_nodes, sample_many
from tbfunc.posterior import GAUSSIAN_FAMILIES, is_posterior
from tbfunc.prior import GaussianPrior, LaplacePrior, is_prior

__all__ = ["accumulation_dtype", "kl_divergence", "log_softplus"]

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
        A scalar tensor, differentiable in every ``mu`` and ``rho``, accumulated and returned
        in ``accumulation_dtype`` of the nodes (float32 for float16/bfloat16 nodes, whose own
        range overflows on large layers; float64 when any node is float64). Cast it yourself
        where you want the parameters' dtype. An empty posterior has KL 0 for both reductions.

    Raises:
        ValueError: a ``mu`` or ``rho`` is not finite (checked in eager mode).
    """
    check_tree(posterior)
    if reduction not in ("sum", "mean"):
        fail("reduction", "'sum' or 'mean'", reduction)
    count = check_optional_positive_int(num_samples, "num_samples")
    if key is not None:
        key = check_key(key)
    monte_carlo = key is not None or count is not None
    if monte_carlo and (key is None or count is None):
        raise ValueError(
            "key and num_samples must be given together for a Monte-Carlo KL, "
            f"got key={'a key' if key is not None else None} and "
            f"num_samples={num_samples!r}."
        )
    leaves, names, indices, _, _ = posterior_nodes(posterior)
    check_finite(leaves, names, indices)
    _, nodes, priors = _pair_with_priors(posterior, prior)
    if not nodes:  # nothing is stochastic: KL(q || p) = 0, for "mean" too (not 0 / 0)
        return torch.zeros(())
    exact = [_closed_form_kind(node, p) for node, p in zip(nodes, priors, strict=True)]
    if monte_carlo:
        if any(exact):
            warnings.warn(
                "kl_divergence: a closed form exists for some nodes but key/num_samples ask "
                "for Monte Carlo; drop them for the exact, cheaper value.",
                UserWarning,
                stacklevel=2,
            )
        assert key is not None and count is not None
        draws = sample_many(posterior, _threefry.split(key, count), check=False)  # checked above
        total = kl_from_draws(posterior, prior, draws)
    elif not all(exact):
        kinds = sorted(
            f"{type(node).__name__} vs {type(p).__name__}"
            for node, p, ok in zip(nodes, priors, exact, strict=True)
            if not ok
        )
        raise ValueError(
            f"no closed-form KL for {', '.join(dict.fromkeys(kinds))}: pass key= and "
            "num_samples= for a Monte-Carlo estimate."
        )
    else:
        total = closed_form_kl(posterior, prior)
    if reduction == "mean":
        total = total / sum(node.mu.numel() for node in nodes)
    return total


def closed_form_kl(posterior: Any, prior: Any, sigmas: list[Tensor] | None = None) -> Tensor:
    """The closed-form KL summed over all nodes (each must have one: ``has_closed_form``).

    ``sigmas``, if given, holds each node's ``softplus(rho)`` in flattening order, so a caller
    that already computed them for sampling (``nelbo``) does not pay for softplus twice.
    """
    _, nodes, priors = _pair_with_priors(posterior, prior)
    fused = _fused_kl(nodes, priors, sigmas)
    if fused is not None:
        return fused
    terms = []
    for i, (node, p) in enumerate(zip(nodes, priors, strict=True)):
        sigma = node.sigma if sigmas is None else sigmas[i]
        if isinstance(p, GaussianPrior):
            check_positive(p.sigma, "prior.sigma")
            terms.append(gaussian_kl(node.mu, node.rho, p.mu, p.sigma, sigma=sigma))
        else:
            check_positive(p.b, "prior.b")
            terms.append(gaussian_laplace_kl(node.mu, node.rho, p.mu, p.b).sum())
    return _total(terms)


def kernel_priors(posterior: Any, prior: Any) -> dict[int, Any] | None:
    """Each Gaussian node's prior in the form the CPU kernels take (``_kernel_calls.PriorTerms``),
    keyed by the node's flat leaf index, where every node has a closed-form Gaussian KL they
    serve; else None. Internal (``nelbo`` hands it to ``sample_with_kl``)."""
    indices, nodes, priors = _pair_with_priors(posterior, prior)
    terms = _kernel_terms(nodes, priors)
    return None if terms is None else dict(zip(indices, terms, strict=True))


def _kernel_terms(nodes: list[Any], priors: list[Any]) -> list[Any] | None:
    if not nodes or not all(
        isinstance(n, GAUSSIAN_FAMILIES) and isinstance(p, GaussianPrior)
        for n, p in zip(nodes, priors, strict=True)
    ):
        return None
    terms = [
        _kernel_calls.prior_terms(n.mu, p.mu, p.sigma) for n, p in zip(nodes, priors, strict=True)
    ]
    if any(t is None for t in terms):
        return None
    for p in priors:
        check_positive(p.sigma, "prior.sigma")
    return terms


def _fused_kl(nodes: list[Any], priors: list[Any], sigmas: list[Tensor] | None) -> Tensor | None:
    """The KL by the CPU kernels (one pass forward, one backward), or None where they do not
    serve: Gaussian nodes of one dtype under Gaussian priors that are numbers or tensors shaped
    like ``mu`` (and not trained), in eager code (``_fused``)."""
    mus, rhos = [n.mu for n in nodes], [n.rho for n in nodes]
    terms = _kernel_terms(nodes, priors) if _fused.eager(mus + rhos) else None
    if terms is None:
        return None
    with torch.no_grad():
        values = [n.sigma for n in nodes] if sigmas is None else sigmas
    return _fused.gaussian_kl(mus, rhos, values, terms)


def kl_from_draws(posterior: Any, prior: Any, draws: Any, *, stop_gradient: bool = False) -> Tensor:
    """Monte-Carlo KL summed over all elements, from draws already made (``sample`` with a
    leading sample axis): the Bayes-by-Backprop estimator that reuses the likelihood's draws."""
    stochastic, nodes, priors = _pair_with_priors(posterior, prior)
    drawn = optree.tree_leaves(draws)
    terms = [
        monte_carlo_term(node, p, drawn[i], stop_gradient=stop_gradient).sum()
        for i, node, p in zip(stochastic, nodes, priors, strict=True)
    ]
    return _total(terms)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions run in: at least float32 (float16 overflows at 65504 and
    bfloat16 keeps 8 bits of mantissa), float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _total(terms: list[Tensor]) -> Tensor:
    if not terms:
        return torch.zeros(())
    wide = functools.reduce(torch.promote_types, (t.dtype for t in terms))
    return torch.stack([t.to(wide) for t in terms]).sum()


def has_closed_form(posterior: Any, prior: Any) -> bool:
    """Whether every node of ``posterior`` has a closed-form KL against its prior."""
    _, nodes, priors = _pair_with_priors(posterior, prior)
    return all(_closed_form_kind(node, p) for node, p in zip(nodes, priors, strict=True))


def _closed_form_kind(node: Any, prior: Any) -> bool:
    return isinstance(node, GAUSSIAN_FAMILIES) and isinstance(prior, GaussianPrior | LaplacePrior)


def gaussian_kl(
    mu: Tensor, rho: Tensor, prior_mu: Any, prior_sigma: Any, *, sigma: Tensor | None = None
) -> Tensor:
    """KL(N(mu, sigma^2) || N(m, s^2)) summed over elements, ``sigma = softplus(rho)``:
    ``sum(log s - log sigma + (sigma^2 + (mu - m)^2) / (2 s^2) - 1/2)``.

    One fused autograd function with an analytic backward: the composite of ~20 element-wise
    ops (and as many saved buffers) made the KL cost more than the forward pass on large models.
    ``sigma`` may be passed in when the caller has it already; gradients reach ``rho`` through
    it and through ``log sigma``, which is computed from ``rho`` directly.
    """
    wide = accumulation_dtype(mu.dtype)
    mu, rho = mu.to(wide), rho.to(wide)
    # a half-precision softplus would cost the sum 1e-4 of its value: recompute it widened
    # (and a sigma given without its graph, under autograd: rho's gradient needs it)
    detached = sigma is not None and rho.requires_grad and not sigma.requires_grad
    if sigma is None or sigma.dtype != wide or (detached and torch.is_grad_enabled()):
        sigma = F.softplus(rho)
    prior_mu = torch.as_tensor(prior_mu, dtype=wide, device=mu.device)
    prior_sigma = torch.as_tensor(prior_sigma, dtype=wide, device=mu.device)
    if torch.compiler.is_compiling():
        # the compiler fuses the composite itself (and would trace the Function's backward)
        spread = sigma * sigma + (mu - prior_mu) ** 2
        log_ratio = torch.log(prior_sigma) - log_softplus(rho)
        return (log_ratio + spread / (2 * prior_sigma * prior_sigma) - 0.5).sum()
    return _GaussianKL.apply(mu, rho, sigma, prior_mu, prior_sigma)


class _GaussianKL(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(
        mu: Tensor, rho: Tensor, sigma: Tensor, prior_mu: Tensor, prior_sigma: Tensor
    ) -> Tensor:
        diff = mu - prior_mu
        spread = torch.addcmul(sigma * sigma, diff, diff)  # sigma^2 + (mu - m)^2
        # log sigma = log(softplus(rho)); below _SMALL_RHO it is rho to 1e-9 (and log would
        # see softplus underflow to 0 in float32 for rho < -103).
        log_sigma = torch.where(rho < _SMALL_RHO, rho, torch.log(sigma))
        if prior_sigma.dim() == 0:  # the common scalar prior: reduce first, scale once
            count = mu.numel()
            quadratic = spread.sum() / (2 * prior_sigma * prior_sigma)
            return quadratic - log_sigma.sum() + count * (torch.log(prior_sigma) - 0.5)
        terms = torch.log(prior_sigma) - log_sigma + spread / (2 * prior_sigma * prior_sigma)
        return terms.sum() - 0.5 * mu.numel()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        mu, rho, sigma, prior_mu, prior_sigma = ctx.saved_tensors
        variance = prior_sigma * prior_sigma
        diff = mu - prior_mu
        # d log(softplus(rho)) / d rho = sigmoid / softplus -> 1 as rho -> -inf (where softplus
        # underflows: that branch is not taken there).
        dlog = torch.where(rho < _SMALL_RHO, 1.0, torch.sigmoid(rho) / sigma)
        grad_mu = grad * diff / variance
        grads: list[Tensor | None] = [grad_mu, -grad * dlog, grad * sigma / variance, None, None]
        if ctx.needs_input_grad[3]:
            grads[3] = _reduce_to(-grad_mu, prior_mu)
        if ctx.needs_input_grad[4]:
            spread = (sigma * sigma + diff * diff) / (variance * prior_sigma)
            grads[4] = _reduce_to(grad * (1 / prior_sigma - spread), prior_sigma)
        return tuple(grads)


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a broadcast gradient back to the shape of the input it came from."""
    extra = grad.dim() - like.dim()
    grad = grad.sum(dim=tuple(range(extra))) if extra else grad
    dims = tuple(i for i, size in enumerate(like.shape) if size == 1 and grad.shape[i] != 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def gaussian_laplace_kl(mu: Tensor, rho: Tensor, prior_mu: Any, b: Any) -> Tensor:
    """KL(N(mu, sigma^2) || Laplace(m, b)) = -H(q) + log(2 b) + E|w - m| / b, where
    ``E|w - m| = sigma sqrt(2/pi) exp(-d^2 / (2 sigma^2)) + d (1 - 2 Phi(-d / sigma))``,
    ``d = mu - m`` (the folded-normal mean). Element-wise, in ``accumulation_dtype``."""
    wide = accumulation_dtype(mu.dtype)
    mu, rho = mu.to(wide), rho.to(wide)
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
    draws = draws.to(accumulation_dtype(draws.dtype))
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
        mu, rho = mu.to(draws.dtype), rho.to(draws.dtype)
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
