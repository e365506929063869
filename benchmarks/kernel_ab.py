"""Two builds of tbfunc's C kernels in one process: this checkout's and a git revision's.

    python -m benchmarks.kernel_ab --before REV [--workloads W1,W4] [--threads 1,2] [--rounds 30]

A kernel change moves a training step by a few percent, less than the run-to-run noise of a
shared machine. Here both builds serve the same three steps (the deterministic step, ``nelbo``
+ ``tb.optim.Adam``, and the VON step) in one process, one build after the other in every
round, and each step is reported as a multiple of the deterministic step timed in the same
rounds. The revision's kernels must have this checkout's C signatures (``_native`` sets them).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import tbfunc as tb
from benchmarks import training, workloads
from tbfunc import _native

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("deterministic", "nelbo + tb.optim.Adam", "VON")


def build(revision: str, folder: Path) -> ctypes.CDLL:
    """The kernels of ``revision``, compiled with this checkout's compiler and flags."""
    for source in (*_native._SOURCES, *_native._HEADERS):
        shown = subprocess.run(
            ["git", "show", f"{revision}:tbfunc/{source.name}"],
            capture_output=True,
            text=True,
            check=source in _native._SOURCES,  # an older revision may lack a newer header
            cwd=ROOT,
        )
        if shown.returncode == 0:
            (folder / source.name).write_text(shown.stdout)
    command, _ = _native._compiler()
    target = folder / "kernels.so"
    sources = [str(folder / source.name) for source in _native._SOURCES]
    flags = _native.preferred_flags()
    subprocess.run([*command, *flags, *sources, "-o", str(target)], check=True)
    library = _native._load(target)
    if library is None:
        raise SystemExit(f"the kernels of {revision} lack functions this checkout calls")
    return library


def compare(
    libraries: dict[str, ctypes.CDLL], workload: str, threads: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Per build, each step's median time as a multiple of the deterministic step's."""
    torch.set_num_threads(threads)
    model, x, y = workloads.instantiate(workloads.WORKLOADS[workload], torch.device("cpu"))
    steps: dict[str, Callable[[], object]] = {
        "deterministic": training.deterministic(model, x, y),
        "nelbo + tb.optim.Adam": training.tbfunc_step(model, x, y, 1, tb.optim.Adam),
        "VON": training.von_step(model, x, y),
    }
    original = _native.kernel
    current = [original()]  # one slot: the build serving the steps now
    _native.kernel = lambda: current[0]  # every kernel call of the steps goes through it
    times: dict[tuple[str, str], list[float]] = {(b, s): [] for b in libraries for s in steps}
    try:
        for warm in (True, *([False] * rounds)):
            for name, library in libraries.items():
                current[0] = library
                for step, run in steps.items():
                    started = time.perf_counter()
                    run()
                    if not warm:
                        times[name, step].append(time.perf_counter() - started)
    finally:
        _native.kernel = original
    table = {}
    for name in libraries:
        floor = statistics.median(times[name, "deterministic"])
        table[name] = {s: statistics.median(times[name, s]) / floor for s in steps}
        table[name]["deterministic ms"] = floor * 1e3
    return table


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a git revision, e.g. HEAD~1")
    parser.add_argument("--workloads", default="W1,W4")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tbfunc-ab-") as folder:
        libraries = {f"before ({args.before})": build(args.before, Path(folder))}
        now = _native.kernel()
        if now is None:
            raise SystemExit("this checkout's kernels did not build")
        libraries["this checkout"] = now
        lines = [
            "| workload | threads | kernels | " + " | ".join(STEPS[1:]) + " | deterministic ms |",
            "|---|---|---|" + "---|" * len(STEPS),
        ]
        for workload in args.workloads.split(","):
            for threads in map(int, args.threads.split(",")):
                table = compare(libraries, workload, threads, args.rounds)
                for name, row in table.items():
                    cells = [f"{row[s]:.2f}" for s in STEPS[1:]]
                    cells.append(f"{row['deterministic ms']:.1f}")
                    lines.append(f"| {workload} | {threads} | {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
