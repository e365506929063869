"""Monte-Carlo prediction over a given list of sample keys, and the choice of strategy.

Shared by ``tbfunc.predict`` and ``tbfunc.distributed.predict`` (which runs a shard of the keys
on each rank). Internal.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tbfunc import _threefry
from tbfunc._boundary import (
    check_inputs,
    check_matches,
    check_modes,
    has_rnn,
    owner,
    tensor_leaves,
    weights_device,
)
from tbfunc._checks import check_key, check_optional_positive_int, check_positive_int, fail
from tbfunc._dropout import active_dropout
from tbfunc._forward import Weights, concat, pin_fixed_rows, run, run_plain
from tbfunc._sampling import hash32, sample_many, tracked
from tbfunc.posterior import is_posterior

__all__ = [
    "CHOICES",
    "check_args",
    "choose",
    "decide",
    "draw",
    "dropout_keys",
    "plan",
    "predict_keys",
    "prepare",
    "static_choice",
    "trial",
]

# Modules whose weights, once batched by vmap, fall off PyTorch's fast CPU kernels (grouped
# convolutions, the unfused attention path): a loop of S forwards is faster there.
_SLOW_UNDER_VMAP_ON_CPU = (nn.modules.conv._ConvNd, nn.MultiheadAttention)

_DROPOUT = hash32("dropout")
_MAX_CHOICES = 32  # per module

# the strategy chosen per module (dropped with it) and call signature: by choose's timing, or
# by predict's trial split of its first call
CHOICES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Literal["vmap", "loop"]]] = (
    weakref.WeakKeyDictionary()
)


def check_args(
    key: Any, num_samples: Any, chunk_size: Any, strategy: Any
) -> tuple[Tensor, int, int]:
    """``predict``'s knobs: the key, the sample count and the chunk size (default: all)."""
    count = check_positive_int(num_samples, "num_samples")
    chunk = check_optional_positive_int(chunk_size, "chunk_size") or count
    if strategy not in ("auto", "vmap", "loop"):
        fail("strategy", "one of 'auto', 'vmap', 'loop'", strategy)
    return check_key(key), count, chunk


def predict_keys(
    module: nn.Module,
    posterior: dict[str, Any],
    names: dict[str, str],
    keys: Tensor,
    args: Any,
    kwargs: Any,
    chunk: int,
    strategy: str,
    entry: str = "predict",
    dropout: bool = False,
) -> Any:
    """Outputs for the sample keys ``keys`` (one per row), stacked; checks already done.

    With ``"auto"`` and no choice yet for this call class, the call itself is the trial
    (``trial``): its first chunk runs vmapped and its first sample by the loop, each timed per
    sample; the faster is kept for the class (``decide``) and gives this call's outputs, so a
    call's result is always the chosen strategy's, bit for bit, as in every later call. An
    evaluation loop pays one extra looped forward, not a timing of both strategies."""
    auto = strategy == "auto"
    chosen, seen = strategy, None
    if auto:
        chosen, seen = plan(module, posterior, names, args, kwargs, min(chunk, len(keys)), dropout)
    outputs = []
    begin = 0
    if seen is not None:  # never under torch.compile (plan decides there)
        begin = min(chunk, len(keys))
        chosen, first = trial(module, posterior, names, keys[:begin], args, kwargs, entry, dropout)
        decide(module, seen, chosen)
        outputs.append(first)
    for start in range(begin, len(keys), chunk):
        weights = draw(module, posterior, names, keys[start : start + chunk], dropout)
        outputs.append(run(module, weights, args, kwargs, chosen, entry, fallback=auto))  # type: ignore[arg-type]
        # free this chunk's weights before the next is drawn: else two chunks coexist at the
        # peak, and chunk_size=S/2 saved nothing
        del weights
    return concat(outputs)


def trial(
    module: nn.Module,
    posterior: dict[str, Any],
    names: dict[str, str],
    keys: Tensor,
    args: Any,
    kwargs: Any,
    entry: str,
    dropout: bool,
) -> tuple[Literal["vmap", "loop"], Any]:
    """The faster strategy per sample for one chunk of real keys, and the chunk's outputs by
    it: vmap on every key against the loop on the first (the loop's other samples run only
    when it wins; every sample's output is a pure function of its key)."""

    def timed_run(strategy: Literal["vmap", "loop"], part: Tensor) -> tuple[Any, float]:
        started = time.perf_counter()
        weights = draw(module, posterior, names, part, dropout)
        out = run(module, weights, args, kwargs, strategy, entry, fallback=True)
        return out, (time.perf_counter() - started) / len(part)

    looped, loop_cost = timed_run("loop", keys[:1])
    vmapped, vmap_cost = timed_run("vmap", keys)  # (a vmap that had to loop costs more)
    if vmap_cost <= loop_cost:
        return "vmap", vmapped
    del vmapped
    rest = draw(module, posterior, names, keys[1:], dropout)
    return "loop", concat([looped, run(module, rest, args, kwargs, "loop", entry)])


def plan(
    module: nn.Module,
    posterior: dict[str, Any],
    names: dict[str, str],
    args: Any,
    kwargs: Any,
    count: int,
    dropout: bool = False,
) -> tuple[str, tuple | None]:
    """``predict``'s auto: the strategy, and the call class to decide by a trial split of this
    call (None once the class is decided, where a rule decides, or for one sample at a time,
    which nothing batches: the loop)."""
    fixed = static_choice(module, posterior, names, args, dropout)
    if fixed is not None:
        return fixed, None
    if count < 2:
        return "loop", None
    seen = signature(posterior, args, kwargs, count, dropout)
    decided = CHOICES.get(module, {}).get(seen)
    return (decided, None) if decided is not None else ("vmap", seen)


def decide(module: nn.Module, seen: tuple, chosen: Literal["vmap", "loop"]) -> None:
    """Keep ``chosen`` for the call class ``seen`` (bounded: a server meets many shapes)."""
    cache = CHOICES.setdefault(module, {})
    if len(cache) >= _MAX_CHOICES:
        cache.clear()
    cache[seen] = chosen


def prepare(
    module: nn.Module, posterior: Any, args: Any, kwargs: Any, entry: str, dropout: bool = False
) -> tuple[dict[str, str], torch.device | None]:
    if not isinstance(dropout, bool):
        fail("dropout", "a bool", dropout, error=TypeError)
    names = check_matches(module, posterior)
    check_modes(module, entry, dropout)
    device = weights_device(module, posterior)
    if device is not None and device.type == "meta":
        raise ValueError(
            f"{entry} needs weights with values, got a posterior on the meta device (shapes "
            "only). Materialise the module first (module.to_empty(device='cpu') and load its "
            "weights), then build the posterior with tb.from_module."
        )
    check_inputs(args, kwargs, device, entry)
    return names, device


def draw(
    module: nn.Module, posterior: Any, names: dict[str, str], keys: Tensor, dropout: bool = False
) -> Weights:
    """Weights with a leading sample axis, keyed by the module's own names, fixed rows pinned;
    with ``dropout``, sample ``s``'s masks are keyed by ``fold_in(keys[s], hash32("dropout"))``
    (no weight node is named that way: names hold a dot or are the root)."""
    drawn = pin_fixed_rows(module, names, sample_many(posterior, keys, validated=True))
    masks = dropout_keys(keys) if dropout else None
    return Weights({names[name]: value for name, value in drawn.items()}, len(keys), masks)


def dropout_keys(keys: Tensor) -> Tensor:
    """Per-sample keys for MC-dropout masks: ``fold_in(keys[s], hash32("dropout"))``."""
    return _threefry.fold_in_hashes(keys, [_DROPOUT])[0]


def choose(
    module: nn.Module,
    posterior: dict[str, Any],
    names: dict[str, str],
    args: Any,
    kwargs: Any,
    count: int,
    dropout: bool = False,
) -> Literal["vmap", "loop"]:
    fixed = static_choice(module, posterior, names, args, dropout)
    if fixed is not None:
        return fixed
    seen = signature(posterior, args, kwargs, count, dropout)
    decided = CHOICES.get(module, {}).get(seen)
    if decided is None:
        decided = timed(module, posterior, names, args, kwargs, count, dropout)
        decide(module, seen, decided)
    return decided


def static_choice(
    module: nn.Module,
    posterior: dict[str, Any],
    names: dict[str, str],
    args: Any,
    dropout: bool = False,
) -> Literal["vmap", "loop"] | None:
    """The strategy a rule decides without timing, or None where only timing can."""
    if has_rnn(module):
        return "loop"
    if not posterior:
        # dropout alone: vmap over the mask keys makes one forward of S x B rows
        return "vmap" if dropout else "loop"
    device = weights_device(module, posterior)
    if device is not None and device.type != "cpu":
        return "vmap"
    for name in names.values():
        if isinstance(owner(module, name), _SLOW_UNDER_VMAP_ON_CPU):
            return "loop"
    means = [value(node) for node in posterior.values()]
    if args is None or torch.compiler.is_compiling() or tracked(*means):
        return "vmap"
    return None


def timed(
    module: nn.Module,
    posterior: dict[str, Any],
    names: dict[str, str],
    args: Any,
    kwargs: Any,
    count: int,
    dropout: bool = False,
) -> Literal["vmap", "loop"]:
    """Time both strategies on ``count`` copies of the mean weights (the loop through one
    forward, scaled by ``count``); the faster wins. With
    ``dropout`` the timing runs as the call will: dropout layers on, masks from fixed keys (a
    forward in training mode would otherwise draw its masks from the global RNG)."""
    # any keys serve: only the time is kept
    masks = (
        dropout_keys(_threefry.split(torch.zeros(2, dtype=torch.int64), count)) if dropout else None
    )
    mean_weights = Weights(
        {
            names[name]: value(node).detach()[None].expand(count, *value(node).shape).clone()
            for name, node in posterior.items()
        },
        count,
        masks,
    )
    # the loop's cost is count times one forward: time one (its first run, a warm-up, is not
    # kept), so the timing costs about two vmapped calls, not two vmapped and two looped ones
    one = Weights(
        {name: tensor[:1] for name, tensor in mean_weights.tensors.items()},
        1,
        None if masks is None else masks[:1],
    )
    runs = {"vmap": (mean_weights, 1), "loop": (one, count)}
    best: dict[str, float] = {}
    for strategy in ("loop", "vmap", "loop", "vmap"):
        if best.get(strategy) == math.inf:
            continue
        weights, scale = runs[strategy]
        start = time.perf_counter()
        try:
            with active_dropout(module) if dropout else contextlib.nullcontext():
                run_plain(module, weights, args, kwargs, strategy)
        except Exception:  # it cannot run: never pick it (the real call explains the error)
            best[strategy] = math.inf
            continue
        elapsed = (time.perf_counter() - start) * scale
        best[strategy] = min(best.get(strategy, math.inf), elapsed)
    return "vmap" if best["vmap"] <= best["loop"] and best["vmap"] < math.inf else "loop"


def value(node: Any) -> Tensor:
    return node.mu if is_posterior(node) else node


def signature(
    posterior: dict[str, Any], args: Any, kwargs: Any, count: int, dropout: bool = False
) -> tuple:
    """What the choice is kept for: the posterior's structure, and a coarse class of the call
    (each input's rank, dtype, device and size rounded to a power of two; the sample count
    likewise). A dynamically padded evaluation loop (B x T, T varying) then decides once or
    twice, not once per batch; the grad mode is left out: it changes both strategies alike."""
    nodes = tuple(
        (name, tuple(value(node).shape), value(node).dtype, value(node).device)
        for name, node in posterior.items()
    )
    inputs = tuple(
        (where, leaf.dim(), leaf.dtype, leaf.device, _octave(leaf.numel()))
        for where, leaf in tensor_leaves(args, kwargs)
    )
    return nodes, inputs, _octave(count), dropout


def _octave(size: int) -> int:
    return max(size, 1).bit_length()
