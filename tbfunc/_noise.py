"""Bulk noise: every draw tbfunc makes goes through ``noise`` or ``gaussian`` (every device).

A draw is a list of segments. With ``hashes``, segment ``(l, s)`` (node-major) holds
``numels[l]`` values keyed by ``fold_in(keys[s], hashes[l])``: a whole posterior tree for S
samples in one call, the per-segment keys derived where the noise is made (in C on the CPU, in
the Triton kernel on GPUs). Without ``hashes``, ``keys`` holds S x L keys, sample-major:
segment ``(s, l)`` holds ``numels[l]`` values keyed by ``keys[s * L + l]``, in that order (with
one key per segment, segment ``t`` is keyed by ``keys[t]``; vmap over keys adds samples, not
segments to the list). ``gaussian`` also applies ``mu + sigma * eps`` per node, fused into the
kernel where one serves the device and nothing records the operations.

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

import ctypes
import functools
import threading
from typing import Any

import torch
from torch import Tensor

from tbfunc import _native, _parallel, _philox, _threefry

__all__ = ["gaussian", "gaussian_with_noise", "noise"]

_PARALLEL_MIN_NUMEL = _parallel.PARALLEL_MIN_NUMEL  # tests lower it to split tiny draws
_generators = threading.local()


def noise(
    keys: Tensor,
    hashes: list[int] | None,
    numels: list[int],
    dtype: torch.dtype,
    device: torch.device,
    *,
    uniform: bool = False,
) -> Tensor:
    """Flat N(0, 1) noise (U[0, 1) with ``uniform``) for the segments described above, through
    the ``tbfunc::noise`` op. Internal: no argument checks."""
    return torch.ops.tbfunc.noise(keys, hashes or [], numels, uniform, dtype, device)


def gaussian(
    keys: Tensor, hashes: list[int] | None, mus: list[Tensor], sigmas: list[Tensor]
) -> list[Tensor]:
    """``mu_l + sigma_l * eps`` for every node ``l`` and sample ``s``: one ``(S, *mu_l.shape)``
    tensor per node (S = ``len(keys)``), eps keyed as in ``noise``; all nodes share one dtype
    and device.

    In plain eager code the kernel writes the values itself (on the CPU in float32/float64, on
    GPUs with Triton), so no S x P noise buffer is written and re-read. Under autograd,
    ``torch.func`` transforms and ``torch.compile`` the noise comes from the op and the affine
    map is tensor ops, ``mu + sigma * eps`` with one rounding after the product and one after
    the sum, as in the kernel: the same bits either way. Internal: no argument checks.
    """
    count = keys.shape[0]
    dtype, device = mus[0].dtype, mus[0].device
    if not _recorded(keys, *mus, *sigmas):
        fused = _fused(keys, hashes, mus, sigmas)
        if fused is not None:
            return fused
    numels = [mu.numel() for mu in mus]
    flat = noise(keys, hashes, numels, dtype, device)
    draws = []
    for mu, sigma, eps in zip(mus, sigmas, flat.split([n * count for n in numels]), strict=True):
        # with one draw, no broadcast over the sample axis: its backward needs no reduction
        value = mu + sigma * (eps.view(mu.shape) if count == 1 else eps.view(count, *mu.shape))
        draws.append(value[None] if count == 1 else value)
    return draws


def gaussian_with_noise(
    keys: Tensor, hashes: list[int] | None, mus: list[Tensor], sigmas: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """``gaussian``'s draws by the CPU kernel, and the noise ``eps`` that made them (for a
    backward pass), in one pass. CPU float32/float64 with the kernel built; no checks."""
    outs, noise = _affine_native(_native.kernel(), keys, hashes, mus, sigmas, keep_noise=True)
    assert noise is not None
    return outs, noise


def gaussian_into(
    key: Tensor,
    hashes: list[int],
    mus: list[Tensor],
    sigmas: list[Tensor],
    outs: list[Tensor],
    noise_outs: list[Tensor],
) -> None:
    """One draw ``mu + sigma * eps`` per node written into ``outs`` and its ``eps`` into
    ``noise_outs`` (tensors shaped like ``mus``, not recorded by autograd): the bits of
    ``gaussian(key[None], hashes, mus, sigmas)``. The CPU kernel writes them in one pass where
    it serves (float32/float64, every tensor contiguous); elsewhere the op's noise and the same
    two roundings in tensor ops. Internal: no argument checks."""
    keys = key[None]
    dtype, device = mus[0].dtype, mus[0].device
    library = _native.kernel() if device.type == "cpu" else None
    tensors = [*mus, *sigmas, *outs, *noise_outs]
    if (
        library is not None
        and dtype in (torch.float32, torch.float64)
        and not _recorded(*tensors)
        and all(t.dtype == dtype and t.is_cpu and t.is_contiguous() for t in tensors)
    ):
        _affine_into(library, keys, hashes, mus, sigmas, outs, noise_outs)
        for tensor in (*outs, *noise_outs):  # written through their pointers
            torch.autograd.graph.increment_version(tensor)
        return
    numels = [mu.numel() for mu in mus]
    flat = noise(keys, hashes, numels, dtype, device)
    pieces = flat.split(numels)
    for mu, sigma, eps, out, kept in zip(mus, sigmas, pieces, outs, noise_outs, strict=True):
        kept.copy_(eps.view(mu.shape))
        out.copy_(mu + sigma * kept)


def _affine_native(
    library: Any,
    keys: Tensor,
    hashes: list[int] | None,
    mus: list[Tensor],
    sigmas: list[Tensor],
    *,
    keep_noise: bool,
) -> tuple[list[Tensor], list[Tensor] | None]:
    """``mu + sigma * eps`` per node written by the C kernel, ``(S, *mu.shape)`` each, and
    with ``keep_noise`` the ``eps`` too."""
    count, dtype = keys.shape[0], mus[0].dtype
    mus = [m.contiguous() for m in mus]
    sigmas = [s.contiguous() for s in sigmas]
    outs = [torch.empty(count, *m.shape, dtype=dtype) for m in mus]
    noise = [torch.empty(count, *m.shape, dtype=dtype) for m in mus] if keep_noise else None
    _affine_into(library, keys, hashes, mus, sigmas, outs, noise)
    return outs, noise


def _affine_into(
    library: Any,
    keys: Tensor,
    hashes: list[int] | None,
    mus: list[Tensor],
    sigmas: list[Tensor],
    outs: list[Tensor],
    noise: list[Tensor] | None,
) -> None:
    """The kernel's ``mu + sigma * eps`` into ``outs`` (and ``eps`` into ``noise``), every
    tensor contiguous and of one dtype: their addresses are what the kernel reads."""
    _fill_native(
        library,
        mus[0].dtype,
        [out.data_ptr() for out in outs],
        keys,
        hashes,
        [m.numel() for m in mus],
        False,
        mus,
        sigmas,
        eps_outs=None if noise is None else [eps.data_ptr() for eps in noise],
    )


def _samples(keys: Tensor, hashes: list[int] | None, numels: list[int]) -> int:
    """S: with hashes every key is a sample; without, ``keys[s * L + l]`` keys segment (s, l)."""
    return keys.shape[0] if hashes else keys.shape[0] // len(numels)


def _recorded(*tensors: Tensor) -> bool:
    """Whether autograd, a ``torch.func`` transform or the compiler records operations."""
    if torch.compiler.is_compiling():
        return True
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    # inside a transform even the buffers we would allocate are wrapped (no data pointer)
    return torch._C._functorch.peek_interpreter_stack() is not None


def _fused(
    keys: Tensor, hashes: list[int] | None, mus: list[Tensor], sigmas: list[Tensor]
) -> list[Tensor] | None:
    """The kernels that write ``mu + sigma * eps`` themselves, or None where none serves."""
    count = keys.shape[0]
    dtype, device = mus[0].dtype, mus[0].device
    if device.type == "cpu" and dtype in (torch.float32, torch.float64):
        library = _native.kernel()
        if library is None:
            return None
        return _affine_native(library, keys, hashes, mus, sigmas, keep_noise=False)[0]
    if hashes and _use_triton(device, dtype):
        numels = [m.numel() for m in mus]
        out = torch.empty(count * sum(numels), dtype=dtype, device=device)
        flat_mu = torch.cat([m.reshape(-1) for m in mus])
        flat_sigma = torch.cat([s.reshape(-1) for s in sigmas])
        flat = _triton().fill_(out, keys, numels, hashes, affine=(flat_mu, flat_sigma))
        return [
            chunk.view(count, *m.shape)
            for m, chunk in zip(mus, flat.split([n * count for n in numels]), strict=True)
        ]
    return None


def _segments(keys: Tensor, hashes: list[int], numels: list[int]) -> tuple[Tensor, list[int]]:
    """Per-segment keys ``(T, 2)`` and lengths, in the flat output's order."""
    samples = _samples(keys, hashes, numels)
    if not hashes:
        return keys, numels * samples
    folded = _threefry.fold_in_hashes(keys.cpu(), hashes).reshape(-1, 2)
    return folded, [n for n in numels for _ in range(samples)]


def _fill_flat(
    library: Any, out: Tensor, keys: Tensor, hashes: list[int], numels: list[int], uniform: bool
) -> None:
    """The op's flat layout: node-major with hashes, sample-major without."""
    samples = _samples(keys, hashes, numels)
    width = out.element_size()
    offsets = [0]
    for count in numels[:-1]:
        offsets.append(offsets[-1] + (samples * count if hashes else count))
    addresses = [out.data_ptr() + width * offset for offset in offsets]
    strides = None if hashes else [sum(numels)] * len(numels)
    _fill_native(library, out.dtype, addresses, keys, hashes, numels, uniform, None, None, strides)


def _fill_native(
    library: Any,
    dtype: torch.dtype,
    outs: list[int],
    keys: Tensor,
    hashes: list[int] | None,
    numels: list[int],
    uniform: bool,
    mus: list[Tensor] | None,
    sigmas: list[Tensor] | None,
    strides: list[int] | None = None,
    eps_outs: list[int] | None = None,
) -> None:
    """Node ``l``'s segment ``s`` at address ``outs[l]`` plus ``s * strides[l]`` elements
    (default ``numels[l]``) of ``dtype``; one kernel call per thread, each writing a
    contiguous run of the concatenated segments. With ``eps_outs`` (and ``mus``) the noise
    itself also goes to ``eps_outs[l]`` plus ``s * numels[l]`` elements."""
    keys = keys.contiguous()
    samples = _samples(keys, hashes, numels)
    nodes = len(numels)
    # small tables as ctypes arrays: cheaper than tensors, and alive until the calls return
    table = ctypes.c_int64 * nodes
    out_table = table(*outs)
    stride_table = table(*strides) if strides is not None else None
    hash_table = table(*hashes) if hashes else None
    numel_table = table(*numels)
    mu_table = table(*[m.data_ptr() for m in mus]) if mus is not None else None
    sigma_table = table(*[s.data_ptr() for s in sigmas]) if sigmas is not None else None
    eps_table = table(*eps_outs) if eps_outs is not None else None
    kind = 0 if dtype == torch.float32 else 1
    total = samples * sum(numels)

    head = (int(uniform), kind, out_table, stride_table)  # tb_fill's arguments before (begin, end)
    tail: tuple[Any, ...] = (samples, keys.data_ptr(), nodes, hash_table, numel_table)
    tail += (mu_table, sigma_table, eps_table)

    def run(begin: int, end: int) -> None:
        library.tb_fill(*head, begin, end, *tail)

    def team(parts: int) -> None:
        library.tb_fill_parts(*head, *tail, total, parts)  # (begin, end) -> (total, parts) last

    _parallel.split(total, run, _PARALLEL_MIN_NUMEL, team)


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
    """The eager kernel: the C kernel (or its tensor-op twin) on the CPU, Triton or the
    reseeded device generator on GPUs."""
    total = _samples(keys, hashes, numels) * sum(numels)
    if device.type == "cpu":
        library = _native.kernel()
        wide = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        if library is not None:
            out = torch.empty(total, dtype=wide)
            _fill_flat(library, out, keys, hashes, numels, uniform)
        else:
            segment_keys, segment_numels = _segments(keys, hashes, numels)
            out = _philox.fill(segment_keys, segment_numels, uniform)
        return out.to(dtype)
    out = torch.empty(total, dtype=dtype, device=device)
    if _use_triton(device, dtype) and not uniform:
        if hashes:
            return _triton().fill_(out, keys, numels, hashes)
        # the kernel's unfolded mode takes one length per key, in the flat order
        return _triton().fill_(out, keys, numels * _samples(keys, hashes, numels))
    segment_keys, segment_numels = _segments(keys, hashes, numels)
    return _fill_with_generator(out, segment_keys.tolist(), segment_numels, uniform)


@_noise_op.register_fake
def _(keys, hashes, numels, uniform, dtype, device):
    return torch.empty(_samples(keys, hashes, numels) * sum(numels), dtype=dtype, device=device)


@_noise_op.register_vmap
def _(info, in_dims, keys, hashes, numels, uniform, dtype, device):
    batch = keys.movedim(in_dims[0], 0)
    size = batch.shape[0]
    if not hashes:  # sample-major: batch element b holds the next S samples
        flat = torch.ops.tbfunc.noise(batch.reshape(-1, 2), [], numels, uniform, dtype, device)
        return flat.view(size, -1), 0
    samples = batch.shape[1]
    flat = torch.ops.tbfunc.noise(batch.reshape(-1, 2), hashes, numels, uniform, dtype, device)
    # node-major over (batch, sample) -> per batch element, node-major over samples
    per_node = flat.split([size * samples * n for n in numels])
    return torch.cat([part.view(size, -1) for part in per_node], dim=1), 0
