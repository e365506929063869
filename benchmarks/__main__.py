"""The scoreboard: ``python -m benchmarks [--quick] [--workloads W1,W3] [--device cuda]``.

Times every contender on every workload, interleaved, and writes ``results.json`` and
``results.md`` to ``--out``. Never run by the tests, except ``--quick`` on tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import tbfunc as tb
from benchmarks import (
    distributed,
    io,
    overhead,
    predict,
    sampling,
    timing,
    training,
    uncertainty,
)
from benchmarks.timing import interleaved, ms, table
from benchmarks.workloads import WORKLOADS, instantiate


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="e.g. W1,W3")
    parser.add_argument(
        "--sections",
        default="overhead,predict,sample,train,io,memory,uncertainty,distributed",
        help="which tables to run",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or all (cpu + cuda if any)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--samples", type=int, help="override every workload's S")
    parser.add_argument("--batch", type=int, help="override every workload's batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU")
    parser.add_argument(
        "--train-threads", default="1,2", help="CPU thread counts of the training tables"
    )
    parser.add_argument("--no-compile", action="store_true", help="skip tb.predict compiled")
    parser.add_argument("--quick", action="store_true", help="smoke run: S=2, B=2, 1 repeat")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.batch, args.repeats, args.warmup = 2, 2, 1, 0
        args.no_compile = True
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        devices = (
            [torch.device("cuda")] if args.device == "cuda" else [*devices, torch.device("cuda")]
        )
    sections = set(args.sections.split(","))
    report: dict[str, object] = {"machine": _machine(devices), "runs": []}
    markdown = [f"# tbfunc scoreboard\n\n{_describe(report['machine'])}\n"]
    if "overhead" in sections:
        for device in devices:
            markdown.append(_overhead(report, args, device))
    for device in devices:
        for name in args.workloads.split(","):
            workload = WORKLOADS[name]
            samples = args.samples or workload.num_samples
            model, x, y = instantiate(workload, device, batch=args.batch)
            title = f"{name} {workload.description}, B={x.shape[0]}, S={samples}, {device.type}"
            if "predict" in sections:
                runs, costs = predict.contenders(
                    model, x, samples, compile_predict=not args.no_compile
                )
                markdown.append(
                    _section(
                        report,
                        f"{title}: MC prediction",
                        runs,
                        costs,
                        args,
                        device,
                        baseline="limit",
                    )
                )
            if "sample" in sections:
                runs = sampling.contenders(model, samples)
                markdown.append(
                    _section(
                        report,
                        f"{title}: sampling the weights",
                        runs,
                        {},
                        args,
                        device,
                        baseline="randn + addcmul",
                    )
                )
            if "train" in sections:
                for threads in _train_threads(args, device):
                    for steps in (1, 4):
                        markdown.append(
                            _training(report, model, x, y, steps, threads, title, args, device)
                        )
            if "io" in sections and device.type == "cpu":
                markdown.append(
                    _section(
                        report,
                        f"{title}: save and load",
                        io.contenders(model),
                        {},
                        args,
                        device,
                        baseline="torch.save + torch.load, module state_dict",
                    )
                )
            if "memory" in sections:
                markdown.append(_memory(report, name, model, x, samples, device, title))
    if "uncertainty" in sections and devices == [torch.device("cpu")]:
        samples = args.samples or 32
        markdown.append(
            _section(
                report,
                f"W1 with Dropout(0.1) after each hidden layer, B={args.batch or 128}, "
                f"S={samples}: MC dropout",
                uncertainty.dropout_contenders(samples, args.batch),
                {},
                args,
                torch.device("cpu"),
                baseline="one forward on S*B inputs",
            )
        )
        samples, batch = (args.samples or 64), (args.batch or 10_000)
        markdown.append(
            _section(
                report,
                f"W1, S={samples}, N={batch}, 10 classes: metrics against prediction",
                uncertainty.metric_contenders(samples, batch),
                {},
                args,
                torch.device("cpu"),
                baseline="tb.predict (the call that made the logits)",
            )
        )
    if "distributed" in sections and devices == [torch.device("cpu")]:
        names = [n for n in args.workloads.split(",") if n in ("W1", "W4")] or ["W1"]
        rows, raw = distributed.scaling(
            names, 1 if args.quick else args.repeats, args.samples, args.batch
        )
        report["runs"].append({"title": "sharded predict, CPU", "results": rows, "times_s": raw})
        columns = ["workload", "world 1 median ms", "world 2 median ms", "speedup"]
        markdown.append(
            "## tb.distributed.predict, CPU, 1 thread per rank (gloo, vmap)\n\n"
            + table(rows, columns)
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text("\n\n".join(markdown) + "\n")
    print("\n\n".join(markdown))
    return report


def _section(report, title, runs, costs, args, device, *, baseline, before=None) -> str:
    results = interleaved(
        runs, repeats=args.repeats, warmup=args.warmup, device=device, before=before
    )
    base = results[baseline].median if baseline in results else float("nan")
    rows = []
    for name, result in results.items():
        rows.append(
            {
                "contender": name,
                "median ms": ms(result.median) if not result.error else "error",
                "min-max ms": f"{ms(min(result.times))}-{ms(max(result.times))}"
                if result.times
                else "",
                f"x {baseline}": f"{result.median / base:.2f}"
                if result.times and base == base
                else "",
                "note": result.error or "",
            }
        )
    report["runs"].append(
        {"title": title, "results": [r.as_dict() for r in results.values()], "costs_s": costs}
    )
    extra = "".join(
        f"\n\n{k}: {v:.1f}" if isinstance(v, float) else f"\n\n{k}: {v}" for k, v in costs.items()
    )
    columns = ["contender", "median ms", "min-max ms", f"x {baseline}", "note"]
    return f"## {title}\n\n" + table(rows, columns) + extra


def _train_threads(args, device) -> list[int | None]:
    if device.type != "cpu":
        return [None]
    return [int(t) for t in args.train_threads.split(",")]


def _training(report, model, x, y, steps, threads, title, args, device) -> str:
    """One training table (at ``threads`` CPU threads) and the fused step's breakdown."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        where = "" if threads is None else f", {threads} thread(s)"
        section = _section(
            report,
            f"{title}: training step, {steps} sample(s){where}",
            training.contenders(model, x, y, steps),
            {},
            args,
            device,
            baseline="deterministic step",
        )
        parts = training.breakdown(model, x, y, steps)
        line = ", ".join(f"{name} {value:.2f}" for name, value in parts.items())
        text = f"{section}\n\ntbfunc nelbo + tb.optim.Adam, ms per step (profiler): {line}"
        if steps == 1:  # VON draws one sample per step
            phases = training.von_breakdown(model, x, y)
            line = ", ".join(f"{name} {value:.2f}" for name, value in phases.items())
            text += f"\n\ntbfunc VON step, sampled, ms per step (timed phases): {line}"
        return text
    finally:
        torch.set_num_threads(before)


def _overhead(report, args, device) -> str:
    """The tiny workload of benchmarks.overhead, on one thread, without autograd."""
    with timing.threads(1), torch.no_grad():
        runs = overhead.contenders(device)
        # the per-call costs are ~1 ms: many more rounds than the workloads get
        quick = argparse.Namespace(repeats=args.repeats * 40, warmup=max(args.warmup, 1) * 20)
        title = (
            f"Per-call overhead: MLP 16-32-32-4, B={overhead.BATCH}, S={overhead.SAMPLES}, "
            f"1 thread, no grad, {device.type}"
        )
        sections = [_section(report, title, runs, {}, quick, device, baseline="floor + rng")]
        other = overhead.other_library(device)
        if other is not None:
            sections.append(
                _section(
                    report,
                    f"{title}, each call right after another library's forward on another "
                    "model (untimed)",
                    runs,
                    {},
                    quick,
                    device,
                    baseline="floor + rng",
                    before=other,
                )
            )
        return "\n\n".join(sections)


def _spread(times: list[float]) -> str:
    return f"{ms(min(times))}-{ms(max(times))}" if times else ""


def _memory(report, workload, model, x, samples, device, title) -> str:
    posterior = tb.from_module(model)
    rows = []
    for chunk in (None, max(1, samples // 4)):
        if device.type == "cuda":
            peak = training.peak_memory(
                lambda c=chunk: tb.predict(
                    model, posterior, predict.KEY, x, num_samples=samples, chunk_size=c
                ),
                device,
            )
        else:
            peak = training.peak_memory_in_child(workload, chunk, samples, x.shape[0])
        rows.append({"chunk_size": str(chunk), "peak MiB above start": f"{peak / 2**20:.0f}"})
    report["runs"].append({"title": f"{title}: predict peak memory", "results": rows})
    return f"## {title}: predict peak memory\n\n" + table(rows, list(rows[0]))


def _machine(devices: list[torch.device]) -> dict[str, object]:
    info: dict[str, object] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "tbfunc": tb.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if any(device.type == "cuda" for device in devices):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _describe(machine: object) -> str:
    return ", ".join(f"{k} {v}" for k, v in dict(machine).items())  # type: ignore[call-overload]


if __name__ == "__main__":
    main()
