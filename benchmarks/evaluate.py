"""Streaming evaluation's memory: ``python -m benchmarks.evaluate [--examples 50000]``.

W1 (MLP 784-512-512-10) with a posterior, S Monte-Carlo samples, N examples in batches. Two
routes, each in a fresh interpreter (so no memory freed earlier sits in the allocator):

- ``tb.evaluate`` over the batches (one batch's logits at a time, O(N) scores kept);
- the whole-set route: ``tb.predict`` batch by batch, the logits concatenated to ``(S, N, C)``,
  then the whole-set metrics (``nll``, ``accuracy``, ``expected_calibration_error``,
  ``predictive_entropy``).

Reported: the peak resident set above the start of each route, next to the size of the
whole-set logits alone, and the wall time. The inputs are generated batch by batch from keys,
so the data set itself never sits in memory in either route.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.training import run_in_child

CHILD = """
import time, torch, tbfunc as tb
from benchmarks.workloads import WORKLOADS, instantiate
from benchmarks.training import peak_memory
torch.set_num_threads({threads})
model, _, _ = instantiate(WORKLOADS["W1"], torch.device("cpu"), batch=2)
post = tb.from_module(model, sigma_scale=0.1)
key = tb.random.key(0)

def batches():
    for i in range({examples} // {batch}):
        x = tb.random.normal(tb.random.fold_in(tb.random.key(1), i), ({batch}, 784))
        yield x, (x[:, 0] > 0).long()

def streaming():
    return tb.evaluate(model, post, key, batches(), num_samples={samples},
                       chunk_size={chunk}, progress=False)

def whole_set():
    with torch.no_grad():
        parts = [(tb.predict(model, post, key, x, num_samples={samples}, chunk_size={chunk}), y)
                 for x, y in batches()]
    logits = torch.cat([p for p, _ in parts], dim=1)
    target = torch.cat([y for _, y in parts])
    del parts
    return (tb.metrics.nll(logits, target), tb.metrics.accuracy(logits, target),
            tb.metrics.expected_calibration_error(logits, target),
            tb.metrics.predictive_entropy(logits))

start = time.perf_counter()
peak = peak_memory({route}, torch.device("cpu"))
print(peak, time.perf_counter() - start)
"""


def measure(route: str, args: argparse.Namespace) -> tuple[int, float]:
    code = CHILD.format(
        route=route,
        threads=args.threads,
        examples=args.examples,
        batch=args.batch,
        samples=args.samples,
        chunk=args.chunk,
    )
    peak, seconds = run_in_child(code).split()[-2:]
    return int(peak), float(seconds)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__)
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8, help="predict's chunk_size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the table to this markdown file")
    args = parser.parse_args(argv)
    logits = args.samples * (args.examples // args.batch) * args.batch * 10 * 4
    rows = [f"| whole-set logits alone (S x N x C float32) | {logits / 2**20:.0f} | |"]
    for label, route in (("tb.evaluate (streaming)", "streaming"), ("whole set", "whole_set")):
        peak, seconds = measure(route, args)
        rows.append(f"| {label} | {peak / 2**20:.0f} | {seconds:.1f} |")
    text = (
        f"W1 (MLP 784-512-512-10), S={args.samples}, N={args.examples}, batches of "
        f"{args.batch}, chunk_size={args.chunk}, {args.threads} threads, CPU; peak resident set "
        "above the start, each route in a fresh process\n\n"
        "| route | peak MiB | seconds |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    if args.out:
        Path(args.out).write_text(f"# Streaming evaluation: memory\n\n{text}")
    print(text)
    return text


if __name__ == "__main__":
    main()
