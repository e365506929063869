"""Classification metrics accumulated over batches (``tb.metrics.Accumulator``).

Sums (NLL, Brier, correct predictions) are kept in float64 scalars; the per-example scores that
ranking metrics need (confidence, correctness, predictive entropy, mutual information) are kept
as 1-d float64 tensors on the CPU: O(N) memory, against O(S x N x C) for the stacked logits of
the whole set. Every number is computed with the operations of the whole-set functions in
``tbfunc.metrics``, on each batch's rows, so the two agree to rounding (and the ranking metrics
on the kept scores exactly).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from tbfunc import _classification as core
from tbfunc._classification import ReliabilityDiagram

__all__ = ["Accumulator", "Summary"]


class Summary(NamedTuple):
    """What an ``Accumulator`` (or ``tb.evaluate``) measured over all the examples it saw.

    Scalars are 0-d float64 tensors equal to the whole-set functions on the concatenated
    logits: ``accuracy``, ``nll``, ``brier`` (``brier_score``), ``ece``
    (``expected_calibration_error``), ``aurc`` (``aurc(confidence, correct)``); ``reliability``
    is ``reliability_diagram``'s data. Per example (1-d, float64, CPU, in the order seen):
    ``confidence`` (the mixture's top probability), ``correct`` (1.0 or 0.0), ``entropy``
    (``predictive_entropy``) and ``mutual_information``; pass them to ``auroc`` /
    ``fpr_at_tpr`` against another set's scores for OOD detection.
    """

    num_examples: int
    accuracy: Tensor
    nll: Tensor
    brier: Tensor
    ece: Tensor
    aurc: Tensor
    reliability: ReliabilityDiagram
    confidence: Tensor
    correct: Tensor
    entropy: Tensor
    mutual_information: Tensor


class Accumulator:
    """Streaming classification metrics over batches of Monte-Carlo logits, in bounded memory.

    ``update(logits, target)`` takes what ``tb.metrics.nll`` takes: logits ``(S, ..., C)`` of
    one batch and integer targets ``(...)``; every element of ``...`` counts as one example.
    ``compute()`` returns a ``Summary`` equal (to rounding, float64 sums of the per-example
    values) to the whole-set functions on all batches' logits concatenated along the example
    axis. Memory: the per-example scores, 4 float64 values per example, whatever ``S`` and
    ``C``; a batch's own logits are released after ``update``.

    Args:
        num_bins: calibration bins, as in ``expected_calibration_error``.
        binning: ``"width"`` or ``"mass"``, as there (the kept confidences make both exact).

    Example:
        >>> import torch, tbfunc as tb
        >>> acc = tb.metrics.Accumulator()
        >>> logits = torch.tensor([[[2.0, -1.0], [-1.0, 1.0]]])  # S=1, two examples
        >>> acc.update(logits[:, :1], torch.tensor([0]))
        >>> acc.update(logits[:, 1:], torch.tensor([0]))
        >>> acc.compute().accuracy
        tensor(0.5000, dtype=torch.float64)
    """

    def __init__(self, *, num_bins: int = 15, binning: Literal["width", "mass"] = "width") -> None:
        core.check_bins(num_bins, binning)
        self.num_bins = num_bins
        self.binning = binning
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._sums = torch.zeros(3, dtype=torch.float64)  # nll, brier, accuracy hits
        self._count = 0
        self._scores: list[Tensor] = []  # (4, B) per batch: confidence, correct, H, MI

    @property
    def count(self) -> int:
        """The number of examples seen."""
        return self._count

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add one batch: logits ``(S, ..., C)`` and integer targets ``(...)`` (an empty batch
        adds nothing)."""
        if isinstance(logits, Tensor) and logits.dim() >= 2 and logits.numel() == 0:
            core.check_target(target, logits)
            return
        logits = core.check_logits(logits)
        target = core.check_target(target, logits)
        logits = logits.detach()
        log_p = core.mixture(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        classes = log_p.shape[-1]
        log_p = log_p.reshape(-1, classes)
        target = target.reshape(-1)
        probs = log_p.exp()
        nll = -log_p.gather(-1, target[:, None])[:, 0]
        brier = ((probs - F.one_hot(target, classes).to(probs.dtype)) ** 2).sum(-1)
        hits = log_p.argmax(-1) == target  # as metrics.accuracy
        top, predicted = probs.max(-1)  # as the calibration bins
        entropy = -(probs * log_p).sum(-1)
        log_s = F.log_softmax(logits, dim=-1)
        expected = -(log_s.exp() * log_s).sum(-1).mean(0).reshape(-1)
        information = (entropy - expected).clamp_min(0)
        sums = torch.stack([nll.double().sum(), brier.double().sum(), hits.double().sum()])
        self._sums += sums.cpu()
        correct = (predicted == target).double()
        scores = torch.stack([top.double(), correct, entropy.double(), information.double()])
        self._scores.append(scores.cpu())
        self._count += target.numel()

    def compute(self) -> Summary:
        """The metrics over every example seen since construction (or ``reset``)."""
        if self._count == 0:
            raise ValueError(
                "Accumulator.compute needs at least one example: call update(logits, target) "
                "first (an empty DataLoader gives none)."
            )
        scores = torch.cat(self._scores, dim=1)
        self._scores = [scores]  # later updates concatenate onto one tensor, not many
        confidence, correct, entropy, information = scores.unbind(0)
        nll, brier, hits = (self._sums / self._count).unbind(0)
        reliability = core.bins(confidence, correct, self.num_bins, self.binning)
        return Summary(
            num_examples=self._count,
            accuracy=hits,
            nll=nll,
            brier=brier,
            ece=reliability.ece,
            aurc=core.risk_coverage_area(confidence, correct),
            reliability=reliability,
            confidence=confidence,
            correct=correct,
            entropy=entropy,
            mutual_information=information,
        )

    def __repr__(self) -> str:
        return (
            f"Accumulator(count={self._count}, num_bins={self.num_bins}, binning={self.binning!r})"
        )
