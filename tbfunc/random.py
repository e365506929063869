"""Keys and noise: the only place tbfunc makes randomness.

A key is an ``int64`` tensor of shape ``(2,)`` holding two 32-bit words, on the CPU. Keys are
derived with Threefry-2x32 (20 rounds; Salmon et al. 2011, "Parallel random numbers: as easy as
1, 2, 3"), computed with plain ``int64`` tensor ops masked to 32 bits, so ``split`` and
``fold_in`` work under ``vmap``, ``grad`` and ``torch.compile`` and match JAX's default
(``threefry_partitionable``) keys bit for bit.

Bulk noise comes from two custom ops with vmap rules and fake kernels, so transforms and the
compiler see ordinary ops: ``tbfunc::normal`` (one segment per key) and ``tbfunc::normal_folded``
(a segment per node and sample, keyed by ``fold_in(key, hash)``, which whole-model sampling
uses). On the CPU each segment reseeds PyTorch's generator, segments spread over the CPU
threads; on CUDA one Triton kernel draws every segment (``tbfunc._triton``), with the
generator as the fallback. The global RNG is never read nor advanced.

Seeding: on CUDA (Philox) the seed is the full 64-bit key. PyTorch's CPU Mersenne Twister only
takes a 32-bit seed, so on the CPU a key selects one of 2**32 streams through a bijective mix of
both words: two distinct keys share a stream with probability 2**-32.
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import Tensor

from tbfunc._checks import check_key, check_positive_int, fail, is_wrapped

__all__ = ["fold_in", "key", "normal", "split"]

Word = TypeVar("Word", int, Tensor)
_MASK = 0xFFFFFFFF
_PARITY = 0x1BD11BDA  # Threefry's key-schedule constant.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PYTHON_THREEFRY_MAX = 48  # keys; past this the tensor version (a fixed ~0.5 ms) is faster
_GOLDEN = 0x9E3779B1  # odd, so multiplying by it is a bijection on 32-bit words


def key(seed: int) -> Tensor:
    """A new key from an integer seed: ``[seed >> 32, seed & 0xFFFFFFFF]`` (as ``jax.random.key``).

    Args:
        seed: any Python int in ``[-2**63, 2**64)``; negative seeds are taken modulo ``2**64``.

    Returns:
        An ``int64`` tensor of shape ``(2,)`` on the CPU.

    Example:
        >>> import tbfunc as tb
        >>> tb.random.key(42).tolist()
        [0, 42]
    """
    value = _as_int(seed, "seed")
    if not -(2**63) <= value < 2**64:
        fail("seed", "an int in [-2**63, 2**64)", seed)
    value %= 2**64
    return torch.tensor([value >> 32, value & _MASK], dtype=torch.int64)


def split(key: Tensor, num: int = 2) -> Tensor:
    """``num`` new keys: ``split(key, num)[i] = threefry2x32(key, (0, i))``.

    Args:
        key: a key from ``key``, ``split`` or ``fold_in``.
        num: how many keys to make (>= 1).

    Returns:
        An ``int64`` tensor of shape ``(num, 2)``.
    """
    key = check_key(key)
    num = check_positive_int(num, "num")
    return _split(key, num)


def fold_in(key: Tensor, data: int | Tensor) -> Tensor:
    """A new key from a key and an integer: ``threefry2x32(key, (data >> 32, data & 0xFFFFFFFF))``.

    Use it to derive one key per loop index or per name without a ``split``.

    Args:
        key: a key.
        data: a Python int in ``[-2**63, 2**64)`` or an integer tensor of shape ``()``.

    Returns:
        A key (``int64`` tensor of shape ``(2,)``).
    """
    key = check_key(key)
    if isinstance(data, Tensor):
        if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
            fail("data", "an integer tensor", data, error=TypeError)
        if data.shape != ():
            fail("data", "a tensor of shape ()", data)
        word = data.to(torch.int64)
    else:
        value = _as_int(data, "data")
        if not -(2**63) <= value < 2**64:
            fail("data", "an int in [-2**63, 2**64)", data)
        word = torch.tensor(value - 2**64 if value >= 2**63 else value, dtype=torch.int64)
    return _fold_in(key, word)


def normal(
    key: Tensor,
    shape: int | Sequence[int],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal noise of ``shape``, a deterministic function of ``key``.

    The same key gives bit-identical noise on the same device type; ``vmap`` over keys equals
    the loop over them. Drawn by the device's native generator seeded from the key.

    Args:
        key: a key.
        shape: the output shape.
        dtype: a floating dtype (default: ``torch.get_default_dtype()``).
        device: where to draw (default: ``torch.get_default_device()``).

    Returns:
        A tensor of ``shape`` with i.i.d. N(0, 1) entries.
    """
    key = check_key(key)
    dims = _as_shape(shape)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        fail("dtype", "a floating-point torch.dtype", dtype, error=TypeError)
    # torch.empty(0).device is the default device, and unlike get_default_device() dynamo traces it.
    device = torch.empty(0).device if device is None else torch.device(device)
    numel = 1
    for size in dims:
        numel *= size
    return normal_segments(key[None], [numel], dtype, device).view(dims)


def normal_segments(
    keys: Tensor, numels: list[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Flat noise whose ``t``-th segment, ``numels[t]`` draws long, is keyed by ``keys[t]``.

    Segment ``t`` equals ``normal(keys[t], (numels[t],))`` bit for bit, so a whole model's noise
    is drawn in one op call. Internal: no argument checks.
    """
    return torch.ops.tbfunc.normal(keys, numels, dtype, device)


def uniform_segments(
    keys: Tensor, numels: list[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Like ``normal_segments``, with U[0, 1) draws: cheaper where a Bernoulli is all that is
    needed (MC-dropout masks). Internal: no argument checks."""
    return torch.ops.tbfunc.uniform(keys, numels, dtype, device)


def normal_folded(
    keys: Tensor, hashes: list[int], numels: list[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Flat noise for ``len(hashes)`` nodes x ``len(keys)`` samples, node-major: segment
    ``(l, s)``, ``numels[l]`` draws long, equals ``normal(fold_in(keys[s], hashes[l]), numels[l])``.

    The op derives the per-segment keys itself (on GPUs inside the kernel), so callers need not
    run Threefry for every (node, sample) pair. Internal: no argument checks.
    """
    return torch.ops.tbfunc.normal_folded(keys, hashes, numels, dtype, device)


def affine_folded(
    keys: Tensor, hashes: list[int], mus: list[Tensor], sigmas: list[Tensor]
) -> Tensor | None:
    """``mu_l + sigma_l * normal_folded(...)`` segments in one kernel, or None where no fused
    kernel serves the device (then use ``normal_folded`` and an ``addcmul``).

    Eager and untracked only: it is no op, so neither autograd nor transforms see through it.
    Saves a read and a write of the S x P buffer on GPUs. Internal: no argument checks.
    """
    if not _use_triton(mus[0].device, mus[0].dtype):
        return None
    out = torch.empty(
        len(keys) * sum(m.numel() for m in mus), dtype=mus[0].dtype, device=mus[0].device
    )
    flat_mu = torch.cat([m.reshape(-1) for m in mus])
    flat_sigma = torch.cat([s.reshape(-1) for s in sigmas])
    numels = [m.numel() for m in mus]
    return _triton().fill_(out, keys, numels, hashes, affine=(flat_mu, flat_sigma))


# ----------------------------------------------------------------------------------------------
# Threefry-2x32 on int64 tensors.


def _threefry2x32(k0: Word, k1: Word, x0: Word, x1: Word) -> tuple[Word, Word]:
    """Threefry-2x32, 20 rounds, on 32-bit words held in Python ints or int64 tensors.

    int64 arithmetic masked to 32 bits stands in for uint32, which PyTorch lacks arithmetic for;
    a left shift of a 32-bit word by <= 29 cannot overflow int64. Tensors broadcast. In eager
    mode a handful of keys go through Python ints: some 150 tiny tensor ops would cost ~40x more
    than the arithmetic (``_few_plain_words``).
    """
    schedule = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0 = (x0 + k0) & _MASK
    x1 = (x1 + k1) & _MASK
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = (x0 + x1) & _MASK
            x1 = (((x1 << r) | (x1 >> (32 - r))) & _MASK) ^ x0
        x0 = (x0 + schedule[(block + 1) % 3]) & _MASK
        x1 = (x1 + schedule[(block + 2) % 3] + block + 1) & _MASK
    return x0, x1


def _split(keys: Tensor, num: int) -> Tensor:
    """keys ``(..., 2)`` -> ``(..., num, 2)``; no checks."""
    if _few_plain_words(keys, num):
        words = keys.reshape(-1, 2).tolist()
        pairs = [_threefry2x32(k0, k1, 0, i) for k0, k1 in words for i in range(num)]
        return torch.tensor(pairs, dtype=torch.int64).reshape(*keys.shape[:-1], num, 2)
    counter = torch.arange(num, dtype=torch.int64, device=keys.device)
    x0, x1 = _threefry2x32(keys[..., 0:1], keys[..., 1:2], torch.zeros_like(counter), counter)
    return torch.stack((x0, x1), dim=-1)


def _fold_in(keys: Tensor, data: Tensor) -> Tensor:
    """keys ``(..., 2)`` and int64 data broadcastable against ``keys[..., 0]``; no checks."""
    shape = torch.broadcast_shapes(keys.shape[:-1], data.shape)
    if _few_plain_words(keys, data.numel()) and not is_wrapped(data):
        words = keys.expand(*shape, 2).reshape(-1, 2).tolist()
        values = data.expand(shape).reshape(-1).tolist()
        pairs = [
            _threefry2x32(k0, k1, (d >> 32) & _MASK, d & _MASK)
            for (k0, k1), d in zip(words, values, strict=True)
        ]
        return torch.tensor(pairs, dtype=torch.int64).reshape(*shape, 2)
    x0, x1 = _threefry2x32(keys[..., 0], keys[..., 1], (data >> 32) & _MASK, data & _MASK)
    return torch.stack((x0, x1), dim=-1)


def _fold_in_hashes(keys: Tensor, hashes: list[int]) -> Tensor:
    """``(L, *keys.shape)``: ``fold_in(keys, hashes[l])`` for every hash, in one Threefry call."""
    data = torch.tensor(hashes, dtype=torch.int64).view(-1, *([1] * (keys.dim() - 1)))
    return _fold_in(keys[None], data)


def _few_plain_words(keys: Tensor, count: int) -> bool:
    """Whether the Python-int path is the faster one and allowed: eager, untransformed CPU keys."""
    return (
        keys.device.type == "cpu"
        and keys.numel() // 2 * count <= _PYTHON_THREEFRY_MAX
        and not torch.compiler.is_compiling()
        and not is_wrapped(keys)
    )


def _as_int(value: object, arg: str) -> int:
    if isinstance(value, bool):
        fail(arg, "an int", value, error=TypeError)
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        fail(arg, "an int", value, error=TypeError)


def _as_shape(shape: int | Sequence[int]) -> list[int]:
    dims = [shape] if not isinstance(shape, Sequence) else list(shape)
    try:
        sizes = [operator.index(size) for size in dims if not isinstance(size, bool)]
    except TypeError:
        sizes = []
    if len(sizes) != len(dims) or any(size < 0 for size in sizes):
        fail("shape", "an int or a sequence of non-negative ints", shape, error=TypeError)
    return sizes


# ----------------------------------------------------------------------------------------------
# The noise op. One op call draws every segment; the vmap rule folds the vmapped key axis into
# the segment list, so vmap over keys equals the loop without a Python loop per batch element.

_generators = threading.local()
_PARALLEL_MIN_NUMEL = 1 << 18  # below this, handing work to threads costs more than it saves
_pool: ThreadPoolExecutor | None = None


def fill_noise_(
    out: Tensor,
    keys: list[list[int]],
    numels: list[int],
    finish: Callable[[int, Tensor], object] | None = None,
    *,
    uniform: bool = False,
) -> Tensor:
    """Fill the flat ``out`` with segments of N(0, 1) noise (U[0, 1) with ``uniform``),
    segment ``t`` keyed by ``keys[t]``.

    ``finish(t, segment)``, if given, runs right after segment ``t`` is drawn, while it is still
    in cache (``module.sample`` writes ``mu + sigma * eps`` there). On the CPU, large fills are
    split into contiguous runs of segments drawn on ``torch.get_num_threads()`` threads: each
    segment has its own seed, so the result does not depend on the split, and PyTorch's
    generator is single-threaded, so this is where the CPU's other cores help. On CUDA, one
    Triton kernel draws all segments (``tbfunc._triton``) where Triton is installed and the
    dtype is not float64; elsewhere each segment reseeds the device's generator. Internal.
    """
    if _use_triton(out.device, out.dtype) and finish is None and not uniform:
        return _triton().fill_(out, torch.tensor(keys, dtype=torch.int64), numels)
    offsets = [0]
    for count in numels:
        offsets.append(offsets[-1] + count)
    jobs = list(zip(range(len(numels)), keys, offsets, numels, strict=False))
    workers = min(torch.get_num_threads(), len(jobs))
    if out.device.type != "cpu" or workers < 2 or offsets[-1] < _PARALLEL_MIN_NUMEL:
        _fill_run(out, jobs, finish, uniform)
        return out
    bounds = [0]
    for part in range(1, workers):
        target = offsets[-1] * part // workers
        bounds.append(max(bounds[-1], next(i for i, o in enumerate(offsets) if o >= target)))
    bounds.append(len(jobs))
    runs = [jobs[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    futures = [_thread_pool().submit(_fill_run, out, run, finish, uniform) for run in runs[1:]]
    _fill_run(out, runs[0], finish, uniform)
    for future in futures:
        future.result()
    return out


def _fill_run(
    out: Tensor,
    jobs: list[tuple[int, list[int], int, int]],
    finish: Callable[[int, Tensor], object] | None,
    uniform: bool = False,
) -> None:
    generator = _generator(out.device)
    for index, (word0, word1), offset, count in jobs:
        segment = out[offset : offset + count]
        generator.manual_seed(_seed(word0, word1, out.device))
        if uniform:
            segment.uniform_(generator=generator)
        else:
            segment.normal_(generator=generator)
        if finish is not None:
            finish(index, segment)


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="tbfunc")
    return _pool


def _generator(device: torch.device) -> torch.Generator:
    """One reusable generator per thread and device; it is reseeded before every segment."""
    cache = _generators.__dict__.setdefault("by_device", {})
    if device not in cache:
        cache[device] = torch.Generator(device=device)
    return cache[device]


def _use_triton(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype != torch.float64 and _triton() is not None


@functools.cache
def _triton() -> Any:
    """``tbfunc._triton``, or None where Triton is not installed (CPU builds of PyTorch)."""
    try:
        from tbfunc import _triton as kernels
    except ImportError:
        return None
    return kernels


def _seed(word0: int, word1: int, device: torch.device) -> int:
    if device.type == "cpu":
        # The CPU Mersenne Twister keeps only the low 32 bits of a seed: mix both words in.
        return ((word0 * _GOLDEN) & _MASK) ^ word1
    return (word0 << 32) | word1


@torch.library.custom_op("tbfunc::normal", mutates_args=())
def _normal_op(keys: Tensor, numels: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    out = torch.empty(sum(numels), dtype=dtype, device=device)
    return fill_noise_(out, keys.tolist(), numels)


@_normal_op.register_fake
def _(keys: Tensor, numels: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(sum(numels), dtype=dtype, device=device)


@_normal_op.register_vmap
def _(info, in_dims, keys: Tensor, numels: list[int], dtype: torch.dtype, device: torch.device):
    keys_dim = in_dims[0]
    batch = keys.movedim(keys_dim, 0)
    size = batch.shape[0]
    flat = torch.ops.tbfunc.normal(batch.reshape(-1, 2), numels * size, dtype, device)
    return flat.view(size, -1), 0


@torch.library.custom_op("tbfunc::uniform", mutates_args=())
def _uniform_op(
    keys: Tensor, numels: list[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    out = torch.empty(sum(numels), dtype=dtype, device=device)
    return fill_noise_(out, keys.tolist(), numels, uniform=True)


@_uniform_op.register_fake
def _(keys: Tensor, numels: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(sum(numels), dtype=dtype, device=device)


@_uniform_op.register_vmap
def _(info, in_dims, keys: Tensor, numels: list[int], dtype: torch.dtype, device: torch.device):
    batch = keys.movedim(in_dims[0], 0)
    size = batch.shape[0]
    flat = torch.ops.tbfunc.uniform(batch.reshape(-1, 2), numels * size, dtype, device)
    return flat.view(size, -1), 0


@torch.library.custom_op("tbfunc::normal_folded", mutates_args=())
def _normal_folded_op(
    keys: Tensor, hashes: list[int], numels: list[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    out = torch.empty(len(keys) * sum(numels), dtype=dtype, device=device)
    if _use_triton(out.device, out.dtype):
        return _triton().fill_(out, keys, numels, hashes)
    segment_keys = _fold_in_hashes(keys, hashes).reshape(-1, 2).tolist()
    return fill_noise_(out, segment_keys, [n for n in numels for _ in range(len(keys))])


@_normal_folded_op.register_fake
def _(
    keys: Tensor, hashes: list[int], numels: list[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    return torch.empty(keys.shape[0] * sum(numels), dtype=dtype, device=device)


@_normal_folded_op.register_vmap
def _(info, in_dims, keys, hashes, numels, dtype, device):
    batch = keys.movedim(in_dims[0], 0)
    size, samples = batch.shape[0], batch.shape[1]
    flat = torch.ops.tbfunc.normal_folded(batch.reshape(-1, 2), hashes, numels, dtype, device)
    # node-major over (batch, sample) -> per batch element, node-major over samples
    per_node = flat.split([size * samples * n for n in numels])
    return torch.cat([part.view(size, -1) for part in per_node], dim=1), 0
