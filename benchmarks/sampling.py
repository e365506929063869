"""Drawing S weight samples: tb.sample against randn(S, P) + one fused multiply-add."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import tbfunc as tb

KEY = tb.random.key(0)


def contenders(model: nn.Module, num_samples: int) -> dict[str, Callable[[], object]]:
    posterior = tb.from_module(model)
    count = sum(node.mu.numel() for node in posterior.values())
    device = next(model.parameters()).device
    mu = torch.cat([node.mu.reshape(-1) for node in posterior.values()])
    sigma = torch.cat([node.sigma.reshape(-1) for node in posterior.values()])

    def reference() -> object:
        noise = torch.randn(num_samples, count, device=device)
        return torch.addcmul(mu, sigma, noise, out=noise)

    return {
        "randn + addcmul": reference,
        "randn alone": lambda: torch.randn(num_samples, count, device=device),
        "tb.sample": lambda: tb.sample(posterior, KEY, num_samples=num_samples),
    }
