"""Key arithmetic: Threefry-2x32 (20 rounds) and the ``split`` / ``fold_in`` built on it.

Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3". Words are held in ``int64``
and masked to 32 bits (PyTorch has no uint32 arithmetic), so every function also works on
tensors under ``vmap``, ``grad`` and ``torch.compile``, and matches JAX's default keys bit for
bit. In eager mode on the CPU a batch of keys goes through the native kernel (``_native``, one
call for any number of keys) or, without one, through Python ints when there are few: some 150
tiny tensor ops cost far more than the arithmetic.
"""

from __future__ import annotations

import ctypes
from typing import TypeVar

import torch
from torch import Tensor

from tbfunc import _native
from tbfunc._checks import is_wrapped

__all__ = ["fold_in", "fold_in_hashes", "fold_in_int", "split", "threefry2x32"]

Word = TypeVar("Word", int, Tensor)
MASK = 0xFFFFFFFF
_PARITY = 0x1BD11BDA  # Threefry's key-schedule constant.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PYTHON_MAX = 48  # keys; past this the tensor version (a fixed ~0.5 ms) is faster


def threefry2x32(k0: Word, k1: Word, x0: Word, x1: Word) -> tuple[Word, Word]:
    """Threefry-2x32, 20 rounds, on 32-bit words held in Python ints or int64 tensors.

    A left shift of a 32-bit word by <= 29 cannot overflow int64. Tensors broadcast.
    """
    schedule = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0 = (x0 + k0) & MASK
    x1 = (x1 + k1) & MASK
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = (x0 + x1) & MASK
            x1 = (((x1 << r) | (x1 >> (32 - r))) & MASK) ^ x0
        x0 = (x0 + schedule[(block + 1) % 3]) & MASK
        x1 = (x1 + schedule[(block + 2) % 3] + block + 1) & MASK
    return x0, x1


def split(keys: Tensor, num: int) -> Tensor:
    """keys ``(..., 2)`` -> ``(..., num, 2)``: ``threefry2x32(key, (0, i))``; no checks."""
    library = _native.kernel() if keys.dim() == 1 and _eager_cpu(keys, keys) else None
    if library is not None:
        k0, k1 = keys.tolist()
        out = torch.empty(num, 2, dtype=torch.int64)
        library.tb_split(k0, k1, num, out.data_ptr())
        return out
    return fold_in(keys[..., None, :], torch.arange(num, dtype=torch.int64))


def fold_in(keys: Tensor, data: Tensor) -> Tensor:
    """``threefry2x32(key, (data >> 32, data & MASK))`` for keys ``(..., 2)`` and int64 data
    broadcastable against ``keys[..., 0]``; no checks."""
    k0, k1, data = torch.broadcast_tensors(keys[..., 0], keys[..., 1], data.to(keys.device))
    if _eager_cpu(keys, data):
        library = _native.kernel()
        if library is not None:
            triples = torch.stack((k0, k1, data), dim=-1).contiguous()
            out = torch.empty(*data.shape, 2, dtype=torch.int64)
            library.tb_fold_in(data.numel(), triples.data_ptr(), out.data_ptr())
            return out
        if data.numel() <= _PYTHON_MAX:
            pairs = [
                threefry2x32(a, b, (d >> 32) & MASK, d & MASK)
                for a, b, d in zip(
                    k0.reshape(-1).tolist(),
                    k1.reshape(-1).tolist(),
                    data.reshape(-1).tolist(),
                    strict=True,
                )
            ]
            return torch.tensor(pairs, dtype=torch.int64).reshape(*data.shape, 2)
    x0, x1 = threefry2x32(k0, k1, (data >> 32) & MASK, data & MASK)
    return torch.stack((x0, x1), dim=-1)


def fold_in_int(key: Tensor, data: int) -> Tensor:
    """``fold_in`` of one key ``(2,)`` and one int64 Python int; no checks. A training loop
    derives a key per step, so eager CPU calls go to the C kernel straight from the two words,
    without the broadcast and stack of the tensor form (a third of its time side by side:
    ``benchmarks.overhead_ab``); anything else takes ``fold_in``."""
    if key.dim() == 1 and _eager_cpu(key, key):
        library = _native.kernel()
        if library is not None:
            k0, k1 = key.tolist()
            out = torch.empty(2, dtype=torch.int64)
            library.tb_fold_in(1, (ctypes.c_int64 * 3)(k0, k1, data), out.data_ptr())
            return out
    return fold_in(key, torch.tensor(data, dtype=torch.int64))


def fold_in_hashes(keys: Tensor, hashes: list[int]) -> Tensor:
    """``(L, *keys.shape)``: ``fold_in(keys, hashes[l])`` for every hash, in one call."""
    data = torch.tensor(hashes, dtype=torch.int64).view(-1, *([1] * (keys.dim() - 1)))
    return fold_in(keys[None], data)


def _eager_cpu(keys: Tensor, data: Tensor) -> bool:
    """Whether plain values can be read and written: eager CPU tensors, no transform active
    (inside one, even fresh tensors are wrapped)."""
    return (
        keys.is_cpu
        and not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is None
        and not is_wrapped(keys)
        and not is_wrapped(data)
    )
