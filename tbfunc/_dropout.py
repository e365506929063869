"""Monte-Carlo dropout with masks drawn from keys, never from the global RNG.

While a forward runs with ``dropout=True``, every ``nn.Dropout*``, ``nn.AlphaDropout`` and
``nn.FeatureAlphaDropout`` is active, and a ``TorchFunctionMode`` replaces each dropout call
that would draw a mask (``F.dropout``, ``F.dropout1d/2d/3d``, ``F.alpha_dropout``,
``F.feature_alpha_dropout``, and ``F.scaled_dot_product_attention`` with ``dropout_p > 0``, as
in Hugging Face attention in training mode) by the same computation with a mask from keyed
uniform draws (``tbfunc::noise`` with ``uniform=True``): keep where ``u >= p``, probability
``1 - p``. The
``n``-th dropout call of a forward is keyed by ``fold_in(key, n)``, so the masks are a function
of the sample's key and the forward's call order: ``vmap`` over keys equals the loop. Internal.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from tbfunc import _noise, random

__all__ = ["DROPOUT_LAYERS", "active_dropout", "keyed_dropout"]

DROPOUT_LAYERS = (nn.modules.dropout._DropoutNd,)  # Dropout1-3d, AlphaDropout, FeatureAlpha...
_ALPHA = 1.7580993408473766  # SELU's -lambda * alpha, as in PyTorch's alpha dropout


@contextlib.contextmanager
def active_dropout(module: nn.Module) -> Iterator[None]:
    """Every dropout layer in training mode for the duration; the flags as they were after,
    even when the forward raises."""
    layers = [m for m in module.modules() if isinstance(m, DROPOUT_LAYERS)]
    flags = [m.training for m in layers]
    try:
        for layer in layers:
            layer.training = True
        yield
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.training = flag


@contextlib.contextmanager
def keyed_dropout(key: Tensor | None) -> Iterator[None]:
    """Dropout calls inside draw their masks from ``key`` (no-op for ``key=None``)."""
    if key is None:
        yield
        return
    with _KeyedDropout(key):
        yield


class _KeyedDropout(TorchFunctionMode):
    def __init__(self, key: Tensor) -> None:
        super().__init__()
        self.key = key
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            return func(*args, **kwargs)
        return handler(self, *args, **kwargs)

    def mask(self, shape: torch.Size, p: float, like: Tensor, scale: float = 1.0) -> Tensor:
        """``scale`` with probability ``1 - p``, else 0, in ``like``'s dtype and device.

        Built in place in the draws' own buffer with float arithmetic, ``floor(u + 1 - p)``
        (1 exactly when ``u >= p``, up to one rounding of the sum): a boolean mask and
        ``torch.where`` took 20x longer on the CPU (type promotion off the vectorised path),
        and ``ge_`` has no vmap batching rule."""
        site = random.fold_in(self.key, self.calls)
        self.calls += 1
        numel = math.prod(shape)
        draws = _noise.noise(site[None], None, [numel], like.dtype, like.device, uniform=True)
        return draws.view(shape).add_(1 - p).floor_().mul_(scale)


def _dropout(
    mode: _KeyedDropout,
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    spatial: int = 0,
    alpha: bool = False,
) -> Tensor:
    if not training or p == 0:
        return input
    if p == 1:
        return input * 0
    shape = input.shape
    if spatial:  # channel-wise masks: one draw per (batch, channel)
        kept = max(input.dim() - spatial, 1)
        shape = torch.Size([*input.shape[:kept], *([1] * (input.dim() - kept))])
    if not alpha:
        if shape == input.shape and not input.requires_grad:
            # the mask's own buffer becomes the output: one allocation less
            return mode.mask(shape, p, input).mul_(input).mul_(1 / (1 - p))
        return input * mode.mask(shape, p, input, 1 / (1 - p))
    mask = mode.mask(shape, p, input)
    a = 1 / math.sqrt((_ALPHA * _ALPHA * p + 1) * (1 - p))
    return input * (mask * a) + ((mask - 1) * (_ALPHA * a) + _ALPHA * a * p)


def _sdpa(
    mode: _KeyedDropout,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    if dropout_p == 0:
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    # the math path of scaled_dot_product_attention, with the keyed mask on the weights
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    factor = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * factor
    if is_causal:
        causal = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device)
        scores = scores.masked_fill(~causal.tril(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights = _dropout(mode, scores.softmax(-1), dropout_p)
    return weights @ value


_HANDLERS: dict[Any, Any] = {
    F.dropout: _dropout,
    F.dropout1d: lambda mode, x, p=0.5, training=True, inplace=False: _dropout(
        mode, x, p, training, spatial=1
    ),
    F.dropout2d: lambda mode, x, p=0.5, training=True, inplace=False: _dropout(
        mode, x, p, training, spatial=2
    ),
    F.dropout3d: lambda mode, x, p=0.5, training=True, inplace=False: _dropout(
        mode, x, p, training, spatial=3
    ),
    F.alpha_dropout: lambda mode, x, p=0.5, training=False, inplace=False: _dropout(
        mode, x, p, training, alpha=True
    ),
    F.feature_alpha_dropout: lambda mode, x, p=0.5, training=False, inplace=False: _dropout(
        mode, x, p, training, spatial=x.dim() - 2 if x.dim() > 2 else 0, alpha=True
    ),
    F.scaled_dot_product_attention: _sdpa,
}
