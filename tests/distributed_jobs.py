"""Jobs that the two-process tests spawn (gloo on the loopback, a FileStore: no port to pick).
Each writes what it saw to ``out/rank<r>.pt``; nothing here asserts."""

from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tbfunc as tb

KEY = tb.random.key(11)


def start(rank: int, world: int, store: str, timeout_s: float) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


class Pair(nn.Module):
    """An MLP that also returns None and a Python value: a structured output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        out = self.net(x)
        return {"logits": out, "hidden": None, "tag": "pair", "probs": out.softmax(-1)}


def model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Pair().eval()


def predict_and_train(rank: int, world: int, store: str, out: str) -> None:
    start(rank, world, store, 60)
    net = model()
    post = tb.from_module(net, sigma_scale=0.1)
    x = tb.random.normal(tb.random.key(1), (7, 6))
    seen: dict[str, object] = {}
    for count in (5, 4, 1):
        for strategy in ("loop", "vmap", "auto"):
            for chunk in (None, 2):
                name = f"S={count} {strategy} chunk={chunk}"
                seen[name] = tb.distributed.predict(
                    net, post, KEY, x, num_samples=count, strategy=strategy, chunk_size=chunk
                )
                seen[name + " single"] = tb.predict(
                    net, post, KEY, x, num_samples=count, strategy=strategy, chunk_size=chunk
                )
    seen["rank_key"] = tb.distributed.rank_key(KEY)
    seen["ddp"] = train_ddp(rank, world, net)
    if rank == 0:
        seen["reference"] = train_reference(world, net)
    torch.save(seen, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = tb.random.fold_in(tb.random.key(5), step)
    x = tb.random.normal(k, (8, 6))
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def loss_fn(out, target):
    return F.cross_entropy(out["logits"], target)


def train_ddp(rank: int, world: int, net: nn.Module) -> dict[str, torch.Tensor]:
    view = tb.PosteriorModule(net, tb.from_module(net, sigma_scale=0.1))
    ddp = nn.parallel.DistributedDataParallel(view)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    for step in range(3):
        x, y = batch(step)
        part = tb.distributed.shard(len(x))
        key = tb.distributed.rank_key(tb.random.fold_in(KEY, step))
        out = ddp(x[part.start : part.stop], key=key)
        loss = loss_fn(out, y[part.start : part.stop]) + view.kl_divergence() / 800
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in view.state_dict().items()}


def train_reference(world: int, net: nn.Module) -> dict[str, torch.Tensor]:
    """One process: the mean of the ranks' losses, with their keys and shards."""
    view = tb.PosteriorModule(net, tb.from_module(net, sigma_scale=0.1))
    opt = torch.optim.Adam(view.parameters(), lr=1e-2)
    for step in range(3):
        x, y = batch(step)
        losses = []
        for r in range(world):
            part = tb.distributed.shard(len(x), rank=r, world_size=world)
            key = tb.random.fold_in(tb.random.fold_in(KEY, step), r)
            out = view(x[part.start : part.stop], key=key)
            losses.append(loss_fn(out, y[part.start : part.stop]) + view.kl_divergence() / 800)
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in view.state_dict().items()}


class FailsOnRank(nn.Module):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.linear, self.rank = nn.Linear(6, 3), rank

    def forward(self, x):
        if self.rank == 1:
            raise ValueError("rank 1's data is corrupt")
        return self.linear(x)


def failing(rank: int, world: int, store: str, out: str, how: str) -> None:
    start(rank, world, store, 10)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = FailsOnRank(rank).eval()
    post = tb.from_module(net)
    began = time.monotonic()
    if how == "dies" and rank == 1:
        os._exit(3)  # a crash: no exception, no clean shutdown
    try:
        tb.distributed.predict(net, post, KEY, torch.zeros(2, 6), num_samples=4, strategy="loop")
        message = "no error"
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        if "no error" in message:
            message += traceback.format_exc()
    torch.save(
        {"message": message, "seconds": time.monotonic() - began}, Path(out) / f"rank{rank}.pt"
    )
    os._exit(0)  # the group is broken: skip destroy_process_group
