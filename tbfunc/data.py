"""``KeyedSampler``: a DataLoader order that is a function of a key and the epoch, so a run
resumed from a checkpoint sees the batches an uninterrupted run sees, and the global RNG is
never read (``shuffle=True`` draws from it, or from a generator whose state no checkpoint
keeps)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor
from torch.utils.data import Sampler

from tbfunc import random
from tbfunc._checks import check_key, fail

__all__ = ["KeyedSampler"]


class KeyedSampler(Sampler[int]):
    """A permutation of ``range(num_data)`` per epoch: the argsort of
    ``tb.random.normal(fold_in(key, epoch), (num_data,))``.

    Pass it as ``DataLoader(dataset, sampler=KeyedSampler(len(dataset), key))`` and call
    ``set_epoch(epoch)`` at the start of each epoch (Lightning's ``Trainer`` does, as for a
    ``DistributedSampler``); ``shuffle=False`` keeps the order ``range(num_data)``.
    """

    def __init__(self, num_data: int, key: Tensor, *, shuffle: bool = True) -> None:
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            fail("num_data", "a positive int (the data set's length)", num_data)
        if not isinstance(shuffle, bool):
            fail("shuffle", "a bool", shuffle, error=TypeError)
        self.num_data = num_data
        self.key = check_key(key)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` gives."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            fail("epoch", "a non-negative int", epoch)
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_data))
        noise = random.normal(random.fold_in(self.key, self.epoch), (self.num_data,))
        return iter(noise.argsort(stable=True).tolist())

    def __len__(self) -> int:
        return self.num_data
