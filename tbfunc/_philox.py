"""The CPU noise stream in tensor ops: the reference for ``_noise.c``, bit for bit.

Element ``i`` of a segment keyed by words ``(w0, w1)`` is word ``i % 4`` of block ``i // 4``
of Philox-4x32-10 under key ``(w0, w1)`` with counter ``(block mod 2**32, block >> 32, 0, 0)``,
turned into N(0, 1) by Box-Muller on the word pairs ``(x0, x1)`` and ``(x2, x3)`` (or into
U[0, 1) as ``(x >> 8) * 2**-24``). Every step is an exactly rounded float32 operation in the
same order as the C kernel, with the same constants, so both give the same bits; the tests
compare them. ``_noise`` uses this module when the kernel cannot be built (no C compiler).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CONSTANTS", "fill", "philox"]

_MASK = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85

# float32 values, spelled as in _noise.c (a test reads them from there and compares)
CONSTANTS = {
    name: float.fromhex(value)
    for name, value in {
        "SQRT_HALF": "0x1.6a09e6p-1",
        "LOG_P0": "0x1.204376p-4",
        "LOG_P1": "-0x1.d7a37p-4",
        "LOG_P2": "0x1.de4a34p-4",
        "LOG_P3": "-0x1.fcba9ep-4",
        "LOG_P4": "0x1.23d37ep-3",
        "LOG_P5": "-0x1.555cap-3",
        "LOG_P6": "0x1.999d58p-3",
        "LOG_P7": "-0x1.fffff8p-3",
        "LOG_P8": "0x1.555554p-2",
        "LN2_LO": "-0x1.bd0106p-13",
        "LN2_HI": "0x1.63p-1",
        "SIN_P0": "-0x1.9943f2p-13",
        "SIN_P1": "0x1.11073cp-7",
        "SIN_P2": "-0x1.555546p-3",
        "COS_P0": "0x1.99eb9cp-16",
        "COS_P1": "-0x1.6c0c34p-10",
        "COS_P2": "0x1.55554ap-5",
        "OCTANT_STEP": "0x1.921fb6p-30",
    }.items()
}
_C = CONSTANTS
_LOG = [_C[f"LOG_P{i}"] for i in range(9)]


def philox(k0: Tensor, k1: Tensor, block: Tensor) -> list[Tensor]:
    """The four 32-bit words (in int64) of Philox-4x32-10 for counter ``(block, 0, 0)``."""
    x0, x1 = block & _MASK, block >> 32
    x2 = torch.zeros_like(block)
    x3 = torch.zeros_like(block)
    for _ in range(10):
        # a 32 x 32-bit product fits 64 bits; int64 wraps it, and >> 32 & MASK is its high word
        p0, p1 = x0 * _M0, x2 * _M1
        x0, x1, x2, x3 = (
            ((p1 >> 32) & _MASK) ^ x1 ^ k0,
            p1 & _MASK,
            ((p0 >> 32) & _MASK) ^ x3 ^ k1,
            p0 & _MASK,
        )
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return [x0, x1, x2, x3]


def _radius(word: Tensor) -> Tensor:
    """sqrt(-2 ln u), u = (word >> 1) * 2**-31 + 2**-32, with Cephes' logf polynomial."""
    u = (word >> 1).to(torch.float32) * 2.0**-31 + 2.0**-32
    bits = u.view(torch.int32)
    e = (bits >> 23) - 126
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)
    below = m < _C["SQRT_HALF"]
    x = torch.where(below, (m + m) - 1.0, m - 1.0)
    e = e - below.to(torch.int32)
    z = x * x
    y = torch.full_like(x, _LOG[0])
    for coefficient in _LOG[1:]:
        y = y * x + coefficient
    y = y * x * z
    fe = e.to(torch.float32)
    y = y + _C["LN2_LO"] * fe
    y = y + -0.5 * z
    x = x + y
    x = x + _C["LN2_HI"] * fe
    # torch.sqrt on float32 CPU tensors may be off by an ulp; in float64 and rounded back it
    # is exactly rounded (53 >= 2 * 24 + 2 bits), as the C kernel's sqrtf
    return torch.sqrt((-2.0 * x).double()).float()


def _cosine(word: Tensor, back: int) -> Tensor:
    """cos(2 pi word / 2**32 - back * pi / 2), range-reduced exactly on the integer."""
    octant = word >> 29
    frac = word & 0x1FFFFFFF
    odd = (octant & 1) == 1
    x = torch.where(odd, 0x20000000 - frac, frac).to(torch.float32) * _C["OCTANT_STEP"]
    z = x * x
    s = z * _C["SIN_P0"] + _C["SIN_P1"]
    s = s * z + _C["SIN_P2"]
    s = s * z * x + x
    c = z * _C["COS_P0"] + _C["COS_P1"]
    c = c * z + _C["COS_P2"]
    c = c * z * z + -0.5 * z + 1.0
    sin_q, cos_q = torch.where(odd, c, s), torch.where(odd, s, c)
    q = ((octant >> 1) - back) & 3
    value = torch.where((q & 1) == 1, sin_q, cos_q)
    return torch.where((q == 1) | (q == 2), -value, value)


def _blocks(k0: Tensor, k1: Tensor, block: Tensor, uniform: bool) -> Tensor:
    """``(blocks, 4)`` float32 values: element ``4b + j`` of a segment is ``[b, j]``."""
    x = philox(k0, k1, block)
    if uniform:
        values = [(word >> 8).to(torch.float32) * 2.0**-24 for word in x]
    else:
        r0, r1 = _radius(x[0]), _radius(x[2])
        values = [r0 * _cosine(x[1], 0), r0 * _cosine(x[1], 1)]
        values += [r1 * _cosine(x[3], 0), r1 * _cosine(x[3], 1)]
    return torch.stack(values, dim=1)


def fill(keys: Tensor, numels: list[int], uniform: bool) -> Tensor:
    """Flat float32 noise: segment ``t`` is ``numels[t]`` elements keyed by ``keys[t]``.

    Blocks go through in chunks of ``_CHUNK``: the some 150 element-wise ops per block then work
    on cache-sized tensors (2.6x faster than on a whole 4M-value draw)."""
    counts = torch.tensor(numels, dtype=torch.int64)
    blocks = (counts + 3) // 4
    segment = torch.repeat_interleave(torch.arange(len(numels)), blocks)
    first = torch.cumsum(blocks, 0) - blocks
    index = torch.arange(int(blocks.sum()), dtype=torch.int64) - first[segment]
    words = keys.to(torch.int64)[segment]
    values = torch.empty(index.numel(), 4, dtype=torch.float32)
    for start in range(0, index.numel(), _CHUNK):
        part = slice(start, start + _CHUNK)
        values[part] = _blocks(words[part, 0], words[part, 1], index[part], uniform)
    # keep the first numels[t] of each segment's 4 * blocks[t] values
    keep = torch.repeat_interleave(4 * first - (torch.cumsum(counts, 0) - counts), counts)
    return values.reshape(-1)[torch.arange(int(counts.sum()), dtype=torch.int64) + keep]


_CHUNK = 1 << 16  # blocks
