"""The fused training route on the CPU: the draw and the closed-form KL as autograd functions
whose backward is one C pass each (``_train.c``), the gradient of a draw taken through the module
itself (``posterior_grads``), and the checks that say where the route serves. The optimizers'
one-pass updates live in ``_fused_updates``, the plumbing of a kernel call in ``_kernel_calls``.

Unfused, a Bayes-by-Backprop step makes a dozen memory-bound passes over the posterior besides
the model's own forward and backward: ``softplus``, the affine map, the KL's terms and the
backward of each, then Adam over twice the tensors. Here the draw writes ``mu + sigma * eps``
and keeps ``eps`` (the noise kernel, one pass); its backward turns the weight gradient ``g``
into ``d/d mu = sum_s g_s`` (``g`` itself for one draw: no pass) and
``d/d rho = sum_s g_s eps_s sigmoid(rho)`` (one pass); the KL's value and gradient are one
pass each; Adam is one pass (``_fused_updates``).

The route serves plain eager autograd on CPU float32/float64 tensors with the kernels built
(``TBFUNC_FUSED=0`` switches it off).
Under ``torch.compile``, ``torch.func`` transforms and forward-mode AD, on other devices or
without a C compiler, callers keep the tensor-op route (``trainable`` is False there), which
gives the same values to rounding. A backward run with ``create_graph=True`` computes the same
formulas in tensor ops, so double backward still works.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbfunc import _native, _noise, _parallel
from tbfunc._checks import traced
from tbfunc._kernel_calls import (
    PriorTerms,
    addresses,
    dtype_code,
    int64_table,
    loaded,
    over_threads,
    prior_tables,
    written,
)

__all__ = ["all_finite", "draw", "eager", "gaussian_kl", "posterior_grads", "trainable"]

_TYPES = (torch.float32, torch.float64)
_SMALL_RHO = -20.0  # as in kl.py and _train.c: below it log(softplus(rho)) is rho


def eager(tensors: Sequence[Tensor]) -> bool:
    """Plain eager CPU float32/float64 tensors of one dtype, with the kernels built: no
    compiler, no ``torch.func`` transform and no forward-mode AD around them; and the route
    not switched off (``TBFUNC_FUSED=0``, read at every call: benchmarks compare both)."""
    if not tensors or traced():
        return False
    if os.environ.get("TBFUNC_FUSED", "1") == "0":
        return False
    dtype = tensors[0].dtype
    for t in tensors:
        if type(t) not in (Tensor, nn.Parameter) or not t.is_cpu or t.dtype != dtype:
            return False
    return dtype in _TYPES and _native.kernel() is not None


def trainable(tensors: Sequence[Tensor]) -> bool:
    """``eager`` and recorded by autograd: the draw's fused backward applies."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return False
    return eager(tensors)


def all_finite(tensors: Sequence[Tensor]) -> bool | None:
    """Whether every element of ``tensors`` is finite, by one C pass over all of them (split
    over threads when large); None where the kernel does not serve: a tensor that is not a
    plain contiguous CPU float32/float64 one, no kernel built, or under the compiler. The
    tensor-op check it stands in for costs a reduction and a launch per tensor."""
    if not tensors or torch.compiler.is_compiling():
        return None
    library = _native.kernel()
    if library is None or not hasattr(library, "tb_finite"):
        return None
    kinds = []
    for t in tensors:
        if type(t) not in (Tensor, nn.Parameter) or not t.is_cpu or not t.is_contiguous():
            return None
        if t.dtype not in _TYPES:
            return None
        kinds.append(dtype_code(t.dtype))
    numels = [t.numel() for t in tensors]
    tables = [int64_table(kinds), int64_table(numels), addresses(tensors)]
    flags: list[Any] = []

    def run(begin: int, end: int) -> None:
        flag = (ctypes.c_int64 * 1)(0)  # one per part: no two threads write one word
        library.tb_finite(len(tensors), *tables, begin, end, flag)
        flags.append(flag[0])

    def team(parts: int) -> None:
        found = (ctypes.c_int64 * parts)()
        library.tb_finite_parts(len(tensors), *tables, sum(numels), parts, found)
        flags.extend(found)

    _parallel.split(sum(numels), run, team=team)
    return not any(flags)


# ----------------------------------------------------------------------------------------------
# The draw


def draw(
    keys: Tensor,
    hashes: list[int] | None,
    mus: list[Tensor],
    rhos: list[Tensor],
    sigmas: list[Tensor],
    priors: list[PriorTerms] | None = None,
) -> tuple[list[Tensor], Tensor | None]:
    """``mu + sigma * eps`` per node, ``(S, *mu.shape)``, keyed as ``_noise.gaussian`` keys
    it (the same bits), with the fused backward to ``mu`` and ``rho``; ``sigmas`` are
    ``softplus(rho)``, detached. With ``priors`` also the closed-form KL summed over the nodes,
    whose gradient the same backward pass adds (else None)."""
    count = len(mus)
    sigmas = [s.detach().contiguous() for s in sigmas]
    outputs = _Draw.apply(keys, hashes, sigmas, priors, count, *mus, *rhos)
    if priors is None:
        return list(outputs), None
    return list(outputs[:-1]), outputs[-1]


class _Draw(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        keys: Tensor,
        hashes: Any,
        sigmas: list[Tensor],
        priors: list[PriorTerms] | None,
        count: int,
        *tensors: Tensor,
    ) -> tuple[Tensor, ...]:
        mus = [m.contiguous() for m in tensors[:count]]
        rhos = [r.contiguous() for r in tensors[count:]]
        draws, noise = _noise.gaussian_with_noise(keys, hashes, mus, sigmas)
        ctx.set_materialize_grads(False)
        ctx.count, ctx.priors = count, priors
        if priors is None:
            ctx.save_for_backward(*rhos, *noise)
            return tuple(draws)
        ctx.save_for_backward(*rhos, *noise, *mus, *sigmas)
        kl = torch.tensor(_kl_sum(mus, rhos, sigmas, priors), dtype=mus[0].dtype)
        return (*draws, kl)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        count, priors = ctx.count, ctx.priors
        saved = ctx.saved_tensors
        rhos, noise = saved[:count], saved[count : 2 * count]
        grad_kl = grads[count] if priors is not None else None
        live = [i for i in range(count) if grads[i] is not None or grad_kl is not None]
        grad_mus: list[Tensor | None] = [None] * count
        grad_rhos: list[Tensor | None] = [None] * count
        if not live:
            return (None,) * 5 + (None,) * (2 * count)
        gs = [
            torch.zeros_like(noise[i]) if grads[i] is None else grads[i].contiguous()  # type: ignore[union-attr]
            for i in live
        ]
        kl = None
        if grad_kl is not None:
            mus, sigmas = saved[2 * count : 3 * count], saved[3 * count :]
            kl = (
                grad_kl,
                [mus[i] for i in live],
                [sigmas[i] for i in live],
                [priors[i] for i in live],
            )
        if torch.is_grad_enabled():  # create_graph=True: differentiable tensor ops
            parts = _draw_grad_ops(gs, [noise[i] for i in live], [rhos[i] for i in live], kl)
        else:
            parts = _draw_grad(gs, [noise[i] for i in live], [rhos[i] for i in live], kl)
        for i, (grad_mu, grad_rho) in zip(live, zip(*parts, strict=True), strict=True):
            grad_mus[i], grad_rhos[i] = grad_mu, grad_rho
        return (None,) * 5 + (*grad_mus, *grad_rhos)


KLPart = tuple[Tensor | float, list[Tensor], list[Tensor], list[PriorTerms]]


def posterior_grads(
    grads: list[Tensor],
    noise: list[Tensor],
    mus: list[Tensor],
    rhos: list[Tensor],
    sigmas: list[Tensor],
    priors: list[PriorTerms],
    kl_scale: float,
    outs: tuple[list[Tensor], list[Tensor]],
) -> None:
    """The gradients to every ``mu`` and ``rho`` of ``sum <g, mu + sigma * eps> + kl_scale *
    KL``, for one draw's weight gradients ``grads`` and noise ``noise`` (shaped like ``mus``,
    contiguous): one kernel pass, ``d/d mu = g + kl_scale (mu - m) / s^2`` and ``d/d rho =
    g eps sigmoid(rho)`` plus the KL's, written to ``outs`` (``mu``'s, ``rho``'s; contiguous,
    ``mu``'s may be ``grads`` themselves). ``sigmas`` are ``softplus(rho)``."""
    _draw_grad(
        [g.view(1, *g.shape) for g in grads],
        [e.view(1, *e.shape) for e in noise],
        rhos,
        (kl_scale, mus, sigmas, priors),
        outs,
    )
    written(*outs)


def _draw_grad_ops(
    grads: list[Tensor], noise: list[Tensor], rhos: list[Tensor], kl: KLPart | None
) -> tuple[list[Tensor], list[Tensor]]:
    """The kernel's formulas in tensor ops (differentiable)."""
    grad_mus = [g.sum(0) for g in grads]
    grad_rhos = [
        (g * e).sum(0) * torch.sigmoid(r) for g, e, r in zip(grads, noise, rhos, strict=True)
    ]
    if kl is not None:
        grad_kl, mus, sigmas, priors = kl
        kl_mus, kl_rhos = _kl_grad_ops(torch.as_tensor(grad_kl), mus, rhos, sigmas, priors)
        grad_mus = [a + b for a, b in zip(grad_mus, kl_mus, strict=True)]
        grad_rhos = [a + b for a, b in zip(grad_rhos, kl_rhos, strict=True)]
    return grad_mus, grad_rhos


def _draw_grad(
    grads: list[Tensor],
    noise: list[Tensor],
    rhos: list[Tensor],
    kl: KLPart | None,
    into: tuple[list[Tensor], list[Tensor]] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """The gradients to every ``mu`` and ``rho`` by one kernel pass, into new tensors or
    ``into`` (contiguous, shaped like ``rhos``; an out may be the weight gradient itself: the
    pass reads each element before writing it); without a KL and with one draw, ``mu``'s
    gradient is the weight gradient itself (no pass)."""
    samples = grads[0].shape[0]
    numels = [r.numel() for r in rhos]
    alone = kl is None and samples == 1
    if into is not None:
        grad_mus, grad_rhos = into
    else:
        grad_rhos = [torch.empty_like(r) for r in rhos]
        grad_mus = [
            g.view(r.shape) if alone else torch.empty_like(r)
            for g, r in zip(grads, rhos, strict=True)
        ]
    tables = [addresses(t) for t in (grads, noise, rhos)]
    outs = [addresses([None] * len(rhos) if alone else grad_mus), addresses(grad_rhos)]
    if kl is None:
        c, extra = 0.0, [None, None, *prior_tables(None, len(rhos))]
    else:
        grad_kl, mus, sigmas, priors = kl
        c, extra = float(grad_kl), [addresses(mus), addresses(sigmas), *prior_tables(priors)]
    library = loaded()
    over_threads(library.tb_draw_grad, rhos[0].dtype, numels, samples, *tables, *outs, c, *extra)
    return grad_mus, grad_rhos


# ----------------------------------------------------------------------------------------------
# The closed-form Gaussian KL


def gaussian_kl(
    mus: list[Tensor], rhos: list[Tensor], sigmas: list[Tensor], priors: list[PriorTerms]
) -> Tensor:
    """``sum KL(N(mu, sigma^2) || N(m, s^2))`` over all nodes, accumulated in float64 and
    returned in the nodes' dtype, with the fused backward to every ``mu`` and ``rho``."""
    count = len(mus)
    sigmas = [s.detach().contiguous() for s in sigmas]
    return _KL.apply(sigmas, priors, count, *mus, *rhos)


class _KL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, sigmas: list[Tensor], priors: list[PriorTerms], count: int, *tensors: Tensor
    ) -> Tensor:
        mus = [t.contiguous() for t in tensors[:count]]
        rhos = [t.contiguous() for t in tensors[count:]]
        ctx.save_for_backward(*mus, *rhos, *sigmas)
        ctx.priors, ctx.count = priors, count
        return torch.tensor(_kl_sum(mus, rhos, sigmas, priors), dtype=mus[0].dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        count, priors = ctx.count, ctx.priors
        saved = ctx.saved_tensors
        mus, rhos, sigmas = saved[:count], saved[count : 2 * count], saved[2 * count :]
        if torch.is_grad_enabled():  # create_graph=True: differentiable tensor ops
            grad_mus, grad_rhos = _kl_grad_ops(grad, mus, rhos, sigmas, priors)
        else:
            grad_mus = [torch.empty_like(m) for m in mus]
            grad_rhos = [torch.empty_like(m) for m in mus]
            _kl_grad(float(grad), mus, rhos, sigmas, priors, grad_mus, grad_rhos)
        return (None, None, None, *grad_mus, *grad_rhos)


def _kl_sum(
    mus: list[Tensor], rhos: list[Tensor], sigmas: list[Tensor], priors: list[PriorTerms]
) -> float:
    library = loaded()
    numels = [m.numel() for m in mus]
    tables = [int64_table(numels), *(addresses(t) for t in (mus, rhos, sigmas))]
    prior = prior_tables(priors)
    kind = dtype_code(mus[0].dtype)
    partials: list[Any] = []

    def run(begin: int, end: int) -> None:
        out = (ctypes.c_double * 1)(0.0)
        library.tb_kl(kind, len(mus), *tables, *prior, begin, end, out)
        partials.append(out[0])

    def team(parts: int) -> None:
        out = (ctypes.c_double * parts)()
        library.tb_kl_parts(kind, len(mus), *tables, *prior, sum(numels), parts, out)
        partials.extend(out)

    _parallel.split(sum(numels), run, team=team)
    return float(sum(sorted(partials)))  # sorted: the same total whatever the threads' order


def _kl_grad(
    c: float,
    mus: Sequence[Tensor],
    rhos: Sequence[Tensor],
    sigmas: Sequence[Tensor],
    priors: list[PriorTerms],
    grad_mus: list[Tensor],
    grad_rhos: list[Tensor],
) -> None:
    tables = [addresses(t) for t in (mus, rhos, sigmas)]
    outs = [addresses(grad_mus), addresses(grad_rhos)]
    numels = [m.numel() for m in mus]
    library = loaded()
    over_threads(library.tb_kl_grad, mus[0].dtype, numels, c, *tables, *prior_tables(priors), *outs)


def _kl_grad_ops(
    grad: Tensor,
    mus: Sequence[Tensor],
    rhos: Sequence[Tensor],
    sigmas: Sequence[Tensor],
    priors: list[PriorTerms],
) -> tuple[list[Tensor], list[Tensor]]:
    """The kernel's formulas in tensor ops (differentiable in ``grad``, ``mu`` and ``rho``: the
    saved ``sigmas`` are detached, so ``softplus(rho)`` is taken again)."""
    grad_mus, grad_rhos = [], []
    for mu, rho, prior in zip(mus, rhos, priors, strict=True):
        sigma = F.softplus(rho)
        mean = prior.mean if prior.mean is not None else prior.mean_value
        scale = prior.scale if prior.scale is not None else prior.scale_value
        variance = scale * scale
        sig = torch.sigmoid(rho)
        dlog = torch.where(rho < _SMALL_RHO, torch.ones_like(rho), sig / sigma)
        grad_mus.append(grad * (mu - mean) / variance)
        grad_rhos.append(grad * sigma / variance * sig - grad * dlog)
    return grad_mus, grad_rhos


# ----------------------------------------------------------------------------------------------
# Adam


# ----------------------------------------------------------------------------------------------
# Variational online Newton
