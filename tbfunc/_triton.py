"""One-launch noise on GPUs: the Triton kernel behind ``tbfunc::noise`` and the fused draw.

Reseeding PyTorch's CUDA generator per segment costs one kernel launch per (leaf, sample): on an
H200 that made ``sample`` 30-120x slower than one ``torch.randn`` (4.3 ms against 0.1 ms for an
MLP with S=32). Here one launch draws everything: element ``i`` of a segment with key words
``(w0, w1)`` is Triton's ``tl.randn((w0 << 32) | w1, i)`` (Philox-4x32-10, Box-Muller), a pure
function of the key and the index, so the result does not depend on the launch configuration or
the GPU model. With ``fold`` the kernel also derives each segment's key,
``fold_in(keys[s], hashes[l])`` (Threefry-2x32 in 32-bit registers), so the host computes no
per-(leaf, sample) keys. Used for float32/16 and bfloat16 where Triton is importable; float64
keeps the generator path for its 53-bit draws. ``tbfunc.random`` imports this module lazily
and only if Triton imports, so CPU installs need no Triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


def fill_(
    out: Tensor,
    keys: Tensor,
    numels: list[int],
    hashes: list[int] | None = None,
    affine: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Fill the flat ``out`` with noise.

    Without ``hashes``: segment ``t`` (``numels[t]`` long, in order) is keyed by ``keys[t]``.
    With ``hashes``: leaf-major segments ``(l, s)`` of ``numels[l]`` draws, keyed by
    ``fold_in(keys[s], hashes[l])``. With ``affine = (mu, sigma)``, flat node-major buffers of
    ``sum(numels)`` entries, it writes ``mu + sigma * noise`` instead of the noise: one pass.
    """
    fold = hashes is not None
    samples = len(keys) if fold else 1
    blocks = [-(-count // BLOCK) for count in numels]
    first_block, start = [0], [0]
    for count, block in zip(numels, blocks, strict=True):
        first_block.append(first_block[-1] + block)
        start.append(start[-1] + samples * count)
    leaves = len(numels)
    table = torch.tensor(
        [*(hashes if hashes is not None else [0] * leaves), *numels, *start[:-1], *first_block],
        dtype=torch.int64,
    )
    table = torch.cat([keys.reshape(-1).to(torch.int64), table]).to(out.device)
    total = first_block[-1]
    steps = max(1, math.ceil(math.log2(leaves + 1)))
    mu, sigma = affine if affine is not None else (out, out)
    _normal_segments[(samples * total,)](
        out,
        table,
        mu,
        sigma,
        2 * len(keys),
        leaves,
        samples,
        total,
        FOLD=fold,
        AFFINE=affine is not None,
        STEPS=steps,
        BLOCK=BLOCK,
    )
    return out


@triton.jit
def _mix(x0, x1, rot: tl.constexpr):
    x0 = x0 + x1
    return x0, ((x1 << rot) | (x1 >> (32 - rot))) ^ x0


@triton.jit
def _four_even(x0, x1):
    x0, x1 = _mix(x0, x1, 13)
    x0, x1 = _mix(x0, x1, 15)
    x0, x1 = _mix(x0, x1, 26)
    return _mix(x0, x1, 6)


@triton.jit
def _four_odd(x0, x1):
    x0, x1 = _mix(x0, x1, 17)
    x0, x1 = _mix(x0, x1, 29)
    x0, x1 = _mix(x0, x1, 16)
    return _mix(x0, x1, 24)


@triton.jit
def _threefry_fold(k0, k1, data):
    """fold_in: Threefry-2x32 (20 rounds) of the counter (0, data) under key (k0, k1),
    as ``tbfunc._threefry.threefry2x32`` (uint32 arithmetic wraps by itself here)."""
    ks2 = k0 ^ k1 ^ 0x1BD11BDA
    x0, x1 = _four_even(k0, data + k1)
    x0, x1 = _four_odd(x0 + k1, x1 + ks2 + 1)
    x0, x1 = _four_even(x0 + ks2, x1 + k0 + 2)
    x0, x1 = _four_odd(x0 + k0, x1 + k1 + 3)
    x0, x1 = _four_even(x0 + k1, x1 + ks2 + 4)
    return x0 + ks2, x1 + k0 + 5


@triton.jit
def _normal_segments(
    out_ptr,
    table_ptr,
    mu_ptr,
    sigma_ptr,
    key_words,
    leaves,
    samples,
    total_blocks,
    FOLD: tl.constexpr,
    AFFINE: tl.constexpr,
    STEPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # table: key words, then rows of `leaves` entries: hash, size, start, first block (+1)
    program = tl.program_id(0)
    sample = program // total_blocks
    block = program % total_blocks
    rows = table_ptr + key_words
    low = block * 0
    high = low + leaves
    for _ in tl.static_range(STEPS):  # binary search: the leaf whose blocks hold `block`
        middle = (low + high) // 2
        below = tl.load(rows + 3 * leaves + middle) <= block
        low = tl.where(below, middle, low)
        high = tl.where(below, high, middle)
    leaf = low
    size = tl.load(rows + leaves + leaf)
    leaf_start = tl.load(rows + 2 * leaves + leaf)
    start = leaf_start + sample * size
    index = (block - tl.load(rows + 3 * leaves + leaf)) * BLOCK + tl.arange(0, BLOCK)
    if FOLD:
        k0 = tl.load(table_ptr + 2 * sample).to(tl.uint32)
        k1 = tl.load(table_ptr + 2 * sample + 1).to(tl.uint32)
        w0, w1 = _threefry_fold(k0, k1, tl.load(rows + leaf).to(tl.uint32))
    else:
        w0 = tl.load(table_ptr + 2 * leaf).to(tl.uint32)
        w1 = tl.load(table_ptr + 2 * leaf + 1).to(tl.uint32)
    seed = (w0.to(tl.uint64) << 32) | w1.to(tl.uint64)
    noise = tl.randn(seed, index.to(tl.int32))
    inside = index < size
    if AFFINE:  # node l's parameters start at leaf_start / samples in the flat mu and sigma
        param = leaf_start // samples + index
        mu = tl.load(mu_ptr + param, mask=inside).to(tl.float32)
        noise = mu + tl.load(sigma_ptr + param, mask=inside).to(tl.float32) * noise
    tl.store(out_ptr + start + index, noise.to(out_ptr.dtype.element_ty), mask=inside)
