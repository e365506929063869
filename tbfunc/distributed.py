"""Beyond one process: sharded Monte-Carlo prediction and per-rank keys on ``torch.distributed``.

Explicit keys make multi-process runs exact. Sample ``i`` of a prediction uses
``split(key, S)[i]`` on whichever rank computes it, so a sharded prediction equals the
single-process one; in data-parallel training every rank draws its weights with
``rank_key(step_key)`` and the run is reproducible for a given world size.

Data-parallel training (DDP over ``tb.PosteriorModule``, or any all-reduce of gradients). With
``N`` points in the data set, ``R`` ranks, rank ``r`` holding a shard ``B_r`` of ``B`` points
(the same ``B`` on every rank, as ``torch.utils.data.DistributedSampler`` arranges) and drawing
``w_r ~ q`` with its own key, each rank's loss is
``L_r = (1/B) sum_{i in B_r} -log p(y_i | x_i, w_r) + KL(q || p) / N``: ``nelbo`` with
``num_data=N``. DDP averages the gradients: ``grad (1/R) sum_r L_r``. Over the draws (each
``w_r`` is an unbiased reparametrised draw) and the shards (a uniform sample of ``R B`` points),
``E[(1/R) sum_r (1/B) sum_{i in B_r} -log p(y_i | x_i, w_r)] = (1/N) sum_i E_q[-log p(y_i | x_i,
w)]``, and the KL term is the same on every rank, so the averaged gradient is an unbiased
estimate of the gradient of ``-ELBO / N``, the objective of the single-process ``nelbo``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import Tensor, nn

from tbfunc import _threefry, random
from tbfunc._checks import check_key, check_positive_int, fail
from tbfunc._concurrency import exclusive
from tbfunc._forward import Strategy
from tbfunc._predicting import check_args, choose, predict_keys, prepare
from tbfunc._rng_guard import rng_guard

__all__ = ["predict", "rank_key", "shard"]

_STRATEGIES = ("vmap", "loop")


def rank_key(key: Tensor, *, group: dist.ProcessGroup | None = None) -> Tensor:
    """``fold_in(key, rank)``: this process's key for a step of data-parallel training.

    Every rank draws different weights, and rank ``r`` draws the same ones in every run.
    """
    key = check_key(key)
    _check_initialized("rank_key")
    return random.fold_in(key, dist.get_rank(group))


def shard(
    count: int,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> range:
    """The contiguous block of ``range(count)`` that ``rank`` owns.

    Blocks differ in size by at most one, the first ``count % world_size`` ranks taking one
    more; ``rank`` and ``world_size`` default to the process group's. Use it for samples (as
    ``predict`` does) or for a recipe of data shards without a sampler.
    """
    count = int(check_positive_int(count, "count"))
    if rank is None or world_size is None:
        _check_initialized("shard")
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size
    world_size = check_positive_int(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, int):
        fail("rank", "an int", rank, error=TypeError)
    if not 0 <= rank < world_size:
        fail("rank", f"in [0, {world_size})", rank)
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def predict(
    module: nn.Module,
    posterior: dict[str, Any],
    key: Tensor,
    args: Any,
    kwargs: dict[str, Any] | None = None,
    *,
    num_samples: int,
    chunk_size: int | None = None,
    strategy: Strategy = "auto",
    dropout: bool = False,
    group: dist.ProcessGroup | None = None,
) -> Any:
    """``tb.predict`` with the samples split across the ranks of ``group``, on every rank.

    Every rank must call it with the same module weights, posterior, key and inputs. Rank
    ``r`` computes the samples ``shard(num_samples)`` (sample ``i`` keyed by
    ``split(key, num_samples)[i]``), and an all-gather returns the whole stacked output on every
    rank: on the CPU bit for bit the single-process ``tb.predict`` with the same strategy.
    ``"auto"`` is decided on rank 0 and broadcast, so all ranks run the same code; it is the
    choice ``tb.predict`` caches on rank 0, but a timed choice made in another process may
    differ, and vmap and the loop agree only to rounding.

    No gradients flow through the gather. If a rank fails, every rank raises (an agreement
    step precedes the gather), naming the ranks that failed; a rank that dies makes the
    others' collective fail within the process group's ``timeout`` (set it in
    ``init_process_group``) with an error that says so.
    """
    key, count, chunk = check_args(key, num_samples, chunk_size, strategy)
    _check_initialized("distributed.predict")
    with exclusive(module):  # one call at a time per module (_concurrency)
        names, device = prepare(module, posterior, args, kwargs, "distributed.predict", dropout)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        keys = _threefry.split(key, count)
        mine = shard(count, rank=rank, world_size=world)
        error: BaseException | None = None
        local: Any = None
        with rng_guard("distributed.predict", device):
            try:
                chosen: str = strategy
                if strategy == "auto":
                    # the probe size of tb.predict: the same cached choice in the same process
                    picked = choose(
                        module, posterior, names, args, kwargs, min(chunk, count), dropout
                    )
                    chosen = _broadcast_choice(picked, group)
                # a rank without samples still runs one, to know the output's structure
                rows = keys[mine.start : mine.stop] if len(mine) else keys[:1]
                local = predict_keys(
                    module,
                    posterior,
                    names,
                    rows,
                    args,
                    kwargs,
                    chunk,
                    chosen,
                    "distributed.predict",
                    dropout,
                )
            except Exception as caught:  # every rank must hear of it before the gather
                error = caught
                if isinstance(caught, _CollectiveError):
                    raise
    failed = _failed_ranks(error is None, group, world)
    if failed:
        if error is not None:
            raise error
        raise RuntimeError(
            f"distributed.predict: rank(s) {failed} failed (their own error says why); "
            f"rank {rank} stops too."
        )
    return _gather(local, len(mine), -(-count // world), count, group, world)


class _CollectiveError(RuntimeError):
    pass


def _check_initialized(entry: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{entry} needs torch.distributed: call torch.distributed.init_process_group(...) "
            "first (e.g. under torchrun)."
        )


def _collective(what: str, call: Any) -> Any:
    try:
        return call()
    except RuntimeError as error:
        raise _CollectiveError(
            f"distributed.predict: the {what} failed ({str(error).splitlines()[0]}); another "
            "rank probably died or timed out."
        ) from error


def _broadcast_choice(picked: str, group: dist.ProcessGroup | None) -> str:
    code = torch.tensor([_STRATEGIES.index(picked)])
    src = dist.get_global_rank(group, 0) if group is not None else 0
    _collective("strategy broadcast", lambda: dist.broadcast(code, src=src, group=group))
    return _STRATEGIES[int(code)]


def _failed_ranks(ok: bool, group: dist.ProcessGroup | None, world: int) -> list[int]:
    flags = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    mine = torch.tensor([int(ok)])
    _collective("agreement step", lambda: dist.all_gather(flags, mine, group=group))
    return [r for r, flag in enumerate(flags) if not int(flag)]


def _gather(
    local: Any, rows: int, most: int, count: int, group: dist.ProcessGroup | None, world: int
) -> Any:
    """All-gather each tensor leaf, padded to ``most`` rows, and stitch the shards in order."""
    leaves, spec = pytree.tree_flatten(local)
    sizes = [len(shard(count, rank=r, world_size=world)) for r in range(world)]
    joined = []
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            joined.append(leaf)
            continue
        padded = leaf.new_zeros((most, *leaf.shape[1:]))
        padded[:rows] = leaf[:rows].detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        _collective("all-gather", lambda p=parts, t=padded: dist.all_gather(p, t, group=group))
        joined.append(torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]))
    return pytree.tree_unflatten(joined, spec)
