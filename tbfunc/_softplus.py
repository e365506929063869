"""``softplus(rho)`` with the same bits at every thread count.

torch's CPU ``softplus`` runs a vectorised loop (SLEEF's exp and log1p) over each thread's part
of a tensor, and a scalar loop (libm's) over the last few elements of each part; the two
disagree in the last bit for some inputs. Above ATen's grain size (32,768 elements) the parts'
bounds move with the thread count, so ``F.softplus`` of a large tensor can differ in a few
elements between 1 and 2 threads (7 of 12M measured). The draws ``mu + softplus(rho) * eps``
inherited that, against tbfunc's rule that a key gives the same bits at any thread count.

Here ``F.softplus`` runs as it does, in parallel, and then the few elements that may have
taken the other loop are computed again: a short window around every place a part can end
(where ATen's OpenMP and native schedulers put part bounds for this size and thread count,
both), and the tensor's end. A window starts at a multiple of 64 elements, the widest step of
the vectorised loops, and runs serially (it is far below the grain size), so each of its
elements takes the loop the one-thread call gives it: the result has one-thread
``F.softplus``'s bits. One thread, small tensors, other devices and traced code (transforms,
the compiler, forward-mode AD) keep ``F.softplus`` as it is; there torch never splits, or the
bits are the tracer's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbfunc._checks import traced

__all__ = ["softplus"]

GRAIN = 32768  # at::internal::GRAIN_SIZE: below it ATen runs an elementwise op serially
STEP = 64  # a multiple of every vectorised loop's step (two AVX-512 vectors of float32)


def softplus(rho: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``F.softplus(rho)`` (beta 1, threshold 20), the same bits at every thread count, with
    ``F.softplus``'s gradient. ``out``: a contiguous tensor like ``rho`` to write the values
    into instead of a new one (no gradient: under ``torch.no_grad()``), so that a caller that
    takes softplus every step does not pay for fresh memory every step."""
    if out is not None:
        torch._C._nn.softplus(rho.detach(), 1, 20, out=out)  # type: ignore[call-arg]
        if rho.numel() >= GRAIN and torch.get_num_threads() > 1 and _plain(rho):
            _windows(rho.detach().contiguous().view(-1), out.view(-1))
        return out
    if rho.numel() < GRAIN or torch.get_num_threads() == 1 or not _plain(rho):
        return F.softplus(rho)
    if torch.is_grad_enabled() and rho.requires_grad:
        return _Softplus.apply(rho)
    return _invariant(rho)


def part_bounds(numel: int, threads: int) -> set[int]:
    """Where ATen's schedulers may end a part of ``numel`` elements over ``threads`` threads:
    OpenMP's ``divup(n, min(T, divup(n, grain)))`` parts and the native pool's parts of at
    least the grain size."""
    divup = lambda a, b: -(-a // b)  # noqa: E731
    chunks = {divup(numel, min(threads, divup(numel, GRAIN))), max(GRAIN, divup(numel, threads))}
    return {k * chunk for chunk in chunks for k in range(1, divup(numel, chunk))}


def _plain(rho: Tensor) -> bool:
    return type(rho) in (Tensor, nn.Parameter) and rho.is_cpu and not traced()


def _invariant(rho: Tensor) -> Tensor:
    flat = rho.detach().contiguous().view(-1)
    return _windows(flat, F.softplus(flat)).view(rho.shape)


def _windows(flat: Tensor, out: Tensor) -> Tensor:
    """``out = F.softplus(flat)`` (flat, computed in parallel) with the elements that may have
    taken the other loop computed again serially (the module docstring)."""
    n = flat.numel()
    # the tensor's end: one thread runs its last n mod step elements in the scalar loop, while
    # a part that began off a multiple of the step runs others there
    last = max(0, (n // STEP - 1) * STEP)
    for bound in part_bounds(n, torch.get_num_threads()):
        # a part ending at ``bound`` ran its last (< STEP) elements in the scalar loop
        start = max(0, (bound // STEP - 1) * STEP)
        end = (bound // STEP + 1) * STEP
        if end >= n:  # joins the end's window
            last = min(last, start)
        else:  # 2 x STEP elements from a multiple of STEP: all in the vectorised loop
            out[start:end] = F.softplus(flat[start:end])
    out[last:] = F.softplus(flat[last:])  # from a multiple of STEP: one thread's tail
    return out


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, rho: Tensor) -> Tensor:
        ctx.save_for_backward(rho)
        return _invariant(rho)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (rho,) = ctx.saved_tensors
        # F.softplus's own backward: the same gradient, differentiable again for double
        # backward (autograd records it when create_graph=True)
        return torch.ops.aten.softplus_backward(grad, rho, 1, 20)
