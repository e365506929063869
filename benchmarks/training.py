"""One training step (sample, forward, backward, Adam) for each contender, and peak memory."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import tbfunc as tb

NUM_DATA = 60_000
POOL_FUSED = "tbfunc nelbo + tb.optim.Adam (fused), tbfunc's thread pool (TBFUNC_OPENMP=0)"
POOL_VON = "tbfunc VON step, tbfunc's thread pool (TBFUNC_OPENMP=0)"
RHO = -3.0
SAMPLED = "tbfunc tb.optim.sampled + tb.optim.Adam (fused)"
ADAM_SAMPLED = "tbfunc tb.optim.Adam.sampled (one pass)"


def contenders(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int
) -> dict[str, Callable[[], object]]:
    runs = {
        "deterministic step": deterministic(model, x, y),
        "deterministic step, tb.optim.Adam": deterministic(model, x, y, tb.optim.Adam),
        "tbfunc nelbo + torch Adam, tensor ops (TBFUNC_FUSED=0)": _unfused(
            tbfunc_step(model, x, y, num_samples)
        ),
        "tbfunc nelbo + torch Adam": tbfunc_step(model, x, y, num_samples),
        "tbfunc nelbo + tb.optim.Adam (fused)": tbfunc_step(
            model, x, y, num_samples, tb.optim.Adam
        ),
        POOL_FUSED: _on_pool(tbfunc_step(model, x, y, num_samples, tb.optim.Adam)),
        SAMPLED: sampled_step(model, x, y, num_samples),
    }
    if num_samples == 1:  # Adam.sampled and natural-gradient VI draw one sample per step
        runs[ADAM_SAMPLED] = sampled_step(model, x, y, 1, one_pass=True)
        runs["tbfunc VON step"] = von_step(model, x, y)
        runs["tbfunc VON step, sampled"] = von_step(model, x, y, sampled=True)
        runs[POOL_VON] = _on_pool(von_step(model, x, y))
        runs.update(ivon_step(model, x, y))
    runs.update(torchbayesian_step(model, x, y, num_samples))
    runs.update(posteriors_step(model, x, y, num_samples))
    return runs


def deterministic(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: type = torch.optim.Adam
) -> Callable[[], object]:
    """The floor: the base model's own step (no sampling, no KL)."""
    net = copy.deepcopy(model)
    return _adam_step(list(net.parameters()), lambda: F.cross_entropy(net(x), y), optimizer)


def _on_pool(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` with the kernels' parts on tbfunc's own thread pool instead of torch's OpenMP
    team: the route before the team (the same results; at one thread, the same calls)."""
    return _with_switch_off("TBFUNC_OPENMP", step)


def _unfused(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` with tbfunc's fused route switched off: the tensor-op route it replaced."""
    return _with_switch_off("TBFUNC_FUSED", step)


def _with_switch_off(variable: str, step: Callable[[], object]) -> Callable[[], object]:
    """``step`` run with the environment switch ``variable=0`` (tbfunc reads it at every call)."""

    def run() -> object:
        os.environ[variable] = "0"
        try:
            return step()
        finally:
            del os.environ[variable]

    return run


def tbfunc_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_samples: int,
    optimizer: type = torch.optim.Adam,
) -> Callable[[], object]:
    posterior = tb.from_module(model, rho=RHO)
    counter = iter(range(10**9))
    key = tb.random.key(0)

    def loss() -> torch.Tensor:
        step_key = tb.random.fold_in(key, next(counter))
        return tb.nelbo(
            model,
            posterior,
            step_key,
            x,
            y,
            loss_fn=F.cross_entropy,
            num_data=NUM_DATA,
            num_samples=num_samples,
        )

    return _adam_step(tb.parameters(posterior), loss, optimizer)


def sampled_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int, *, one_pass: bool = False
) -> Callable[[], object]:
    """Bayes-by-Backprop through the module itself, the draw written into a copy of it:
    ``num_samples`` blocks of ``tb.optim.sampled`` (its own forward and backward, the nelbo
    gradient in one pass on leaving; the gradient of ``nelbo(..., num_samples=num_samples)``
    with the same keys), then ``tb.optim.Adam``'s step; with ``one_pass``, one block of
    ``tb.optim.Adam.sampled`` (one sample) and its one pass for the gradient, Adam and the
    next draw's sigma."""
    posterior = tb.from_module(model, rho=RHO)
    opt = tb.optim.Adam(posterior, lr=1e-4)
    counter = iter(range(10**9))
    key = tb.random.key(0)
    net = copy.deepcopy(model).requires_grad_(False)

    def blocks(step_key: torch.Tensor) -> list:
        if one_pass:
            return [opt.sampled(net, step_key, num_data=NUM_DATA)]
        return [
            tb.optim.sampled(net, posterior, k, num_data=NUM_DATA, num_samples=num_samples)
            for k in tb.random.split(step_key, num_samples)
        ]

    def step() -> object:
        opt.zero_grad()
        for block in blocks(tb.random.fold_in(key, next(counter))):
            with block:
                value = F.cross_entropy(net(x), y)
                value.backward()
        opt.step()
        return value

    return step


def breakdown(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int, steps: int = 10
) -> dict[str, float]:
    """Where the fused step's time goes, in ms per step, from torch.profiler's self times: the
    draw (with the KL's value), ``softplus``, the draw's backward (with the KL's gradient),
    the optimizer update, and the model's own forward and backward (the rest, with Python)."""
    from torch.profiler import ProfilerActivity, profile

    step = tbfunc_step(model, x, y, num_samples, tb.optim.Adam)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    parts = {"draw + KL": "_Draw", "softplus": "aten::softplus"}
    parts |= {"draw/KL backward": "_DrawBackward", "update": "Optimizer.step#Adam.step"}
    totals = {name: 0.0 for name in (*parts, "model forward/backward + rest")}
    for event in prof.key_averages():
        name = next((k for k, v in parts.items() if event.key == v), None)
        totals[name or "model forward/backward + rest"] += event.self_cpu_time_total / 1e3
    return {name: value / steps for name, value in totals.items()}


def von_breakdown(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 10
) -> dict[str, float]:
    """Where the VON step through ``VON.sampled`` spends its time, in ms per step (medians of
    ``steps`` steps after two untimed ones): entering the block (the draw, the parameters
    pointed at it, a finiteness check where the last update did not make one), the module's
    forward and backward, leaving the block (the parameters back, ``mu.grad``), and the
    update."""
    import statistics
    import time

    posterior = tb.from_module(model, rho=RHO)
    opt = tb.optim.VON(posterior, lr=0.1, num_data=NUM_DATA, clip=1.0)
    net = copy.deepcopy(model).requires_grad_(False)
    key = tb.random.key(0)
    names = ("draw into the module", "forward/backward", "restore", "update")
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(steps + 2):
        opt.zero_grad()
        block = opt.sampled(net, tb.random.fold_in(key, index))
        marks = [time.perf_counter()]
        block.__enter__()
        marks.append(time.perf_counter())
        F.cross_entropy(net(x), y).backward()
        marks.append(time.perf_counter())
        block.__exit__(None, None, None)
        marks.append(time.perf_counter())
        opt.step()
        marks.append(time.perf_counter())
        if index >= 2:
            for name, start, end in zip(names, marks[:-1], marks[1:], strict=True):
                times[name].append(end - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def von_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, sampled: bool = False
) -> Callable[[], object]:
    """``tb.optim.VON``: one draw through ``tb.functional_call``, backward, one VON update;
    with ``sampled`` the draw written into a copy of the module (``VON.sampled``) and the
    module's own forward and backward."""
    posterior = tb.from_module(model, rho=RHO)
    # the recipe's clip (examples/recipes.py): unclipped, the first steps on the W2 CNN, while h
    # is still the guess, diverge within four steps (loss 4.8, 1.3e4, 4e19, then an infinite rho)
    opt = tb.optim.VON(posterior, lr=0.1, num_data=NUM_DATA, clip=1.0)
    counter = iter(range(10**9))
    key = tb.random.key(0)
    net = copy.deepcopy(model).requires_grad_(False) if sampled else model

    def step() -> object:
        step_key = tb.random.fold_in(key, next(counter))
        opt.zero_grad()
        if sampled:
            with opt.sampled(net, step_key):
                value = F.cross_entropy(net(x), y)
                value.backward()
        else:
            value = F.cross_entropy(tb.functional_call(model, posterior, step_key, x), y)
            value.backward()
        opt.step()
        return value

    return step


def ivon_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, Callable[[], object]]:
    """ivon-opt (GPL-3.0, a peer only): its documented loop with one sample per step."""
    name = "IVON step (ivon-opt)"
    try:
        import ivon
    except ImportError as error:
        return {name: _raiser(error)}
    net = copy.deepcopy(model)
    opt = ivon.IVON(net.parameters(), lr=0.1, ess=NUM_DATA)

    def step() -> object:
        with opt.sampled_params(train=True):  # draws from the global RNG
            opt.zero_grad()
            value = F.cross_entropy(net(x), y)
            value.backward()
        opt.step()
        return value

    return {name: step}


def torchbayesian_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int
) -> dict[str, Callable[[], object]]:
    """torchbayesian's documented loop: S forwards, cross-entropy, KL / N, Adam."""
    name = "torchbayesian fwd + KL + Adam"
    try:
        from torchbayesian import bnn
    except ImportError as error:
        return {name: _raiser(error)}
    net = bnn.BayesianModule(copy.deepcopy(model), variational_posterior="pretrained_normal")
    net = net.to(x.device)

    def loss() -> torch.Tensor:
        nll = sum(F.cross_entropy(net(x), y) for _ in range(num_samples)) / num_samples
        return nll + net.kl_divergence() / NUM_DATA

    return {name: _adam_step(list(net.parameters()), loss)}


def posteriors_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int
) -> dict[str, Callable[[], object]]:
    """posteriors 0.1.3 ``vi.diag`` update: its NELBO with a N(0, 1) prior, temperature 1/N."""
    name = "posteriors vi.diag update"
    try:
        with warnings.catch_warnings():  # tensordict warns about its own future at import
            warnings.simplefilter("ignore", FutureWarning)
            import posteriors as ps
            import torchopt
    except ImportError as error:
        return {name: _raiser(error)}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    def log_posterior(p: dict[str, torch.Tensor], batch: tuple) -> tuple[torch.Tensor, object]:
        out = torch.func.functional_call(model, p, (batch[0],))
        log_prior = sum((-0.5 * w**2).sum() for w in p.values()) - 0.5 * math.log(2 * math.pi)
        return -F.cross_entropy(out, batch[1]) + log_prior / NUM_DATA, out

    transform = ps.vi.diag.build(
        log_posterior,
        torchopt.adam(lr=1e-4),
        temperature=1 / NUM_DATA,
        n_samples=num_samples,
        init_log_sds=math.log(math.log1p(math.exp(RHO))),
    )
    state = [transform.init(params)]

    def step() -> object:
        state[0], _ = transform.update(state[0], (x, y))
        return state[0]

    return {name: step}


def peak_memory(run: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of ``run`` above what was held before it.

    On CUDA from the caching allocator's statistics; on the CPU (Linux) from the peak resident
    set, reset just before ``run``; call it in a fresh process (``peak_memory_in_child``), where
    no memory freed earlier sits in the allocator's free lists.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    _reset_peak_rss()
    before = _rss_kib("VmRSS")
    run()
    return (_rss_kib("VmHWM") - before) * 1024


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory_in_child(workload: str, chunk: int | None, samples: int, batch: int | None) -> int:
    """``peak_memory`` of one ``tb.predict`` call on the CPU, in a fresh interpreter."""
    code = (
        "import torch, tbfunc as tb; from benchmarks.workloads import WORKLOADS, instantiate;"
        "from benchmarks.training import peak_memory;"
        f"m, x, _ = instantiate(WORKLOADS[{workload!r}], torch.device('cpu'), batch={batch});"
        "p = tb.from_module(m); k = tb.random.key(0);"
        f"print(peak_memory(lambda: tb.predict(m, p, k, x, num_samples={samples},"
        f" chunk_size={chunk}), torch.device('cpu')))"
    )
    return int(run_in_child(code).split()[-1])


def run_in_child(code: str) -> str:
    """The stdout of ``code`` run in a fresh interpreter whose large blocks come straight from
    mmap, so freed memory leaves the resident set and the peak resident set measures what the
    measured call itself holds."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return out.stdout


def _adam_step(
    params: list[torch.Tensor],
    loss: Callable[[], torch.Tensor],
    optimizer: type = torch.optim.Adam,
) -> Callable[[], object]:
    """One Adam step on ``loss()``: the same settings for every contender (``optimizer`` is
    ``torch.optim.Adam`` or ``tb.optim.Adam``, the same update)."""
    opt = optimizer(params, lr=1e-4)

    def step() -> object:
        value = loss()
        opt.zero_grad()
        value.backward()
        opt.step()
        return value

    return step


def _raiser(error: Exception) -> Callable[[], object]:
    def run() -> object:
        raise error

    return run


def main(argv: list[str] | None = None) -> str:
    """``python -m benchmarks.training [--workloads W1,W4] [--threads 1,2] [--steps 10]``: the
    VON step's timed phases alone (the training section prints the same line per table)."""
    import argparse

    from benchmarks import workloads

    parser = argparse.ArgumentParser(description="the VON step through VON.sampled, by phase")
    parser.add_argument("--workloads", default="W1,W4")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    lines = []
    before = torch.get_num_threads()
    try:
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            for name in args.workloads.split(","):
                model, x, y = workloads.instantiate(workloads.WORKLOADS[name], torch.device("cpu"))
                parts = von_breakdown(model, x, y, args.steps)
                cells = ", ".join(f"{phase} {ms:.2f}" for phase, ms in parts.items())
                lines.append(f"{name}, {threads} thread(s), ms per step: {cells}")
    finally:
        torch.set_num_threads(before)
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
