"""A posterior's draw written into a module's own parameters for one forward and backward.

``tb.optim``'s sampled routes (``VON.sampled`` and ``tb.optim.sampled``) run the module itself
instead of ``tb.functional_call``: no ``torch.func`` machinery per call and no autograd node
for the draw. The block writes ``mu + sigma * eps`` (the bits of ``tb.sample(posterior, key)``
for ``sigma = softplus(rho)``) and keeps ``eps``; the module's forward and backward then leave
the weight gradient ``g`` in the parameters' ``.grad``, which the block hands to its caller
after giving the module back its own values, ``requires_grad`` flags and ``.grad``. The
callers turn ``g`` (and ``eps``) into what their optimizer needs.

The callers hold the module's lock (``_concurrency.exclusive``) around the block and what
they do with its gradients: the parameters hold the draw meanwhile, and per-module scratch
tensors live here.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from tbfunc import _noise
from tbfunc._boundary import check_matches
from tbfunc._forward import padding_row
from tbfunc._sampling import check_finite
from tbfunc._softplus import softplus
from tbfunc._structure import GENERATION

__all__ = ["Scratch", "bind", "drawn", "free", "scratch", "scratch_for", "sigmas_of"]

# per module: check_matches' answer, the structure generation and node order it was bound for,
# and the module's parameter per node in that order
_BOUND: weakref.WeakKeyDictionary[nn.Module, tuple[Any, ...]] = weakref.WeakKeyDictionary()


class Scratch:
    """A block's working tensors, one shaped like each node's ``mu``: the draw the module's
    parameters point at during the block (``draws``), the draw's ``eps`` (``noise``); for
    ``tb.optim.sampled`` also the draw's ``sigma`` and the ``rho`` gradients it hands out
    (``rho_grads``, reused only while nothing else holds them). Fresh memory of this size
    costs a page fault per 4 KiB on every first write: as much as a pass over it."""

    __slots__ = ("draws", "noise", "rho_grads", "sigma", "sigma_of")

    def __init__(self) -> None:
        self.draws: list[Tensor] = []
        self.noise: list[Tensor] = []
        self.sigma: list[Tensor] = []
        # the rhos (weakly) and their versions that ``sigma`` is softplus of
        self.sigma_of: list[tuple[weakref.ref, int]] = []
        self.rho_grads: list[Tensor] = []


# per module: the scratch of tb.optim.sampled, used under the module's lock only
_SCRATCH: weakref.WeakKeyDictionary[nn.Module, Scratch] = weakref.WeakKeyDictionary()


def scratch_for(module: nn.Module) -> Scratch:
    """The module's own scratch (the caller holds its lock)."""
    found = _SCRATCH.get(module)
    if found is None:
        found = _SCRATCH[module] = Scratch()
    return found


def sigmas_of(work: Scratch, rhos: list[Tensor]) -> list[Tensor]:
    """``softplus(rho)`` per node in ``work.sigma``, computed again only when a ``rho`` has
    changed (another tensor, or its version counter moved) since the last block: the blocks of
    one step (several samples, micro-batches) share one pass. A write through ``rho.data`` is
    not seen, as everywhere autograd's version counter is read."""
    if len(work.sigma_of) == len(rhos) and all(
        ref() is rho and version == rho._version
        for (ref, version), rho in zip(work.sigma_of, rhos, strict=True)
    ):
        return work.sigma
    work.sigma = scratch(work.sigma, rhos)
    with torch.no_grad():
        for rho, out in zip(rhos, work.sigma, strict=True):
            softplus(rho, out=out)
    work.sigma_of = [(weakref.ref(rho), rho._version) for rho in rhos]
    return work.sigma


def scratch(kept: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    """Contiguous tensors shaped like ``like``: ``kept`` again when they still fit (no
    allocation per step)."""
    fits = len(kept) == len(like) and all(
        k.shape == t.shape and k.dtype == t.dtype and k.device == t.device
        for k, t in zip(kept, like, strict=True)
    )
    if fits:
        return kept
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]


def free(tensors: list[Tensor | None], index: int) -> bool:
    """Whether ``tensors[index]`` is held by nothing but that list: no other Python reference
    (a ``.grad`` slot, a user's variable, a view's base) and no other tensor on its storage, so
    that writing it in place is seen by no one. A tensor that a C++ structure alone holds is
    not seen; autograd, the one that would read it, checks versions (the writers bump them)."""
    tensor = tensors[index]
    if tensor is None:
        return False
    # counted in the same expression form as _FREE_REFS: the list's and the argument's
    if sys.getrefcount(tensors[index]) - 1 != _FREE[0]:  # - 1: ``tensor`` above
        return False
    storage = tensor.untyped_storage()
    uses = torch._C._storage_Use_Count(storage._cdata)
    return (sys.getrefcount(storage), uses) == _FREE[1:]


def _baseline() -> tuple[int, int, int]:
    probe: list[Tensor | None] = [torch.empty(1)]
    refs = sys.getrefcount(probe[0])
    storage = probe[0].untyped_storage()  # type: ignore[union-attr]
    uses = torch._C._storage_Use_Count(storage._cdata)
    return refs, sys.getrefcount(storage), uses


# what free() reads for a tensor only a list holds, on this interpreter and torch
_FREE = _baseline()


def bind(
    module: nn.Module, view: dict[str, Any], order: list[str]
) -> tuple[dict[str, str], list[Tensor]]:
    """``check_matches``'s names and the module's parameter for each node of ``order``, kept
    while ``check_matches`` keeps its answer, the module's structure is unchanged and the
    order is the same."""
    names = check_matches(module, view)
    kept = _BOUND.get(module)
    if kept is not None and kept[0] is names and kept[1] == GENERATION[0] and kept[2] == order:
        return names, kept[3]
    own = dict(module.named_parameters(remove_duplicate=False))
    weights: list[Tensor] = [own[names[name]] for name in order]
    _BOUND[module] = (names, GENERATION[0], list(order), weights)
    return names, weights


@contextlib.contextmanager
def drawn(
    module: nn.Module,
    view: dict[str, Any],
    order: list[str],
    key: Tensor,
    hashes: list[int],
    sigmas: list[Tensor],
    work: Scratch,
) -> Iterator[list[Tensor | None]]:
    """The draw ``mu + sigmas * eps`` of ``view``'s nodes (in ``order``) in the module's
    parameters for the block, ``eps`` left in ``work.noise``. Yields a list that holds, once the
    block has left without an error, each node's weight gradient (None where the block left
    none). Embedding padding rows keep the module's values, as ``tb.functional_call`` keeps
    them.

    The parameters are pointed at the draw's memory (``set_``) and back at their own on
    leaving, which costs no pass over the weights (copying the module's values out and back
    cost two). A view of a parameter taken before the block, or a flat buffer the parameters
    live in, keeps showing the module's own values meanwhile; the parameters' strides are
    the draw's (contiguous) for the block."""
    names, weights = bind(module, view, order)
    nodes = [view[name] for name in order]
    check_finite(nodes, order, list(range(len(nodes))))
    mus = [node.mu for node in nodes]
    work.draws = scratch(work.draws, mus)
    work.noise = scratch(work.noise, mus)
    own = [w.detach() for w in weights]  # the module's own memory, given back on leaving
    flags = [w.requires_grad for w in weights]
    grads = [w.grad for w in weights]
    with torch.no_grad():
        _noise.gaussian_into(key, hashes, mus, sigmas, work.draws, work.noise)
        for i, name in enumerate(order):
            padded = padding_row(module, names[name])
            if padded is not None:
                work.draws[i][padded[1]] = own[i][padded[1]]
        for w, drawn_ in zip(weights, work.draws, strict=True):
            w.set_(drawn_)  # type: ignore[call-overload]  # no copy in, none out
    for w in weights:
        w.grad = None
        w.requires_grad_(True)
    found: list[Tensor | None] = []
    try:
        yield found
    finally:
        left = [w.grad for w in weights]
        with torch.no_grad():
            for w, mine in zip(weights, own, strict=True):
                w.set_(mine)  # type: ignore[call-overload]
        for w, flag, grad in zip(weights, flags, grads, strict=True):
            w.grad = grad
            w.requires_grad_(flag)
    found.extend(left)
