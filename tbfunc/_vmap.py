"""``torch.func.vmap`` over leading axes, without its per-call pytree work (private).

Every tbfunc forward batches the same shape of call: a dict of weights and maybe a tensor of
dropout keys, all with a leading sample axis, and a function returning a tuple of tensors, all
stacked on a new leading axis. ``torch.func.vmap`` flattens and validates its inputs, in_dims
and outputs anew on every call: a quarter of a small MLP's vmapped forward (``benchmarks
--sections overhead``). In eager code ``leading`` enters the vmap level itself through the
functorch primitives that ``torch.func.vmap`` is built on, so the batching, the randomness
check ("error": a forward drawing from the global RNG fails) and the results are the same.
Under ``torch.compile`` and ``torch.export`` (which trace ``torch.func.vmap`` itself), or where
a torch build lacks the primitives, ``torch.func.vmap`` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["leading"]


def _primitives() -> tuple[Any, ...] | None:
    """The functorch calls ``leading`` makes, or None where this torch lacks any of them."""
    import torch._functorch.vmap as public  # torch.func.vmap's module

    functorch = torch._C._functorch
    names = ("_vmap_increment_nesting", "_vmap_decrement_nesting", "_add_batch_dim")
    found = tuple(getattr(functorch, name, None) for name in (*names, "_remove_batch_dim"))
    loader = getattr(public, "lazy_load_decompositions", None)
    return None if loader is None or None in found else (*found, loader)


_PRIMITIVES = _primitives()
_DECOMPOSITIONS_LOADED = [False]  # torch.func.vmap's batching rules written in Python
# missing from some torch versions; is_compiling still sees code that dynamo traces
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def leading(
    func: Callable[..., tuple[Tensor, ...]],
    weights: dict[str, Tensor],
    extra: tuple[Tensor, ...],
    size: int,
) -> tuple[Tensor, ...]:
    """``torch.func.vmap(func)(weights, *extra)``: every tensor batched on its leading axis (of
    length ``size``), every output stacked on a new one."""
    if _PRIMITIVES is None or torch.compiler.is_compiling() or _exporting():
        return torch.func.vmap(func)(weights, *extra)
    increment, decrement, add, remove, load_decompositions = _PRIMITIVES
    if not _DECOMPOSITIONS_LOADED[0]:
        load_decompositions()
        _DECOMPOSITIONS_LOADED[0] = True
    level = increment(size, "error")
    try:
        batched = {name: add(tensor, 0, level) for name, tensor in weights.items()}
        outputs = func(batched, *(add(tensor, 0, level) for tensor in extra))
        # an output that no batched input reached comes back expanded to `size` rows, as
        # torch.func.vmap returns it
        return tuple(remove(output, level, size, 0) for output in outputs)
    finally:
        decrement()
