"""A training job that checkpoints with PosteriorModule.state_dict(): run as
``python checkpoint_job.py START STOP OUT [IN]`` it trains steps START..STOP-1 (resuming from the
checkpoint IN when given) and writes a checkpoint to OUT. Keys come from the step counter, so a
job split over processes must equal one that never stopped."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import tbfunc as tb

KEY = tb.random.key(2024)


def build() -> tuple[nn.Module, tb.PosteriorModule, torch.optim.Optimizer]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    view = tb.PosteriorModule(net, tb.from_module(net, sigma_scale=0.1))
    return net, view, torch.optim.Adam(view.parameters(), lr=1e-2)


def train(view: tb.PosteriorModule, opt: torch.optim.Optimizer, start: int, stop: int) -> None:
    for step in range(start, stop):
        key = tb.random.fold_in(KEY, step)
        k_x, k_w = tb.random.split(key)
        x = tb.random.normal(k_x, (32, 6))
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        loss = view.nelbo(k_w, x, y, loss_fn=F.cross_entropy, num_data=320, num_samples=2)
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    start, stop, out = int(argv[0]), int(argv[1]), argv[2]
    _, view, opt = build()
    if len(argv) > 3:
        checkpoint = torch.load(argv[3], weights_only=True)
        view.load_state_dict(checkpoint["posterior"])
        opt.load_state_dict(checkpoint["optimizer"])
    train(view, opt, start, stop)
    torch.save({"posterior": view.state_dict(), "optimizer": opt.state_dict()}, out)


if __name__ == "__main__":
    main(sys.argv[1:])
