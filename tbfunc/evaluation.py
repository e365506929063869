"""``tb.evaluate``: ``predict`` over a DataLoader (or any iterable of batches), with the metrics
accumulated batch by batch in bounded memory."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tbfunc import _batches, _progress
from tbfunc._checks import check_key, fail
from tbfunc._forward import Strategy
from tbfunc.metrics import Accumulator, Summary
from tbfunc.module import predict

__all__ = ["evaluate"]


def evaluate(
    module: nn.Module,
    posterior: dict[str, Any],
    key: Tensor,
    batches: Iterable[Any],
    *,
    num_samples: int,
    chunk_size: int | None = None,
    strategy: Strategy = "auto",
    dropout: bool = False,
    output: Callable[[Any], Tensor] | None = None,
    unpack: _batches.Unpack | None = None,
    num_bins: int = 15,
    binning: Literal["width", "mass"] = "width",
    progress: bool | None = None,
) -> Summary:
    """Classification metrics of the Monte-Carlo predictive over every batch of ``batches``.

    Each batch runs ``tb.predict(module, posterior, key, ...)`` under ``torch.no_grad`` and goes
    into a ``tb.metrics.Accumulator``; its logits are dropped before the next batch. Every batch
    uses the same ``key``, so every example sees the same ``num_samples`` weight draws: the
    result equals ``predict`` on the whole set followed by the whole-set metrics (for a model
    whose rows do not interact; MC-dropout masks are drawn per batch shape, so with
    ``dropout=True`` it is a different, equally valid, draw). Memory: one batch's
    ``num_samples x batch x classes`` logits (``chunk_size`` bounds the weights and
    activations of ``predict``) plus 4 float64 scores per example.

    Args:
        module, posterior, key, num_samples, chunk_size, strategy, dropout: as in ``predict``.
        batches: a ``DataLoader`` or any iterable. A batch is ``(inputs, target)`` (``inputs``
            a tensor, a tuple of positional arguments or a dict of keyword arguments) or a
            dict holding ``"labels"`` (Hugging Face style; the other entries are keyword
            arguments).
        output: ``module output -> logits (S, ..., C)``; by default the output itself when it is
            a tensor, else its ``logits`` (a Hugging Face ``ModelOutput``).
        unpack: ``batch -> (args, kwargs, target)`` for other batch layouts (or to move a
            batch to the model's device: ``predict`` does not move inputs).
        num_bins, binning: calibration bins, as in ``expected_calibration_error``.
        progress: a progress line on stderr; by default when stderr is a terminal.

    Returns:
        a ``tb.metrics.Summary``: accuracy, NLL, Brier, ECE, AURC, the reliability bins and the
        per-example scores for ``auroc`` / ``fpr_at_tpr``.
    """
    key = check_key(key)
    if isinstance(batches, Tensor | Mapping) or not isinstance(batches, Iterable):
        fail(
            "batches",
            "an iterable of batches such as a DataLoader",
            batches,
            "Wrap tensors in a DataLoader(TensorDataset(x, y), batch_size=...).",
            error=TypeError,
        )
    if output is not None and not callable(output):
        fail("output", "a callable (module output -> logits)", output, error=TypeError)
    if unpack is not None and not callable(unpack):
        fail("unpack", "a callable (batch -> (args, kwargs, target))", unpack, error=TypeError)
    if progress is None:
        progress = sys.stderr.isatty()
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    accumulator = Accumulator(num_bins=num_bins, binning=binning)
    start = time.perf_counter()
    with torch.no_grad():
        for number, batch in enumerate(batches):
            args, kwargs, target = (unpack or _batches.unpack)(batch)
            out = predict(
                module,
                posterior,
                key,
                args,
                kwargs,
                num_samples=num_samples,
                chunk_size=chunk_size,
                strategy=strategy,
                dropout=dropout,
            )
            accumulator.update(_batches.logits_of(out, output), target)
            del out
            if progress:
                _progress.show(
                    number + 1,
                    total,
                    f"batches, {accumulator.count} examples",
                    time.perf_counter() - start,
                )
    if progress:
        _progress.finish()
    return accumulator.compute()
