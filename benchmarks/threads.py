"""Throughput of ``tb.predict`` from 2 Python threads against 1: ``python -m benchmarks.threads``.

Each round times ``2 * calls`` predictions made by one thread, then the same work split over two
threads, both on one shared module (tbfunc serialises calls on a module: its weights are swapped
in during a forward) and on two copies of it (nothing shared, so they may run in parallel).
torch's intra-op threads are set to 1, so two Python threads can use two cores. Medians over
interleaved rounds; the ratio is throughput with 2 threads over throughput with 1.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import threading
import time
from pathlib import Path

import torch
from torch import nn

import tbfunc as tb
from benchmarks import timing


def _mlp(width: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(64, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        ).eval()


def _timed(jobs: list[tuple[nn.Module, dict, int]], x: torch.Tensor, samples: int) -> float:
    """Seconds for every job (module, posterior, calls) run each in its own thread."""

    def work(module: nn.Module, posterior: dict, calls: int) -> None:
        for i in range(calls):
            tb.predict(module, posterior, tb.random.key(i), x, num_samples=samples)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--calls", type=int, default=50, help="per thread")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", help="write the table to this markdown file")
    args = parser.parse_args(argv)
    with timing.threads(1):
        net = _mlp(args.width)
        post = tb.from_module(net, sigma_scale=0.1)
        twin = copy.deepcopy(net)
        twin_post = tb.from_module(twin, sigma_scale=0.1)
        x = tb.random.normal(tb.random.key(1), (args.batch, 64))
        n = args.calls
        routes = {
            "1 thread": [(net, post, 2 * n)],
            "2 threads, one shared module": [(net, post, n), (net, post, n)],
            "2 threads, a module each": [(net, post, n), (twin, twin_post, n)],
        }
        _timed(routes["1 thread"], x, args.samples)  # warm up (strategy choice, caches)
        _timed(routes["2 threads, a module each"], x, args.samples)
        times: dict[str, list[float]] = {name: [] for name in routes}
        for _ in range(args.rounds):
            for name, jobs in routes.items():
                times[name].append(_timed(jobs, x, args.samples))
    base = statistics.median(times["1 thread"])
    rows = []
    for name, t in times.items():
        per_call = statistics.median(t) * 1e3 / (2 * n)
        rows.append(f"| {name} | {per_call:.3f} | {base / statistics.median(t):.2f} |")
    text = (
        f"MLP 64-{args.width}-{args.width}-10, B={args.batch}, S={args.samples}, "
        f"{2 * n} predict calls per route, torch intra-op threads 1, medians of {args.rounds} "
        "interleaved rounds\n\n| route | ms per call | throughput vs 1 thread |\n|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )
    if args.out:
        Path(args.out).write_text(f"# Threads: predict throughput\n\n{text}")
    print(text)
    return text


if __name__ == "__main__":
    main()
