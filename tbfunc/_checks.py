"""Boundary validation with one wording for every error tbfunc raises.

Every message reads ``<argument> must be <expected>, got <received>.`` followed by an optional
hint on how to fix it, so users (and tests) can rely on the form.
"""

from __future__ import annotations

import operator
from typing import Any, NoReturn

import torch
from torch import Tensor

__all__ = [
    "check_key",
    "check_optional_positive_int",
    "check_positive_int",
    "check_posterior_dict",
    "check_tensor",
    "describe",
    "fail",
    "is_wrapped",
]


_MAKE_KEY = "Make one with tb.random.key(seed)."


def describe(value: Any) -> str:
    """A short description of what the user passed, for error messages."""
    if isinstance(value, Tensor):
        shape = tuple(value.shape)
        return f"a tensor of shape {shape}, dtype {value.dtype} on {value.device.type}"
    if isinstance(value, bool | int | float | str):
        return f"{type(value).__name__} {value!r}"
    return f"an object of type {type(value).__name__}"


def fail(arg: str, expected: str, value: Any, hint: str = "", error: type = ValueError) -> NoReturn:
    """Raise ``error`` with the uniform wording; ``value`` is described, not dumped."""
    message = f"{arg} must be {expected}, got {describe(value)}."
    raise error(f"{message} {hint}".strip())


def check_key(key: Any, arg: str = "key") -> Tensor:
    """A key: an integer tensor of shape (2,) whose two words lie in ``[0, 2**32)``.

    ``int64`` keys are returned as they are; ``uint32`` keys (e.g. converted from JAX's
    ``jax.random.key_data``) are widened to ``int64``. Words outside ``[0, 2**32)`` are an error,
    not silently masked; the values are checked in eager mode only (under ``vmap`` or
    ``torch.compile`` reading them would be data-dependent control flow).
    """
    if not isinstance(key, Tensor):
        fail(arg, "a key tensor", key, "Make one with tb.random.key(seed).", TypeError)
    if key.dtype not in (torch.int64, torch.uint32) or key.shape != (2,):
        fail(arg, "an int64 or uint32 tensor of shape (2,)", key, _MAKE_KEY)
    if key.dtype == torch.uint32:
        return key.to(torch.int64)
    if not torch.compiler.is_compiling() and not is_wrapped(key):
        low, high = key.tolist()
        if not (0 <= low < 2**32 and 0 <= high < 2**32):
            raise ValueError(
                f"{arg} words must lie in [0, 2**32), got [{low}, {high}]. {_MAKE_KEY}"
            )
    return key


def traced() -> bool:
    """Whether the compiler, a ``torch.func`` transform or forward-mode AD records what runs
    now: values cannot be read, nor tensors written through their data pointers."""
    return (
        torch.compiler.is_compiling()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or torch.autograd.forward_ad._current_level >= 0
    )


def is_wrapped(tensor: Tensor) -> bool:
    """Whether a ``torch.func`` transform (vmap, grad) wraps ``tensor``: its values are unknown."""
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def check_positive_int(value: Any, arg: str) -> int:
    """An int >= 1 (bools are rejected: ``True`` is not a sample count)."""
    if isinstance(value, bool):
        fail(arg, "a positive int", value, error=TypeError)
    try:
        number = operator.index(value)
    except TypeError:
        fail(arg, "a positive int", value, error=TypeError)
    if number < 1:
        fail(arg, "a positive int (>= 1)", value)
    return number


def check_positive(value: float | Tensor, arg: str) -> None:
    """A number, or a tensor every element of which, above zero (a scale, a precision)."""
    positive = bool((value > 0).all()) if isinstance(value, Tensor) else value > 0
    if not positive:
        fail(arg, "positive", value)


def check_optional_positive_int(value: Any, arg: str) -> int | None:
    return None if value is None else check_positive_int(value, arg)


def check_tensor(value: Any, arg: str, *, floating: bool = True) -> Tensor:
    """A tensor (an ``nn.Parameter`` counts), floating point unless ``floating=False``."""
    if not isinstance(value, Tensor):
        fail(arg, "a floating-point tensor", value, error=TypeError)
    if floating and not value.is_floating_point():
        fail(arg, "a floating-point tensor", value, "Convert it with .float() first.", TypeError)
    return value


def check_posterior_dict(posterior: Any) -> dict:
    """A whole-model posterior is a dict of parameter name -> node."""
    if not isinstance(posterior, dict):
        fail(
            "posterior",
            "a dict of parameter name -> posterior node",
            posterior,
            "Build one with tb.from_module(module).",
            TypeError,
        )
    return posterior
