"""Interleaved timing (A B C A B C ...), medians and a markdown table."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Result:
    name: str
    times: list[float] = field(default_factory=list)
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "median_s": self.median,
            "min_s": min(self.times) if self.times else None,
            "max_s": max(self.times) if self.times else None,
            "times_s": self.times,
            "error": self.error,
            **self.extra,
        }


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """``torch.set_num_threads(count)`` inside, the previous count restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    contenders: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int,
    device: torch.device,
    before: Callable[[str], object] | None = None,
) -> dict[str, Result]:
    """Time every contender ``repeats`` times, one round of all of them at a time.

    Interleaving spreads the machine's drift (other tenants, clock changes) over every
    contender alike; a contender that raises is reported with its error, not timed.
    ``before(name)`` runs, untimed, ahead of every timed call of contender ``name``: what a call
    costs when other code has just run (a server's other model, another library) and its
    caches are cold.
    """
    results = {name: Result(name) for name in contenders}
    live = dict(contenders)
    for round_ in range(warmup + repeats):
        for name, run in list(live.items()):
            try:
                if before is not None:
                    before(name)
                synchronize(device)
                start = time.perf_counter()
                run()
                synchronize(device)
                elapsed = time.perf_counter() - start
            except Exception as error:  # a peer failing is a result, not a crash
                results[name].error = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                del live[name]
                continue
            if round_ >= warmup:
                results[name].times.append(elapsed)
    return results


def table(rows: Sequence[Mapping[str, object]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def ms(seconds: float | None) -> str:
    """Milliseconds: three decimals below 10 ms (per-call overheads), one above."""
    if seconds is None or seconds != seconds:
        return "-"
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"
