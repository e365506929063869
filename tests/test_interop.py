"""tb.interop against the real peers: torchbayesian 0.2.1 and posteriors 0.1.3 (issue 11)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tbfunc as tb
from helpers import data, mlp, seeded
from tbfunc import testing
from tbfunc._sampling import hash32

KEY = tb.random.key(0)
bnn = pytest.importorskip("torchbayesian.bnn")


def bayesian(net, kind):
    with torch.random.fork_rng():  # torchbayesian draws its initial values from the global RNG
        torch.manual_seed(1)
        return bnn.BayesianModule(net, variational_posterior=kind)


@pytest.mark.parametrize(
    ("kind", "family"),
    [("normal", tb.GaussianPosterior), ("pretrained_normal", tb.PretrainedGaussianPosterior)],
)
def test_from_torchbayesian_keeps_names_values_and_family(kind, family):
    twin = bayesian(mlp(), kind)
    post = tb.interop.from_torchbayesian(twin)
    assert list(post) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    state = twin.state_dict()
    for name, node in post.items():
        path, _, leaf = name.rpartition(".")
        stem = f"module.{path}.reparametrizations.{leaf}.variational_posterior"
        assert type(node) is family
        assert torch.equal(node.mu, state[f"{stem}.mu"]) and torch.equal(
            node.rho, state[f"{stem}.rho"]
        )
    from_dict = tb.interop.from_torchbayesian(state)
    assert all(type(n) is tb.PretrainedGaussianPosterior for n in from_dict.values())
    assert all(torch.equal(from_dict[n].rho, post[n].rho) for n in post)
    bare = bayesian(seeded(lambda: nn.Linear(3, 2)), kind)
    assert list(tb.interop.from_torchbayesian(bare.state_dict())) == ["weight", "bias"]


def test_to_torchbayesian_and_back_and_same_predictions_for_the_same_noise(monkeypatch):
    net = mlp()
    post = tb.from_module(net, sigma_scale=0.2)
    before = {n: p.clone() for n, p in net.named_parameters()}
    twin = tb.interop.to_torchbayesian(net, post)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())  # net untouched
    back = tb.interop.from_torchbayesian(twin)
    for name in post:
        assert torch.equal(back[name].mu, post[name].mu) and torch.equal(
            back[name].rho, post[name].rho
        )
    # torchbayesian draws eps with torch.randn_like(mu): hand it tbfunc's noise for this key
    owners = {
        id(sub.mu): name
        for name in post
        for sub in [
            twin.module.get_submodule(name.rpartition(".")[0])
            .reparametrizations[name.rpartition(".")[2]]
            .variational_posterior
        ]
    }
    noise = {n: tb.random.normal(tb.random.fold_in(KEY, hash32(n)), post[n].mu.shape) for n in post}
    monkeypatch.setattr(torch, "randn_like", lambda t, **_: noise[owners[id(t)]])
    x = data(6, 5)
    torch.testing.assert_close(twin(x), tb.functional_call(net, post, KEY, x), rtol=1e-6, atol=1e-6)


def test_to_torchbayesian_refuses_what_it_cannot_hold():
    net = mlp()
    with pytest.raises(
        ValueError,
        match=r"posterior must cover every parameter .* got none for \['0.bias', '2.bias'\]",
    ):
        tb.interop.to_torchbayesian(net, tb.from_module(net, include="*.weight"))
    mixed = {
        **tb.from_module(net),
        "0.bias": tb.GaussianPosterior(torch.zeros(16), torch.zeros(16)),
    }
    with pytest.raises(ValueError, match="posterior must hold one family"):
        tb.interop.to_torchbayesian(net, mixed)
    with pytest.raises(ValueError, match="source holds no torchbayesian posterior"):
        tb.interop.from_torchbayesian(net.state_dict())


def posteriors_package():
    with warnings.catch_warnings():  # tensordict warns about its own future at import
        warnings.simplefilter("ignore")
        ps = pytest.importorskip("posteriors")
        torchopt = pytest.importorskip("torchopt")
    return ps, torchopt


def test_posteriors_vi_diag_runs_on_the_converted_state():
    ps, torchopt = posteriors_package()
    net = mlp()
    post = tb.from_module(net, sigma_scale=0.2)
    params, log_sd = tb.interop.to_posteriors(post)
    state = ps.vi.diag.init(params, torchopt.adam(lr=1e-3), init_log_sds=log_sd)
    for name, node in post.items():
        assert torch.equal(state.params[name], node.mu)
        torch.testing.assert_close(state.log_sd_diag[name].exp(), node.sigma, rtol=1e-6, atol=0)
    with torch.random.fork_rng():  # posteriors samples from the global RNG
        torch.manual_seed(0)
        draws = ps.vi.diag.sample(state, (4000,))
    for name, node in post.items():
        testing.assert_moments(draws[name], node.mu, node.sigma, fail_prob=1e-6)
    back = tb.interop.from_posteriors(state.params, state.log_sd_diag)
    for name, node in post.items():
        assert torch.equal(back[name].mu, node.mu)
        torch.testing.assert_close(back[name].rho, node.rho, rtol=1e-5, atol=1e-6)


def test_from_posteriors_is_stable_for_tiny_and_large_sigma():
    log_sd = torch.tensor([-300.0, -150.0, -25.0, -3.0, 0.0, 5.0])
    post = tb.interop.from_posteriors({"w": torch.zeros(6)}, {"w": log_sd})
    rho = post["w"].rho
    assert torch.isfinite(rho).all()
    torch.testing.assert_close(tb.kl.log_softplus(rho), log_sd, rtol=1e-5, atol=1e-5)
    _params, back = tb.interop.to_posteriors(post)
    torch.testing.assert_close(back["w"], log_sd, rtol=1e-5, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"log_sd_diag\['w'\] has shape \(2,\) but params\['w'\] has shape \(6,\)"
    ):
        tb.interop.from_posteriors({"w": torch.zeros(6)}, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="params and log_sd_diag must have the same names"):
        tb.interop.from_posteriors({"w": torch.zeros(6)}, {"v": torch.zeros(6)})
