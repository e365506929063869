"""The main demo: ``python -m tbfunc.demo`` turns a trained network into a Bayesian one.

1. Makes its own data: 1000 points of y = sin(3x) + x/2 + noise, observed on [-1.5, 1.5].
2. Trains a small deterministic MLP (the "pretrained" model, MAP with a Gaussian likelihood).
3. Converts it with ``tb.from_module`` (posterior centred on the trained weights) and a prior
   centred on them too (``tb.pretrained_prior``), then trains the posterior by
   Bayes-by-Backprop with ``tb.nelbo``.
4. Predicts with ``tb.predict`` and prints what a user wants to know: predictive spread in and
   out of the training range, coverage of the 90% interval, and test NLL for MAP vs the BNN in
   and out of the training range.

With matplotlib installed (``pip install -e ".[examples]"``) it also writes ``tbfunc_demo.png``
into ``--out`` (default: a new temporary folder, printed), never into the current directory.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tbfunc as tb
from tbfunc import _progress as progress

NOISE = 0.1  # the data's known noise standard deviation


def make_data(key: Tensor, count: int, low: float, high: float) -> tuple[Tensor, Tensor]:
    k_x, k_noise = tb.random.split(key)
    x = low + (high - low) * torch.special.ndtr(tb.random.normal(k_x, (count, 1)))
    y = torch.sin(3 * x) + 0.5 * x + NOISE * tb.random.normal(k_noise, (count, 1))
    return x, y


def gaussian_nll(output: Tensor, target: Tensor) -> Tensor:
    """Mean negative log-likelihood of ``target`` under N(output, NOISE^2)."""
    return (0.5 * ((output - target) / NOISE) ** 2).mean() + math.log(
        NOISE * math.sqrt(2 * math.pi)
    )


def pretrain(x: Tensor, y: Tensor, steps: int) -> nn.Module:
    with torch.random.fork_rng():  # the model's init only: the global RNG is kept
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
        )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def train_posterior(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int,
    key: Tensor,
    init_sigma: float = 0.01,
    prior_sigma: float = 0.2,
    lr: float = 1e-2,
) -> dict:
    posterior = tb.from_module(net, sigma=init_sigma)
    prior = tb.pretrained_prior(net, posterior, sigma=prior_sigma)
    opt = torch.optim.Adam(tb.parameters(posterior), lr=lr)
    start = time.perf_counter()
    for step in range(steps):
        loss = tb.nelbo(
            net,
            posterior,
            tb.random.fold_in(key, step),
            x,
            y,
            loss_fn=gaussian_nll,
            num_data=len(x),
            prior=prior,
            num_samples=4,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            progress.show(step + 1, steps, f"nelbo {loss.item():8.4f}", elapsed)
    progress.finish()
    return {
        name: tb.PretrainedGaussianPosterior(node.mu.detach(), node.rho.detach())
        for name, node in posterior.items()
    }


def summarize(net: nn.Module, posterior: dict, key: Tensor, num_samples: int) -> dict[str, float]:
    k_in, k_out, k_pred = tb.random.split(key, 3)
    x_in, y_in = make_data(k_in, 1000, -1.5, 1.5)
    x_out, y_out = make_data(k_out, 1000, 2.0, 3.5)
    with torch.no_grad():
        draws = tb.predict(
            net, posterior, k_pred, torch.cat([x_in, x_out]), num_samples=num_samples
        )  # (S, N, 1)
        map_in, map_out = net(x_in), net(x_out)
    inside, outside = draws[:, : len(x_in)], draws[:, len(x_in) :]
    # the predictive: a mixture over weight draws of N(f_s(x), NOISE^2)
    total_sd = (inside.var(0) + NOISE**2).sqrt()
    z = 1.6448536269514722  # two-sided 90%
    covered = ((y_in - inside.mean(0)).abs() <= z * total_sd).float().mean()
    return {
        "epistemic sd in range": inside.std(0).mean().item(),
        "epistemic sd out of range": outside.std(0).mean().item(),
        "90% interval coverage in range": covered.item(),
        "test NLL in range, MAP": gaussian_nll(map_in, y_in).item(),
        "test NLL in range, BNN": _mixture_nll(inside, y_in),
        "test NLL out of range, MAP": gaussian_nll(map_out, y_out).item(),
        "test NLL out of range, BNN": _mixture_nll(outside, y_out),
    }


def _mixture_nll(draws: Tensor, target: Tensor) -> float:
    """Mean of -log((1/S) sum_s N(target; f_s, NOISE^2)), by logsumexp."""
    log_terms = -0.5 * ((target - draws) / NOISE) ** 2 - math.log(NOISE * math.sqrt(2 * math.pi))
    return -(torch.logsumexp(log_terms, 0) - math.log(len(draws))).mean().item()


def plot(net: nn.Module, posterior: dict, x: Tensor, y: Tensor, key: Tensor, path: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 'no plot: matplotlib is not installed (pip install -e ".[examples]")'
    grid = torch.linspace(-3, 4, 400)[:, None]
    with torch.no_grad():
        draws = tb.predict(net, posterior, key, grid, num_samples=200)[..., 0]
        map_line = net(grid)[:, 0]
    mean, sd = draws.mean(0), (draws.var(0) + NOISE**2).sqrt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.fill_between(
        grid[:, 0],
        mean - 1.645 * sd,
        mean + 1.645 * sd,
        alpha=0.3,
        label="BNN 90% predictive interval",
    )
    ax.plot(grid[:, 0], mean, label="BNN predictive mean")
    ax.plot(grid[:, 0], map_line, "--", label="pretrained (MAP) network")
    ax.scatter(x[:, 0], y[:, 0], s=6, c="k", label="training data")
    ax.axvspan(-1.5, 1.5, color="grey", alpha=0.08, label="training range")
    ax.set(xlabel="x", ylabel="y", title="tbfunc: a pretrained MLP turned Bayesian")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog="python -m tbfunc.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=1000, help="Bayes-by-Backprop steps")
    parser.add_argument("--samples", type=int, default=200, help="MC samples for predict")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="folder for the plot (default: a new temporary folder)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    args = parser.parse_args(argv)
    key = tb.random.key(args.seed)
    k_data, k_train, k_eval = tb.random.split(key, 3)
    x, y = make_data(k_data, 1000, -1.5, 1.5)
    print(f"1/4 data: {len(x)} points of y = sin(3x) + x/2 + N(0, {NOISE}^2) on [-1.5, 1.5]")
    net = pretrain(x, y, args.pretrain_steps)
    print(f"2/4 pretrained MLP: train MSE {F.mse_loss(net(x), y).item():.4f}")
    print("3/4 Bayes-by-Backprop, posterior and prior centred on the pretrained weights:")
    posterior = train_posterior(net, x, y, args.steps, k_train)
    results = summarize(net, posterior, k_eval, args.samples)
    print(f"4/4 tb.predict with {args.samples} weight samples:")
    for name, value in results.items():
        print(f"    {name:32s} {value:8.4f}")
    ratio = results["epistemic sd out of range"] / results["epistemic sd in range"]
    print(f"    the BNN is {ratio:.1f}x less certain outside the data than inside it")
    if not args.no_plot:
        folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tbfunc-demo-"))
        folder.mkdir(parents=True, exist_ok=True)
        print(plot(net, posterior, x, y, k_eval, str(folder / "tbfunc_demo.png")))
    return results


if __name__ == "__main__":
    main()
