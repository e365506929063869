"""tb.testing: the assertions hold their stated false-alarm rate and catch wrong samplers;
the strategies drive real properties of tbfunc."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tbfunc as tb
from tbfunc import testing

TRIALS = 300
MU = torch.linspace(-2.0, 2.0, 4)
SIGMA = torch.linspace(0.5, 2.0, 4)


def draws(seed: int, count: int, *, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """``count`` draws of N(MU, SIGMA^2), optionally with sigma scaled or mean shifted (in sigmas)."""
    eps = tb.random.normal(tb.random.key(seed), (count, len(MU)), dtype=torch.float64)
    return MU + SIGMA * (scale * eps + shift)


def binomial_upper(n: int, p: float, tail: float = 1e-6) -> int:
    """The smallest k with P(Binomial(n, p) > k) <= tail."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if 1 - total <= tail:
            return k
    return n


def failures(check, make) -> int:
    count = 0
    for seed in range(TRIALS):
        try:
            check(*make(seed))
        except AssertionError:
            count += 1
    return count


ASSERTIONS = {
    "moments": lambda s: (draws(s, 3000), MU, SIGMA),
    "normal": lambda s: (draws(s, 3000), MU, SIGMA),
    "independent": lambda s: (
        tb.random.normal(tb.random.key(2 * s), (6000,)),
        tb.random.normal(tb.random.key(2 * s + 1), (6000,)),
    ),
}


@pytest.mark.parametrize("name", ASSERTIONS)
def test_false_alarm_rate_within_fail_prob(name):
    """At fail_prob=0.05 over 300 seeds of a correct sampler, the number of alarms stays below
    the Binomial(300, 0.05) quantile at 1e-6 (deterministic seeds: this cannot flake)."""
    check = {
        "moments": testing.assert_moments,
        "normal": testing.assert_normal,
        "independent": testing.assert_independent,
    }[name]
    alarms = failures(lambda *a: check(*a, fail_prob=0.05), ASSERTIONS[name])
    assert alarms <= binomial_upper(TRIALS, 0.05), alarms


@pytest.mark.parametrize(
    ("check", "make"),
    [
        # sigma 10% too large: 3,000 draws per element (the documented size)
        (testing.assert_moments, lambda s: (draws(s, 3000, scale=1.1), MU, SIGMA)),
        # mean off by 0.2 sigma: 3,000 draws per element
        (testing.assert_moments, lambda s: (draws(s, 3000, shift=0.2), MU, SIGMA)),
        # sigma 10% too large: 40,000 pooled values (10,000 draws of 4 elements)
        (testing.assert_normal, lambda s: (draws(s, 10000, scale=1.1), MU, SIGMA)),
        # two keys whose noise has correlation 0.1: 6,000 pairs
        (testing.assert_independent, lambda s: correlated(s, 0.1, 6000)),
    ],
    ids=["moments-sigma", "moments-mean", "normal-sigma", "independent"],
)
def test_power_against_wrong_samplers(check, make):
    """Each wrong sampler is caught at fail_prob=1e-6 in at least 99% of 300 seeds."""
    misses = TRIALS - failures(lambda *a: check(*a, fail_prob=1e-6), make)
    assert misses <= 0.01 * TRIALS, misses


def correlated(seed: int, rho: float, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = tb.random.normal(tb.random.key(2 * seed), (count,), dtype=torch.float64)
    b = tb.random.normal(tb.random.key(2 * seed + 1), (count,), dtype=torch.float64)
    return a, rho * a + math.sqrt(1 - rho**2) * b


def test_messages_say_expected_observed_and_bound():
    with pytest.raises(
        AssertionError,
        match=r"sample variance off at element \(\d+,\): observed .*, expected .*; Wilson-Hilferty z of s\^2 / sigma\^2 = .* exceeds the bound",
    ):
        testing.assert_moments(draws(0, 3000, scale=1.5), MU, SIGMA)
    with pytest.raises(AssertionError, match=r"sample mean off at element \(\d+,\): observed"):
        testing.assert_moments(draws(0, 3000, shift=1.0), MU, SIGMA)
    with pytest.raises(
        AssertionError,
        match=r"samples are not N\(mu, sigma\^2\): Kolmogorov-Smirnov distance .* over 40000 standardised values exceeds the bound .* for fail_prob=1e-06",
    ):
        testing.assert_normal(draws(0, 10000, scale=1.3), MU, SIGMA)
    a = tb.random.normal(tb.random.key(0), (1000,))
    with pytest.raises(
        AssertionError, match=r"a and b are correlated: Pearson r = 1 over 1000 pairs"
    ):
        testing.assert_independent(a, a)
    with pytest.raises(ValueError, match="fail_prob must be in \\(0, 1\\), got 0"):
        testing.assert_moments(draws(0, 10), MU, SIGMA, fail_prob=0)
    with pytest.raises(
        ValueError, match=r"a and b must be tensors of one shape, got shape \(3,\) and shape \(4,\)"
    ):
        testing.assert_independent(torch.zeros(3), torch.zeros(4))


@given(testing.posterior_trees(), testing.keys())
@settings(max_examples=15)
def test_strategies_drive_tbfunc_properties(tree, key):
    """On generated trees: num_samples agrees with split keys, and dtypes and shapes hold."""
    many = tb.sample(tree, key, num_samples=3)
    one = tb.sample(tree, tb.random.split(key, 3)[2])
    for name, node in tree.items():
        assert many[name].shape == (3, *node.mu.shape) and many[name].dtype == node.mu.dtype
        assert torch.equal(many[name][2], one[name])


@given(testing.modules(), testing.keys())
@settings(max_examples=6)
def test_predict_equals_loop_on_generated_modules(case, key):
    module, posterior, x = case
    out = tb.predict(module, posterior, key, x, num_samples=3, strategy="vmap")
    loop = torch.stack(
        [tb.functional_call(module, posterior, k, x) for k in tb.random.split(key, 3)]
    )
    torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-6)


# -- planted bugs: independence in one direction only; strategies that drop cases ---------------


def test_assert_independent_catches_negative_and_non_linear_dependence():
    a = tb.random.normal(tb.random.key(11), (6000,), dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"a and b are correlated: Pearson r = -1 over 6000"):
        testing.assert_independent(a, -a)
    with pytest.raises(AssertionError, match=r"a and b are correlated: Pearson r = -0.1"):
        testing.assert_independent(*correlated(3, -0.1, 6000))
    with pytest.raises(
        AssertionError,
        match=r"a and b are dependent: chi-square .* of a 8x8 table of quantile bins over 6000 pairs exceeds the bound .* \(49 degrees of freedom\)",
    ):
        testing.assert_independent(a, a**2 - 1)  # uncorrelated with a, yet a function of it
    noise = tb.random.normal(tb.random.key(12), (6000,), dtype=torch.float64)
    with pytest.raises(AssertionError, match="a and b are dependent"):
        testing.assert_independent(a, a.abs() * noise.sign())  # |b| = |a|: uncorrelated
    with pytest.raises(ValueError, match="a and b must hold at least 80 values each, got 10"):
        testing.assert_independent(a[:10], a[:10])


SEEN: dict[str, set] = {"dtype": set(), "shape": set(), "strided": set(), "tree_dtype": set()}


@given(testing.posteriors())
@settings(max_examples=150)
def record_nodes(node):
    SEEN["dtype"].add(node.mu.dtype)
    SEEN["shape"].add(len(node.mu.shape))
    SEEN["strided"].add(not node.mu.is_contiguous() and not node.rho.is_contiguous())
    assert node.mu.dtype == node.rho.dtype and node.mu.shape == node.rho.shape
    if node.mu.dtype in (torch.float16, torch.bfloat16):
        # sigma is resolvable next to mu: draws are not pure rounding
        spacing = torch.finfo(node.mu.dtype).eps * node.mu.float().abs().clamp_min(1.0)
        assert bool((node.sigma.float() >= 32 * spacing).all())


@given(testing.posterior_trees())
@settings(max_examples=60)
def record_trees(tree):
    for node in tree.values():
        SEEN["tree_dtype"].add(node.mu.dtype)


def test_strategies_generate_every_dtype_scalar_shapes_and_strided_nodes():
    record_nodes()
    record_trees()
    dtypes = {torch.float32, torch.float64, torch.float16, torch.bfloat16}
    assert SEEN["dtype"] == dtypes and SEEN["tree_dtype"] == dtypes
    assert 0 in SEEN["shape"] and {1, 2, 3} <= SEEN["shape"]
    assert SEEN["strided"] == {True, False}


@given(testing.posteriors(shapes=st.just((40,))), testing.keys())
@settings(max_examples=12)
def test_half_precision_nodes_sample_with_the_right_moments(node, key):
    draws = tb.sample(node, key, num_samples=3000)
    assert draws.dtype == node.mu.dtype
    testing.assert_moments(draws, node.mu.double(), node.sigma.double(), fail_prob=1e-6)
