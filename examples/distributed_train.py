"""Data-parallel Bayes-by-Backprop and sharded Monte-Carlo prediction with torch.distributed.

    torchrun --standalone --nproc_per_node=2 examples/distributed_train.py

Every rank builds the same model (seeded), wraps its posterior in ``tb.PosteriorModule`` and
``DistributedDataParallel``, trains on its shard of each batch with its own weight draw
(``tb.distributed.rank_key``), and finally predicts with the samples split across the ranks
(``tb.distributed.predict``), which every rank receives whole. Gloo on the CPU, NCCL on GPUs.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tbfunc as tb


def data(key: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = tb.random.normal(key, (count, 8))
    return x, (x[:, :4].sum(1) > 0).long()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="global batch, split across ranks")
    parser.add_argument("--samples", type=int, default=32, help="MC samples for prediction")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    )
    with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    net = net.to(device).eval()
    view = tb.PosteriorModule(net, tb.from_module(net, sigma=0.01))
    model = nn.parallel.DistributedDataParallel(view)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    num_data = args.steps * args.batch  # every batch is new data: the data set seen in training
    key = tb.random.key(0)
    for step in range(args.steps):
        x, y = data(tb.random.fold_in(key, step), args.batch)
        mine = tb.distributed.shard(args.batch)  # this rank's rows of the global batch
        x, y = x[mine.start : mine.stop].to(device), y[mine.start : mine.stop].to(device)
        draw_key = tb.distributed.rank_key(tb.random.fold_in(key, 10**6 + step))
        logits = model(x, key=draw_key)
        loss = F.cross_entropy(logits, y) + view.kl_divergence() / num_data
        opt.zero_grad()
        loss.backward()  # DDP averages the ranks' gradients: an unbiased -ELBO/N gradient
        opt.step()
    x_test, y_test = data(tb.random.key(1), 500)
    with torch.no_grad():
        probs = tb.distributed.predict(
            net, view.posterior(), tb.random.key(2), x_test.to(device), num_samples=args.samples
        ).softmax(-1)
    accuracy = (probs.mean(0).argmax(-1).cpu() == y_test).float().mean().item()
    if rank == 0:
        print(f"world size {world}: test accuracy {accuracy:.3f} with {args.samples} samples")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
