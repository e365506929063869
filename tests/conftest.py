"""Shared fixtures: a deterministic hypothesis profile, seeded modules, CUDA skipping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

# derandomize: the same examples every run, so CI never flakes; print_blob shows how to replay.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def global_rng_untouched():
    """Every test leaves the global RNG as it found it: tbfunc never reads nor advances it."""
    before = torch.get_rng_state()
    cuda_before = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    yield
    assert torch.equal(torch.get_rng_state(), before), "the global CPU RNG state changed"
    if cuda_before is not None:
        after = torch.cuda.get_rng_state_all()
        assert all(torch.equal(a, b) for a, b in zip(after, cuda_before, strict=False)), (
            "CUDA RNG changed"
        )
