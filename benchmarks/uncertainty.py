"""Uncertainty after prediction: key-driven MC dropout against one deterministic forward on
S*B inputs, and tb.metrics against the tb.predict call whose output they summarise (W1)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import tbfunc as tb
from benchmarks.workloads import WORKLOADS, instantiate

KEY = tb.random.key(0)


def with_dropout(model: nn.Module, p: float = 0.1) -> nn.Module:
    """The MLP with a Dropout(p) after each hidden layer's activation."""
    layers: list[nn.Module] = []
    for layer in model:
        layers.append(layer)
        if isinstance(layer, nn.ReLU):
            layers.append(nn.Dropout(p))
    return nn.Sequential(*layers).eval()


def dropout_contenders(num_samples: int, batch: int | None) -> dict[str, Callable[[], object]]:
    base, x, _ = instantiate(WORKLOADS["W1"], torch.device("cpu"), batch=batch)
    model = with_dropout(base)
    big = x.repeat(num_samples, 1)
    return {
        "one forward on S*B inputs": lambda: model(big),
        "tb.predict({}, dropout=True)": lambda: tb.predict(
            model, {}, KEY, x, num_samples=num_samples, dropout=True
        ),
        "torch MC dropout (train mode, global RNG)": lambda: _global_rng_mc(model, big),
    }


def _global_rng_mc(model: nn.Module, big: torch.Tensor) -> object:
    with torch.random.fork_rng():
        model.train()
        try:
            return model(big)
        finally:
            model.eval()


def metric_contenders(num_samples: int, batch: int) -> dict[str, Callable[[], object]]:
    model, x, _ = instantiate(WORKLOADS["W1"], torch.device("cpu"), batch=batch)
    posterior = tb.from_module(model, rho=-3.0)
    logits = tb.predict(model, posterior, KEY, x, num_samples=num_samples)
    target = torch.arange(batch) % 10

    def summaries() -> object:
        m = tb.metrics
        return (
            m.predictive_entropy(logits),
            m.expected_entropy(logits),
            m.mutual_information(logits),
            m.nll(logits, target),
            m.brier_score(logits, target),
            m.accuracy(logits, target),
            m.expected_calibration_error(logits, target),
        )

    return {
        "tb.predict (the call that made the logits)": lambda: tb.predict(
            model, posterior, KEY, x, num_samples=num_samples, chunk_size=8
        ),
        "7 tb.metrics on its (S, N, 10) logits": summaries,
    }
