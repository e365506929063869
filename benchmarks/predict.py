"""Monte-Carlo prediction contenders: S weight samples, S forwards, outputs stacked."""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import tbfunc as tb

KEY = tb.random.key(0)
RHO = -3.0  # every contender's posterior: mu = the model's weights, sigma = softplus(-3)


def contenders(
    model: nn.Module, x: torch.Tensor, num_samples: int, *, compile_predict: bool
) -> tuple[dict[str, Callable[[], object]], dict[str, float | str]]:
    """Callables to time, and set-up facts to report (compile time, auto's choice)."""
    posterior = tb.from_module(model, rho=RHO)
    count = sum(node.mu.numel() for node in posterior.values())
    start = time.perf_counter()
    choice = tb.choose_strategy(model, posterior, x, num_samples=min(num_samples, 4))
    costs: dict[str, float | str] = {
        "tb.predict auto strategy": choice,
        "tb.predict auto choice: s": time.perf_counter() - start,
    }
    runs: dict[str, Callable[[], object]] = {
        "limit": limit(model, x, num_samples, count),
        "tb.predict": lambda: tb.predict(model, posterior, KEY, x, num_samples=num_samples),
        "tb.predict vmap": lambda: tb.predict(
            model, posterior, KEY, x, num_samples=num_samples, strategy="vmap"
        ),
        "tb.predict loop": lambda: tb.predict(
            model, posterior, KEY, x, num_samples=num_samples, strategy="loop"
        ),
        "loop of tb.functional_call": lambda: [
            tb.functional_call(model, posterior, k, x) for k in tb.random.split(KEY, num_samples)
        ],
    }
    if compile_predict:
        compiled = torch.compile(
            lambda key: tb.predict(model, posterior, key, x, num_samples=num_samples)
        )
        start = time.perf_counter()
        try:
            compiled(KEY)
            costs["tb.predict compiled: compile s"] = time.perf_counter() - start
            runs["tb.predict compiled"] = lambda: compiled(KEY)
        except Exception as error:
            runs["tb.predict compiled"] = _raiser(error)
    runs.update(torchbayesian(model, x, num_samples))
    runs.update(posteriors(model, x, num_samples))
    return runs, costs


def limit(model: nn.Module, x: torch.Tensor, num_samples: int, count: int) -> Callable[[], object]:
    """The faster of (one forward on S*B inputs, S forwards on B inputs) + randn(S*P).

    Which of the two forwards is faster is decided once, at set-up, by timing each three times.
    """
    big = x.repeat(num_samples, *([1] * (x.dim() - 1)))

    def batched() -> object:
        return model(big)

    def looped() -> object:
        return [model(x) for _ in range(num_samples)]

    def best_of(run: Callable[[], object]) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    forward = batched if best_of(batched) <= best_of(looped) else looped

    def run() -> object:
        noise = torch.randn(num_samples * count, device=x.device)
        return forward(), noise

    return run


def torchbayesian(
    model: nn.Module, x: torch.Tensor, num_samples: int
) -> dict[str, Callable[[], object]]:
    try:
        from torchbayesian import bnn
    except ImportError as error:
        return {"torchbayesian loop": _raiser(error), "torchbayesian vmap": _raiser(error)}
    bayesian = bnn.BayesianModule(copy.deepcopy(model), variational_posterior="pretrained_normal")
    bayesian = bayesian.to(x.device).eval()

    def loop() -> object:
        return torch.stack([bayesian(x) for _ in range(num_samples)])

    def vmapped() -> object:
        return torch.func.vmap(lambda _: bayesian(x), randomness="different")(
            torch.arange(num_samples, device=x.device)
        )

    return {"torchbayesian loop": loop, "torchbayesian vmap": vmapped}


def posteriors(
    model: nn.Module, x: torch.Tensor, num_samples: int
) -> dict[str, Callable[[], object]]:
    try:
        with warnings.catch_warnings():  # tensordict warns about its own future at import
            warnings.simplefilter("ignore", FutureWarning)
            import posteriors as ps
            import torchopt
    except ImportError as error:
        return {"posteriors": _raiser(error)}
    params = {n: p.detach() for n, p in model.named_parameters()}
    log_sd = math.log(math.log1p(math.exp(RHO)))
    state = ps.vi.diag.init(params, torchopt.adam(lr=1e-3), init_log_sds=log_sd)

    def run() -> object:
        sampled = ps.vi.diag.sample(state, (num_samples,))
        return torch.func.vmap(lambda p: torch.func.functional_call(model, p, (x,)))(sampled)

    return {"posteriors": run}


def _raiser(error: Exception) -> Callable[[], object]:
    def run() -> object:
        raise error

    return run
