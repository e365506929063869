"""Predictive uncertainty, calibration, OOD and selective-prediction metrics, as pure functions.

On stacked Monte-Carlo outputs (leading axis = samples, as ``tb.predict`` returns them):
regression takes ``(S, ...)``; classification takes logits ``(S, ..., C)`` (log-probabilities
work too: softmax does not see the difference) and integer targets ``(...)``. The predictive
distribution is the mixture ``p(y | x) = (1/S) sum_s softmax(logits_s)``, computed in log space
(``logsumexp``), so the metrics stay finite in float32 for confident models. On scores per
example: ``auroc``, ``fpr_at_tpr`` (out-of-distribution detection, the out-of-distribution set
the positive class, larger scores meaning "more likely OOD") and ``aurc`` (selective
prediction). Every function composes with ``vmap`` and ``grad`` where its maths is smooth.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tbfunc import _classification as core
from tbfunc._checks import fail
from tbfunc._classification import ReliabilityDiagram
from tbfunc._streaming import Accumulator, Summary

__all__ = [
    "Accumulator",
    "ReliabilityDiagram",
    "Summary",
    "accuracy",
    "aurc",
    "auroc",
    "brier_score",
    "expected_calibration_error",
    "expected_entropy",
    "fit_noise",
    "fit_temperature",
    "fpr_at_tpr",
    "gaussian_nll",
    "interval_coverage",
    "log_predictive",
    "mutual_information",
    "nll",
    "predictive_entropy",
    "predictive_interval",
    "predictive_mean",
    "predictive_variance",
    "reliability_diagram",
    "rmse",
]

Reduction = Literal["mean", "sum", "none"]


# ----------------------------------------------------------------------------------------------
# Regression.


def predictive_mean(samples: Tensor) -> Tensor:
    """The mean over the sample axis: ``samples.mean(0)``."""
    return _samples(samples).mean(0)


def predictive_variance(samples: Tensor, *, correction: int = 0) -> Tensor:
    """The variance over the sample axis (``correction=0``: the variance of the empirical
    mixture of the draws; ``1``: the unbiased estimate of the predictive variance)."""
    return _samples(samples).var(0, correction=correction)


def predictive_interval(samples: Tensor, level: float = 0.9) -> tuple[Tensor, Tensor]:
    """The central ``level`` interval of the draws: the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles over the sample axis (linear interpolation)."""
    samples = _samples(samples)
    if not isinstance(level, int | float) or not 0 < level < 1:
        fail("level", "a float in (0, 1)", level)
    probs = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype)
    low, high = torch.quantile(samples, probs.to(samples.device), dim=0)
    return low, high


def gaussian_nll(
    samples: Tensor, target: Tensor, noise: float | Tensor, *, reduction: Reduction = "mean"
) -> Tensor:
    """``-log (1/S) sum_s N(target; samples_s, noise^2)`` per element: the negative
    log-likelihood of the predictive mixture of Gaussians (logsumexp over samples; the UCI
    benchmark's test log-likelihood is minus its mean). Each element of a multi-output target
    is scored on its own.

    Args:
        samples: ``(S, ...)`` predicted means (one deterministic model: ``mean[None]``).
        target: shaped like one sample.
        noise: the observation noise standard deviation: a float, a tensor per output (the last
            axis), or per example (target's shape, or ``(S, ...)`` for a heteroscedastic head).
    """
    samples, target = _regression(samples, target)
    noise = _noise(noise, samples)
    wide = torch.promote_types(samples.dtype, torch.float32)
    samples, target, noise = samples.to(wide), target.to(wide), noise.to(wide)
    log_densities = -0.5 * ((target - samples) / noise) ** 2 - torch.log(noise)
    log_mixture = torch.logsumexp(log_densities, dim=0) - math.log(samples.shape[0])
    return _reduce(-(log_mixture - 0.5 * math.log(2 * math.pi)), reduction)


def rmse(samples: Tensor, target: Tensor) -> Tensor:
    """The root mean squared error of the predictive mean: ``sqrt(mean((mean_s - target)^2))``."""
    samples, target = _regression(samples, target)
    return (samples.mean(0) - target).pow(2).mean().sqrt()


def interval_coverage(
    samples: Tensor, target: Tensor, level: float = 0.9, noise: float | Tensor | None = None
) -> Tensor:
    """The fraction of targets inside the central ``level`` predictive interval (``level`` for
    a calibrated model; lower: too narrow, higher: too wide).

    Without ``noise`` the interval is that of the draws (``predictive_interval``). With it, the
    predictive is the mixture ``(1/S) sum_s N(samples_s, noise^2)`` and a target lies inside
    exactly when its mixture CDF is in ``[(1 - level) / 2, (1 + level) / 2]``.
    """
    samples, target = _regression(samples, target)
    if noise is None:
        low, high = predictive_interval(samples, level)
        inside = (target >= low) & (target <= high)
    else:
        if not isinstance(level, int | float) or not 0 < level < 1:
            fail("level", "a float in (0, 1)", level)
        scale = _noise(noise, samples).double()
        z = (target.double() - samples.double()) / scale
        cdf = (0.5 * torch.erfc(-z / math.sqrt(2))).mean(0)
        inside = (cdf >= (1 - level) / 2) & (cdf <= (1 + level) / 2)
    return inside.to(torch.get_default_dtype()).mean()


# ----------------------------------------------------------------------------------------------
# Classification, on logits (S, ..., C).


def log_predictive(logits: Tensor) -> Tensor:
    """``log((1/S) sum_s softmax(logits_s))`` per example and class, shape ``(..., C)``: the
    predictive mixture in log space (``logsumexp`` over samples, float32 or wider), finite
    where the probabilities themselves underflow."""
    return core.log_predictive(logits)


def fit_temperature(
    logits: Tensor, target: Tensor, *, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature ``T`` minimising ``nll(logits / T, target)`` (Guo et al. 2017): fit it on
    a validation split, then report ``nll(test_logits / T, test_target)``.

    Every sample's logits are divided by the same ``T``. The NLL is convex in ``1 / T`` for one
    model; the search is a grid over ``log T`` followed by golden-section refinement, so the
    result is deterministic and needs no learning rate.

    Args:
        logits: ``(S, ..., C)`` (one model: ``logits[None]``).
        target: integer classes ``(...)``.
        bounds: the range of ``T`` searched.
    """
    target = core.check_target(target, core.check_logits(logits))
    _check_bounds(bounds)
    with torch.no_grad():
        wide = logits.detach().double()
        picked = target.long()[..., None]

        def loss(log_t: float) -> float:  # nll without re-checking what was checked above
            log_p = core.mixture(wide / math.exp(log_t))
            return float(-log_p.gather(-1, picked)[..., 0].mean())

        return math.exp(_argmin_log(loss, *bounds))


def fit_noise(
    samples: Tensor, target: Tensor, *, bounds: tuple[float, float] | None = None
) -> float:
    """The observation noise ``s`` minimising ``gaussian_nll(samples, target, s)``: the
    regression analogue of temperature scaling. Fit it on a validation split, then report
    ``gaussian_nll(test_samples, test_target, s)``; the means (and the RMSE) do not change.

    One ``s`` for every element (homoscedastic, in the target's units). The search is a grid
    over ``log s`` followed by golden-section refinement, deterministic, no learning rate.

    Args:
        samples: ``(S, ...)`` predicted means (one model: ``mean[None]``).
        target: shaped like one sample.
        bounds: the range of ``s`` searched. Default: from 1e-4 to 1 times the root mean
            squared residual over all draws, ``sqrt(mean((samples - target)^2))``: the optimum
            of one draw, and an upper bound for the mixture's (its spread adds to the noise).
            Pass e.g. ``(learned_noise, 1e3)`` to widen the predictive only.
    """
    samples, target = _regression(samples, target)
    with torch.no_grad():
        residuals = target.detach().double() - samples.detach().double()
        if bounds is None:
            residual = math.sqrt(float(residuals.pow(2).mean()))
            if not 0 < residual < math.inf:
                fail(
                    "samples",
                    "predictions with a positive, finite residual (a perfect fit has no optimal "
                    "noise: the likelihood grows without bound as it shrinks)",
                    samples,
                    f"The root mean squared residual is {residual}; pass bounds to search anyway.",
                )
            bounds = (1e-4 * residual, residual)
        _check_bounds(bounds)
        log_count = math.log(samples.shape[0])

        def loss(log_s: float) -> float:  # gaussian_nll without its checks and its 2 pi
            z = residuals * math.exp(-log_s)
            return float(-(torch.logsumexp(-0.5 * z * z, dim=0) - log_count).mean()) + log_s

        return math.exp(_argmin_log(loss, *bounds))


def _check_bounds(bounds: Any) -> None:
    ok = isinstance(bounds, tuple | list) and len(bounds) == 2
    if ok:
        low, high = bounds
        ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in bounds)
        ok = ok and 0 < low < high < math.inf
    if not ok:
        fail("bounds", "a pair (low, high) with 0 < low < high", bounds)


def _argmin_log(loss: Any, low: float, high: float) -> float:
    """The minimiser of ``loss(log x)`` for ``x`` in ``[low, high]``, as ``log x``: the best of a
    41-point grid, then 40 golden-section steps between its neighbours (a unimodal loss near
    its minimum is all this assumes)."""
    grid = torch.linspace(math.log(low), math.log(high), 41).tolist()
    values = [loss(t) for t in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(40):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return (a + b) / 2


def predictive_entropy(logits: Tensor) -> Tensor:
    """``H[p(y | x)]`` of the mixture, per example: total uncertainty, in nats."""
    log_p = core.log_predictive(logits)
    return -(log_p.exp() * log_p).sum(-1)


def expected_entropy(logits: Tensor) -> Tensor:
    """``E_s H[softmax(logits_s)]`` per example: the aleatoric part of the uncertainty."""
    log_p = F.log_softmax(core.check_logits(logits), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean(0)


def mutual_information(logits: Tensor) -> Tensor:
    """``predictive_entropy - expected_entropy`` per example (BALD; Houlsby et al. 2011): the
    epistemic part, >= 0, and 0 when all samples agree (clamped at 0 against rounding)."""
    return (predictive_entropy(logits) - expected_entropy(logits)).clamp_min(0)


def nll(logits: Tensor, target: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """``-log p(target | x)`` of the mixture (``logsumexp`` over samples)."""
    log_p = core.log_predictive(logits)
    target = core.check_target(target, logits)
    return _reduce(-log_p.gather(-1, target[..., None])[..., 0], reduction)


def brier_score(logits: Tensor, target: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """``sum_c (p_c - 1[c = target])**2`` per example, of the mixture (in [0, 2])."""
    probs = core.log_predictive(logits).exp()
    target = core.check_target(target, logits)
    onehot = F.one_hot(target, probs.shape[-1]).to(probs.dtype)
    return _reduce(((probs - onehot) ** 2).sum(-1), reduction)


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """The fraction of examples whose mixture's most probable class is the target."""
    predicted = core.log_predictive(logits).argmax(-1)
    return (predicted == core.check_target(target, logits)).to(torch.get_default_dtype()).mean()


def expected_calibration_error(
    logits: Tensor,
    target: Tensor,
    *,
    num_bins: int = 15,
    binning: Literal["width", "mass"] = "width",
) -> Tensor:
    """``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|`` over confidence bins (Naeini et
    al. 2015; Guo et al. 2017), confidence = the mixture's top probability.

    ``binning="width"``: ``num_bins`` equal-width bins ``(b_{i-1}, b_i]`` on [0, 1] (as
    torchmetrics and torch-uncertainty); ``"mass"``: equal-mass (adaptive) bins, the examples
    sorted by confidence and cut into ``num_bins`` groups of sizes within one.
    """
    return _bins(logits, target, num_bins, binning).ece


def reliability_diagram(
    logits: Tensor,
    target: Tensor,
    *,
    num_bins: int = 15,
    binning: Literal["width", "mass"] = "width",
    path: str | None = None,
    title: str = "",
) -> ReliabilityDiagram:
    """The reliability diagram's data (always) and, where matplotlib is installed, the
    figure (saved to ``path`` if given). tbfunc itself never needs matplotlib."""
    data = _bins(logits, target, num_bins, binning)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return data
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    filled = data.counts > 0
    left, right = data.edges[:-1][filled], data.edges[1:][filled]
    ax.bar(
        left.tolist(),
        data.accuracy[filled].tolist(),
        width=(right - left).tolist(),
        align="edge",
        edgecolor="k",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set(
        xlabel="confidence",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"{title} ECE {float(data.ece):.3f}".strip(),
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return data._replace(figure=fig)


# ----------------------------------------------------------------------------------------------
# Scores per example.


def auroc(scores_in: Tensor, scores_out: Tensor) -> Tensor:
    """Area under the ROC curve separating ``scores_out`` (positive) from ``scores_in``:
    ``P(out > in) + P(out = in) / 2`` (Mann-Whitney, ties shared); 0.5 when they do not
    differ, 1 when every OOD score is larger."""
    inside, outside = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    both = torch.cat([inside, outside]).double()
    ranks = _average_ranks(both)
    n_in, n_out = inside.numel(), outside.numel()
    rank_sum = ranks[n_in:].sum()
    return (rank_sum - n_out * (n_out + 1) / 2) / (n_in * n_out)


def fpr_at_tpr(scores_in: Tensor, scores_out: Tensor, tpr: float = 0.95) -> Tensor:
    """The fraction of in-distribution examples flagged (score >= t) at the largest threshold
    ``t`` that flags at least a fraction ``tpr`` of the OOD examples (FPR at 95% TPR)."""
    inside, outside = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    if not isinstance(tpr, int | float) or not 0 < tpr <= 1:
        fail("tpr", "a float in (0, 1]", tpr)
    ordered = outside.double().sort(descending=True).values
    needed = math.ceil(tpr * ordered.numel() - 1e-9)
    threshold = ordered[max(needed, 1) - 1]
    return (inside.double() >= threshold).double().mean()


def aurc(confidence: Tensor, correct: Tensor) -> Tensor:
    """Area under the risk-coverage curve (Geifman et al. 2019): examples sorted by decreasing
    confidence, ``(1/n) sum_k risk(k)`` with ``risk(k)`` the error rate of the ``k`` most
    confident. Lower is better; it is the error rate when confidence is uninformative."""
    confidence = _scores(confidence, "confidence")
    correct = _scores(correct, "correct")
    if correct.shape != confidence.shape:
        fail("correct", f"a tensor of shape {tuple(confidence.shape)}", correct)
    return core.risk_coverage_area(confidence, correct)


# ----------------------------------------------------------------------------------------------


def _samples(samples: Any) -> Tensor:
    if not isinstance(samples, Tensor) or samples.dim() < 1:
        fail("samples", "a tensor with a leading sample axis (S, ...)", samples, error=TypeError)
    if not samples.is_floating_point():
        fail("samples", "a floating-point tensor", samples, error=TypeError)
    return samples


def _regression(samples: Any, target: Any) -> tuple[Tensor, Tensor]:
    samples = _samples(samples)
    if not isinstance(target, Tensor) or not target.is_floating_point():
        fail("target", "a floating-point tensor", target, error=TypeError)
    if tuple(target.shape) != tuple(samples.shape[1:]):
        hint = (
            "samples seem to lack the leading sample axis: pass tb.predict's stacked output, "
            "or mean[None] for one deterministic model."
            if tuple(target.shape) == tuple(samples.shape)
            else ""
        )
        fail("target", f"a tensor of shape {tuple(samples.shape[1:])} (one sample's)", target, hint)
    if target.numel() == 0:
        fail("target", "a non-empty tensor", target)
    return samples, target


def _noise(noise: Any, samples: Tensor) -> Tensor:
    if isinstance(noise, bool) or not isinstance(noise, int | float | Tensor):
        fail("noise", "a positive float or tensor", noise, error=TypeError)
    noise = torch.as_tensor(noise, dtype=samples.dtype, device=samples.device)
    if not bool((noise > 0).all()) or not bool(torch.isfinite(noise).all()):
        fail("noise", "positive and finite (a standard deviation)", noise)
    try:
        torch.broadcast_shapes(noise.shape, samples.shape)
    except RuntimeError:
        fail("noise", f"a float or a tensor broadcastable to {tuple(samples.shape[1:])}", noise)
    return noise


def _scores(scores: Any, arg: str) -> Tensor:
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.numel() == 0:
        fail(arg, "a non-empty 1-d tensor of scores per example", scores, error=TypeError)
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        fail(
            arg,
            "free of NaN (NaN has no rank)",
            scores,
            f"{int(torch.isnan(scores).sum())} are NaN.",
        )
    return scores


def _reduce(values: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    fail("reduction", "one of 'mean', 'sum', 'none'", reduction)


def _bins(logits: Tensor, target: Tensor, num_bins: int, binning: str) -> ReliabilityDiagram:
    core.check_bins(num_bins, binning)
    log_p = core.log_predictive(logits)
    target = core.check_target(target, logits)
    top, predicted = log_p.exp().reshape(-1, log_p.shape[-1]).max(-1)
    correct = (predicted == target.reshape(-1)).double()
    return core.bins(top.double(), correct, num_bins, binning)


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks, ties sharing their average rank."""
    order = values.argsort(stable=True)
    ordered = values[order]
    ranks = torch.empty_like(values)
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(values.dtype)
    average = ends - (counts.to(values.dtype) - 1) / 2
    ranks[order] = average[inverse]
    return ranks
