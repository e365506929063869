"""tb.empirical_prior: the closed-form ELBO-maximising prior scale, per node and per layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tbfunc as tb
from helpers import data, mlp


def _net() -> nn.Module:
    return mlp((4, 6, 3))


def _posterior(net: nn.Module, sigma: float = 0.05) -> dict:
    return tb.from_module(net, sigma=sigma)


def test_scale_is_the_closed_form_and_maximises_the_elbo():
    # the mistake caught: a missing sigma^2 term, a sum instead of a mean, or sqrt forgotten
    net = _net()
    post = _posterior(net)
    prior = tb.empirical_prior(post)
    for name, node in post.items():
        expected = (node.mu.double() ** 2 + node.sigma.double() ** 2).mean().sqrt()
        assert float(prior[name].sigma) == pytest.approx(float(expected), rel=1e-6)
        # KL(q || N(0, s^2)) is minimal at s*: larger and smaller scales both cost more
        best = float(tb.kl_divergence({name: node}, prior[name]))
        for factor in (0.9, 0.99, 1.01, 1.1):
            other = tb.GaussianPrior(0.0, prior[name].sigma * factor)
            assert float(tb.kl_divergence({name: node}, other)) > best


def test_centres_come_from_the_given_prior_and_its_scale_is_ignored():
    net = _net()
    post = _posterior(net, sigma=0.05)
    centred = tb.empirical_prior(post, tb.pretrained_prior(net, post, sigma=3.0))
    for name, node in post.items():
        # mu == w0, so only the posterior's own spread remains: s = 0.05 exactly
        assert float(centred[name].sigma) == pytest.approx(0.05, rel=1e-5)
        assert torch.equal(centred[name].mu, node.mu)
    shifted = {name: tb.GaussianPrior(1.0, 7.0) for name in post}
    far = tb.empirical_prior(post, shifted)
    near = tb.empirical_prior(post)
    for name in post:  # centres at 1 are farther from these means than 0 is
        assert float(far[name].sigma) > float(near[name].sigma)
        assert far[name].mu == 1.0


def test_the_scale_follows_the_posterior_in_both_directions():
    net = _net()
    post = _posterior(net, sigma=0.05)
    wide = {n: p._replace(rho=p.rho + 2.0) for n, p in post.items()}
    narrow = {n: p._replace(mu=p.mu * 0.1, rho=p.rho - 2.0) for n, p in post.items()}
    base, up, down = (tb.empirical_prior(t) for t in (post, wide, narrow))
    for name in post:
        assert float(up[name].sigma) > float(base[name].sigma) > float(down[name].sigma)


def test_per_layer_pools_the_weight_and_bias_of_one_module():
    net = _net()
    post = _posterior(net)
    layer = tb.empirical_prior(post, per="layer")
    node = tb.empirical_prior(post, per="node")
    assert float(layer["0.weight"].sigma) == float(layer["0.bias"].sigma)
    assert float(layer["0.weight"].sigma) != float(layer["2.weight"].sigma)
    assert float(node["0.weight"].sigma) != float(node["0.bias"].sigma)
    pooled = torch.cat([(p.mu**2 + p.sigma**2).flatten() for n, p in post.items() if n[0] == "0"])
    assert float(layer["0.bias"].sigma) == pytest.approx(float(pooled.mean().sqrt()), rel=1e-6)


def test_floor_guards_against_collapse_and_no_gradient_flows():
    net = _net()
    post = {
        n: p._replace(mu=torch.zeros_like(p.mu), rho=torch.full_like(p.rho, -30.0))
        for n, p in tb.from_module(net).items()
    }
    floored = tb.empirical_prior(post, min_sigma=0.02)
    assert all(float(p.sigma) == pytest.approx(0.02) for p in floored.values())
    live = {n: p._replace(mu=p.mu.requires_grad_()) for n, p in _posterior(net).items()}
    assert not tb.empirical_prior(live)["0.weight"].sigma.requires_grad


def test_usable_in_nelbo_and_equal_to_the_hand_written_prior():
    net = _net().eval()
    post = _posterior(net)
    x, y, key = data(5, 4), torch.tensor([0, 1, 2, 1, 0]), tb.random.key(1)
    prior = tb.empirical_prior(post)
    by_hand = {n: tb.GaussianPrior(0.0, float(p.sigma)) for n, p in prior.items()}
    kwargs = dict(loss_fn=nn.functional.cross_entropy, num_data=50)
    assert float(tb.nelbo(net, post, key, x, y, prior=prior, **kwargs)) == pytest.approx(
        float(tb.nelbo(net, post, key, x, y, prior=by_hand, **kwargs)), rel=1e-6
    )


def test_bad_input_names_the_argument():
    net = _net()
    post = _posterior(net)
    with pytest.raises(ValueError, match=r"per must be 'node' or 'layer', got str 'element'"):
        tb.empirical_prior(post, per="element")
    with pytest.raises(ValueError, match=r"min_sigma must be a positive float, got float 0.0"):
        tb.empirical_prior(post, min_sigma=0.0)
    with pytest.raises(TypeError, match=r"prior must be a tb.GaussianPrior or a dict of them"):
        tb.empirical_prior(post, tb.LaplacePrior())
    with pytest.raises(TypeError, match=r"prior\['0.weight'\] must be a tb.GaussianPrior"):
        tb.empirical_prior(post, {n: tb.LaplacePrior() for n in post})
    with pytest.raises(ValueError, match=r"prior has no entry for posterior names \['2.bias'\]"):
        tb.empirical_prior(post, {n: tb.GaussianPrior() for n in list(post)[:3]})
    with pytest.raises(TypeError, match=r"posterior must be a non-empty dict"):
        tb.empirical_prior({})
    with pytest.raises(TypeError, match=r"posterior\['w'\] must be a Gaussian posterior node"):
        tb.empirical_prior({"w": torch.zeros(3)})
