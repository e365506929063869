"""Sharded Monte-Carlo prediction: ``tb.distributed.predict`` at world size 1 and 2 on the CPU,
one thread per rank (gloo on the loopback, a FileStore), timed between barriers on rank 0, in
interleaved rounds."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import tbfunc as tb
from benchmarks.workloads import WORKLOADS, instantiate


def rank_main(
    rank: int, store: str, out: str, name: str, repeats: int, samples: int, batch: int | None
) -> None:
    """Two ranks; rounds alternate between world size 1 (rank 0 alone, in a group of its own,
    while rank 1 waits at the barrier) and world size 2, so machine drift hits both alike."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=600),
    )
    alone = dist.new_group([0])
    workload = WORKLOADS[name]
    model, x, _ = instantiate(workload, torch.device("cpu"), batch=batch)
    posterior = tb.from_module(model, rho=-3.0)
    times: dict[int, list[float]] = {1: [], 2: []}

    def run(group: dist.ProcessGroup | None) -> None:
        tb.distributed.predict(
            model,
            posterior,
            tb.random.key(0),
            x,
            num_samples=samples,
            strategy="vmap",
            group=group,
        )

    with torch.no_grad():
        for round_ in range(repeats + 1):
            for world, group in ((1, alone), (2, None)):
                dist.barrier()
                start = time.perf_counter()
                if world == 2 or rank == 0:
                    run(group)
                dist.barrier()
                if round_:
                    times[world].append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(repr(times))
    dist.destroy_process_group()


def timed(name: str, repeats: int, samples: int, batch: int | None) -> dict[int, list[float]]:
    folder = Path(tempfile.mkdtemp(prefix="tbfunc-bench-dist-"))
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(
            target=rank_main,
            args=(
                rank,
                str(folder / "store"),
                str(folder / "times"),
                name,
                repeats,
                samples,
                batch,
            ),
        )
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return eval((folder / "times").read_text())


def scaling(
    names: list[str], repeats: int, samples: int | None = None, batch: int | None = None
) -> tuple[list[dict[str, str]], dict[str, object]]:
    rows, raw = [], {}
    for name in names:
        count = samples or WORKLOADS[name].num_samples
        times = timed(name, repeats, count, batch)
        one, two = times[1], times[2]
        raw[name] = {"world 1": one, "world 2": two}
        speedup = statistics.median(one) / statistics.median(two)
        rows.append(
            {
                "workload": f"{name} {WORKLOADS[name].description}, S={count}",
                "world 1 median ms": f"{statistics.median(one) * 1e3:.1f}",
                "world 2 median ms": f"{statistics.median(two) * 1e3:.1f}",
                "speedup": f"{speedup:.2f}",
            }
        )
    return rows, raw
