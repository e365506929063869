"""How Python hands tensors to the C training kernels (``_train.c``): tables of addresses and
counts, the dtype code, a Gaussian prior in the kernels' form, one call split over threads
(``_parallel``, or the kernel's ``_parts`` twin on torch's OpenMP team), and the version bump
of what a kernel wrote. ``_fused`` (the nelbo route) and ``_fused_updates`` (the optimizers'
passes) call the kernels through these.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tbfunc import _native, _parallel

__all__ = [
    "PriorTerms",
    "addresses",
    "dtype_code",
    "int64_table",
    "loaded",
    "over_threads",
    "prior_tables",
    "prior_terms",
    "written",
]


def int64_table(values: Sequence[int]) -> Any:
    return (ctypes.c_int64 * len(values))(*values)


def addresses(tensors: Sequence[Tensor | None]) -> Any:
    return int64_table([0 if t is None else t.data_ptr() for t in tensors])


def dtype_code(dtype: torch.dtype) -> int:
    return 0 if dtype == torch.float32 else 1


class PriorTerms(NamedTuple):
    """A Gaussian prior's centre and scale for one node, as the kernels take them: a tensor
    shaped like ``mu`` (contiguous, its dtype) or None with the scalar in ``*_value``."""

    mean: Tensor | None
    mean_value: float
    scale: Tensor | None
    scale_value: float


def prior_terms(mu: Tensor, mean: Any, scale: Any) -> PriorTerms | None:
    """The kernels' form of ``N(mean, scale^2)`` for ``mu``, or None where they do not serve
    (a broadcast shape, another dtype or device, a prior that is itself trained)."""
    parts: list[Any] = []
    for value in (mean, scale):
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            parts += [None, float(value)]
        elif isinstance(value, Tensor) and not value.requires_grad and type(value) is Tensor:
            if value.numel() == 1 and value.dim() <= mu.dim() and value.device == mu.device:
                parts += [None, float(value)]
            elif value.shape == mu.shape and value.dtype == mu.dtype and value.device == mu.device:
                parts += [value.contiguous(), 0.0]
            else:
                return None
        else:
            return None
    return PriorTerms(*parts)


def prior_tables(priors: list[PriorTerms] | None, count: int = 0) -> list[Any]:
    """The kernels' four prior tables (none: null tables for ``count`` nodes)."""
    if priors is None:
        return [None, None, None, None]
    doubles = ctypes.c_double * len(priors)
    return [
        addresses([p.mean for p in priors]),
        doubles(*[p.mean_value for p in priors]),
        addresses([p.scale for p in priors]),
        doubles(*[p.scale_value for p in priors]),
    ]


def over_threads(
    function: Any, dtype: torch.dtype, numels: list[int], *args: Any, flagged: bool = False
) -> bool:
    """``function(kind, nodes, numels, *args, begin, end)``, the kernels' common signature, over
    the nodes' concatenated elements, one part per thread (on torch's OpenMP team by the
    kernel's ``_parts`` twin where the library has one). ``flagged``: the kernel also takes an
    ``int64`` out after ``begin, end`` (its twin one per part, after ``total, parts``) and sets
    it to 1 where a result is not finite; returns whether no part did (True without a flag)."""
    kind, table, total = dtype_code(dtype), int64_table(numels), sum(numels)
    twin: Any = getattr(loaded(), function.__name__ + "_parts", None)
    flags: list[int] = []

    def run(begin: int, end: int) -> None:
        if not flagged:
            function(kind, len(numels), table, *args, begin, end)
            return
        out = (ctypes.c_int64 * 1)(0)
        function(kind, len(numels), table, *args, begin, end, out)
        flags.append(out[0])

    def team(parts: int) -> None:
        if not flagged:
            twin(kind, len(numels), table, *args, total, parts)
            return
        out = (ctypes.c_int64 * parts)()
        twin(kind, len(numels), table, *args, total, parts, out)
        flags.extend(out)

    _parallel.split(total, run, team=None if twin is None else team)
    return not any(flags)


def loaded() -> Any:
    library = _native.kernel()
    assert library is not None  # callers checked eager()
    return library


def written(*groups: list[Tensor]) -> None:
    """Bump the version counter of tensors a kernel wrote in place: writes through a data
    pointer bypass it, and autograd's saved-tensor checks and tbfunc's finiteness cache
    (``_sampling.check_finite``) read it to learn that a tensor changed."""
    for group in groups:
        for tensor in group:  # one at a time: the form every supported torch takes
            torch.autograd.graph.increment_version(tensor)
