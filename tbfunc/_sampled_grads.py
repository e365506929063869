"""Bayes-by-Backprop's gradient through the module itself (``tb.optim.sampled``), and the
pieces ``tb.optim.Adam.sampled`` shares with it: the block's weight gradients, the prior in
the kernels' form, the nodes' noise hashes, and the tensor-op route of the gradient.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import optree
import torch
from torch import Tensor, nn

from tbfunc import _fused, _sampled
from tbfunc._checks import check_key, check_positive_int, fail
from tbfunc._concurrency import exclusive
from tbfunc._optimizers import finite_number, gaussian_nodes
from tbfunc._sampling import canonical, node_hashes
from tbfunc.kl import closed_form_kl, has_closed_form, kernel_priors, kl_from_draws
from tbfunc.posterior import is_posterior
from tbfunc.prior import GaussianPrior

__all__ = ["grads_by_ops", "hashes_of", "kernel_terms", "sampled", "weight_grads"]


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
    nodes = gaussian_nodes(posterior)
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
    if not finite_number(kl_weight) or not kl_weight >= 0:
        fail("kl_weight", "a finite non-negative float", kl_weight)
    order = list(nodes)
    mus = [nodes[name].mu for name in order]
    rhos = [nodes[name].rho for name in order]
    terms = kernel_terms(posterior, prior, order)
    kl_scale = float(kl_weight) / (data_size * blocks)
    with exclusive(module):
        work = _sampled.scratch_for(module)
        sigmas = _sampled.sigmas_of(work, rhos)
        hashes = hashes_of(tuple(order))
        with _sampled.drawn(module, nodes, order, key, hashes, sigmas, work) as found:
            yield module
        gs = weight_grads(found, mus)
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
            grad_mus, grad_rhos = grads_by_ops(nodes, order, gs, work.noise, prior, kl_scale)
        # under the lock: an added-in buffer is the module's scratch
        for tensor, grad in zip([*mus, *rhos], [*grad_mus, *grad_rhos], strict=True):
            if tensor.grad is None:
                tensor.grad = grad
            else:
                tensor.grad.add_(grad)


def weight_grads(found: list[Tensor | None], mus: list[Tensor]) -> list[Tensor]:
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


def kernel_terms(posterior: dict[str, Any], prior: Any, order: list[str]) -> list[Any] | None:
    """Each node's Gaussian prior in the kernels' form, in ``order``, or None where they do
    not serve (``kl.kernel_priors`` keys them by the tree's flat leaf order)."""
    terms = kernel_priors(posterior, prior)
    if terms is None:
        return None
    flat = [path[0] for path in optree.tree_paths(posterior, is_leaf=is_posterior)]  # type: ignore[arg-type]
    by_name = {flat[i]: term for i, term in terms.items()}
    return [by_name[name] for name in order]


@functools.lru_cache(maxsize=64)
def hashes_of(order: tuple[str, ...]) -> list[int]:
    """The noise streams' hashes of the nodes, as ``tb.sample`` takes them (kept per name list:
    checking the paths for collisions is not free). Callers do not write the list."""
    return node_hashes([canonical(name) for name in order])


def grads_by_ops(
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
