"""Regression end to end: Gaussian likelihoods for nelbo, and the mixture metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

import tbfunc as tb
from helpers import data, mlp

m = tb.metrics


def test_homoscedastic_likelihood_is_the_normal_log_density_summed_over_outputs():
    lik = tb.GaussianLikelihood.from_noise(0.7, shape=(2,))
    out, y = data(5, 2, seed=1), data(5, 2, seed=2)
    expected = Normal(out, torch.tensor(0.7)).log_prob(y).sum(-1)
    assert torch.allclose(lik(out, y), expected, atol=1e-6)
    assert torch.allclose(lik.noise, torch.tensor([0.7, 0.7]))
    one = tb.GaussianLikelihood.from_noise(0.7)
    assert torch.allclose(one(out[:, 0], y[:, 0]), Normal(out[:, 0], 0.7).log_prob(y[:, 0]))


def test_heteroscedastic_likelihood_reads_the_noise_from_the_second_half():
    lik = tb.HeteroscedasticGaussianLikelihood(min_noise=0.01)
    out, y = data(6, 2, seed=3), data(6, 1, seed=4)
    mean, noise = lik.split(out)
    assert torch.equal(mean, out[:, :1])
    assert torch.allclose(noise, torch.nn.functional.softplus(out[:, 1:]) + 0.01)
    expected = Normal(out[:, :1], noise).log_prob(y).sum(-1)
    assert torch.allclose(lik(out, y), expected, atol=1e-6)


def test_learned_noise_trains_through_nelbo_towards_the_residual_scale():
    # the noise of a fixed model converges to the residuals' rms, from above and from below
    net = mlp((3, 1))
    post = tb.from_module(net, sigma=1e-4)
    x = data(256, 3, seed=5)
    with torch.no_grad():
        y = net(x) + 0.3 * data(256, 1, seed=6)
    for start in (0.05, 2.0):
        lik = tb.GaussianLikelihood.from_noise(start)
        opt = torch.optim.Adam([lik.rho.requires_grad_()], lr=0.05)
        for step in range(300):
            loss = tb.nelbo(
                net,
                post,
                tb.random.key(step),
                x,
                y,
                log_likelihood=lik,
                num_data=256,
                kl_weight=0.0,
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert float(lik.noise.detach()) == pytest.approx(0.3, rel=0.1), start


def test_gaussian_nll_is_the_mixture_log_likelihood():
    samples, y = data(7, 10, seed=7), data(10, seed=8)
    for noise in (0.5, torch.linspace(0.2, 1.0, 10)):
        per_sample = Normal(samples, torch.as_tensor(noise)).log_prob(y)
        expected = -(torch.logsumexp(per_sample, 0) - math.log(7))
        assert torch.allclose(
            m.gaussian_nll(samples, y, noise, reduction="none"), expected, atol=1e-5
        )
        assert torch.allclose(m.gaussian_nll(samples, y, noise), expected.mean(), atol=1e-5)
        assert torch.allclose(
            m.gaussian_nll(samples, y, noise, reduction="sum"), expected.sum(), atol=1e-4
        )
    # a per-sample, per-example noise (a heteroscedastic head's output) is used as given
    noise = 0.1 + data(7, 10, seed=9).abs()
    expected = -(torch.logsumexp(Normal(samples, noise).log_prob(y), 0) - math.log(7))
    assert torch.allclose(m.gaussian_nll(samples, y, noise, reduction="none"), expected, atol=1e-5)


def test_gaussian_nll_stays_finite_far_out_in_float32():
    samples = torch.zeros(4, 3)
    y = torch.tensor([0.0, 50.0, 500.0])
    out = m.gaussian_nll(samples, y, 0.01, reduction="none")
    assert torch.isfinite(out).all()
    assert float(out[2]) == pytest.approx(
        0.5 * (500 / 0.01) ** 2 + math.log(0.01) + 0.5 * math.log(2 * math.pi), rel=1e-5
    )


def test_rmse_is_the_error_of_the_predictive_mean():
    samples, y = data(5, 20, seed=10), data(20, seed=11)
    assert float(m.rmse(samples, y)) == pytest.approx(
        float(((samples.mean(0) - y) ** 2).mean().sqrt()), rel=1e-6
    )


@pytest.mark.parametrize("noise", [None, 1.0])
def test_interval_coverage_is_nominal_when_calibrated_and_not_when_wrong(noise):
    # targets drawn from the predictive itself: coverage ~ level; a predictive three times too
    # narrow covers far less, three times too wide far more (both directions)
    count, draws = 4000, 200
    centre = data(count, seed=12)
    if noise is None:
        samples = centre + data(draws, count, seed=13)
    else:
        samples = centre.expand(draws, count) + 0.0
    truth = centre + data(count, seed=14)
    cover = float(m.interval_coverage(samples, truth, 0.9, noise=noise))
    assert cover == pytest.approx(0.9, abs=0.02)
    scale_samples = (lambda s: centre + (s - centre) / 3) if noise is None else (lambda s: s)
    narrow = m.interval_coverage(
        scale_samples(samples), truth, 0.9, noise=None if noise is None else noise / 3
    )
    wide_samples = (centre + (samples - centre) * 3) if noise is None else samples
    wide = m.interval_coverage(wide_samples, truth, 0.9, noise=None if noise is None else noise * 3)
    assert float(narrow) < 0.5 and float(wide) > 0.99


def test_log_predictive_is_the_log_of_the_mean_softmax():
    logits = data(6, 4, 5, seed=15) * 3
    expected = logits.softmax(-1).mean(0).log()
    assert torch.allclose(m.log_predictive(logits), expected, atol=1e-6)
    huge = torch.tensor([[[500.0, -500.0]], [[-500.0, 500.0]]])
    assert torch.allclose(m.log_predictive(huge), torch.full((1, 2), -math.log(2)))


def test_fit_temperature_recovers_a_planted_temperature_from_either_side():
    # labels drawn from softmax(z / 2.5): the NLL-optimal temperature is ~2.5; from
    # softmax(z / 0.4) it is ~0.4 (an under-confident model needs T < 1)
    z = data(3000, 5, seed=16) * 3
    uniforms = tb.random.normal(tb.random.key(17), (3000,))
    u = torch.special.ndtr(uniforms)[:, None]
    for true_t in (2.5, 0.4):
        cdf = (z / true_t).softmax(-1).cumsum(-1)
        y = (u > cdf).sum(-1).clamp_max(4)
        fitted = m.fit_temperature(z[None], y)
        assert fitted == pytest.approx(true_t, rel=0.1)
        assert float(m.nll(z[None] / fitted, y)) <= float(m.nll(z[None], y))


def test_fit_noise_is_the_residual_scale_for_one_model():
    # one deterministic model: the Gaussian likelihood's optimal sd is the RMS residual,
    # in closed form; a loss that scaled or dropped the log-sd term would miss it
    mean, noise = data(500, 2, seed=18), data(500, 2, seed=19)
    for scale in (0.03, 4.0):
        target = mean + scale * noise
        residual = float((target - mean).pow(2).mean().sqrt())
        assert m.fit_noise(mean[None], target) == pytest.approx(residual, rel=1e-6)


def test_fit_noise_minimises_the_mixture_likelihood_within_its_bounds():
    # the reference is gaussian_nll itself, on a fine grid: with draws that spread, the
    # mixture needs less noise than the residual, and the search must find that minimum
    draws = data(8, 300, seed=20) * 0.5
    target = data(300, seed=21)
    fitted = m.fit_noise(draws, target)
    grid = torch.logspace(-3, 1, 4001, dtype=torch.float64).tolist()
    best = min(grid, key=lambda s: float(m.gaussian_nll(draws.double(), target.double(), s)))
    assert fitted == pytest.approx(best, rel=2e-3)
    assert fitted < float((draws - target).pow(2).mean().sqrt())
    # a lower bound above the optimum is kept (widen-only calibration)
    assert m.fit_noise(draws, target, bounds=(2 * best, 10.0)) == pytest.approx(2 * best)
    assert m.fit_noise(draws, target, bounds=(1e-3, best / 2)) == pytest.approx(best / 2)


def test_bad_input_names_the_argument():
    samples, y = data(3, 4), data(4)
    with pytest.raises(
        ValueError, match=r"target must be a tensor of shape \(\) .*lack the leading"
    ):
        m.gaussian_nll(samples[0], samples[0], 1.0)
    with pytest.raises(ValueError, match=r"noise must be positive and finite"):
        m.gaussian_nll(samples, y, -1.0)
    with pytest.raises(
        ValueError, match=r"noise must be a float or a tensor broadcastable to \(4,\)"
    ):
        m.gaussian_nll(samples, y, torch.ones(5))
    with pytest.raises(TypeError, match=r"target must be a floating-point tensor"):
        m.rmse(samples, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"level must be a float in \(0, 1\), got float 1.5"):
        m.interval_coverage(samples, y, 1.5, noise=1.0)
    with pytest.raises(
        ValueError, match=r"bounds must be a pair \(low, high\) with 0 < low < high"
    ):
        m.fit_temperature(data(1, 4, 3), torch.zeros(4, dtype=torch.long), bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"bounds must be a pair \(low, high\) with 0 < low"):
        m.fit_noise(samples, y, bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"samples must be predictions with a positive, finite"):
        m.fit_noise(y[None], y)
    with pytest.raises(ValueError, match=r"noise must be a positive float, got float 0.0"):
        tb.GaussianLikelihood.from_noise(0.0)
    with pytest.raises(ValueError, match=r"target must be a tensor of the mean's shape \(4, 1\)"):
        tb.GaussianLikelihood.from_noise(1.0)(data(4, 1), data(4))
    with pytest.raises(ValueError, match=r"output must be a tensor whose last axis holds 2 D"):
        tb.HeteroscedasticGaussianLikelihood()(data(4, 3), data(4, 1))
