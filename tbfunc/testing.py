"""Property-based testing of sampling code: hypothesis strategies and statistical assertions.

The assertions take a ``fail_prob``: the probability that they raise although the samples do
come from the stated distribution. Their bounds are derived from the sample size (never fixed
tolerances) and a Bonferroni correction over the elements tested, so a test suite that calls
them with ``fail_prob=1e-6`` a thousand times fails spuriously with probability below 1e-3.

This module imports hypothesis; the rest of tbfunc does not need it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from tbfunc import random
from tbfunc.module import from_module
from tbfunc.posterior import GaussianPosterior, PretrainedGaussianPosterior

__all__ = [
    "assert_independent",
    "assert_moments",
    "assert_normal",
    "keys",
    "modules",
    "posterior_trees",
    "posteriors",
]

_SHAPES = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
_DTYPES = st.sampled_from([torch.float32, torch.float64])


# ----------------------------------------------------------------------------------------------
# Strategies.


def keys() -> st.SearchStrategy[Tensor]:
    """Keys from seeds over the whole 64-bit range."""
    return st.integers(0, 2**64 - 1).map(random.key)


def posteriors(
    shapes: st.SearchStrategy[tuple[int, ...]] = _SHAPES,
    dtypes: st.SearchStrategy[torch.dtype] = _DTYPES,
    mu: st.SearchStrategy[float] | None = None,
    rho: st.SearchStrategy[float] | None = None,
    families: Sequence[type] = (GaussianPosterior, PretrainedGaussianPosterior),
) -> st.SearchStrategy[Any]:
    """One posterior node: ``mu`` varies element-wise around a drawn centre, ``rho`` likewise.

    Args:
        shapes, dtypes: strategies for the node's shape and dtype.
        mu, rho: strategies for the centres (defaults: ``[-10, 10]`` and ``[-8, 4]``).
        families: node types to draw from; each must be built as ``Family(mu, rho)``.
    """
    mu = st.floats(-10, 10) if mu is None else mu
    rho = st.floats(-8, 4) if rho is None else rho
    return st.builds(
        _node,
        st.sampled_from(tuple(families)),
        shapes,
        dtypes,
        mu,
        rho,
        st.floats(0, 1),
        st.integers(0, 2**32 - 1),
    )


def posterior_trees(
    nodes: st.SearchStrategy[Any] | None = None, max_size: int = 4
) -> st.SearchStrategy[dict[str, Any]]:
    """``dict[name, node]`` with parameter-like names (``"layer3.weight"``)."""
    names = st.from_regex(r"[a-z]{1,6}[0-9]?\.(weight|bias)", fullmatch=True)
    return st.dictionaries(
        names, posteriors() if nodes is None else nodes, min_size=1, max_size=max_size
    )


def modules(kinds: Sequence[str] = ("mlp", "conv", "attention")) -> st.SearchStrategy[Any]:
    """``(module, posterior, input)`` for small random modules in eval mode.

    The module's initial weights come from a seeded, forked RNG: the global RNG is untouched.
    """
    return st.builds(
        _small_module, st.sampled_from(tuple(kinds)), st.integers(0, 2**32 - 1), st.integers(1, 4)
    )


# ----------------------------------------------------------------------------------------------
# Assertions.


def assert_moments(
    samples: Tensor, mu: Tensor | float, sigma: Tensor | float, *, fail_prob: float = 1e-6
) -> None:
    """Check element-wise sample means and variances of ``samples`` (axis 0 = draws).

    For N normal draws the standardised mean ``(m - mu) / (sigma / sqrt(N))`` is N(0, 1) and
    the variance ratio ``s**2 / sigma**2`` is ``chi2(N-1) / (N-1)``, within ``z * sqrt(2/(N-1))``
    of 1 to the normal approximation (Wilson-Hilferty corrected). ``z`` is the two-sided normal
    quantile at ``fail_prob / (2 * elements)`` (Bonferroni over both checks and all elements).
    """
    samples, mu_t, sigma_t = _prepare(samples, mu, sigma)
    count = samples.shape[0]
    if count < 3:
        raise ValueError(f"samples must have at least 3 draws on axis 0, got {count}.")
    elements = max(1, samples[0].numel())
    z = _two_sided_quantile(fail_prob / (2 * elements))
    mean_z = (samples.mean(0) - mu_t) / (sigma_t / math.sqrt(count))
    _report(
        "mean", mean_z.abs(), z, samples.mean(0), mu_t, f"|mean - mu| / (sigma / sqrt({count}))"
    )
    # Wilson-Hilferty: (chi2_k / k) ** (1/3) is close to N(1 - 2/(9k), 2/(9k)).
    k = count - 1
    ratio = samples.var(0, correction=1) / sigma_t**2
    cube = (ratio ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    _report(
        "variance",
        cube.abs(),
        z,
        samples.var(0, correction=1),
        sigma_t**2,
        "Wilson-Hilferty z of s^2 / sigma^2",
    )


def assert_normal(
    samples: Tensor, mu: Tensor | float, sigma: Tensor | float, *, fail_prob: float = 1e-6
) -> None:
    """Kolmogorov-Smirnov test of the standardised samples ``(x - mu) / sigma`` against N(0, 1).

    All standardised values are pooled (they are i.i.d. N(0, 1) under the hypothesis). The
    critical value solves ``2 exp(-2 t^2) = fail_prob`` (the leading term of Kolmogorov's
    series, which bounds it above) with Stephens' finite-sample factor
    ``sqrt(n) + 0.12 + 0.11 / sqrt(n)``.
    """
    samples, mu_t, sigma_t = _prepare(samples, mu, sigma)
    z = ((samples - mu_t) / sigma_t).reshape(-1).double().sort().values
    n = z.numel()
    if n < 8:
        raise ValueError(f"samples must hold at least 8 values, got {n}.")
    cdf = torch.special.ndtr(z)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    distance = torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max().item()
    critical = math.sqrt(-0.5 * math.log(fail_prob / 2)) / (
        math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)
    )
    if distance > critical:
        raise AssertionError(
            f"samples are not N(mu, sigma^2): Kolmogorov-Smirnov distance {distance:.4g} over "
            f"{n} standardised values exceeds the bound {critical:.4g} for fail_prob={fail_prob}."
        )


def assert_independent(a: Tensor, b: Tensor, *, fail_prob: float = 1e-6) -> None:
    """Check that paired draws ``a`` and ``b`` (e.g. two keys' noise) are uncorrelated.

    Pools all pairs ``(a_i, b_i)`` and tests Pearson's r: under independence
    ``sqrt(n) * atanh(r)`` (Fisher) is close to N(0, 1). Identical or strongly correlated
    streams fail; the bound is the two-sided normal quantile at ``fail_prob``.
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.shape != b.shape:
        raise ValueError(f"a and b must be tensors of one shape, got {_shape(a)} and {_shape(b)}.")
    x = a.reshape(-1).double()
    y = b.reshape(-1).double()
    n = x.numel()
    if n < 8:
        raise ValueError(f"a and b must hold at least 8 values each, got {n}.")
    x = x - x.mean()
    y = y - y.mean()
    r = ((x * y).sum() / (x.norm() * y.norm())).clamp(-1 + 1e-12, 1 - 1e-12).item()
    statistic = abs(math.atanh(r)) * math.sqrt(n - 3)
    bound = _two_sided_quantile(fail_prob)
    if statistic > bound:
        raise AssertionError(
            f"a and b are correlated: Pearson r = {r:.4g} over {n} pairs, Fisher z "
            f"{statistic:.3g} exceeds the bound {bound:.3g} for fail_prob={fail_prob}."
        )


# ----------------------------------------------------------------------------------------------


def _node(
    family: type,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    mu: float,
    rho: float,
    spread: float,
    seed: int,
) -> Any:
    k_mu, k_rho = random.split(random.key(seed))
    mu_t = mu + spread * random.normal(k_mu, shape, dtype=dtype)
    rho_t = rho + spread * random.normal(k_rho, shape, dtype=dtype)
    return family(mu_t, rho_t)


def _small_module(kind: str, seed: int, batch: int) -> tuple[nn.Module, dict[str, Any], Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "mlp":
            module: nn.Module = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
            shape: tuple[int, ...] = (batch, 5)
        elif kind == "conv":
            module = nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(4 * 5 * 5, 3),
            )
            shape = (batch, 2, 5, 5)
        else:
            module = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0),
                num_layers=1,
                enable_nested_tensor=False,
            )
            shape = (batch, 3, 8)
    module.eval()
    inputs = random.normal(random.key(seed), shape)
    return module, from_module(module, sigma_scale=0.1), inputs


def _prepare(
    samples: Tensor, mu: Tensor | float, sigma: Tensor | float
) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(samples, Tensor) or samples.dim() < 1:
        raise ValueError(
            f"samples must be a tensor with a leading draw axis, got {_shape(samples)}."
        )
    wide = samples.double()
    mu_t = torch.as_tensor(mu, dtype=torch.float64).expand(samples.shape[1:])
    sigma_t = torch.as_tensor(sigma, dtype=torch.float64).expand(samples.shape[1:])
    if not bool((sigma_t > 0).all()):
        raise ValueError("sigma must be positive everywhere.")
    return wide, mu_t, sigma_t


def _two_sided_quantile(prob: float) -> float:
    if not 0 < prob < 1:
        raise ValueError(f"fail_prob must be in (0, 1), got {prob!r}.")
    return -float(torch.special.ndtri(torch.tensor(prob / 2, dtype=torch.float64)))


def _report(
    what: str, statistic: Tensor, bound: float, observed: Tensor, expected: Tensor, formula: str
) -> None:
    worst = int(statistic.reshape(-1).argmax()) if statistic.numel() else 0
    value = float(statistic.reshape(-1)[worst]) if statistic.numel() else 0.0
    if not value <= bound:
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), statistic.shape))
        seen = float(observed.reshape(-1)[worst])
        wanted = float(expected.reshape(-1)[worst])
        raise AssertionError(
            f"sample {what} off at element {index}: observed {seen:.6g}, "
            f"expected {wanted:.6g}; {formula} = {value:.3g} exceeds "
            f"the bound {bound:.3g}."
        )


def _shape(value: object) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
