"""A one-line progress bar on stderr, shared by the demo and ``tb.evaluate``."""

from __future__ import annotations

import sys

__all__ = ["finish", "show"]

_WIDTH = 30


def show(done: int, total: int | None, text: str, elapsed: float) -> None:
    """Redraw the line: a bar when ``total`` is known, the count alone otherwise."""
    if total:
        filled = int(_WIDTH * min(done, total) / total)
        head = f"[{'#' * filled}{'.' * (_WIDTH - filled)}] {done}/{total}"
    else:
        head = f"{done}"
    print(f"\r    {head}  {text}  {elapsed:5.1f}s", end="", file=sys.stderr, flush=True)


def finish() -> None:
    print(file=sys.stderr, flush=True)
