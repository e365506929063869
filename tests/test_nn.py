"""PosteriorModule: the nn.Module view for optimizers, checkpoints, compile and DDP (issue 11)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tbfunc as tb
from helpers import data, mlp

KEY = tb.random.key(0)
HERE = Path(__file__).resolve().parent


def view_of(net=None):
    net = net or mlp()
    post = tb.from_module(net, sigma_scale=0.1)
    return net, post, tb.PosteriorModule(net, post)


def test_parameters_are_the_posterior_and_the_base_module_is_untouched():
    net, post, view = view_of()
    before = {n: p.clone() for n, p in net.named_parameters()}
    names = [n for n, _ in view.named_parameters()]
    assert names == [
        "0:weight:mu",
        "0:weight:rho",
        "0:bias:mu",
        "0:bias:rho",
        "2:weight:mu",
        "2:weight:rho",
        "2:bias:mu",
        "2:bias:rho",
    ]
    assert list(view.state_dict()) == list(tb.state_dict(post))
    tree = view.posterior()
    for name, node in post.items():
        assert tree[name].mu.data_ptr() == node.mu.data_ptr()  # no copy, either way
        assert type(tree[name]) is type(node)
    assert view.module is net and not list(view.children())
    x = data(4, 5)
    torch.testing.assert_close(
        view(x, key=KEY), tb.functional_call(net, post, KEY, x), rtol=0, atol=0
    )
    view.double()
    assert all(p.dtype == torch.float64 for p in view.parameters())
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_optimizer_steps_reach_the_pure_tree_and_the_conveniences_agree():
    net, post, view = view_of()
    x, y = data(8, 5), torch.arange(8) % 3
    torch.testing.assert_close(view.kl_divergence(), tb.kl_divergence(post))
    torch.testing.assert_close(
        view.kl_divergence(tb.GaussianPrior(0.0, 0.1), reduction="mean"),
        tb.kl_divergence(post, tb.GaussianPrior(0.0, 0.1), reduction="mean"),
    )
    options = dict(loss_fn=F.cross_entropy, num_data=80, num_samples=2)
    torch.testing.assert_close(
        view.nelbo(KEY, x, y, **options), tb.nelbo(net, post, KEY, x, y, **options)
    )
    opt = torch.optim.SGD(view.parameters(), lr=0.1)
    start = post["2.weight"].mu.clone()
    view.nelbo(KEY, x, y, **options).backward()
    assert view.get_parameter("2:weight:rho").grad is not None
    opt.step()
    assert not torch.equal(post["2.weight"].mu, start)  # the tree shares the parameters' storage
    assert torch.equal(view.posterior()["2.weight"].mu, post["2.weight"].mu)


def test_state_dict_round_trip_through_torch_save(tmp_path):
    _, _, view = view_of()
    torch.save(view.state_dict(), tmp_path / "view.pt")
    _, _, fresh = view_of(mlp(seed=5))
    assert not torch.equal(fresh.get_parameter("0:weight:mu"), view.get_parameter("0:weight:mu"))
    fresh.load_state_dict(torch.load(tmp_path / "view.pt", weights_only=True))
    for a, b in zip(fresh.parameters(), view.parameters(), strict=True):
        assert torch.equal(a, b)
    assert tb.from_state_dict(fresh.state_dict()).keys() == view.posterior().keys()
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "0.weight.rho"'):
        fresh.load_state_dict({k: v for k, v in view.state_dict().items() if k != "0.weight.rho"})


def test_compiled_view_equals_eager():
    _, _, view = view_of()
    x = data(4, 5)
    compiled = torch.compile(view, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, key=KEY), view(x, key=KEY), rtol=1e-6, atol=1e-6)


def test_names_that_cannot_be_encoded_are_refused():
    net = mlp()
    post = tb.from_module(net)
    with pytest.raises(ValueError, match=r"posterior\['a:b'\] names no parameter"):
        tb.PosteriorModule(net, {"a:b": post["0.bias"]})
    with pytest.raises(TypeError, match=r"posterior\['0.bias'\] must be a posterior node"):
        tb.PosteriorModule(net, {"0.bias": torch.zeros(16)})


def test_a_checkpointed_run_restarted_in_new_processes_is_bit_identical(tmp_path):
    """Steps 0-5 in one process against 0-2, a checkpoint, and 3-5 in a fresh process."""

    def job(*args):
        subprocess.run(
            [sys.executable, str(HERE / "checkpoint_job.py"), *map(str, args)],
            check=True,
            cwd=HERE,
            timeout=120,
        )

    job(0, 6, tmp_path / "whole.pt")
    job(0, 3, tmp_path / "half.pt")
    job(3, 6, tmp_path / "resumed.pt", tmp_path / "half.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)["posterior"]
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)["posterior"]
    half = torch.load(tmp_path / "half.pt", weights_only=True)["posterior"]
    assert list(whole) == list(resumed)
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert not torch.equal(whole["0.weight.mu"], half["0.weight.mu"])
