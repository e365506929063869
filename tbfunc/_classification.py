"""The core that ``tbfunc.metrics`` (whole-set) and ``tbfunc.metrics.Accumulator`` (streaming)
share, so the two compute every number with the same operations: argument checks, the
predictive mixture in log space, and calibration bins from per-example confidences."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tbfunc._checks import fail

__all__ = [
    "ReliabilityDiagram",
    "bins",
    "check_bins",
    "check_logits",
    "check_target",
    "log_predictive",
    "mixture",
    "risk_coverage_area",
]


def check_logits(logits: Any) -> Tensor:
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() < 2:
        fail("logits", "a floating-point tensor of shape (S, ..., C)", logits, error=TypeError)
    if logits.shape[-1] < 2:
        fail("logits", "at least 2 classes on the last axis", logits)
    if logits.numel() == 0:
        fail("logits", "a tensor holding at least one sample and example", logits, "It is empty.")
    if not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(
        logits
    ):
        low, high = torch.aminmax(logits)  # one pass; real logits stop here (negative values)
        if bool(torch.isnan(low)) or bool(torch.isnan(high)):  # aminmax propagates NaN
            fail(
                "logits",
                "free of NaN",
                logits,
                f"{int(torch.isnan(logits).sum())} values are NaN: the model diverged or "
                "overflowed upstream (tb.check_predictions finds the examples).",
            )
        in_unit = bool(low >= 0) and bool(high <= 1)
        if in_unit and bool(torch.allclose(logits.sum(-1), logits.new_ones(()), atol=1e-4)):
            fail(
                "logits",
                "logits or log-probabilities",
                logits,
                "These look like probabilities (in [0, 1], summing to 1): pass logits, or "
                "probs.log().",
            )
    return logits


def log_predictive(logits: Tensor) -> Tensor:
    """``log((1/S) sum_s softmax(logits_s))``: logsumexp over samples, in float32 or wider."""
    logits = check_logits(logits)
    return mixture(logits.to(torch.promote_types(logits.dtype, torch.float32)))


def mixture(wide: Tensor) -> Tensor:
    """The unchecked core of ``log_predictive``, on logits already widened."""
    return torch.logsumexp(F.log_softmax(wide, dim=-1), dim=0) - math.log(wide.shape[0])


def check_target(target: Any, logits: Tensor) -> Tensor:
    if not isinstance(target, Tensor) or target.is_floating_point() or target.is_complex():
        fail("target", "an integer tensor of class indices", target, error=TypeError)
    expected = tuple(logits.shape[1:-1])
    if tuple(target.shape) != expected:
        hint = (
            "logits seem to lack the leading sample axis: pass tb.predict's stacked output, or "
            "logits[None] for one deterministic model."
            if tuple(target.shape) == tuple(logits.shape[:-1])
            else ""
        )
        fail(
            "target", f"a tensor of shape {expected} (logits' shape without S and C)", target, hint
        )
    classes = logits.shape[-1]
    if target.numel() and not torch._C._functorch.is_functorch_wrapped_tensor(target):
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= classes:
            raise ValueError(
                f"target must hold class indices in [0, {classes}), got values in [{low}, {high}]."
            )
    return target.long()


def check_bins(num_bins: Any, binning: Any) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        fail("num_bins", "a positive int", num_bins)
    if binning not in ("width", "mass"):
        fail("binning", "'width' or 'mass'", binning)


class ReliabilityDiagram(NamedTuple):
    """Per-bin data of a reliability diagram; ``figure`` is a matplotlib figure or None."""

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    counts: Tensor
    ece: Tensor
    figure: Any = None


def bins(confidence: Tensor, correct: Tensor, num_bins: int, binning: str) -> ReliabilityDiagram:
    """Reliability bins of 1-d float64 ``confidence`` and ``correct`` (0/1) per example."""
    count = confidence.numel()
    if binning == "width":
        edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)
        index = torch.bucketize(confidence, edges[1:-1], right=False)  # (b_{i-1}, b_i]
    else:
        order = confidence.argsort(stable=True)
        index = torch.empty(count, dtype=torch.int64)
        index[order] = torch.arange(count) * num_bins // count
        sorted_conf = confidence[order]
        cuts = [int(i * count // num_bins) for i in range(num_bins + 1)]
        edges = torch.tensor(
            [0.0] + [float(sorted_conf[max(c - 1, 0)]) for c in cuts[1:-1]] + [1.0],
            dtype=torch.float64,
        )
    members = torch.zeros(num_bins, dtype=torch.float64).index_add_(
        0, index, torch.ones(count, dtype=torch.float64)
    )
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, correct)
    safe = members.clamp_min(1)
    ece = ((acc_sum - conf_sum).abs() / count).sum()
    return ReliabilityDiagram(edges, conf_sum / safe, acc_sum / safe, members.long(), ece)


def risk_coverage_area(confidence: Tensor, correct: Tensor) -> Tensor:
    """AURC of 1-d ``confidence`` and ``correct`` (0/1): the mean error rate of the ``k`` most
    confident examples over ``k = 1..n`` (ties kept in their given order)."""
    order = confidence.double().argsort(descending=True, stable=True)
    errors = 1.0 - correct.double()[order]
    risks = errors.cumsum(0) / torch.arange(1, errors.numel() + 1, dtype=torch.float64)
    return risks.mean()
