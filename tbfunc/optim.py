"""Posterior optimizers: natural-gradient mean-field VI (variational online Newton), and
Bayes-by-Backprop's fused Adam with its routes through the module itself (``Adam.sampled``,
``sampled``; ``_sampled`` holds their block). What follows is VON's.

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

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import optree
import torch
from torch import Tensor, nn

from tbfunc import _fused, _sampled
from tbfunc._checks import check_key, check_positive_int, fail
from tbfunc._concurrency import exclusive
from tbfunc._sampling import canonical, node_hashes, remember_finite, sample_many
from tbfunc._softplus import softplus
from tbfunc.kl import closed_form_kl, has_closed_form, kernel_priors, kl_from_draws
from tbfunc.objective import parameters
from tbfunc.posterior import GAUSSIAN_FAMILIES, is_posterior
from tbfunc.prior import GaussianPrior, empirical_prior

__all__ = ["VON", "Adam", "VONState", "sampled", "von"]

LearningRate = float | Callable[[int], float]
PriorScale = Literal["fixed", "node", "layer"]
Tensors = list[Tensor] | tuple[Tensor, ...]  # what torch._foreach ops take and return
_PRECISION_FLOOR = 1e-3  # with a learned delta, h + delta >= this * delta (module docstring)


class VONState(NamedTuple):
    """The optimizer's state, a pytree of tensors: the step count and, per posterior name, the
    gradient momentum ``gbar`` and the curvature estimate ``h``."""

    step: Tensor
    momentum: dict[str, Tensor]
    hessian: dict[str, Tensor]


class _Config(NamedTuple):
    lr: LearningRate
    num_data: int
    beta1: float
    beta2: float
    hess_init: float
    weight_decay: float
    clip: float | None


class _PendingDraw(NamedTuple):
    """``Adam.sampled``'s draw awaiting ``step()``: its key, the weight gradients summed over
    its blocks, its sigma, and the objective's prior (with the kernels' form of it, or None) and KL
    scale ``kl_weight / num_data``."""

    key: Tensor
    grads: list[Tensor]
    sigmas: list[Tensor]
    prior: Any
    terms: list[Any] | None
    kl_scale: float


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
    """Variational online Newton, functionally (the module docstring has the equations).

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
    config = _config(lr, num_data, beta1, beta2, hess_init, weight_decay, clip)
    _check_prior_scale(prior_scale)

    def init(posterior: dict[str, Any]) -> VONState:
        nodes = _gaussian_nodes(posterior)
        _check_prior_mean(prior_mean, nodes)
        return VONState(
            torch.zeros((), dtype=torch.int64),
            {name: torch.zeros_like(node.mu) for name, node in nodes.items()},
            {name: torch.full_like(node.mu, config.hess_init) for name, node in nodes.items()},
        )

    def update(
        grads: dict[str, Tensor], state: VONState, posterior: dict[str, Any], key: Tensor
    ) -> tuple[dict[str, Any], VONState]:
        key = check_key(key)
        nodes = _gaussian_nodes(posterior)
        if not isinstance(state, VONState) or set(state.hessian) != set(nodes):
            fail("state", "the VONState that init(posterior) returned", state, error=TypeError)
        _check_grads(grads, nodes)
        noise = _noise_of(posterior, key)
        step = int(state.step) + 1
        names = list(nodes)
        with torch.no_grad():
            deltas = _precisions(nodes, prior_mean, prior_scale, config)
            hessians = [
                state.hessian[n]
                if prior_scale == "fixed"
                else _above_precision_floor(state.hessian[n], deltas[n])
                for n in names
            ]
            mus, rhos, gbars, hs = _step(
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


class VON(torch.optim.Optimizer):
    """Variational online Newton as a ``torch.optim.Optimizer`` over a posterior's tensors.

    The loss must be the data term only, computed through the posterior with one draw, so that
    ``mu.grad = g`` and ``rho.grad = g * eps * sigmoid(rho)``; the prior enters as
    ``weight_decay``. ``sampled(module, key)`` is the faster route to the same step: the draw
    goes into the module itself, and the step reads ``g * eps`` from the noise it kept.
    ``step()`` then updates ``mu`` and ``rho`` in place (the tree stays usable with
    ``predict``/``save``). ``state_dict``/``load_state_dict`` checkpoint it.

    Example:
        >>> import torch, torch.nn.functional as F, tbfunc as tb
        >>> net = torch.nn.Linear(3, 2)
        >>> post = tb.from_module(net)
        >>> opt = tb.optim.VON(post, lr=0.1, num_data=100)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> loss = F.cross_entropy(tb.functional_call(net, post, tb.random.key(0), x), y)
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        posterior: dict[str, Any],
        lr: float = 0.1,
        *,
        num_data: int,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        hess_init: float = 0.1,
        weight_decay: float = 1e-4,
        clip: float | None = None,
        prior_mean: dict[str, Tensor] | None = None,
        prior_scale: PriorScale = "fixed",
    ) -> None:
        if callable(lr):
            fail(
                "lr", "a float (use a torch.optim.lr_scheduler for schedules)", lr, error=TypeError
            )
        nodes = _gaussian_nodes(posterior)
        _check_prior_mean(prior_mean, nodes)
        config = _config(lr, num_data, beta1, beta2, hess_init, weight_decay, clip)
        _check_prior_scale(prior_scale)
        self._names = list(nodes)
        self._families = [type(node) for node in nodes.values()]
        self._prior_scale = prior_scale
        self._prior_mean = prior_mean
        params: list[Tensor] = []
        for node in nodes.values():
            for tensor in (node.mu, node.rho):
                if not tensor.is_leaf:
                    fail("posterior", "leaf tensors (detach them first)", tensor)
                params.append(tensor.requires_grad_(True))
        defaults = config._asdict()
        super().__init__(params, defaults)
        self._hashes = node_hashes([canonical(name) for name in self._names])
        # sampled()'s scratch: the draw the module points at during a block, and the last
        # draw's eps per node, which step() reads
        self._work = _sampled.Scratch()
        self._view: list[Any] | None = None
        self._pending: Tensor | None = None  # that draw's key, until step() or zero_grad()
        # the rho versions that state["sigma"] belongs to: the sigma the last sampled() step
        # wrote, valid while nothing has written rho since (else None)
        self._sigma_versions: list[int] | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            config = _Config(**{field: group[field] for field in _Config._fields})
            params = group["params"]
            mus, rhos = params[0::2], params[1::2]
            view = dict(zip(self._names, self._nodes(mus, rhos), strict=True))
            deltas = _precisions(view, self._prior_mean, self._prior_scale, config)
            noise = self._pending_noise(mus, rhos)
            for name, mu, rho in zip(self._names, mus, rhos, strict=True):
                if mu.grad is None or (noise is None and rho.grad is None):
                    raise RuntimeError(
                        f"posterior[{name!r}] has no gradient in mu and rho: compute the loss "
                        "through the posterior (tb.functional_call(module, posterior, key, x), "
                        "or the module itself inside opt.sampled(module, key)) and call "
                        "loss.backward() before step()."
                    )
                state = self.state[mu]
                if "step" not in state:  # sampled() may have kept a sigma here first
                    state["step"] = torch.zeros((), dtype=torch.int64)
                    state["momentum"] = torch.zeros_like(mu)
                    state["hessian"] = torch.full_like(mu, config.hess_init)
                state["step"] += 1
            states = [self.state[mu] for mu in mus]
            if self._prior_scale != "fixed":
                for name, state in zip(self._names, states, strict=True):
                    h = state["hessian"]
                    _above_precision_floor(h, deltas[name], out=h)
            sigmas = None if noise is None else [state["sigma"] for state in states]
            if self._fused_step(config, mus, rhos, states, deltas, noise, sigmas):
                self._sigma_versions = None if noise is None else _versions(rhos)
                continue
            if noise is not None:
                g_eps = torch._foreach_mul([mu.grad for mu in mus], noise)
            else:
                rho_grads = [rho.grad for rho in rhos]
                # d theta / d rho = eps * sigmoid(rho), so rho.grad / sigmoid(rho) = g * eps
                g_eps = torch._foreach_div(rho_grads, torch._foreach_sigmoid(rhos))
            new_mus, new_rhos, gbars, hs = _step(
                config,
                int(states[0]["step"]),
                mus,
                # the draw's sigma, bit for bit
                sigmas if sigmas is not None else [softplus(rho) for rho in rhos],
                [mu.grad for mu in mus],
                g_eps,
                [state["momentum"] for state in states],
                [state["hessian"] for state in states],
                None if self._prior_mean is None else [self._prior_mean[n] for n in self._names],
                [deltas[n] for n in self._names],
            )
            for mu, rho, state, new_mu, new_rho, gbar, h in zip(
                mus, rhos, states, new_mus, new_rhos, gbars, hs, strict=True
            ):
                mu.copy_(new_mu)
                rho.copy_(new_rho)
                state["momentum"], state["hessian"] = gbar, h
        self._pending = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; it also forgets a ``sampled`` draw not yet
        stepped on (its gradient is gone with the rest)."""
        super().zero_grad(set_to_none)
        self._pending = None

    @contextlib.contextmanager
    def sampled(self, module: nn.Module, key: Tensor) -> Iterator[nn.Module]:
        """Run ``module`` itself with one draw of the posterior in its parameters: the fast
        route for a training step (no ``torch.func`` machinery, no autograd through the draw).

        Inside the block the module's parameters named by the posterior hold
        ``mu + sigma * eps`` and require gradients; run the forward and ``loss.backward()``
        there (the restored weights are not the ones the forward used). On leaving, the module
        gets its own values, ``requires_grad`` flags and ``.grad`` back, and each ``mu.grad``
        gains the weight gradient ``g`` (accumulated, as autograd would). ``step()`` then takes
        ``g * eps`` from the draw's noise, kept here, instead of ``rho.grad``, which stays as
        it was (``None`` after ``zero_grad()``). The step equals the ``tb.functional_call``
        route's to rounding.

        ``eps`` is ``tb.sample(posterior, key)``'s noise. ``sigma`` is ``softplus(rho)`` on a
        first draw (the bits of ``tb.sample``); after a step of this route it is the sigma that
        step computed, ``1 / sqrt(N (h + delta))``, whose inverse softplus the step wrote to
        ``rho`` (``softplus(rho)`` gives it back to an ulp or two). Keeping it saves a softplus
        over every weight in the draw and in the step. Any write to ``rho`` since (in place,
        ``load_state_dict``, a step of the other route) brings ``softplus(rho)`` back; a write
        through ``rho.data`` is not seen, since autograd's version counter skips it.

        Micro-batches of one draw may run several blocks with the same key before ``step()``;
        another key before ``step()`` is refused (the first draw's noise would be lost). The
        forward is the module's own call, so dropout and batch-norm layers in training mode act
        as they do without tbfunc (on the global RNG, updating their statistics), where
        ``tb.functional_call`` refuses them. The module is held for the block (one thread at a
        time, as for every tbfunc call that runs it); another thread that calls it directly
        sees the drawn weights.

        Example:
            >>> import torch, torch.nn.functional as F, tbfunc as tb
            >>> net = torch.nn.Linear(3, 2).requires_grad_(False)
            >>> post = tb.from_module(net)
            >>> opt = tb.optim.VON(post, lr=0.1, num_data=100)
            >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
            >>> with opt.sampled(net, tb.random.key(0)):
            ...     F.cross_entropy(net(x), y).backward()
            >>> opt.step(); opt.zero_grad()
        """
        if not isinstance(module, nn.Module):
            fail("module", "an nn.Module", module, error=TypeError)
        key = check_key(key)
        if self._pending is not None and not torch.equal(key, self._pending):
            raise ValueError(
                "VON.sampled: a second draw with another key before step(): the first draw's "
                "noise would be lost. Call step() (or zero_grad()) after each draw; micro-batches "
                "of one draw pass the same key."
            )
        params = self.param_groups[0]["params"]
        mus, rhos = params[0::2], params[1::2]
        view = dict(zip(self._names, self._nodes(mus, rhos), strict=True))
        with exclusive(module):
            sigmas = self._draw_sigmas(mus, rhos)
            with _sampled.drawn(
                module, view, self._names, key, self._hashes, sigmas, self._work
            ) as found:
                yield module
            for mu, g in zip(mus, found, strict=True):
                if g is None:
                    continue
                if mu.grad is None:
                    mu.grad = g
                else:
                    mu.grad.add_(g)
            self._pending = key.clone()

    def _draw_sigmas(self, mus: list[Tensor], rhos: list[Tensor]) -> list[Tensor]:
        """The draw's sigma per node, kept in ``state["sigma"]``: the one the last step wrote
        while ``rho`` is as that step left it (that step's ``1 / sqrt(N (h + delta))``, of which
        ``rho`` is the inverse softplus, so ``softplus(rho)`` would give it back to an ulp or
        two); else ``softplus(rho)``, ``tb.sample``'s own."""
        states = [self.state[mu] for mu in mus]
        if self._sigma_versions == _versions(rhos) and all("sigma" in st for st in states):
            return [st["sigma"] for st in states]
        for state, rho in zip(states, rhos, strict=True):
            state["sigma"] = softplus(rho).contiguous()
        self._sigma_versions = _versions(rhos)
        return [st["sigma"] for st in states]

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``; a kept sigma (``sampled``) only while it is
        the posterior's, so that a restart draws what the run would have drawn."""
        saved = super().state_dict()
        rhos = self.param_groups[0]["params"][1::2]
        return saved if self._sigma_versions == _versions(rhos) else _without_sigma(saved)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``; a sigma in it belongs to the posterior
        as it is now (load the posterior's tensors first, as for any optimizer)."""
        super().load_state_dict(state_dict)
        params = self.param_groups[0]["params"]
        kept = all("sigma" in self.state[mu] for mu in params[0::2])
        self._sigma_versions = _versions(params[1::2]) if kept else None

    def _nodes(self, mus: list[Tensor], rhos: list[Tensor]) -> list[Any]:
        """The posterior's nodes over the optimizer's tensors, built once per tensor set."""
        seen = self._view
        if seen is None or any(
            n.mu is not m or n.rho is not r for n, m, r in zip(seen, mus, rhos, strict=True)
        ):
            seen = [f(m, r) for f, m, r in zip(self._families, mus, rhos, strict=True)]
            self._view = seen
        return seen

    def _pending_noise(self, mus: list[Tensor], rhos: list[Tensor]) -> list[Tensor] | None:
        """The eps of the draw ``sampled`` left for this step, or None (the rho.grad route)."""
        if self._pending is None:
            return None
        mixed = [name for name, rho in zip(self._names, rhos, strict=True) if rho.grad is not None]
        if mixed:
            raise RuntimeError(
                f"VON.step: posterior[{mixed[0]!r}] has a rho gradient and a sampled() draw is "
                "pending: one step takes one route. Compute the loss either inside "
                "opt.sampled(module, key) or through tb.functional_call, and call zero_grad() "
                "between steps."
            )
        return self._work.noise

    def _fused_step(
        self,
        config: _Config,
        mus: list[Tensor],
        rhos: list[Tensor],
        states: list[dict[str, Tensor]],
        deltas: dict[str, float | Tensor],
        noise: list[Tensor] | None,
        sigmas: list[Tensor] | None,
    ) -> bool:
        """The update by one C pass (``_fused.von_step``), where it serves: CPU float32/float64
        tensors of one dtype, contiguous, with a scalar prior precision per node. ``noise`` and
        ``sigmas``: the pending ``sampled`` draw's eps and sigma, read in place of the rho
        gradients and ``softplus(rho)``; the kernel writes the new sigma to ``sigmas``."""
        grads = [t.grad for t in mus] + ([t.grad for t in rhos] if noise is None else noise)
        gbars = [state["momentum"] for state in states]
        hs = [state["hessian"] for state in states]
        centres = None if self._prior_mean is None else [self._prior_mean[n] for n in self._names]
        tensors = [*mus, *rhos, *grads, *gbars, *hs, *(centres or []), *(sigmas or [])]
        precisions = [deltas[n] for n in self._names]
        if not _fused.eager(tensors) or not all(t.is_contiguous() for t in tensors):  # type: ignore[arg-type,union-attr]
            return False
        if any(isinstance(d, Tensor) and d.numel() != 1 for d in precisions):
            return False
        step = int(states[0]["step"])
        finite = _fused.von_step(
            (mus, rhos, grads[: len(mus)], grads[len(mus) :]),  # type: ignore[arg-type]
            gbars,
            hs,
            centres,
            [float(d) for d in precisions],
            step=step,
            lr=config.lr(step) if callable(config.lr) else config.lr,
            beta1=config.beta1,
            beta2=config.beta2,
            num_data=config.num_data,
            clip=config.clip,
            sigmas=sigmas,
        )
        if finite:  # the kernel read every new value: no pass before the next draw
            _remember_finite(mus, rhos)
        return True


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` over a posterior's ``mu`` and ``rho`` (or any tensors), fused.

    The same update, hyperparameters and state as ``torch.optim.Adam`` (its ``state_dict``
    loads into one and back), computed by one C pass over all the tensors of a group instead
    of a dozen tensor ops per tensor. Pair it with ``tb.nelbo``, whose draw and KL take their
    fused route under plain autograd on the CPU: that step costs about 1.2x an ordinary
    training step (``benchmarks/training.py``), against 2-3x for ``nelbo`` +
    ``torch.optim.Adam`` before the fused route. Built from the posterior tree, it also has
    ``sampled``: the draw in the module itself and one pass per step for the gradient, the
    update and the next draw's sigma, the fastest step.

    The fused pass serves CPU float32/float64 tensors (one dtype per group, dense gradients)
    with ``amsgrad``, ``maximize``, ``capturable``, ``differentiable``, ``fused`` and
    ``decoupled_weight_decay`` off, in eager code with tbfunc's C kernels built. Elsewhere (a
    GPU, other dtypes, those options, ``torch.compile``, no C compiler) ``step`` is
    ``torch.optim.Adam.step`` itself; both give the same values to rounding.

    Args:
        params: a posterior tree (its tensors are set to ``requires_grad`` as by
            ``tb.parameters``), or what ``torch.optim.Adam`` takes (tensors, parameter groups).
        lr, betas, eps, weight_decay, **options: as in ``torch.optim.Adam``.

    Example:
        >>> import torch, torch.nn.functional as F, tbfunc as tb
        >>> net = torch.nn.Linear(3, 2)
        >>> post = tb.from_module(net)
        >>> opt = tb.optim.Adam(post, lr=1e-3)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> loss = tb.nelbo(net, post, tb.random.key(0), x, y, loss_fn=F.cross_entropy,
        ...                 num_data=100)
        >>> opt.zero_grad(); loss.backward(); opt.step()
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> None:
        tree = params if isinstance(params, dict) else None
        if isinstance(params, dict) or is_posterior(params):
            params = parameters(params)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)
        # sampled(): the posterior's Gaussian nodes, and the pending draw of a block
        self._tree = tree
        self._work = _sampled.Scratch()
        self._pending: _PendingDraw | None = None
        # the rho versions that state[rho]["sigma"] belongs to (the sigma the last sampled
        # step wrote), valid while nothing has written rho since (else None)
        self._sigma_versions: list[int] | None = None

    @contextlib.contextmanager
    def sampled(
        self,
        module: nn.Module,
        key: Tensor,
        *,
        num_data: int,
        prior: Any = GaussianPrior(),  # noqa: B008 - an immutable NamedTuple of floats
        kl_weight: float = 1.0,
    ) -> Iterator[nn.Module]:
        """Run ``module`` itself with one draw of the posterior in its parameters, and let the
        next ``step()`` turn the weight gradient into Bayes-by-Backprop's update: the fastest
        route of a training step (one draw, the model's own forward and backward, one pass).

        Inside the block the module's parameters named by the posterior hold
        ``mu + sigma * eps`` and require gradients; compute the batch-mean NLL with the module
        there and call ``backward()``. On leaving, the module gets its own values, flags and
        ``.grad`` back, and the optimizer keeps the weight gradient ``g`` and the draw's
        ``eps``. ``step()`` then computes, in one C pass per step, the gradient of
        ``loss + kl_weight * KL / num_data`` (``nelbo``'s objective on that draw, the closed-form
        KL against ``prior``) with respect to ``mu`` and ``rho``, Adam's update of both, and
        the next draw's ``sigma = softplus(rho)``. The step equals ``tb.optim.sampled`` +
        ``step()`` (and so ``nelbo`` + ``step()``) to rounding. ``mu.grad`` and ``rho.grad``
        stay as they were: clip or inspect gradients through ``tb.optim.sampled``, which writes
        them.

        ``sigma`` is ``softplus(rho)``: torch's on a first draw (the bits of
        ``tb.sample(posterior, key)``); after a step of this route, the kernel's, to an ulp of
        torch's, kept in ``state[rho]["sigma"]`` while ``rho`` is as that step left it (any
        other write to ``rho`` brings torch's back; ``state_dict`` carries the kept one, so a
        restart draws what the run would have drawn). Micro-batches of one draw may run several
        blocks with the same key before ``step()`` (their gradients add up, as autograd's
        would: scale each loss); another key, or other ``num_data``/``kl_weight``/``prior``,
        before ``step()`` is refused. Where the pass does not serve (another prior, a GPU,
        options ``torch.optim.Adam`` has that the pass lacks), ``step()`` writes the gradients
        by ``tb.optim.sampled``'s route and steps as without a draw.

        Needs the optimizer built from the posterior tree (``tb.optim.Adam(posterior)``), one
        parameter group. The module is held for the block, as by ``tb.optim.sampled``.

        Example:
            >>> import torch, torch.nn.functional as F, tbfunc as tb
            >>> net = torch.nn.Linear(3, 2).requires_grad_(False)
            >>> post = tb.from_module(net)
            >>> opt = tb.optim.Adam(post, lr=1e-3)
            >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
            >>> with opt.sampled(net, tb.random.key(0), num_data=100):
            ...     F.cross_entropy(net(x), y).backward()
            >>> opt.step(); opt.zero_grad()
        """
        if not isinstance(module, nn.Module):
            fail("module", "an nn.Module", module, error=TypeError)
        nodes = self._sampled_nodes()
        key = check_key(key)
        data_size = check_positive_int(num_data, "num_data")
        if not _number(kl_weight) or not kl_weight >= 0:
            fail("kl_weight", "a finite non-negative float", kl_weight)
        kl_scale = float(kl_weight) / data_size
        pending = self._pending
        if pending is not None and not torch.equal(key, pending.key):
            raise ValueError(
                "Adam.sampled: a second draw with another key before step(): the first draw's "
                "gradient would be lost. Call step() (or zero_grad()) after each draw; "
                "micro-batches of one draw pass the same key."
            )
        if pending is not None and (
            pending.kl_scale != kl_scale or not _same(pending.prior, prior)
        ):
            raise ValueError(
                "Adam.sampled: the blocks of one step must pass the same num_data, kl_weight "
                "and prior: they make one objective."
            )
        order = list(nodes)
        mus = [nodes[name].mu for name in order]
        rhos = [nodes[name].rho for name in order]
        terms = _kernel_terms(nodes, prior, order)
        with exclusive(module):
            sigmas = self._draw_sigmas(rhos)
            hashes = _hashes_of(tuple(order))
            with _sampled.drawn(module, nodes, order, key, hashes, sigmas, self._work) as found:
                yield module
            if pending is None:
                grads = _weight_grads(found, mus)
            else:
                grads = pending.grads
                for g, extra in zip(grads, found, strict=True):
                    if extra is not None:
                        g.add_(extra)
            del found
            self._pending = _PendingDraw(key.clone(), grads, sigmas, prior, terms, kl_scale)

    def _sampled_nodes(self) -> dict[str, Any]:
        tree = self._tree
        if tree is None or len(self.param_groups) != 1:
            found = (
                "one built from tensors"
                if tree is None
                else f"{len(self.param_groups)} parameter groups"
            )
            raise TypeError(
                "Adam.sampled needs the optimizer built from the posterior tree, "
                "tb.optim.Adam(posterior, ...), with its one parameter group; got "
                f"{found}. Build it from the tree (another optimizer for other tensors), or "
                "use tb.optim.sampled(module, posterior, key, ...) with any optimizer."
            )
        nodes = _gaussian_nodes(tree)
        if len(nodes) != len(tree):
            other = next(name for name in tree if name not in nodes)
            fail(
                f"posterior[{other!r}]",
                "a Gaussian node (Adam.sampled draws mu + sigma * eps)",
                tree[other],
                "Train other families through tb.nelbo.",
                TypeError,
            )
        return nodes

    def _draw_sigmas(self, rhos: list[Tensor]) -> list[Tensor]:
        """The draw's sigma per node: the one the last sampled step wrote to
        ``state[rho]["sigma"]`` while ``rho`` is as that step left it, else ``softplus(rho)``
        (torch's, ``tb.sample``'s bits) in the block's scratch (``_sampled.sigmas_of``: once
        for the blocks of a step), which the step then keeps."""
        states = [self.state[rho] for rho in rhos]
        if self._sigma_versions == _versions(rhos) and all("sigma" in st for st in states):
            return [st["sigma"] for st in states]
        return _sampled.sigmas_of(self._work, rhos)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; it also forgets a ``sampled`` draw not yet
        stepped on (its gradient is gone with the rest)."""
        super().zero_grad(set_to_none)
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``; a kept sigma (``sampled``) only while it is
        the posterior's, so that a restart draws what the run would have drawn."""
        saved = super().state_dict()
        if self._tree is not None and self._sigma_versions == self._rho_versions():
            return saved
        return _without_sigma(saved)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``; a sigma in it belongs to the posterior
        as it is now (load the posterior's tensors first, as for any optimizer)."""
        super().load_state_dict(state_dict)
        self._sigma_versions = None
        self._pending = None
        if self._tree is None:
            return
        rhos = [node.rho for node in _gaussian_nodes(self._tree).values()]
        if all("sigma" in self.state[rho] for rho in rhos):
            self._sigma_versions = _versions(rhos)

    def _rho_versions(self) -> list[int] | None:
        if self._tree is None:
            return None
        return _versions([node.rho for node in _gaussian_nodes(self._tree).values()])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        if self._pending is not None:
            return self._sampled_step(closure)
        groups = [self._fused_group(group) for group in self.param_groups]
        if any(group is None for group in groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            groups = [self._fused_group(group) for group in self.param_groups]
            if any(group is None for group in groups):  # the closure changed the gradients
                return self._step_after_closure(loss)
        for group, params in zip(self.param_groups, groups, strict=True):
            if not params:
                continue
            steps = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                steps.append(float(state["step"]))
            beta1, beta2 = group["betas"]
            _fused.adam_step(
                params,
                [p.grad.contiguous() for p in params],  # type: ignore[union-attr]
                [self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params],
                steps,
                lr=float(group["lr"]),
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
            )
        return loss

    def _sampled_step(self, closure: Callable[[], Tensor] | None) -> Tensor | None:
        """``step()`` after a ``sampled`` block: the one pass where it serves, else the
        gradients written as ``tb.optim.sampled`` writes them and the usual step."""
        pending = self._pending
        assert pending is not None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        nodes = self._sampled_nodes()
        order = list(nodes)
        mus = [nodes[name].mu for name in order]
        rhos = [nodes[name].rho for name in order]
        mixed = [
            name
            for name in order
            if nodes[name].mu.grad is not None or nodes[name].rho.grad is not None
        ]
        if mixed:
            raise RuntimeError(
                f"Adam.step: posterior[{mixed[0]!r}] has a gradient and a sampled() draw is "
                "pending: one step takes one route. Compute the loss either inside "
                "opt.sampled(module, key, ...) or through tb.nelbo, and call zero_grad() "
                "between steps."
            )
        self._pending = None
        sigmas = pending.sigmas
        if not self._one_pass(pending, mus, rhos, sigmas):
            noise = self._work.noise
            tensors = [*pending.grads, *noise, *mus, *rhos, *sigmas]
            if (
                pending.terms is not None
                and _fused.eager(tensors)
                and all(t.is_contiguous() for t in tensors)
            ):
                rho_grads = [
                    torch.empty_like(r, memory_format=torch.contiguous_format) for r in rhos
                ]
                _fused.posterior_grads(
                    pending.grads,
                    noise,
                    mus,
                    rhos,
                    sigmas,
                    pending.terms,
                    pending.kl_scale,
                    (pending.grads, rho_grads),
                )
                grad_mus, grad_rhos = pending.grads, rho_grads
            else:
                grad_mus, grad_rhos = _posterior_grads_by_ops(
                    nodes, order, pending.grads, noise, pending.prior, pending.kl_scale
                )
            for tensor, grad in zip([*mus, *rhos], [*grad_mus, *grad_rhos], strict=True):
                tensor.grad = grad
            self._sigma_versions = None
            self.step()
            for tensor in (*mus, *rhos):  # the gradients of a step that owned them
                tensor.grad = None
        return loss

    def _one_pass(
        self, pending: _PendingDraw, mus: list[Tensor], rhos: list[Tensor], sigmas: list[Tensor]
    ) -> bool:
        """The fused pass (``_fused.bbb_adam_step``) where it serves: this group's options as
        the Adam pass takes them, a Gaussian prior the kernels take, contiguous CPU
        float32/float64 tensors of one dtype, and each node's ``mu`` and ``rho`` at one step."""
        group = self.param_groups[0]
        if pending.terms is None or not _fused.serves_bbb_adam():
            return False
        options = ("amsgrad", "maximize", "capturable", "differentiable", "fused")
        if any(group.get(option) for option in (*options, "decoupled_weight_decay")):
            return False
        hyper = [group["lr"], *group["betas"], group["eps"], group["weight_decay"]]
        if any(isinstance(value, Tensor) for value in hyper):
            return False
        for p in (*mus, *rhos):
            state = self.state[p]
            if not state:  # as torch.optim.Adam makes it (these options: no amsgrad state)
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        moments = [
            [self.state[p][name] for p in ps]
            for ps in (mus, rhos)
            for name in ("exp_avg", "exp_avg_sq")
        ]
        tensors = [
            *mus,
            *rhos,
            *pending.grads,
            *self._work.noise,
            *sigmas,
            *(t for ts in moments for t in ts),
        ]
        if not _fused.eager(tensors) or not all(t.is_contiguous() for t in tensors):
            return False
        if any(t.dtype != mus[0].dtype for t in tensors):
            return False
        steps = [float(self.state[mu]["step"]) for mu in mus]
        if steps != [float(self.state[rho]["step"]) for rho in rhos]:
            return False
        for p in (*mus, *rhos):
            self.state[p]["step"] += 1
        beta1, beta2 = group["betas"]
        finite = _fused.bbb_adam_step(
            (mus, rhos, pending.grads, self._work.noise, sigmas),
            (moments[0], moments[1], moments[2], moments[3]),
            pending.terms,
            [step + 1 for step in steps],
            kl_scale=pending.kl_scale,
            lr=float(group["lr"]),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
        )
        if finite:  # the kernel read every new value: no pass before the next draw
            _remember_finite(mus, rhos)
        for rho, sigma in zip(rhos, sigmas, strict=True):  # the new sigma, kept for the draw
            self.state[rho]["sigma"] = sigma
        self._sigma_versions = _versions(rhos)
        return True

    def _step_after_closure(self, loss: Tensor | None) -> Tensor | None:
        super().step()
        return loss

    def _fused_group(self, group: dict[str, Any]) -> list[Tensor] | None:
        """The group's tensors with a gradient where the fused pass serves them, else None."""
        options = ("amsgrad", "maximize", "capturable", "differentiable", "fused")
        if any(group.get(option) for option in (*options, "decoupled_weight_decay")):
            return None
        hyper = [group["lr"], *group["betas"], group["eps"], group["weight_decay"]]
        if any(isinstance(value, Tensor) for value in hyper):
            return None
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return []
        if not _fused.eager(params + [p.grad for p in params]) or any(
            p.grad.is_sparse or not p.is_contiguous() for p in params
        ):
            return None
        for p in params:
            state = self.state.get(p)
            if state and not all(
                state[name].is_contiguous() and state[name].dtype == p.dtype
                for name in ("exp_avg", "exp_avg_sq")
            ):
                return None
        return params


@contextlib.contextmanager
def sampled(
    module: nn.Module,
    posterior: dict[str, Any],
    key: Tensor,
    *,
    num_data: int,
    prior: Any = GaussianPrior(),  # noqa: B008 - an immutable NamedTuple of floats
    kl_weight: float = 1.0,
    num_samples: int = 1,
) -> Iterator[nn.Module]:
    """Bayes-by-Backprop's gradient through the module itself: the fast route of a training step.

    Inside the block the module's parameters named by the posterior hold one draw
    ``tb.sample(posterior, key)`` and require gradients; compute the batch-mean NLL with the
    module there (``loss_fn(module(x), y)``, as ``nelbo``'s ``loss_fn``) and call
    ``backward()`` on it. On leaving, the module gets its own values, ``requires_grad`` flags
    and ``.grad`` back, and the posterior's ``mu.grad`` and ``rho.grad`` gain (accumulating,
    as autograd would) the gradient of ``nelbo``'s objective on that draw,
    ``loss + kl_weight * KL / num_data``, divided by ``num_samples``. Any optimizer over
    ``tb.parameters(posterior)`` then steps: ``tb.optim.Adam`` is the fused one.

    ``num_samples`` blocks with the keys ``tb.random.split(key, num_samples)`` give exactly the
    gradient of ``tb.nelbo(..., key, num_samples=num_samples)``: each adds its draw's share of
    the NLL and ``1 / num_samples`` of the KL's. Micro-batches of one step pass the number of
    blocks the same way (each block's loss the mean over its micro-batch).

    The step is the model's own forward and backward, one pass that writes the draw and keeps
    its noise, and one that turns the weight gradient ``g`` into ``d/d mu = g + d KL/d mu`` and
    ``d/d rho = g eps sigmoid(rho) + d KL/d rho`` (the closed form), on CPU float32/float64 with
    tbfunc's kernels and a Gaussian prior. Elsewhere (another prior, a GPU) the same gradient
    comes from tensor ops, with the Monte-Carlo KL on the same draw where the prior has no
    closed form (as ``nelbo`` takes it). The loss inside the block is not differentiable in
    ``mu`` and ``rho`` (``torch.func.grad`` of it gives nothing): for transforms, use
    ``nelbo``.

    The forward is the module's own call, so dropout and batch-norm layers in training mode
    act as they do without tbfunc, where ``nelbo`` refuses them. The module is held for the
    block (one thread at a time, as for every tbfunc call that runs it); another thread that
    calls it directly sees the drawn weights.

    Args:
        module: the model the posterior was built from (``tb.from_module``).
        posterior: a dict of Gaussian nodes (their ``mu`` and ``rho`` get the gradients).
        key: the draw's key.
        num_data, prior, kl_weight: as in ``nelbo``.
        num_samples: the number of blocks whose gradients make one step.

    Example:
        >>> import torch, torch.nn.functional as F, tbfunc as tb
        >>> net = torch.nn.Linear(3, 2).requires_grad_(False)
        >>> post = tb.from_module(net)
        >>> opt = tb.optim.Adam(post, lr=1e-3)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> with tb.optim.sampled(net, post, tb.random.key(0), num_data=100):
        ...     F.cross_entropy(net(x), y).backward()
        >>> opt.step(); opt.zero_grad()
    """
    if not isinstance(module, nn.Module):
        fail("module", "an nn.Module", module, error=TypeError)
    nodes = _gaussian_nodes(posterior)
    others = [name for name in posterior if name not in nodes]
    if others:
        fail(
            f"posterior[{others[0]!r}]",
            "a Gaussian node (tb.optim.sampled draws mu + sigma * eps)",
            posterior[others[0]],
            "Train other families through tb.nelbo.",
            TypeError,
        )
    key = check_key(key)
    data_size = check_positive_int(num_data, "num_data")
    blocks = check_positive_int(num_samples, "num_samples")
    if not _number(kl_weight) or not kl_weight >= 0:
        fail("kl_weight", "a finite non-negative float", kl_weight)
    order = list(nodes)
    mus = [nodes[name].mu for name in order]
    rhos = [nodes[name].rho for name in order]
    terms = _kernel_terms(posterior, prior, order)
    kl_scale = float(kl_weight) / (data_size * blocks)
    with exclusive(module):
        work = _sampled.scratch_for(module)
        sigmas = _sampled.sigmas_of(work, rhos)
        hashes = _hashes_of(tuple(order))
        with _sampled.drawn(module, nodes, order, key, hashes, sigmas, work) as found:
            yield module
        gs = _weight_grads(found, mus)
        del found
        if blocks > 1:
            torch._foreach_mul_(gs, 1.0 / blocks)
        rho_outs = _rho_grad_buffers(work, rhos)
        tensors = [*gs, *work.noise, *mus, *rhos, *sigmas]
        if terms is not None and _fused.eager(tensors) and all(t.is_contiguous() for t in tensors):
            _fused.posterior_grads(
                gs, work.noise, mus, rhos, sigmas, terms, kl_scale, (gs, rho_outs)
            )
            grad_mus, grad_rhos = gs, rho_outs
        else:
            grad_mus, grad_rhos = _posterior_grads_by_ops(
                nodes, order, gs, work.noise, prior, kl_scale
            )
        # under the lock: an added-in buffer is the module's scratch
        for tensor, grad in zip([*mus, *rhos], [*grad_mus, *grad_rhos], strict=True):
            if tensor.grad is None:
                tensor.grad = grad
            else:
                tensor.grad.add_(grad)


def _same(a: Any, b: Any) -> bool:
    """Whether two priors are the same: one object, or equal floats (a prior holding tensors
    compares by identity only)."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except RuntimeError:  # tensors inside: their truth value is ambiguous
        return False


def _weight_grads(found: list[Tensor | None], mus: list[Tensor]) -> list[Tensor]:
    """The block's weight gradients, to become mu's: each one itself where nothing else holds
    it (the pass then writes mu's gradient over it), else a copy; zeros where it left none."""
    grads = []
    for i, mu in enumerate(mus):
        # found[i], never a local name: free() counts the references
        if found[i] is None:
            grads.append(torch.zeros_like(mu, memory_format=torch.contiguous_format))
        elif found[i].is_contiguous() and _sampled.free(found, i):  # type: ignore[union-attr]
            grads.append(found[i])  # type: ignore[arg-type]
        else:
            grads.append(found[i].clone(memory_format=torch.contiguous_format))  # type: ignore[union-attr]
    return grads


def _rho_grad_buffers(work: _sampled.Scratch, rhos: list[Tensor]) -> list[Tensor]:
    """Where ``tb.optim.sampled`` writes the rho gradients: the ones it handed out last time
    where nothing holds them any more (a ``zero_grad()`` dropped them), else new tensors,
    kept for next time."""
    kept = work.rho_grads
    if len(kept) != len(rhos) or any(
        k.shape != r.shape or k.dtype != r.dtype or k.device != r.device
        for k, r in zip(kept, rhos, strict=True)
    ):
        kept = work.rho_grads = [torch.empty_like(r) for r in rhos]
        return list(kept)
    for i, rho in enumerate(rhos):
        if not _sampled.free(kept, i):  # type: ignore[arg-type]
            kept[i] = torch.empty_like(rho, memory_format=torch.contiguous_format)
    return list(kept)


def _kernel_terms(posterior: dict[str, Any], prior: Any, order: list[str]) -> list[Any] | None:
    """Each node's Gaussian prior in the kernels' form, in ``order``, or None where they do
    not serve (``kl.kernel_priors`` keys them by the tree's flat leaf order)."""
    terms = kernel_priors(posterior, prior)
    if terms is None:
        return None
    flat = [path[0] for path in optree.tree_paths(posterior, is_leaf=is_posterior)]  # type: ignore[arg-type]
    by_name = {flat[i]: term for i, term in terms.items()}
    return [by_name[name] for name in order]


@functools.lru_cache(maxsize=64)
def _hashes_of(order: tuple[str, ...]) -> list[int]:
    """The noise streams' hashes of the nodes, as ``tb.sample`` takes them (kept per name list:
    checking the paths for collisions is not free). Callers do not write the list."""
    return node_hashes([canonical(name) for name in order])


def _posterior_grads_by_ops(
    nodes: dict[str, Any],
    order: list[str],
    gs: list[Tensor],
    noise: list[Tensor],
    prior: Any,
    kl_scale: float,
) -> tuple[list[Tensor], list[Tensor]]:
    """``tb.optim.sampled``'s gradients in tensor ops: autograd through the draw rebuilt from
    its noise, ``sum <g, mu + softplus(rho) eps> + kl_scale * KL``, with the closed-form KL or,
    where the prior has none, the Monte-Carlo term at the same draw (as ``nelbo``)."""
    with torch.enable_grad():
        leaves = [
            (nodes[n].mu.detach().requires_grad_(), nodes[n].rho.detach().requires_grad_())
            for n in order
        ]
        view = {n: type(nodes[n])(mu, rho) for n, (mu, rho) in zip(order, leaves, strict=True)}
        draws = {n: view[n].mu + view[n].sigma * e for n, e in zip(order, noise, strict=True)}
        data = sum((g * draws[n]).sum() for n, g in zip(order, gs, strict=True))
        if has_closed_form(view, prior):
            kl = closed_form_kl(view, prior)
        else:
            kl = kl_from_draws(view, prior, {n: draws[n][None] for n in view})
        total = data + kl_scale * kl.to(data.dtype)
        flat = [t for pair in leaves for t in pair]
        grads = torch.autograd.grad(total, flat)
    return list(grads[0::2]), list(grads[1::2])


def _step(
    config: _Config,
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


def _precisions(
    nodes: dict[str, Any], prior_mean: Any, prior_scale: str, config: _Config
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


def _above_precision_floor(
    h: Tensor, delta: float | Tensor, *, out: Tensor | None = None
) -> Tensor:
    """``h`` raised to at least ``-(1 - 1e-3) delta``: the precision ``h + delta`` stays at
    ``1e-3 delta`` or more when a learned ``delta`` falls below a negative ``h``. A new tensor
    (the functional form's state is never written), or written to ``out`` (the optimizer's
    own state, in place: no allocation per step)."""
    floor = -(1.0 - _PRECISION_FLOOR) * torch.as_tensor(delta)
    return torch.maximum(h, floor.to(h), out=out)


def _check_prior_scale(prior_scale: Any) -> None:
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


def _remember_finite(*groups: list[Tensor]) -> None:
    for group in groups:
        for tensor in group:
            remember_finite(tensor)


def _without_sigma(saved: dict[str, Any]) -> dict[str, Any]:
    """An optimizer ``state_dict`` without the kept sigmas of the sampled routes (they belong
    to ``rho`` as a step left it, and ``rho`` has changed since)."""
    saved["state"] = {
        index: {k: v for k, v in state.items() if k != "sigma"}
        for index, state in saved["state"].items()
    }
    return saved


def _versions(tensors: list[Tensor]) -> list[int]:
    return [t._version for t in tensors]


def _gaussian_nodes(posterior: Any) -> dict[str, Any]:
    if not isinstance(posterior, dict):
        fail(
            "posterior",
            "a dict of parameter name -> Gaussian posterior node",
            posterior,
            "Build one with tb.from_module(module).",
            TypeError,
        )
    nodes = {name: node for name, node in posterior.items() if isinstance(node, GAUSSIAN_FAMILIES)}
    if not nodes:
        fail("posterior", "a dict with at least one Gaussian posterior node", posterior)
    return nodes


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


def _check_prior_mean(prior_mean: Any, nodes: dict[str, Any]) -> None:
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


def _config(
    lr: Any,
    num_data: Any,
    beta1: Any,
    beta2: Any,
    hess_init: Any,
    weight_decay: Any,
    clip: Any,
) -> _Config:
    if not callable(lr) and not _positive(lr):
        fail("lr", "a positive float or a callable step -> lr", lr)
    count = check_positive_int(num_data, "num_data")
    for value, arg in ((beta1, "beta1"), (beta2, "beta2")):
        if not _number(value) or not 0 <= value < 1:
            fail(arg, "a float in [0, 1)", value)
    if not _number(hess_init) or not hess_init > 0:
        fail("hess_init", "a positive float", hess_init)
    if not _number(weight_decay) or not weight_decay > 0:
        fail(
            "weight_decay",
            "a positive float (the prior precision per data point)",
            weight_decay,
            "A zero prior precision leaves sigma undefined where the data set no curvature.",
        )
    if clip is not None and not _positive(clip):
        fail("clip", "None or a positive float", clip)
    return _Config(
        lr, count, float(beta1), float(beta2), float(hess_init), float(weight_decay), clip
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0
