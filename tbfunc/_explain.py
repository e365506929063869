"""Explaining a failed forward in the user's terms: which submodule failed, with which input
shapes, and whether vmap is to blame (private)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor, nn

__all__ = ["first_line", "raise_if_forward_fails", "same_kind"]


def raise_if_forward_fails(
    error: BaseException,
    module: nn.Module,
    rerun: Callable[[], Any],
    entry: str,
    strategy: str,
) -> None:
    """``rerun()`` runs sample 0 alone; it is run with hooks: if it fails too, the inputs or the
    module are at fault: raise its error with the failing submodule and the shapes it got.
    Otherwise return."""
    with _locating(module) as where:
        try:
            rerun()
        except Exception as plain:
            blame = (
                " It fails for one weight sample without vmap too, so the inputs or the module "
                "are at fault, not vmap."
                if strategy == "vmap"
                else ""
            )
            message = f"{entry} failed in {where()}: {first_line(plain)}{blame}"
            raise same_kind(plain, message) from error


@contextlib.contextmanager
def _locating(module: nn.Module) -> Iterator[Callable[[], str]]:
    """Track the running submodules with temporary hooks. A forward that raises never reaches
    its forward hook, so after a failure the top of the stack is the innermost culprit."""
    stack: list[str] = []

    def push(name: str) -> Callable[..., None]:
        def hook(layer: nn.Module, inputs: Any) -> None:
            shapes = [
                f"{tuple(x.shape)} {x.dtype}"
                for x in pytree.tree_leaves(inputs)
                if isinstance(x, Tensor)
            ]
            label = f"submodule {name!r}" if name else "the module's own forward"
            stack.append(f"{label} ({_short(layer)}) called with tensors {shapes}")

        return hook

    def pop(layer: nn.Module, inputs: Any, output: Any) -> None:
        stack.pop()

    handles = []
    for name, layer in module.named_modules():
        handles.append(layer.register_forward_pre_hook(push(name)))
        handles.append(layer.register_forward_hook(pop))
    try:
        yield lambda: stack[-1] if stack else "the module"
    finally:
        for handle in handles:
            handle.remove()


def _short(layer: nn.Module) -> str:
    text = repr(layer).split("\n")[0]
    return text if len(text) <= 100 else text[:97] + "..."


def first_line(error: BaseException) -> str:
    text = str(error).strip().split("\n")[0].rstrip(".")
    return text + "."


def same_kind(error: BaseException, message: str) -> BaseException:
    try:
        return type(error)(message)
    except Exception:
        return RuntimeError(message)
