"""KL divergence: references from torch.distributions and torchbayesian, Monte Carlo, stability."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tbfunc as tb
from helpers import data, mlp, torchbayesian_twin
from tbfunc import testing
from tbfunc.kl import log_softplus

KEY = tb.random.key(0)


def posterior_with_random_rho(net, dtype=torch.float64):
    post = tb.from_module(net.to(dtype))
    return {
        name: tb.PretrainedGaussianPosterior(
            node.mu, -2 + data(*node.mu.shape, seed=i, dtype=dtype)
        )
        for i, (name, node) in enumerate(post.items())
    }


def torch_kl(post, prior_of):
    return sum(
        torch.distributions.kl_divergence(node.distribution, prior_of(name, node)).sum()
        for name, node in post.items()
    )


def test_closed_form_matches_torch_distributions():
    post = posterior_with_random_rho(mlp())
    normal = torch.distributions.Normal
    torch.testing.assert_close(
        tb.kl_divergence(post), torch_kl(post, lambda n, p: normal(0.0, 1.0))
    )
    shifted = tb.GaussianPrior(0.3, 0.5)
    torch.testing.assert_close(
        tb.kl_divergence(post, shifted), torch_kl(post, lambda n, p: normal(0.3, 0.5))
    )
    net = mlp().double()
    centred = tb.pretrained_prior(net, post, sigma=0.2)
    params = dict(net.named_parameters())
    torch.testing.assert_close(
        tb.kl_divergence(post, centred),
        torch_kl(post, lambda n, p: normal(params[n].detach(), 0.2)),
    )
    total = sum(node.mu.numel() for node in post.values())
    torch.testing.assert_close(
        tb.kl_divergence(post, shifted, reduction="mean"), tb.kl_divergence(post, shifted) / total
    )


def test_per_node_priors():
    post = posterior_with_random_rho(mlp())
    priors = {name: tb.GaussianPrior(0.0, 1.0 + i) for i, name in enumerate(post)}
    expected = sum(tb.kl_divergence(post[n], priors[n]) for n in post)
    torch.testing.assert_close(tb.kl_divergence(post, priors), expected)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("prior", [(0.0, 1.0), (0.1, 0.5)])
def test_matches_torchbayesian(reduction, prior):
    net = mlp((4, 6, 3))
    post = posterior_with_random_rho(net, dtype=torch.float32)
    twin, _ = torchbayesian_twin(net, post, ("normal", {"mu": prior[0], "sigma": prior[1]}))
    expected = twin.kl_divergence(reduction=reduction)
    ours = tb.kl_divergence(post, tb.GaussianPrior(*prior), reduction=reduction)
    torch.testing.assert_close(ours, expected.detach(), rtol=1e-5, atol=0)


def test_laplace_closed_form_against_monte_carlo():
    post = posterior_with_random_rho(mlp((3, 4, 2)))
    prior = tb.LaplacePrior(0.1, 0.7)
    exact = tb.kl_divergence(post, prior)
    check_monte_carlo(post, prior, exact, warns=True)


def test_scale_mixture_monte_carlo_against_quadrature():
    post = posterior_with_random_rho(mlp((2, 3, 2)))
    prior = tb.ScaleMixturePrior(0.25, 1.0, math.exp(-3))
    # reference: the KL integral per element by the trapezoid rule on a fine grid
    exact = torch.zeros((), dtype=torch.float64)
    for node in post.values():
        mu, sigma = node.mu.reshape(-1, 1), node.sigma.reshape(-1, 1)
        grid = mu + sigma * torch.linspace(-12, 12, 20001, dtype=torch.float64)
        log_q = torch.distributions.Normal(mu, sigma).log_prob(grid)
        integrand = log_q.exp() * (log_q - prior.log_prob(grid))
        exact = exact + torch.trapezoid(integrand, grid, dim=-1).sum()
    check_monte_carlo(post, prior, exact, warns=False)


def check_monte_carlo(post, prior, exact, *, warns):
    """MC KL with S draws is within z * sd / sqrt(S) of the exact value, z at fail_prob 1e-6;
    sd is estimated from per-draw values made with an independent key."""
    draws = tb.sample(post, tb.random.key(99), num_samples=2000)
    per_draw = sum(
        (post[n].distribution.log_prob(draws[n]) - prior.log_prob(draws[n])).flatten(1).sum(1)
        for n in post
    )
    sd = per_draw.std().item()
    count = 4000
    if warns:
        with pytest.warns(UserWarning, match="a closed form exists"):
            estimate = tb.kl_divergence(post, prior, key=KEY, num_samples=count)
    else:
        estimate = tb.kl_divergence(post, prior, key=KEY, num_samples=count)
    bound = testing._two_sided_quantile(1e-6) * sd / math.sqrt(count)
    assert abs(estimate.item() - exact.item()) <= bound, (estimate.item(), exact.item(), bound)


@given(st.floats(-1e6, 1e6), st.floats(-1e3, 1e3))
def test_closed_form_finite_and_differentiable_in_float32(rho, mu):
    """log(softplus(rho)) underflows at rho < -103 in float32; tbfunc takes log sigma from rho."""
    node = tb.PretrainedGaussianPosterior(
        torch.tensor([mu], requires_grad=True), torch.tensor([rho], requires_grad=True)
    )
    for prior in (tb.GaussianPrior(), tb.LaplacePrior()):
        kl = tb.kl_divergence(node, prior)
        mu_grad, rho_grad = torch.autograd.grad(kl, [node.mu, node.rho])
        assert (
            torch.isfinite(kl) and torch.isfinite(mu_grad).all() and torch.isfinite(rho_grad).all()
        )


def test_very_negative_rho_values():
    rho = torch.tensor([-100.0, -200.0, -1e4])
    assert torch.equal(log_softplus(rho), rho)  # log(softplus(rho)) = rho to float32 precision
    wide = torch.tensor([-100.0, -30.0, -19.0, -5.0, 0.0, 30.0], dtype=torch.float64)
    torch.testing.assert_close(log_softplus(wide), torch.log(torch.log1p(torch.exp(wide))))
    # the KL keeps its -log(sigma) = -rho term instead of turning infinite
    kl = tb.kl_divergence(tb.PretrainedGaussianPosterior(torch.zeros(1), torch.tensor([-200.0])))
    torch.testing.assert_close(kl, torch.tensor(200.0 - 0.5))


def test_gradcheck_float64():
    post = posterior_with_random_rho(mlp((2, 3, 2)))
    names = list(post)

    def kl(*tensors):
        tree = {
            n: tb.PretrainedGaussianPosterior(tensors[2 * i], tensors[2 * i + 1])
            for i, n in enumerate(names)
        }
        return (
            tb.kl_divergence(tree, tb.GaussianPrior(0.1, 0.8)),
            tb.kl_divergence(tree, tb.LaplacePrior(0.0, 0.5)),
            tb.kl_divergence(tree, tb.ScaleMixturePrior(0.5, 1.0, 0.1), key=KEY, num_samples=3),
        )

    inputs = tuple(t.detach().clone().requires_grad_() for n in names for t in post[n])
    assert torch.autograd.gradcheck(kl, inputs)


def test_kl_errors():
    post = tb.from_module(mlp())
    with pytest.raises(
        ValueError,
        match=r"prior must have exactly the posterior's names, got missing \['2.bias'\]; extra \['head.bias'\]",
    ):
        tb.kl_divergence(
            post,
            {
                "0.weight": tb.GaussianPrior(),
                "0.bias": tb.GaussianPrior(),
                "2.weight": tb.GaussianPrior(),
                "head.bias": tb.GaussianPrior(),
            },
        )
    with pytest.raises(
        ValueError,
        match=r"no closed-form KL for PretrainedGaussianPosterior vs ScaleMixturePrior: pass key= and num_samples=",
    ):
        tb.kl_divergence(post, tb.ScaleMixturePrior(0.5, 1.0, 0.1))
    with pytest.raises(
        ValueError,
        match="key and num_samples must be given together for a Monte-Carlo KL, got key=a key and num_samples=None",
    ):
        tb.kl_divergence(post, tb.ScaleMixturePrior(0.5, 1.0, 0.1), key=KEY)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean', got str 'avg'"):
        tb.kl_divergence(post, reduction="avg")
    with pytest.raises(
        TypeError,
        match=r"prior must be a prior \(e.g. tb.GaussianPrior\(\)\) or a dict of them, got str 'normal'",
    ):
        tb.kl_divergence(post, "normal")
    with pytest.raises(ValueError, match="prior.sigma must be positive, got float -1.0"):
        tb.kl_divergence(post, tb.GaussianPrior(0.0, -1.0))
    with pytest.raises(ValueError, match="pi must be in \\(0, 1\\), got float 1.5"):
        tb.kl_divergence(post, tb.ScaleMixturePrior(1.5, 1.0, 0.1), key=KEY, num_samples=2)
    with pytest.raises(
        ValueError, match=r"posterior names \['x'\] are not parameters of Sequential"
    ):
        tb.pretrained_prior(mlp(), {"x": post["0.bias"]})


def test_priors_match_torch_distributions():
    value = data(50, dtype=torch.float64)
    mixture = tb.ScaleMixturePrior(0.3, 1.5, 0.05)
    # the reference mixture holds its weights in float32
    torch.testing.assert_close(
        mixture.log_prob(value), mixture.distribution.log_prob(value).double(), rtol=1e-5, atol=1e-6
    )
    laplace = tb.LaplacePrior(0.2, 0.4)
    torch.testing.assert_close(
        laplace.log_prob(value), laplace.distribution.log_prob(value).double()
    )
    gauss = tb.GaussianPrior(0.2, 0.4)
    torch.testing.assert_close(gauss.log_prob(value), gauss.distribution.log_prob(value).double())


def test_gradcheck_with_learned_prior_parameters():
    """Gradients also reach a prior's own tensors (an empirical-Bayes or learned prior)."""
    mu, rho = data(3, 2, dtype=torch.float64), data(3, 2, seed=1, dtype=torch.float64) - 1

    def kl(mu, rho, prior_mu, prior_sigma):
        node = tb.PretrainedGaussianPosterior(mu, rho)
        return tb.kl_divergence(node, tb.GaussianPrior(prior_mu, prior_sigma))

    for prior_mu, prior_sigma in (
        (
            data(3, 2, seed=2, dtype=torch.float64),
            0.5 + data(3, 2, seed=3, dtype=torch.float64).abs(),
        ),
        (torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)),
        (data(1, 2, seed=4, dtype=torch.float64), torch.full((3, 1), 0.8, dtype=torch.float64)),
    ):
        inputs = tuple(t.clone().requires_grad_() for t in (mu, rho, prior_mu, prior_sigma))
        assert torch.autograd.gradcheck(kl, inputs)
