"""Per-call overhead: a model so small that the forward costs little, so host work shows.

MLP 16-32-32-4, B=8, S=8, 1 thread on the CPU (the section sets it and restores it), no grad.
The contenders:
- floor: ``vmap(functional_call)`` on weights sampled beforehand (the forward alone);
- floor + rng: the same, with ``randn`` + ``addcmul`` per leaf drawn in the call;
- tb.predict (vmap and auto) and tb.sample (with its own reference, randn + addcmul alone);
- torchbayesian: its ``BayesianModule`` under ``vmap(randomness="different")``.

A second table times the same calls, each right after another library's forward on another
model (``other_library``): what a call costs when a server's other model has just run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

import tbfunc as tb

KEY = tb.random.key(0)
SAMPLES = 8
SIZES = (16, 32, 32, 4)
BATCH = 8


def model(device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for i in range(len(SIZES) - 1):
            layers += [nn.Linear(SIZES[i], SIZES[i + 1]), nn.ReLU()]
        net = nn.Sequential(*layers[:-1]).to(device).eval()
    x = tb.random.normal(tb.random.key(1), (BATCH, SIZES[0]), device=device)
    return net, x


def contenders(device: torch.device) -> dict[str, Callable[[], object]]:
    net, x = model(device)
    posterior = tb.from_module(net)
    mus = {name: node.mu for name, node in posterior.items()}
    sigmas = {name: node.sigma for name, node in posterior.items()}
    drawn = tb.sample(posterior, KEY, num_samples=SAMPLES)
    forward = torch.func.vmap(lambda params: torch.func.functional_call(net, params, (x,)))

    def draw() -> dict[str, torch.Tensor]:
        return {
            name: torch.addcmul(mu, sigmas[name], torch.randn(SAMPLES, *mu.shape, device=device))
            for name, mu in mus.items()
        }

    runs: dict[str, Callable[[], object]] = {
        "floor": lambda: forward(drawn),
        "floor + rng": lambda: forward(draw()),
        "tb.predict vmap": lambda: tb.predict(
            net, posterior, KEY, x, num_samples=SAMPLES, strategy="vmap"
        ),
        "tb.predict": lambda: tb.predict(net, posterior, KEY, x, num_samples=SAMPLES),
        "randn + addcmul": draw,
        "tb.sample": lambda: tb.sample(posterior, KEY, num_samples=SAMPLES),
    }
    try:
        from torchbayesian import bnn
    except ImportError as error:
        runs["torchbayesian vmap"] = _raiser(error)
        return runs
    bayesian = bnn.BayesianModule(copy.deepcopy(net), variational_posterior="pretrained_normal")
    bayesian = bayesian.to(device).eval()
    runs["torchbayesian vmap"] = lambda: torch.func.vmap(
        lambda _: bayesian(x), randomness="different"
    )(torch.arange(SAMPLES, device=device))
    return runs


def other_library(device: torch.device) -> Callable[[str], object] | None:
    """``before(name)``: another library's forward on a model of its own (MLP 10-64-64-3, S=8),
    to run untimed before each timed call of contender ``name``, so that no contender finds
    its caches warm. torchbayesian's vmapped ``BayesianModule`` runs before every contender
    but torchbayesian's own, which gets ``tb.predict`` instead: each library's calls follow the
    other library's code. None without torchbayesian."""
    try:
        from torchbayesian import bnn
    except ImportError:
        return None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        net.append(nn.Linear(64, 3)).to(device).eval()
        bayesian = bnn.BayesianModule(copy.deepcopy(net), variational_posterior="pretrained_normal")
    bayesian = bayesian.to(device).eval()
    posterior = tb.from_module(net)
    x = tb.random.normal(tb.random.key(2), (BATCH, 10), device=device)

    def before(name: str) -> object:
        if name.startswith("torchbayesian"):
            return tb.predict(net, posterior, KEY, x, num_samples=SAMPLES)
        return torch.func.vmap(lambda _: bayesian(x), randomness="different")(
            torch.arange(SAMPLES, device=device)
        )

    return before


def _raiser(error: Exception) -> Callable[[], object]:
    def run() -> object:
        raise error

    return run
