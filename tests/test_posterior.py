"""Posterior nodes: construction, reference densities, reparametrised sampling, errors."""

from __future__ import annotations

import optree
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import given
from hypothesis import strategies as st

import tbfunc as tb
from helpers import data
from tbfunc import testing

FAMILIES = [tb.GaussianPosterior, tb.PretrainedGaussianPosterior]


def test_pretrained_from_param_defaults():
    param = torch.nn.Parameter(data(3, 4))
    post = tb.PretrainedGaussianPosterior.from_param(param)
    assert torch.equal(post.mu, param) and not post.mu.requires_grad
    assert post.mu.data_ptr() != param.data_ptr()  # a copy, not a view
    assert torch.equal(post.rho, torch.full((3, 4), -3.0))
    torch.testing.assert_close(post.sigma, F.softplus(torch.tensor(-3.0)).expand(3, 4))


def test_pretrained_sigma_options():
    param = data(4, 5, dtype=torch.float64)
    by_sigma = tb.PretrainedGaussianPosterior.from_param(param, sigma=0.25)
    torch.testing.assert_close(by_sigma.sigma, torch.full_like(param, 0.25))
    per_row = torch.linspace(0.1, 2.0, 4, dtype=torch.float64)[:, None]
    torch.testing.assert_close(
        tb.PretrainedGaussianPosterior.from_param(param, sigma=per_row).sigma,
        per_row.expand(4, 5),
    )
    scaled = tb.PretrainedGaussianPosterior.from_param(param, sigma_scale=0.1, sigma_floor=1e-4)
    torch.testing.assert_close(scaled.sigma, (0.1 * param.abs()).clamp_min(1e-4))
    zeros = tb.PretrainedGaussianPosterior.from_param(torch.zeros(3), sigma_scale=0.1)
    torch.testing.assert_close(zeros.sigma, torch.full((3,), 1e-3))
    tiny = tb.PretrainedGaussianPosterior.from_param(torch.zeros(2), sigma=1e-30)
    assert torch.isfinite(tiny.rho).all()
    assert torch.equal(
        tb.PretrainedGaussianPosterior.from_param(param, rho=torch.tensor(-1.0)).rho,
        torch.full_like(param, -1.0),
    )


def test_gaussian_from_param_draws_mu_with_the_key():
    param = torch.zeros(200, 50)
    post = tb.GaussianPosterior.from_param(param, key=tb.random.key(0))
    assert torch.equal(post.rho, torch.full_like(param, -3.0))
    assert torch.equal(post.mu, tb.GaussianPosterior.from_param(param, key=tb.random.key(0)).mu)
    testing.assert_moments(post.mu.reshape(-1, 1), 0.0, 0.1, fail_prob=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_distribution_matches_torch_normal(family):
    post = family(data(3, 2, dtype=torch.float64), data(3, 2, seed=1, dtype=torch.float64))
    value = data(3, 2, seed=2, dtype=torch.float64)
    reference = torch.distributions.Normal(post.mu, F.softplus(post.rho))
    torch.testing.assert_close(post.distribution.log_prob(value), reference.log_prob(value))
    torch.testing.assert_close(post.distribution.entropy(), reference.entropy())


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_is_reparametrised(family):
    post = family(data(3, dtype=torch.float64), data(3, seed=1, dtype=torch.float64))
    key = tb.random.key(4)
    eps = tb.random.normal(key, (3,), dtype=torch.float64)
    torch.testing.assert_close(post.sample(key), post.mu + post.sigma * eps)

    def draw(mu, rho):
        return family(mu, rho).sample(key)

    mu = post.mu.clone().requires_grad_()
    rho = post.rho.clone().requires_grad_()
    assert torch.autograd.gradcheck(draw, (mu, rho))


def test_reset_parameters():
    param = data(3)
    post = tb.PretrainedGaussianPosterior.from_param(param, rho=0.5)
    reset = post.reset_parameters()
    assert torch.equal(reset.mu, post.mu) and torch.equal(reset.rho, torch.full((3,), -3.0))
    torch.testing.assert_close(post.reset_parameters(sigma=0.2).sigma, torch.full((3,), 0.2))
    fresh = tb.GaussianPosterior.from_param(param, key=tb.random.key(0))
    redrawn = fresh.reset_parameters(key=tb.random.key(1), rho=-2.0)
    assert not torch.equal(redrawn.mu, fresh.mu)
    assert torch.equal(redrawn.rho, torch.full((3,), -2.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_nodes_are_pytrees_for_optree_and_torch(family):
    post = family(data(2), data(2, seed=1))
    assert isinstance(post, tb.VariationalPosterior)
    assert len(optree.tree_leaves(post)) == 2
    leaves, spec = pytree.tree_flatten({"w": post})
    assert len(leaves) == 2
    assert type(pytree.tree_unflatten(leaves, spec)["w"]) is family
    grads = torch.func.grad(lambda p: p.sample(tb.random.key(0)).sum())(post)
    assert type(grads) is family
    torch.testing.assert_close(grads.mu, torch.ones(2))


@given(
    testing.posteriors(
        shapes=st.sampled_from([(), (3,), (2, 2)]), mu=st.floats(-5, 5), rho=st.floats(-5, 3)
    ),
    testing.keys(),
)
def test_sample_moments_property(post, key):
    """Sampling statistics for arbitrary shapes, dtypes, mu and rho: 2,000 draws per element;
    each example fails with probability <= 1e-6 when the sampler is right."""
    draws = torch.stack([post.sample(k) for k in tb.random.split(key, 2000)])
    assert draws.dtype == post.mu.dtype
    testing.assert_moments(draws, post.mu, post.sigma, fail_prob=1e-6)


# -- errors -----------------------------------------------------------------------------------


def test_from_param_errors():
    P = tb.PretrainedGaussianPosterior
    with pytest.raises(
        TypeError,
        match="param must be a floating-point tensor, got a tensor of shape \\(3,\\), dtype torch.int64",
    ):
        P.from_param(torch.arange(3))
    with pytest.raises(
        TypeError, match="param must be a floating-point tensor, got an object of type list"
    ):
        P.from_param([1.0, 2.0])
    with pytest.raises(
        ValueError,
        match=r"rho must be a float or a tensor broadcastable to shape \(3, 4\), got a tensor of shape \(5,\)",
    ):
        P.from_param(torch.zeros(3, 4), rho=torch.zeros(5))
    with pytest.raises(
        ValueError,
        match=r"sigma must be a float or a tensor broadcastable to shape \(3,\), got a tensor of shape \(2, 3\)",
    ):
        P.from_param(torch.zeros(3), sigma=torch.ones(2, 3))
    with pytest.raises(
        ValueError, match="sigma must be positive and finite everywhere, got a minimum of 0.0"
    ):
        P.from_param(torch.zeros(3), sigma=0.0)
    with pytest.raises(
        ValueError, match="sigma must be positive and finite everywhere, got a minimum of -1.0"
    ):
        P.from_param(torch.zeros(3), sigma=torch.tensor([1.0, -1.0, 2.0]))
    with pytest.raises(
        ValueError, match="give at most one of rho, sigma and sigma_scale, got rho, sigma"
    ):
        P.from_param(torch.zeros(3), rho=-2.0, sigma=0.1)
    with pytest.raises(
        ValueError, match="sigma_scale must be a positive finite float, got float -0.1"
    ):
        P.from_param(torch.zeros(3), sigma_scale=-0.1)
    with pytest.raises(ValueError, match="rho must be finite, got float inf"):
        P.from_param(torch.zeros(3), rho=float("inf"))
    with pytest.raises(TypeError, match="key must be a key tensor, got an object of type NoneType"):
        tb.GaussianPosterior.from_param(torch.zeros(3), key=None)
    with pytest.raises(ValueError, match="key must be an int64 or uint32 tensor of shape"):
        P.from_param(torch.zeros(3)).sample(torch.zeros(2))


# -- planted bug: mu_std ignored ----------------------------------------------------------------


@pytest.mark.parametrize("mu_std", [0.0, 0.02, 0.5])
def test_mu_std_sets_the_spread_of_the_initial_mean(mu_std):
    """20,000 draws: the sample std of mu is within 3% of mu_std (the std of a sample std is
    mu_std / sqrt(2 n) = 0.5%: a 6-sigma band), and mu_std=0 gives zeros."""
    param = torch.empty(100, 200)
    made = tb.GaussianPosterior.from_param(param, key=tb.random.key(1), mu_std=mu_std)
    reset = made.reset_parameters(key=tb.random.key(2), mu_std=mu_std)
    for node in (made, reset):
        if mu_std == 0:
            assert torch.equal(node.mu, torch.zeros(100, 200))
        else:
            assert abs(node.mu.std().item() / mu_std - 1) < 0.03
            assert abs(node.mu.mean().item()) < 6 * mu_std / 141
    assert not torch.equal(made.mu, reset.mu) or mu_std == 0
