"""The scoreboard's workloads: one model, one input batch and one sample count each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import tbfunc as tb


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    num_samples: int
    classes: int


def mlp(*sizes: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return build


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *block(3, 32), *block(32, 64), *block(64, 128), nn.Flatten(), nn.Linear(128 * 4 * 4, 10)
    )


class Transformer(nn.Module):
    """4 encoder layers, d_model 256, 4 heads, mean-pooled into a 10-way head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


WORKLOADS = {
    "W1": Workload("W1", "MLP 784-512-512-10", mlp(784, 512, 512, 10), (128, 784), 32, 10),
    "W2": Workload("W2", "CNN + BatchNorm, 3x32x32", small_cnn, (64, 3, 32, 32), 16, 10),
    "W3": Workload("W3", "TransformerEncoder 4x256, seq 64", Transformer, (16, 64, 256), 16, 10),
    "W4": Workload("W4", "MLP 1024-2048-2048-10", mlp(1024, 2048, 2048, 10), (256, 1024), 8, 10),
}


def instantiate(
    workload: Workload, device: torch.device, *, batch: int | None = None, scale: int = 1
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (eval mode, seeded init), an input batch and integer targets, on ``device``."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = workload.build()
    model = model.to(device).eval()
    shape = (batch or workload.input_shape[0], *workload.input_shape[1:])
    x = tb.random.normal(tb.random.key(1), shape, device=device)
    y = torch.arange(shape[0], device=device) % workload.classes
    return model, x, y
