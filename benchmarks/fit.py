"""A whole fit: natural-gradient VI against an Adam fit of the same number of steps.

    python -m benchmarks.fit [--steps 500] [--rounds 7] [--threads 1,2]

The inference issue's cost bar ("a VON fit costs <= 1.3x an Adam fit of the same number of
steps") on the model and loop of ``examples/classification_eval.py``: digits (1,078 training
rows, 60% of scikit-learn's 1,797), an MLP 64-128-128-10, minibatches of 128 from a keyed
epoch-wise shuffle, and the benchmark's settings. Every fit starts from the same initial
weights. The contenders:

- Adam (MAP): the deterministic fit, ``torch.optim.Adam`` (lr 1e-3, weight decay 1e-4);
- tb.optim.VON: one draw per step through ``tb.functional_call``, backward, ``step`` (the
  recommended row's settings, with its cosine schedule);
- tb.optim.VON, sampled: the same steps with the draw written into the module itself
  (``with opt.sampled(net, key)``), the module's own forward and backward;
- tb.nelbo + tb.optim.Adam: Bayes-by-Backprop with one draw, the fused route;
- tb.optim.Adam.sampled: the same Bayes-by-Backprop steps with the draw in the module itself
  (``with opt.sampled(net, key, num_data=N)``) and one pass per step;
- IVON (ivon-opt), where installed: its documented loop with the VON row's settings.

The rounds interleave the contenders (each fit once a round); the table gives medians and each
fit's median as a multiple of the Adam fit's. A second table splits one Adam step and one VON
step into forward, backward and update, the two alternating step by step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tbfunc as tb

KEY = tb.random.key(0)
BATCH = 128
VON_SETTINGS = {"lr": 0.2, "hess_init": 0.3, "weight_decay": 1e-3, "beta2": 0.99999, "clip": 1.0}


def data() -> tuple[Tensor, Tensor]:
    """The training rows of digits (pixels / 16), a keyed 60% of the set."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    rows = tb.random.normal(KEY, (len(x),)).argsort()[: int(0.6 * len(x))]
    return x[rows], y[rows]


def model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )


def batch_rows(step: int, count: int) -> Tensor:
    """Minibatch ``step`` of an epoch-wise keyed shuffle, as the examples draw them."""
    per_epoch = -(-count // BATCH)
    epoch, index = divmod(step, per_epoch)
    order = tb.random.normal(tb.random.fold_in(KEY, epoch), (count,)).argsort()
    return order[index * BATCH : (index + 1) * BATCH]


def adam(net: nn.Module) -> torch.optim.Adam:
    """The MAP fit's optimizer (the examples' ``map_lr`` and ``map_weight_decay``)."""
    return torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)


def von(count: int) -> tuple[nn.Module, dict, tb.optim.VON]:
    """The frozen base, its posterior with the first draw at the sigma the curvature guess
    implies (as the recipe starts it), and VON at the recipe's settings for ``count`` rows."""
    net = model().requires_grad_(False)
    settings = VON_SETTINGS
    sigma = (count * (settings["hess_init"] + settings["weight_decay"])) ** -0.5
    posterior = tb.from_module(net, sigma=sigma)
    return net, posterior, tb.optim.VON(posterior, num_data=count, **settings)  # type: ignore[arg-type]


def adam_fit(x: Tensor, y: Tensor, steps: int) -> None:
    net = model()
    opt = adam(net)
    for step in range(steps):
        rows = batch_rows(step, len(x))
        loss = F.cross_entropy(net(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()


def von_fit(x: Tensor, y: Tensor, steps: int) -> None:
    net, posterior, opt = von(len(x))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        rows = batch_rows(step, len(x))
        out = tb.functional_call(net, posterior, tb.random.fold_in(KEY, step), x[rows])
        loss = F.cross_entropy(out, y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()


def von_sampled_fit(x: Tensor, y: Tensor, steps: int) -> None:
    net, _, opt = von(len(x))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        rows = batch_rows(step, len(x))
        with opt.sampled(net, tb.random.fold_in(KEY, step)):
            loss = F.cross_entropy(net(x[rows]), y[rows])
            loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step()


def bbb_fit(x: Tensor, y: Tensor, steps: int) -> None:
    net = model().requires_grad_(False)
    posterior = tb.from_module(net, sigma=1e-3)
    opt = tb.optim.Adam(tb.parameters(posterior), lr=1e-3)
    for step in range(steps):
        rows = batch_rows(step, len(x))
        loss = tb.nelbo(
            net,
            posterior,
            tb.random.fold_in(KEY, step),
            x[rows],
            y[rows],
            loss_fn=F.cross_entropy,
            num_data=len(x),
        )
        opt.zero_grad()
        loss.backward()
        opt.step()


def bbb_sampled_fit(x: Tensor, y: Tensor, steps: int) -> None:
    net = model().requires_grad_(False)
    posterior = tb.from_module(net, sigma=1e-3)
    opt = tb.optim.Adam(posterior, lr=1e-3)
    for step in range(steps):
        rows = batch_rows(step, len(x))
        opt.zero_grad()
        with opt.sampled(net, tb.random.fold_in(KEY, step), num_data=len(x)):
            loss = F.cross_entropy(net(x[rows]), y[rows])
            loss.backward()
        opt.step()


def ivon_fit(x: Tensor, y: Tensor, steps: int) -> None:
    import ivon  # GPL-3.0: a peer only, never a dependency

    net = model()
    opt = ivon.IVON(
        net.parameters(),
        lr=VON_SETTINGS["lr"],
        ess=len(x),
        hess_init=VON_SETTINGS["hess_init"],
        weight_decay=VON_SETTINGS["weight_decay"],
        beta2=VON_SETTINGS["beta2"],
        clip_radius=VON_SETTINGS["clip"],
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.random.fork_rng():  # ivon-opt draws from the global RNG
        torch.manual_seed(0)
        for step in range(steps):
            rows = batch_rows(step, len(x))
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss = F.cross_entropy(net(x[rows]), y[rows])
                loss.backward()
            opt.step()
            schedule.step()


def contenders() -> dict[str, Callable[[Tensor, Tensor, int], None]]:
    runs = {
        "Adam (MAP)": adam_fit,
        "tb.optim.VON": von_fit,
        "tb.optim.VON, sampled": von_sampled_fit,
        "tb.nelbo + tb.optim.Adam": bbb_fit,
        "tb.optim.Adam.sampled": bbb_sampled_fit,
    }
    try:
        import ivon  # noqa: F401
    except ImportError:
        pass
    else:
        runs["IVON (ivon-opt)"] = ivon_fit
    return runs


def compare(steps: int, rounds: int, threads: int) -> dict[str, tuple[float, float]]:
    """Per contender: the median fit in seconds, and the median of its ratio to the Adam fit
    of the same round."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, y = data()
        runs = contenders()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for warm in (True, *([False] * rounds)):
            for name, fit in runs.items():
                started = time.perf_counter()
                fit(x, y, steps if not warm else min(steps, 20))
                if not warm:
                    times[name].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    base = times["Adam (MAP)"]
    return {
        name: (
            statistics.median(values),
            statistics.median(v / b for v, b in zip(values, base, strict=True)),
        )
        for name, values in times.items()
    }


def phases(steps: int, threads: int) -> dict[str, dict[str, float]]:
    """Where a step's time goes, per contender: the forward (to the loss), the backward and the
    update, in ms, medians over ``steps`` steps that alternate between the Adam (MAP) step, the
    VON step through ``tb.functional_call`` and the VON step through ``VON.sampled`` (entering
    the block counts as its forward, leaving it as its backward), each timed phase by phase."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, y = data()
        net = model()
        base, posterior, von_opt = von(len(x))
        forwards: dict[str, Callable[[Tensor, int], Tensor]] = {
            "Adam (MAP)": lambda rows, step: net(x[rows]),
            "tb.optim.VON": lambda rows, step: tb.functional_call(
                base, posterior, tb.random.fold_in(KEY, step), x[rows]
            ),
        }
        optimizers = {"Adam (MAP)": adam(net), "tb.optim.VON": von_opt}
        drawn, _, drawn_opt = von(len(x))
        times = {
            name: {"forward": [], "backward": [], "update": []}
            for name in (*forwards, "tb.optim.VON, sampled")
        }
        for step in range(steps):
            rows = batch_rows(step, len(x))
            for name, forward in forwards.items():
                opt = optimizers[name]
                opt.zero_grad()
                started = time.perf_counter()
                loss = F.cross_entropy(forward(rows, step), y[rows])
                split = time.perf_counter()
                loss.backward()
                stepped = time.perf_counter()
                opt.step()
                done = time.perf_counter()
                times[name]["forward"].append(split - started)
                times[name]["backward"].append(stepped - split)
                times[name]["update"].append(done - stepped)
            # the sampled route: entering the block counts as forward, leaving it as backward
            drawn_opt.zero_grad()
            block = drawn_opt.sampled(drawn, tb.random.fold_in(KEY, step))
            started = time.perf_counter()
            block.__enter__()
            loss = F.cross_entropy(drawn(x[rows]), y[rows])
            split = time.perf_counter()
            loss.backward()
            block.__exit__(None, None, None)
            stepped = time.perf_counter()
            drawn_opt.step()
            done = time.perf_counter()
            parts = times["tb.optim.VON, sampled"]
            parts["forward"].append(split - started)
            parts["backward"].append(stepped - split)
            parts["update"].append(done - stepped)
    finally:
        torch.set_num_threads(previous)
    skip = min(20, steps // 2)  # the first steps warm the caches and the kernels
    return {
        name: {phase: 1e3 * statistics.median(values[skip:]) for phase, values in parts.items()}
        for name, parts in times.items()
    }


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args(argv)
    lines = [
        f"digits MLP 64-128-128-10, B={BATCH}, {args.steps} steps a fit, "
        f"{args.rounds} interleaved rounds, medians",
        "",
        "| threads | fit | median s | x Adam fit |",
        "|---|---|---|---|",
    ]
    for threads in map(int, args.threads.split(",")):
        for name, (seconds, ratio) in compare(args.steps, args.rounds, threads).items():
            lines.append(f"| {threads} | {name} | {seconds:.3f} | {ratio:.2f} |")
    lines += [
        "",
        f"One step by phase, ms (medians over {args.steps} alternating steps):",
        "",
        "| threads | step | forward | backward | update |",
        "|---|---|---|---|---|",
    ]
    for threads in map(int, args.threads.split(",")):
        for name, parts in phases(args.steps, threads).items():
            cells = " | ".join(f"{parts[p]:.2f}" for p in ("forward", "backward", "update"))
            lines.append(f"| {threads} | {name} | {cells} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
