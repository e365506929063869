"""``tb.KeyedSampler``: a permutation per (key, epoch), nothing drawn from the global RNG."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import tbfunc as tb


def test_each_epoch_is_a_permutation_fixed_by_key_and_epoch():
    sampler = tb.KeyedSampler(50, tb.random.key(0))
    first = list(sampler)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert list(sampler) == first  # iterating again: the same epoch, the same order
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(50)) and second != first
    sampler.set_epoch(0)
    assert list(sampler) == first  # a resumed run that sets the epoch sees the same batches
    other = tb.KeyedSampler(50, tb.random.key(1))
    assert list(other) != first
    assert len(sampler) == 50
    plain = tb.KeyedSampler(5, tb.random.key(0), shuffle=False)
    plain.set_epoch(3)
    assert list(plain) == [0, 1, 2, 3, 4]


def test_a_dataloader_over_it_yields_every_example_once():
    x = torch.arange(23.0)
    loader = DataLoader(
        TensorDataset(x),
        batch_size=5,
        sampler=tb.KeyedSampler(23, tb.random.key(2)),
        generator=torch.Generator(),
    )
    seen = torch.cat([batch for (batch,) in loader])
    assert sorted(seen.tolist()) == x.tolist()


def test_bad_arguments_are_named():
    with pytest.raises(
        ValueError, match=r"num_data must be a positive int \(the data set's length\), got int 0"
    ):
        tb.KeyedSampler(0, tb.random.key(0))
    with pytest.raises(TypeError, match=r"key must be a key tensor"):
        tb.KeyedSampler(3, 7)
    with pytest.raises(TypeError, match=r"shuffle must be a bool, got str 'yes'"):
        tb.KeyedSampler(3, tb.random.key(0), shuffle="yes")
    with pytest.raises(ValueError, match=r"epoch must be a non-negative int, got int -1"):
        tb.KeyedSampler(3, tb.random.key(0)).set_epoch(-1)
