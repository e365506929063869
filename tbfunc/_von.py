"""Variational online Newton (VON), natural-gradient mean-field VI: the update rule, functional
(``tb.optim.von``), and what ``tb.optim.VON`` (``_von_optimizer``) shares with it.

Written from the papers' equations (Khan & Rue 2023, "The Bayesian learning rule", JMLR 24;
Shen et al. 2024, "Variational learning is effective for large deep networks", ICML, Algorithm
1). The posterior is ``N(mu, sigma^2)`` element-wise with ``sigma^2 = 1 / (N (h + delta))``:
``N`` the effective sample size (``num_data``), ``delta`` the prior precision per data point
(the prior ``N(prior_mean, 1 / (N delta))`` acts as weight decay), ``h`` a running estimate
of the expected diagonal Hessian of the per-point loss. One step, with ``eps`` the noise of
the step's draw ``theta = mu + sigma * eps`` and ``g`` the gradient of the mean minibatch loss
(the data term only: no KL) at ``theta``:

1. ``h_hat = g * eps / sigma`` (reparametrisation / Price's theorem: unbiased for E[diag H]);
2. ``gbar = beta1 gbar + (1 - beta1) g``;
3. ``h = beta2 h + (1 - beta2) h_hat + (1 - beta2)^2 (h - h_hat)^2 / (2 (h + delta))``
   (the last term is the Riemannian correction that keeps ``h + delta > 0``);
4. ``mu = mu - lr (gbar / (1 - beta1^t) + delta (mu - prior_mean)) / (h + delta)``;
5. ``rho = softplus^-1(1 / sqrt(N (h + delta)))``.

The correction of step 3 keeps ``h + delta > 0`` only for a fixed ``delta``. A learned prior
scale (``prior_scale="node"``/``"layer"``) changes ``delta`` between steps, and a ``delta``
that falls below a negative ``h`` would make the precision negative and ``sigma`` NaN. So with
a learned scale, ``h`` is first raised to at least ``-(1 - 1e-3) delta``, which keeps the
precision at no less than ``1e-3 delta`` (a choice of ours, not the papers').

The result is an ordinary tbfunc posterior tree (``predict``, ``save``, ``PosteriorModule``
work on it). ``von`` is functional (optax-like ``init``/``update``; the eps of step 1 is drawn
again from the step's key, since tbfunc's noise is a pure function of the key: nothing is
stored); ``VON`` is a ``torch.optim.Optimizer`` for imperative loops, which reads ``g`` from
``mu.grad`` and ``g * eps`` from ``rho.grad`` (``d theta / d rho = eps * sigmoid(rho)``), or,
after ``VON.sampled``, ``g * eps`` from the draw's noise it kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import optree
import torch
from torch import Tensor

from tbfunc._checks import check_key, check_positive_int, fail
from tbfunc._optimizers import finite_number, gaussian_nodes
from tbfunc._sampling import sample_many
from tbfunc.posterior import GAUSSIAN_FAMILIES, is_posterior
from tbfunc.prior import GaussianPrior, empirical_prior

LearningRate = float | Callable[[int], float]
PriorScale = Literal["fixed", "node", "layer"]
Tensors = list[Tensor] | tuple[Tensor, ...]  # what torch._foreach ops take and return
_PRECISION_FLOOR = 1e-3  # with a learned delta, h + delta >= this * delta (module docstring)

__all__ = [
    "Config",
    "LearningRate",
    "PriorScale",
    "VONState",
    "VONTransform",
    "above_precision_floor",
    "check_prior_mean",
    "check_prior_scale",
    "foreach_step",
    "make_config",
    "precisions",
    "von",
]


class VONState(NamedTuple):
    """The optimizer's state, a pytree of tensors: the step count and, per posterior name, the
    gradient momentum ``gbar`` and the curvature estimate ``h``."""

    step: Tensor
    momentum: dict[str, Tensor]
    hessian: dict[str, Tensor]


class Config(NamedTuple):
    lr: LearningRate
    num_data: int
    beta1: float
    beta2: float
    hess_init: float
    weight_decay: float
    clip: float | None


class VONTransform(NamedTuple):
    """``init(posterior) -> state`` and ``update(grads, state, posterior, key) ->
    (posterior, state)``, as returned by ``von``."""

    init: Callable[[dict[str, Any]], VONState]
    update: Callable[..., tuple[dict[str, Any], VONState]]


def von(
    lr: LearningRate,
    *,
    num_data: int,
    beta1: float = 0.9,
    beta2: float = 0.99999,
    hess_init: float = 0.1,
    weight_decay: float = 1e-4,
    clip: float | None = None,
    prior_mean: dict[str, Tensor] | None = None,
    prior_scale: PriorScale = "fixed",
) -> VONTransform:
    """Variational online Newton, functionally (the equations: ``tbfunc._von``'s docstring).

    Args:
        lr: the step size ``alpha`` (far larger than Adam's: 0.05-1), or ``step -> lr``
            (``step`` counts from 1).
        num_data: the effective sample size ``N``, the number of training points.
        beta1, beta2: the momentum and curvature averaging (``beta2`` very close to 1).
        hess_init: the initial ``h`` (sets the first steps' ``sigma``).
        weight_decay: ``delta``, the prior precision per data point.
        clip: if given, each element of the preconditioned step is clipped to ``[-clip, clip]``
            (guards the first steps, when ``h`` is still a guess).
        prior_mean: the prior's centre per name (e.g. the pretrained weights); default 0.
        prior_scale: ``"fixed"``: the prior precision is ``weight_decay``; ``"node"`` or
            ``"layer"``: learned by empirical Bayes before every step, ``delta = 1 / (N s^2)``
            with ``s`` from ``tb.empirical_prior(posterior, per=...)`` around ``prior_mean``
            (``weight_decay`` is then unused). Weights the data do not pin then get the
            layer's own spread as ``sigma`` instead of an arbitrary ``1 / sqrt(N delta)``.

    Returns:
        ``VONTransform(init, update)``. ``update(grads, state, posterior, key)`` takes the
        gradient of the mean minibatch loss with respect to the sampled weights
        ``tb.sample(posterior, key)`` (a dict keyed like the posterior) and the same ``key``.

    Example:
        >>> import torch, tbfunc as tb
        >>> net = torch.nn.Linear(3, 1)
        >>> post = tb.from_module(net)
        >>> opt = tb.optim.von(0.1, num_data=100)
        >>> state = opt.init(post)
        >>> x, y, key = torch.randn(8, 3), torch.randn(8, 1), tb.random.key(0)
        >>> def loss(w):
        ...     return ((torch.func.functional_call(net, w, (x,)) - y) ** 2).mean() / 2
        >>> grads = torch.func.grad(loss)(tb.sample(post, key))
        >>> post, state = opt.update(grads, state, post, key)
    """
    config = make_config(lr, num_data, beta1, beta2, hess_init, weight_decay, clip)
    check_prior_scale(prior_scale)

    def init(posterior: dict[str, Any]) -> VONState:
        nodes = gaussian_nodes(posterior)
        check_prior_mean(prior_mean, nodes)
        return VONState(
            torch.zeros((), dtype=torch.int64),
            {name: torch.zeros_like(node.mu) for name, node in nodes.items()},
            {name: torch.full_like(node.mu, config.hess_init) for name, node in nodes.items()},
        )

    def update(
        grads: dict[str, Tensor], state: VONState, posterior: dict[str, Any], key: Tensor
    ) -> tuple[dict[str, Any], VONState]:
        key = check_key(key)
        nodes = gaussian_nodes(posterior)
        if not isinstance(state, VONState) or set(state.hessian) != set(nodes):
            fail("state", "the VONState that init(posterior) returned", state, error=TypeError)
        _check_grads(grads, nodes)
        noise = _noise_of(posterior, key)
        step = int(state.step) + 1
        names = list(nodes)
        with torch.no_grad():
            deltas = precisions(nodes, prior_mean, prior_scale, config)
            hessians = [
                state.hessian[n]
                if prior_scale == "fixed"
                else above_precision_floor(state.hessian[n], deltas[n])
                for n in names
            ]
            mus, rhos, gbars, hs = foreach_step(
                config,
                step,
                [nodes[n].mu for n in names],
                [nodes[n].sigma for n in names],
                [grads[n] for n in names],
                torch._foreach_mul([grads[n] for n in names], [noise[n] for n in names]),
                [state.momentum[n] for n in names],
                hessians,
                None if prior_mean is None else [prior_mean[n] for n in names],
                [deltas[n] for n in names],
            )
        new = dict(posterior)
        for name, mu, rho in zip(names, mus, rhos, strict=True):
            new[name] = nodes[name]._replace(mu=mu, rho=rho)
        momentum = dict(zip(names, gbars, strict=True))
        hessian = dict(zip(names, hs, strict=True))
        return new, VONState(state.step + 1, momentum, hessian)

    return VONTransform(init, update)


def foreach_step(
    config: Config,
    step: int,
    mus: Tensors,
    sigmas: Tensors,
    gs: Tensors,
    g_eps: Tensors,
    gbars: Tensors,
    hs: Tensors,
    centres: Tensors | None,
    deltas: list[float | Tensor],
) -> tuple[Tensors, Tensors, Tensors, Tensors]:
    """One VON step for every node at once: ``(mu, rho, gbar, h)`` lists after it (equations
    1-5 above), in ``torch._foreach`` ops: a few dozen kernel calls whatever the node count,
    where a loop over nodes paid Python's dispatch per node and op."""
    b1, b2 = config.beta1, config.beta2
    delta = [float(d) for d in deltas]  # foreach ops take a list of Python scalars
    h_hat = torch._foreach_div(g_eps, sigmas)
    gbars = torch._foreach_lerp(gbars, gs, 1 - b1)  # b1 gbar + (1 - b1) g
    # the Riemannian correction (h - h_hat)^2 / (2 (h + delta)), from the old h
    correction = torch._foreach_sub(hs, h_hat)
    torch._foreach_mul_(correction, correction)
    torch._foreach_div_(correction, torch._foreach_add(hs, delta))
    hs = torch._foreach_lerp(hs, h_hat, 1 - b2)  # b2 h + (1 - b2) h_hat
    torch._foreach_add_(hs, correction, alpha=(1 - b2) ** 2 / 2)
    precision = torch._foreach_add(hs, delta)  # h + delta
    direction = torch._foreach_mul(
        mus if centres is None else torch._foreach_sub(mus, centres), delta
    )
    torch._foreach_add_(direction, gbars, alpha=1 / (1 - b1**step))
    torch._foreach_div_(direction, precision)
    if config.clip is not None:
        torch._foreach_clamp_min_(direction, -config.clip)
        torch._foreach_clamp_max_(direction, config.clip)
    lr = config.lr(step) if callable(config.lr) else config.lr
    mus = torch._foreach_add(mus, direction, alpha=-lr)
    # sigma = 1 / sqrt(N (h + delta)); rho = softplus^-1(sigma) = sigma + log(-expm1(-sigma))
    torch._foreach_mul_(precision, float(config.num_data))
    torch._foreach_sqrt_(precision)
    torch._foreach_reciprocal_(precision)
    rhos = torch._foreach_neg(precision)
    torch._foreach_expm1_(rhos)
    torch._foreach_neg_(rhos)
    torch._foreach_log_(rhos)
    torch._foreach_add_(rhos, precision)
    return mus, rhos, gbars, hs


def precisions(
    nodes: dict[str, Any], prior_mean: Any, prior_scale: str, config: Config
) -> dict[str, float | Tensor]:
    """``delta`` per node: ``weight_decay``, or ``1 / (N s^2)`` with the empirical-Bayes ``s``."""
    if prior_scale == "fixed":
        return dict.fromkeys(nodes, config.weight_decay)
    centres: Any = (
        GaussianPrior()
        if prior_mean is None
        else {name: GaussianPrior(prior_mean[name]) for name in nodes}
    )
    priors = empirical_prior(nodes, centres, per=prior_scale)  # type: ignore[arg-type]
    return {name: 1.0 / (config.num_data * priors[name].sigma ** 2) for name in nodes}


def above_precision_floor(h: Tensor, delta: float | Tensor, *, out: Tensor | None = None) -> Tensor:
    """``h`` raised to at least ``-(1 - 1e-3) delta``: the precision ``h + delta`` stays at
    ``1e-3 delta`` or more when a learned ``delta`` falls below a negative ``h``. A new tensor
    (the functional form's state is never written), or written to ``out`` (the optimizer's
    own state, in place: no allocation per step)."""
    floor = -(1.0 - _PRECISION_FLOOR) * torch.as_tensor(delta)
    return torch.maximum(h, floor.to(h), out=out)


def check_prior_scale(prior_scale: Any) -> None:
    if prior_scale not in ("fixed", "node", "layer"):
        fail("prior_scale", "one of 'fixed', 'node', 'layer'", prior_scale)


def _noise_of(posterior: dict[str, Any], key: Tensor) -> dict[str, Tensor]:
    """The eps that ``tb.sample(posterior, key)`` used, per node: the same tree with ``mu = 0``
    and ``sigma = 1`` drawn with the same key (``0 + 1 * eps`` is exact)."""
    leaves, spec = optree.tree_flatten(posterior, is_leaf=is_posterior)  # type: ignore[arg-type]
    unit = [
        leaf._replace(mu=torch.zeros_like(leaf.mu)) if isinstance(leaf, GAUSSIAN_FAMILIES) else leaf
        for leaf in leaves
    ]
    ones = {
        i: torch.ones_like(leaf.mu)
        for i, leaf in enumerate(leaves)
        if isinstance(leaf, GAUSSIAN_FAMILIES)
    }
    drawn = sample_many(optree.tree_unflatten(spec, unit), key[None], ones, check=False)
    return {
        name: value[0]
        for name, value in drawn.items()
        if name in posterior and isinstance(posterior[name], GAUSSIAN_FAMILIES)
    }


def _check_grads(grads: Any, nodes: dict[str, Any]) -> None:
    if not isinstance(grads, dict):
        fail(
            "grads",
            "a dict keyed like the posterior (the gradient wrt tb.sample's tree)",
            grads,
            error=TypeError,
        )
    for name, node in nodes.items():
        grad = grads.get(name)
        if not isinstance(grad, Tensor) or grad.shape != node.mu.shape:
            fail(
                f"grads[{name!r}]",
                f"a tensor of shape {tuple(node.mu.shape)} (the gradient wrt the sampled weight)",
                grad,
                error=TypeError if not isinstance(grad, Tensor) else ValueError,
            )


def check_prior_mean(prior_mean: Any, nodes: dict[str, Any]) -> None:
    if prior_mean is None:
        return
    if not isinstance(prior_mean, dict):
        fail(
            "prior_mean",
            "a dict of name -> tensor (e.g. tb.mean(posterior))",
            prior_mean,
            error=TypeError,
        )
    for name, node in nodes.items():
        centre = prior_mean.get(name)
        if not isinstance(centre, Tensor) or centre.shape != node.mu.shape:
            fail(f"prior_mean[{name!r}]", f"a tensor of shape {tuple(node.mu.shape)}", centre)


def make_config(
    lr: Any,
    num_data: Any,
    beta1: Any,
    beta2: Any,
    hess_init: Any,
    weight_decay: Any,
    clip: Any,
) -> Config:
    if not callable(lr) and not _positive(lr):
        fail("lr", "a positive float or a callable step -> lr", lr)
    count = check_positive_int(num_data, "num_data")
    for value, arg in ((beta1, "beta1"), (beta2, "beta2")):
        if not finite_number(value) or not 0 <= value < 1:
            fail(arg, "a float in [0, 1)", value)
    if not finite_number(hess_init) or not hess_init > 0:
        fail("hess_init", "a positive float", hess_init)
    if not finite_number(weight_decay) or not weight_decay > 0:
        fail(
            "weight_decay",
            "a positive float (the prior precision per data point)",
            weight_decay,
            "A zero prior precision leaves sigma undefined where the data set no curvature.",
        )
    if clip is not None and not _positive(clip):
        fail("clip", "None or a positive float", clip)
    return Config(
        lr, count, float(beta1), float(beta2), float(hess_init), float(weight_decay), clip
    )


def _positive(value: Any) -> bool:
    return finite_number(value) and value > 0
