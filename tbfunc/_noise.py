"""Bulk noise: every draw tbfunc makes goes through ``draw`` (one entry, every device).

A draw is a list of segments. With ``hashes``, segment ``(l, s)`` (node-major) holds
``numels[l]`` values keyed by ``fold_in(keys[s], hashes[l])``: a whole posterior tree for S
samples in one call, the per-segment keys derived where the noise is made (in C on the CPU, in
the Triton kernel on GPUs). Without ``hashes``, segment ``t`` holds ``numels[t]`` values keyed
by ``keys[t]``. ``draw`` can also apply ``mu + sigma * eps`` per node, fused into the kernel
where one serves the device and nothing records the operations.

The streams (each a pure function of the whole 64-bit key and the index):
- CPU: Philox-4x32-10 + Box-Muller (``_noise.c`` through ``_native``; ``_philox`` is the same
  algorithm in tensor ops, used when no C compiler is present). float32 arithmetic; other
  dtypes are rounded from it.
- CUDA: Triton's ``tl.randn`` (Philox-4x32-10 seeded with the 64-bit key) in one launch
  (``_triton``); float64 and Triton-less installs reseed the device's Philox generator with
  the 64-bit key per segment.

Under autograd, ``torch.func`` transforms and ``torch.compile`` the noise comes from the custom
op ``tbfunc::noise`` (a fake kernel for the compiler, a vmap rule that folds the vmapped key
axis into the segment list) and the affine map is ordinary tensor ops; both routes give the
same bits. The global RNG is never read nor advanced.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from tbfunc import _native, _philox, _threefry

__all__ = ["draw"]

_PARALLEL_MIN_NUMEL = 1 << 16  # below this, handing work to threads costs more than it saves
_pool: ThreadPoolExecutor | None = None
_generators = threading.local()


def draw(
    keys: Tensor,
    hashes: list[int] | None,
    numels: list[int],
    dtype: torch.dtype,
    device: torch.device,
    *,
    uniform: bool = False,
    affine: tuple[list[Tensor], list[Tensor]] | None = None,
) -> Tensor:
    """Flat noise for the segments described in the module docstring.

    With ``affine = (mus, sigmas)`` (one tensor per node, ``hashes`` given or one node) node
    ``l``'s segments hold ``mu_l + sigma_l * eps`` (eps of the node's dtype, one rounding for
    the product and one for the sum). Internal: no argument checks.
    """
    fused = affine is not None and not _recorded(keys, *affine[0], *affine[1])
    if fused and affine is not None:
        out = _fused(keys, hashes, numels, dtype, device, affine)
        if out is not None:
            return out
    flat = torch.ops.tbfunc.noise(keys, hashes or [], numels, uniform, dtype, device)
    if affine is None:
        return flat
    samples = _samples(keys, hashes, numels)
    parts = []
    for mu, sigma, eps in zip(*affine, flat.split([n * samples for n in numels]), strict=True):
        eps = eps.view(mu.shape) if samples == 1 else eps.view(samples, *mu.shape)
        # no broadcast over the sample axis with one draw: its backward needs no reduction
        value = torch.add(mu, sigma * eps, out=eps if fused else None)
        parts.append(value.reshape(-1))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _samples(keys: Tensor, hashes: list[int] | None, numels: list[int]) -> int:
    """S: with hashes every key is a sample; without, ``keys[l * S + s]`` keys segment (l, s)."""
    return keys.shape[0] if hashes else keys.shape[0] // len(numels)


def _recorded(*tensors: Tensor) -> bool:
    """Whether autograd, a ``torch.func`` transform or the compiler records operations."""
    if torch.compiler.is_compiling():
        return True
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _fused(
    keys: Tensor,
    hashes: list[int] | None,
    numels: list[int],
    dtype: torch.dtype,
    device: torch.device,
    affine: tuple[list[Tensor], list[Tensor]],
) -> Tensor | None:
    """The kernels that write ``mu + sigma * eps`` themselves, or None where none serves."""
    mus, sigmas = affine
    if device.type == "cpu" and dtype in (torch.float32, torch.float64):
        library = _native.kernel()
        if library is None:
            return None
        mus = [m.contiguous() for m in mus]
        sigmas = [s.contiguous() for s in sigmas]
        out = torch.empty(_samples(keys, hashes, numels) * sum(numels), dtype=dtype)
        _fill_native(library, out, keys, hashes, numels, False, mus, sigmas)
        return out
    if hashes and _use_triton(device, dtype):
        out = torch.empty(len(keys) * sum(numels), dtype=dtype, device=device)
        flat_mu = torch.cat([m.reshape(-1) for m in mus])
        flat_sigma = torch.cat([s.reshape(-1) for s in sigmas])
        return _triton().fill_(out, keys, numels, hashes, affine=(flat_mu, flat_sigma))
    return None


def _noise_eager(
    keys: Tensor,
    hashes: list[int],
    numels: list[int],
    uniform: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    total = _samples(keys, hashes, numels) * sum(numels)
    if device.type == "cpu":
        library = _native.kernel()
        wide = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        if library is not None:
            out = torch.empty(total, dtype=wide)
            _fill_native(library, out, keys, hashes, numels, uniform, None, None)
        else:
            segment_keys, segment_numels = _segments(keys, hashes, numels)
            out = _philox.fill(segment_keys, segment_numels, uniform)
        return out.to(dtype)
    out = torch.empty(total, dtype=dtype, device=device)
    if _use_triton(device, dtype) and not uniform:
        return _triton().fill_(out, keys, numels, hashes or None)
    segment_keys, segment_numels = _segments(keys, hashes, numels)
    return _fill_with_generator(out, segment_keys.tolist(), segment_numels, uniform)


def _segments(keys: Tensor, hashes: list[int], numels: list[int]) -> tuple[Tensor, list[int]]:
    """Per-segment keys ``(T, 2)`` and lengths, node-major."""
    samples = _samples(keys, hashes, numels)
    if not hashes:
        return keys, [n for n in numels for _ in range(samples)]
    folded = _threefry.fold_in_hashes(keys.cpu(), hashes).reshape(-1, 2)
    return folded, [n for n in numels for _ in range(samples)]


def _fill_native(
    library: Any,
    out: Tensor,
    keys: Tensor,
    hashes: list[int] | None,
    numels: list[int],
    uniform: bool,
    mus: list[Tensor] | None,
    sigmas: list[Tensor] | None,
) -> None:
    """One kernel call per thread, each writing a contiguous run of the flat output."""
    keys = keys.contiguous()
    samples = _samples(keys, hashes, numels)
    hashes = hashes or []
    table = torch.tensor([*hashes, *numels], dtype=torch.int64)
    nodes = len(numels)
    hash_ptr = table.data_ptr() if hashes else None
    numel_ptr = table.data_ptr() + 8 * len(hashes)
    addresses = None
    if mus is not None and sigmas is not None:
        addresses = torch.tensor(
            [m.data_ptr() for m in mus] + [s.data_ptr() for s in sigmas], dtype=torch.int64
        )
    mu_ptr = addresses.data_ptr() if addresses is not None else None
    sigma_ptr = mu_ptr + 8 * nodes if mu_ptr is not None else None
    kind = 0 if out.dtype == torch.float32 else 1
    total = out.numel()

    def run(begin: int, end: int) -> None:
        library.tb_fill(
            int(uniform),
            kind,
            out.data_ptr(),
            begin,
            end,
            samples,
            keys.data_ptr(),
            nodes,
            hash_ptr,
            numel_ptr,
            mu_ptr,
            sigma_ptr,
        )

    workers = min(torch.get_num_threads(), total // _PARALLEL_MIN_NUMEL)
    if workers < 2:
        run(0, total)
        return
    bounds = [total * part // workers for part in range(workers + 1)]
    futures = [_thread_pool().submit(run, a, b) for a, b in itertools.pairwise(bounds[1:])]
    run(bounds[0], bounds[1])
    for future in futures:
        future.result()


def _fill_with_generator(
    out: Tensor, keys: list[list[int]], numels: list[int], uniform: bool
) -> Tensor:
    """GPUs without Triton, and float64: reseed the device's Philox generator per segment with
    the whole 64-bit key."""
    generator = _generator(out.device)
    offset = 0
    for (word0, word1), count in zip(keys, numels, strict=True):
        segment = out[offset : offset + count]
        generator.manual_seed((word0 << 32) | word1)
        if uniform:
            segment.uniform_(generator=generator)
        else:
            segment.normal_(generator=generator)
        offset += count
    return out


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="tbfunc")
    return _pool


def _generator(device: torch.device) -> torch.Generator:
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


# ----------------------------------------------------------------------------------------------
# The op. Its vmap rule folds the vmapped key axis into the segment list, so vmap over keys
# equals the loop over them without a Python loop per batch element.


@torch.library.custom_op("tbfunc::noise", mutates_args=())
def _noise_op(
    keys: Tensor,
    hashes: list[int],
    numels: list[int],
    uniform: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    return _noise_eager(keys, hashes, numels, uniform, dtype, device)


@_noise_op.register_fake
def _(keys, hashes, numels, uniform, dtype, device):
    return torch.empty(_samples(keys, hashes, numels) * sum(numels), dtype=dtype, device=device)


@_noise_op.register_vmap
def _(info, in_dims, keys, hashes, numels, uniform, dtype, device):
    batch = keys.movedim(in_dims[0], 0)
    size = batch.shape[0]
    if not hashes:  # segment t of batch element b is segment b * T + t
        flat = torch.ops.tbfunc.noise(
            batch.reshape(-1, 2), [], numels * size, uniform, dtype, device
        )
        return flat.view(size, -1), 0
    samples = batch.shape[1]
    flat = torch.ops.tbfunc.noise(batch.reshape(-1, 2), hashes, numels, uniform, dtype, device)
    # node-major over (batch, sample) -> per batch element, node-major over samples
    per_node = flat.split([size * samples * n for n in numels])
    return torch.cat([part.view(size, -1) for part in per_node], dim=1), 0
