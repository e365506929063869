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
    "DTYPES",
    "assert_independent",
    "assert_moments",
    "assert_normal",
    "keys",
    "modules",
    "posterior_trees",
    "posteriors",
]

_SHAPES = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPES = st.sampled_from(DTYPES)
_HALF = (torch.float16, torch.bfloat16)
_HALF_SIGMA_ULPS = 64  # half-precision sigma floor, in units of mu's spacing (see posteriors)


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

    Shapes include ``()``; dtypes are float32, float64, float16 and bfloat16 by default; about
    half the nodes have non-contiguous ``mu`` and ``rho`` (strided or transposed views), as
    slices of real parameters do. In float16 and bfloat16, ``sigma`` is floored at 64 times
    the spacing of representable numbers around ``mu`` (``rho`` raised to match): a smaller
    sigma would be lost to rounding and the draws would be ``mu`` itself.

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
        st.booleans(),
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
    """Check that paired draws ``a`` and ``b`` (e.g. two keys' noise) are independent.

    Two tests on all pooled pairs ``(a_i, b_i)``, each at ``fail_prob / 2``:

    - linear dependence: Pearson's r, with ``sqrt(n - 3) * atanh(r)`` (Fisher) close to
      N(0, 1); positive and negative correlation both fail;
    - any other dependence (``b = a**2 - 1`` is uncorrelated with ``a`` yet a function of
      it): a chi-square test of independence on a ``k x k`` table of the pairs' quantile bins
      (``k`` up to 8, with at least 20 expected pairs per cell), whose statistic is close to
      ``chi2((k - 1)**2)`` under independence (Wilson-Hilferty quantile).
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.shape != b.shape:
        raise ValueError(f"a and b must be tensors of one shape, got {_shape(a)} and {_shape(b)}.")
    x = a.reshape(-1).double()
    y = b.reshape(-1).double()
    n = x.numel()
    if n < 80:
        raise ValueError(f"a and b must hold at least 80 values each, got {n}.")
    xc = x - x.mean()
    yc = y - y.mean()
    r = ((xc * yc).sum() / (xc.norm() * yc.norm())).clamp(-1 + 1e-12, 1 - 1e-12).item()
    statistic = abs(math.atanh(r)) * math.sqrt(n - 3)
    bound = _two_sided_quantile(fail_prob / 2)
    if statistic > bound:
        raise AssertionError(
            f"a and b are correlated: Pearson r = {r:.4g} over {n} pairs, Fisher z "
            f"{statistic:.3g} exceeds the bound {bound:.3g} for fail_prob={fail_prob}."
        )
    bins = max(2, min(8, math.isqrt(n // 20)))
    table = torch.zeros(bins * bins, dtype=torch.float64)
    cell = _quantile_bins(x, bins) * bins + _quantile_bins(y, bins)
    table.index_add_(0, cell, torch.ones(n, dtype=torch.float64))
    table = table.view(bins, bins)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / n
    chi2 = float(((table - expected) ** 2 / expected).sum())
    dof = (bins - 1) ** 2
    limit = _chi2_quantile(dof, fail_prob / 2)
    if chi2 > limit:
        raise AssertionError(
            f"a and b are dependent: chi-square {chi2:.4g} of a {bins}x{bins} table of quantile "
            f"bins over {n} pairs exceeds the bound {limit:.4g} ({dof} degrees of freedom) "
            f"for fail_prob={fail_prob}."
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
    strided: bool,
) -> Any:
    k_mu, k_rho = random.split(random.key(seed))
    mu_t = mu + spread * random.normal(k_mu, shape, dtype=torch.float64)
    rho_t = rho + spread * random.normal(k_rho, shape, dtype=torch.float64)
    if dtype in _HALF:
        spacing = torch.finfo(dtype).eps * mu_t.abs().clamp_min(1.0)
        floor = _HALF_SIGMA_ULPS * spacing
        rho_t = torch.maximum(rho_t, floor + torch.log(-torch.expm1(-floor)))
    if strided:
        return family(_non_contiguous(mu_t.to(dtype)), _non_contiguous(rho_t.to(dtype)))
    return family(mu_t.to(dtype), rho_t.to(dtype))


def _non_contiguous(value: Tensor) -> Tensor:
    """The same values as a non-contiguous view (a 0-d tensor stays as it is)."""
    if value.dim() >= 2 and value.shape[0] > 1 and value.shape[-1] > 1:
        return value.transpose(0, -1).contiguous().transpose(0, -1)
    if value.dim() >= 1:
        doubled = torch.stack([value, torch.zeros_like(value)], dim=-1)
        return doubled[..., 0]
    return value


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


def _quantile_bins(values: Tensor, bins: int) -> Tensor:
    """Each value's bin among ``bins`` equally filled ones (ties broken by position)."""
    ranks = torch.empty_like(values, dtype=torch.int64)
    ranks[values.argsort(stable=True)] = torch.arange(values.numel())
    return ranks * bins // values.numel()


def _chi2_quantile(dof: int, prob: float) -> float:
    """The upper ``prob`` quantile of chi2(dof), Wilson-Hilferty: ``(chi2 / k) ** (1/3)`` is close
    to N(1 - 2 / (9k), 2 / (9k))."""
    z = _two_sided_quantile(2 * prob)
    spread = 2 / (9 * dof)
    return dof * (1 - spread + z * math.sqrt(spread)) ** 3


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
