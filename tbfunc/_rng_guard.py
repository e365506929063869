"""The guard every entry point runs its forward under: tbfunc never reads the global RNG, so a
forward that did is refused after the fact, with the RNG state put back (private)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["rng_guard"]


class rng_guard:
    """Fail, and restore the global RNG, if the forward inside drew from it (eager only).

    A class rather than a generator context manager: it runs on every call, and the CPU state
    is compared as bytes (cheaper than ``torch.equal`` on the 5 KB state tensor)."""

    def __init__(self, entry: str, device: torch.device | None) -> None:
        self.entry = entry
        self.cuda = device if device is not None and device.type == "cuda" else None

    def __enter__(self) -> None:
        self.active = not torch.compiler.is_compiling()
        if self.active:
            self.before = torch.get_rng_state()
            cuda = self.cuda
            self.cuda_before = torch.cuda.get_rng_state(cuda) if cuda is not None else self.before

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if not self.active:
            return
        changed = _differ(self.before, torch.get_rng_state())
        cuda = self.cuda
        if cuda is not None and not torch.equal(self.cuda_before, torch.cuda.get_rng_state(cuda)):
            changed = True
            torch.cuda.set_rng_state(self.cuda_before, cuda)
        if changed:
            torch.set_rng_state(self.before)
            if kind is None:
                raise RuntimeError(
                    f"{self.entry}: the module's forward drew from the global RNG (e.g. "
                    "F.dropout with training=True, or a random layer in training mode), which "
                    "tbfunc never reads; the RNG state was restored. Call module.eval() first."
                )


def _differ(before: Tensor, after: Tensor) -> bool:
    """Two CPU RNG states, compared as bytes where they have data (inside a ``torch.func``
    transform even these fresh tensors are wrapped: ``torch.equal`` then)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return not torch.equal(before, after)
    return before.numpy().tobytes() != after.numpy().tobytes()
