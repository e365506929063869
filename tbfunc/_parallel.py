"""Splitting one C kernel call over threads: ``split(total, run, team=...)`` runs the kernel on
contiguous parts of ``[0, total)`` at once, one part per thread (``torch.get_num_threads()``).

Two routes, the same parts and so the same results: where the kernel library shares torch's
OpenMP runtime (``_native.team``), ``team(parts)`` makes one C call that runs the parts on
torch's own threads (``_parts.h``); else ``run(begin, end)`` runs each part on a pool of
tbfunc's threads (``ctypes`` releases the GIL during a call). The pool is the slower route in
a training loop: the threads torch's last op leaves spinning hold the cores it needs."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from tbfunc import _native

__all__ = ["split"]

PARALLEL_MIN_NUMEL = 1 << 16  # below this, handing work to threads costs more than it saves
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def split(
    total: int,
    run: Callable[[int, int], object],
    min_numel: int | None = None,
    team: Callable[[int], object] | None = None,
) -> None:
    """``run(begin, end)`` over ``[0, total)``: in one call below ``min_numel`` elements per
    thread (default ``PARALLEL_MIN_NUMEL``), else in one part per thread, this one included;
    part ``p`` of ``P`` is ``[total p // P, total (p + 1) // P)``. With ``team``, where the
    kernels run on torch's OpenMP team, ``team(P)`` instead (one call for all the parts)."""
    workers = min(torch.get_num_threads(), total // (min_numel or PARALLEL_MIN_NUMEL))
    if workers < 2:
        run(0, total)
        return
    library = _native.kernel()
    if team is not None and library is not None and _native.team(library):
        team(workers)
        return
    bounds = [total * part // workers for part in range(workers + 1)]
    futures = [_thread_pool().submit(run, a, b) for a, b in itertools.pairwise(bounds[1:])]
    run(bounds[0], bounds[1])
    for future in futures:
        future.result()


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(
                    max_workers=os.cpu_count() or 2, thread_name_prefix="tbfunc"
                )
    return _pool


def _forget_pool_in_child() -> None:
    """A forked child inherits the pool object but none of its threads: work submitted to it
    would wait forever. The child makes its own on its first parallel call."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)
