"""Reading a user's batches and outputs: shared by ``tb.evaluate`` and the Lightning module."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from tbfunc._checks import fail

__all__ = ["Unpack", "logits_of", "unpack"]

Unpack = Callable[[Any], tuple[tuple[Any, ...], dict[str, Any], Any]]


def unpack(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """``(args, kwargs, target)`` of an ``(inputs, target)`` pair or a dict with ``labels``."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(
                f"a dict batch must hold 'labels' (the targets); it has {sorted(batch)}. "
                "Pass unpack=lambda batch: (args, kwargs, target) for other layouts."
            )
        rest = {name: value for name, value in batch.items() if name != "labels"}
        return (), rest, batch["labels"]
    if isinstance(batch, tuple | list) and len(batch) == 2:
        inputs, target = batch
        if isinstance(inputs, Mapping):
            return (), dict(inputs), target
        if isinstance(inputs, tuple | list):
            return tuple(inputs), {}, target
        return (inputs,), {}, target
    fail(
        "batch",
        "an (inputs, target) pair or a dict with 'labels'",
        batch,
        "Pass unpack=lambda batch: (args, kwargs, target) for other layouts.",
        error=TypeError,
    )


def logits_of(out: Any, output: Callable[[Any], Tensor] | None) -> Tensor:
    """The logits in a module's output: ``output(out)``, the tensor itself, or ``.logits``."""
    if output is not None:
        return output(out)
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    fail(
        "output",
        "a callable giving the logits, since the module returns neither a tensor nor an "
        "object with .logits",
        out,
        "Pass output=lambda out: out[0] (or the field that holds the logits).",
        error=TypeError,
    )
