"""``tb.optim.Adam``: ``torch.optim.Adam`` over a posterior's tensors by one C pass, and its
sampled route (``Adam.sampled``: the draw in the module itself, and one pass per step for the
nelbo gradient, Adam's update and the next draw's sigma).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from tbfunc import _fused, _fused_updates, _sampled
from tbfunc._checks import check_key, check_positive_int, fail
from tbfunc._concurrency import exclusive
from tbfunc._optimizers import (
    finite_number,
    gaussian_nodes,
    remember_all_finite,
    versions,
    without_sigma,
)
from tbfunc._sampled_grads import grads_by_ops, hashes_of, kernel_terms, weight_grads
from tbfunc.objective import parameters
from tbfunc.posterior import is_posterior
from tbfunc.prior import GaussianPrior

__all__ = ["Adam"]


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
        if not finite_number(kl_weight) or not kl_weight >= 0:
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
        terms = kernel_terms(nodes, prior, order)
        with exclusive(module):
            sigmas = self._draw_sigmas(rhos)
            hashes = hashes_of(tuple(order))
            with _sampled.drawn(module, nodes, order, key, hashes, sigmas, self._work) as found:
                yield module
            if pending is None:
                grads = weight_grads(found, mus)
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
        nodes = gaussian_nodes(tree)
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
        if self._sigma_versions == versions(rhos) and all("sigma" in st for st in states):
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
        return without_sigma(saved)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``; a sigma in it belongs to the posterior
        as it is now (load the posterior's tensors first, as for any optimizer)."""
        super().load_state_dict(state_dict)
        self._sigma_versions = None
        self._pending = None
        if self._tree is None:
            return
        rhos = [node.rho for node in gaussian_nodes(self._tree).values()]
        if all("sigma" in self.state[rho] for rho in rhos):
            self._sigma_versions = versions(rhos)

    def _rho_versions(self) -> list[int] | None:
        if self._tree is None:
            return None
        return versions([node.rho for node in gaussian_nodes(self._tree).values()])

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
                    _new_state(state, p)
                state["step"] += 1
                steps.append(float(state["step"]))
            beta1, beta2 = group["betas"]
            _fused_updates.adam_step(
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
                grad_mus, grad_rhos = grads_by_ops(
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
        """The fused pass (``_fused_updates.bbb_adam_step``) where it serves: this group's
        options as the Adam pass takes them, a Gaussian prior the kernels take, contiguous CPU
        float32/float64 tensors of one dtype, and each node's ``mu`` and ``rho`` at one step."""
        group = self.param_groups[0]
        if pending.terms is None or not _fused_updates.serves_bbb_adam():
            return False
        if not _plain(group):
            return False
        for p in (*mus, *rhos):
            state = self.state[p]
            if not state:
                _new_state(state, p)
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
        finite = _fused_updates.bbb_adam_step(
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
            remember_all_finite(mus, rhos)
        for rho, sigma in zip(rhos, sigmas, strict=True):  # the new sigma, kept for the draw
            self.state[rho]["sigma"] = sigma
        self._sigma_versions = versions(rhos)
        return True

    def _step_after_closure(self, loss: Tensor | None) -> Tensor | None:
        super().step()
        return loss

    def _fused_group(self, group: dict[str, Any]) -> list[Tensor] | None:
        """The group's tensors with a gradient where the fused pass serves them, else None."""
        if not _plain(group):
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


def _same(a: Any, b: Any) -> bool:
    """Whether two priors are the same: one object, or equal floats (a prior holding tensors
    compares by identity only)."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except RuntimeError:  # tensors inside: their truth value is ambiguous
        return False


def _plain(group: dict[str, Any]) -> bool:
    """Whether the fused passes serve the group's options: none of torch.optim.Adam's others
    on, and Python numbers (not tensors) for its hyperparameters."""
    options = ("amsgrad", "maximize", "capturable", "differentiable", "fused")
    if any(group.get(option) for option in (*options, "decoupled_weight_decay")):
        return False
    hyper = [group["lr"], *group["betas"], group["eps"], group["weight_decay"]]
    return not any(isinstance(value, Tensor) for value in hyper)


def _new_state(state: dict[str, Any], p: Tensor) -> None:
    """A tensor's first state, as torch.optim.Adam makes it with those options (no amsgrad
    state), so that its state_dict loads into torch's and back."""
    state["step"] = torch.tensor(0.0)
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
