"""``tb.optim.VON``: variational online Newton as a ``torch.optim.Optimizer`` over a posterior's
tensors, with its sampled route (the draw in the module itself). The rule is ``_von``'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from tbfunc import _fused, _fused_updates, _sampled
from tbfunc._checks import check_key, fail
from tbfunc._concurrency import exclusive
from tbfunc._optimizers import gaussian_nodes, remember_all_finite, versions, without_sigma
from tbfunc._sampling import canonical, node_hashes
from tbfunc._softplus import softplus
from tbfunc._von import (
    Config,
    PriorScale,
    above_precision_floor,
    check_prior_mean,
    check_prior_scale,
    foreach_step,
    make_config,
    precisions,
)

__all__ = ["VON"]


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
        nodes = gaussian_nodes(posterior)
        check_prior_mean(prior_mean, nodes)
        config = make_config(lr, num_data, beta1, beta2, hess_init, weight_decay, clip)
        check_prior_scale(prior_scale)
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
            config = Config(**{field: group[field] for field in Config._fields})
            params = group["params"]
            mus, rhos = params[0::2], params[1::2]
            view = dict(zip(self._names, self._nodes(mus, rhos), strict=True))
            deltas = precisions(view, self._prior_mean, self._prior_scale, config)
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
                    above_precision_floor(h, deltas[name], out=h)
            sigmas = None if noise is None else [state["sigma"] for state in states]
            if self._fused_step(config, mus, rhos, states, deltas, noise, sigmas):
                self._sigma_versions = None if noise is None else versions(rhos)
                continue
            if noise is not None:
                g_eps = torch._foreach_mul([mu.grad for mu in mus], noise)
            else:
                rho_grads = [rho.grad for rho in rhos]
                # d theta / d rho = eps * sigmoid(rho), so rho.grad / sigmoid(rho) = g * eps
                g_eps = torch._foreach_div(rho_grads, torch._foreach_sigmoid(rhos))
            new_mus, new_rhos, gbars, hs = foreach_step(
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
        if self._sigma_versions == versions(rhos) and all("sigma" in st for st in states):
            return [st["sigma"] for st in states]
        for state, rho in zip(states, rhos, strict=True):
            state["sigma"] = softplus(rho).contiguous()
        self._sigma_versions = versions(rhos)
        return [st["sigma"] for st in states]

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``; a kept sigma (``sampled``) only while it is
        the posterior's, so that a restart draws what the run would have drawn."""
        saved = super().state_dict()
        rhos = self.param_groups[0]["params"][1::2]
        return saved if self._sigma_versions == versions(rhos) else without_sigma(saved)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``; a sigma in it belongs to the posterior
        as it is now (load the posterior's tensors first, as for any optimizer)."""
        super().load_state_dict(state_dict)
        params = self.param_groups[0]["params"]
        kept = all("sigma" in self.state[mu] for mu in params[0::2])
        self._sigma_versions = versions(params[1::2]) if kept else None

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
        config: Config,
        mus: list[Tensor],
        rhos: list[Tensor],
        states: list[dict[str, Tensor]],
        deltas: dict[str, float | Tensor],
        noise: list[Tensor] | None,
        sigmas: list[Tensor] | None,
    ) -> bool:
        """The update by one C pass (``_fused_updates.von_step``), where it serves: CPU
        float32/float64 tensors of one dtype, contiguous, with a scalar prior precision per node.
        ``noise`` and ``sigmas``: the pending ``sampled`` draw's eps and sigma, read in place of the
        rho gradients and ``softplus(rho)``; the kernel writes the new sigma to ``sigmas``."""
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
        finite = _fused_updates.von_step(
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
            remember_all_finite(mus, rhos)
        return True
