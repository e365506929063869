"""tb.save / tb.load / tb.state_dict / tb.from_state_dict: round trips, checks, and refusal of
files that carry code (issue 11)."""

from __future__ import annotations

import os
import pickle
from typing import NamedTuple

import pytest
import torch
from torch import nn

import tbfunc as tb
from helpers import CUDA, data, mlp, seeded

KEY = tb.random.key(0)
FAMILIES = [tb.PretrainedGaussianPosterior, tb.GaussianPosterior]


def posterior_of(family, dtype):
    net = mlp().to(dtype)
    if family is tb.GaussianPosterior:
        return net, tb.from_module(net, family, key=tb.random.key(3))
    return net, tb.from_module(net, sigma_scale=0.1)


def assert_same(loaded, post):
    assert list(loaded) == list(post)
    for name, node in post.items():
        assert type(loaded[name]) is type(node)
        for a, b in zip(loaded[name], node, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trips_keep_family_values_dtype_and_noise(tmp_path, family, dtype):
    net, post = posterior_of(family, dtype)
    assert list(tb.state_dict(post)) == [f"{n}.{f}" for n in post for f in ("mu", "rho")]
    assert_same(tb.from_state_dict(tb.state_dict(post), family=family), post)
    tb.save(post, tmp_path / "post.pt")
    loaded = tb.load(tmp_path / "post.pt", module=net)
    assert_same(loaded, post)
    x = data(3, 5, dtype=dtype)
    torch.testing.assert_close(
        tb.predict(net, loaded, KEY, x, num_samples=2),
        tb.predict(net, post, KEY, x, num_samples=2),
        rtol=0,
        atol=0,
    )


def test_non_contiguous_and_shared_tensors_survive(tmp_path):
    base = data(6, 4)
    shared = tb.PretrainedGaussianPosterior(base.T, torch.full((4, 6), -2.0))  # a transposed view
    post = {"encoder.weight": shared, "decoder.weight": shared}  # one node under two names
    tb.save(post, tmp_path / "tied.pt")
    loaded = tb.load(tmp_path / "tied.pt")
    assert_same(loaded, post)
    assert not loaded["encoder.weight"].mu.is_contiguous()
    assert loaded["encoder.weight"].mu.data_ptr() == loaded["decoder.weight"].mu.data_ptr()


def test_files_load_under_weights_only_and_map_location(tmp_path):
    _, post = posterior_of(tb.PretrainedGaussianPosterior, torch.float32)
    tb.save(post, tmp_path / "p.pt")
    raw = torch.load(tmp_path / "p.pt", weights_only=True)
    assert raw["format"] == "tbfunc.posterior" and raw["version"] == 1
    assert raw["families"] == dict.fromkeys(post, "PretrainedGaussianPosterior")
    on_meta = tb.load(tmp_path / "p.pt", map_location="meta")
    assert all(node.mu.device.type == "meta" for node in on_meta.values())


@CUDA
def test_cuda_round_trip_and_map_location(tmp_path):
    _, post = posterior_of(tb.PretrainedGaussianPosterior, torch.float32)
    gpu = {n: tb.PretrainedGaussianPosterior(p.mu.cuda(), p.rho.cuda()) for n, p in post.items()}
    tb.save(gpu, tmp_path / "g.pt")
    assert all(n.mu.is_cuda for n in tb.load(tmp_path / "g.pt").values())
    assert_same(tb.load(tmp_path / "g.pt", map_location="cpu"), post)


def test_load_against_a_module_lists_every_difference(tmp_path):
    _net, post = posterior_of(tb.PretrainedGaussianPosterior, torch.float32)
    tb.save(post, tmp_path / "p.pt")
    other = seeded(lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))).double()
    with pytest.raises(ValueError) as info:
        tb.load(tmp_path / "p.pt", module=other)
    message = str(info.value)
    assert message.startswith("posterior does not match Sequential: ")
    for part in (
        "0.weight.mu has shape (16, 5), the parameter (8, 5)",
        "0.weight.mu has dtype torch.float32, the parameter torch.float64",
        "2.bias.rho has dtype torch.float32",
    ):
        assert part in message
    with pytest.raises(ValueError, match=r"'0.weight' is not a parameter of Linear"):
        tb.load(tmp_path / "p.pt", module=seeded(lambda: nn.Linear(5, 16)))


class Marker:
    """Unpickling this writes a file: what an attacker's payload would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_file_that_tries_to_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "tbfunc.posterior", "version": 1, "x": Marker(str(marker))}, f)
    torch.save(
        {
            "format": "tbfunc.posterior",
            "version": 1,
            "families": {},
            "state_dict": {},
            "payload": Marker(str(marker)),
        },
        tmp_path / "evil2.pt",
    )
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(
            ValueError, match=rf"'{tmp_path / name}' was refused: it holds more than tensors"
        ):
            tb.load(tmp_path / name)
    assert not os.path.exists(marker)


class LaplaceNode(NamedTuple):
    """A user family: a Laplace posterior with location mu and log-scale."""

    mu: torch.Tensor
    log_b: torch.Tensor

    @classmethod
    def from_param(cls, param, **kwargs):
        return cls(param.detach().clone(), torch.full_like(param, -3.0))

    @property
    def sigma(self):
        return self.log_b.exp() * 2**0.5

    @property
    def distribution(self):
        return torch.distributions.Laplace(self.mu, self.log_b.exp())

    def sample(self, key):
        return self.mu + self.log_b.exp() * tb.random.normal(key, self.mu.shape)


def test_user_families_load_only_when_allowed(tmp_path):
    net = mlp()
    post = tb.from_module(net, LaplaceNode)
    assert list(tb.state_dict(post))[:2] == ["0.weight.mu", "0.weight.log_b"]
    tb.save(post, tmp_path / "laplace.pt")
    with pytest.raises(
        ValueError,
        match=r"family 'test_io.LaplaceNode' of node '0.weight' is not allowed: pass families=\[LaplaceNode\] to load it.",
    ):
        tb.load(tmp_path / "laplace.pt")
    loaded = tb.load(tmp_path / "laplace.pt", families=[LaplaceNode])
    assert_same(loaded, post)


def test_state_dict_errors():
    with pytest.raises(
        ValueError, match=r"state_dict key 'mu' must read '<parameter name>.<field>'"
    ):
        tb.from_state_dict({"mu": torch.zeros(2)})
    with pytest.raises(
        ValueError,
        match=r"state_dict node 'w' must have the fields \['mu', 'rho'\] of PretrainedGaussianPosterior, got \['mu'\].",
    ):
        tb.from_state_dict({"w.mu": torch.zeros(2)})
    with pytest.raises(
        TypeError, match=r"posterior\['w'\] must be a posterior node .*got a tensor"
    ):
        tb.state_dict({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="is not a tbfunc posterior file"):
        path = "not-a-posterior.pt"
        torch.save({"a": torch.zeros(1)}, path)
        try:
            tb.load(path)
        finally:
            os.remove(path)
