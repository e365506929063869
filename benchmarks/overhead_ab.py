"""The overhead section's calls with tbfunc's short routes on and off, in one process.

    python -m benchmarks.overhead_ab [--rounds 60] [--after-other]

Two per-call shortcuts sit on every eager ``predict`` and ``sample``: the direct vmap level
(``tbfunc._vmap``; off: ``torch.func.vmap``) and the flat-dict draw (``_sampling._flat``; off:
optree's walk). A third sits on the key a training loop derives every step: ``tb.random.fold_in``
with a Python int (``_threefry.fold_in_int``; off: the tensor form). A fourth sits on the first
call after an optimizer step, which checks the rewritten posterior for non-finite values: one
C pass (``_fused.all_finite``; off: a sum per tensor), timed as ``tb.sample`` right after an
in-place update of every ``mu`` (the update itself inside the timing). Switched off, each call
takes the route it took before the shortcuts existed (``tb.sample``'s smaller shortcut in
``check_tree`` stays on in both settings).
A change of a few tens of microseconds is below the drift between runs on a shared machine, so
both settings run here in the same rounds, one after the other, with "floor + rng" and
torchbayesian as anchors; medians in microseconds and as multiples of "floor + rng".
``--after-other`` runs another library's forward on another model, untimed, before every call
(``overhead.other_library``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import torch

import tbfunc as tb
from benchmarks import overhead, timing
from tbfunc import _fused, _sampling, _threefry, _vmap

CALLS = 10  # per contender and round


@contextlib.contextmanager
def routes(short: bool) -> Iterator[None]:
    """The short routes as they are (True) or all switched off (False)."""
    saved = _sampling._flat, _vmap._PRIMITIVES, _threefry.fold_in_int, _fused.all_finite
    if not short:
        _sampling._flat, _vmap._PRIMITIVES = (lambda tree: None), None
        _threefry.fold_in_int = _tensor_fold_in
        _fused.all_finite = lambda tensors: None  # the tensor-op check runs instead
    try:
        yield
    finally:
        _sampling._flat, _vmap._PRIMITIVES, _threefry.fold_in_int, _fused.all_finite = saved


def _tensor_fold_in(key: torch.Tensor, data: int) -> torch.Tensor:
    return _threefry.fold_in(key, torch.tensor(data, dtype=torch.int64))


def compare(rounds: int, after_other: bool) -> dict[str, list[float]]:
    """Per contender, its mean time per call in each round (seconds)."""
    device = torch.device("cpu")
    runs = overhead.contenders(device)
    other = overhead.other_library(device) if after_other else None
    if after_other and other is None:
        raise SystemExit("--after-other needs torchbayesian installed")
    calls = {name: runs[name] for name in ("tb.predict vmap", "tb.predict", "tb.sample")}
    key = tb.random.key(0)
    calls["tb.random.fold_in"] = lambda: tb.random.fold_in(key, 12345)
    posterior = tb.from_module(overhead.model(device)[0])

    def after_update() -> object:
        for node in posterior.values():
            node.mu.add_(0.0)  # an optimizer's in-place step: the version counter moves
        return tb.sample(posterior, key)

    calls["tb.sample after an in-place update"] = after_update
    anchors = {
        name: runs[name] for name in ("floor + rng", "randn + addcmul", "torchbayesian vmap")
    }
    times: dict[str, list[float]] = {}

    def timed(name: str, run: Callable[[], object]) -> None:
        total = 0.0
        for _ in range(CALLS):
            if other is not None:
                other(name)
            start = time.perf_counter()
            run()
            total += time.perf_counter() - start
        times.setdefault(name, []).append(total / CALLS)

    for round_ in range(rounds + 1):  # round 0 warms up and is dropped
        for short in (False, True):
            with routes(short):
                for name, run in calls.items():
                    timed(f"{name}, short routes {'on' if short else 'off'}", run)
        for name, run in anchors.items():
            timed(name, run)
        if round_ == 0:
            times.clear()
    return times


def report(times: dict[str, list[float]], after_other: bool) -> str:
    base = statistics.median(times["floor + rng"])
    lines = [
        "# Per-call overhead, short routes on and off in the same rounds"
        + (", each call after another library's forward on another model" if after_other else ""),
        "",
        f"MLP {'-'.join(map(str, overhead.SIZES))}, B={overhead.BATCH}, S={overhead.SAMPLES}, "
        f"1 thread, no grad, torch {torch.__version__}; {len(times['floor + rng'])} rounds of "
        f"{CALLS} calls each.",
        "",
        "| contender | median us | x floor + rng |",
        "|---|---|---|",
    ]
    for name, values in sorted(times.items()):
        median = statistics.median(values)
        lines.append(f"| {name} | {median * 1e6:.0f} | {median / base:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--after-other", action="store_true")
    args = parser.parse_args(argv)
    with timing.threads(1), torch.no_grad():
        text = report(compare(args.rounds, args.after_other), args.after_other)
    print(text)
    return text


if __name__ == "__main__":
    main()
