"""Keys and noise: the only place tbfunc makes randomness.

A key is an ``int64`` tensor of shape ``(2,)`` holding two 32-bit words, on the CPU. Keys are
derived with Threefry-2x32 (20 rounds; ``tbfunc._threefry``), computed with plain ``int64``
tensor ops masked to 32 bits, so ``split`` and ``fold_in`` work under ``vmap``, ``grad`` and
``torch.compile`` and match JAX's default (``threefry_partitionable``) keys bit for bit.

Noise (``tbfunc._noise``) is a pure function of the whole 64-bit key on every device: on the
CPU a counter-based Philox-4x32-10 stream keyed by both words (a C kernel, or the same
algorithm in tensor ops), on CUDA Philox seeded with the 64-bit key. Two distinct keys share a
stream with probability about 2**-64. The global RNG is never read nor advanced.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from tbfunc import _noise, _threefry
from tbfunc._checks import check_key, check_positive_int, fail

__all__ = ["fold_in", "key", "normal", "split"]

_MASK = 0xFFFFFFFF


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
    return _threefry.split(key, num)


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
        return _threefry.fold_in(key, data.to(torch.int64))
    value = _as_int(data, "data")
    if not -(2**63) <= value < 2**64:
        fail("data", "an int in [-2**63, 2**64)", data)
    return _threefry.fold_in_int(key, value - 2**64 if value >= 2**63 else value)


def normal(
    key: Tensor,
    shape: int | Sequence[int],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Standard normal noise of ``shape``, a deterministic function of ``key``.

    The same key gives bit-identical noise on the same device type, for any thread count;
    ``vmap`` over keys equals the loop over them. On the CPU the noise is computed in float32
    (Philox-4x32-10 and Box-Muller) and rounded to ``dtype``, so float64 noise has float32
    resolution and equals the float32 noise widened.

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
    return _noise.noise(key[None], None, [numel], dtype, device).view(dims)


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
