"""Running a module on stacked weight samples: vmap or a loop (private).

``predict``, ``functional_call`` and ``nelbo`` all go through here, so they share one treatment
of outputs (any pytree registered with ``torch.utils._pytree``, such as Hugging Face
``ModelOutput``; non-tensor leaves such as ``None`` pass through) and one way of swapping a
draw's tensors into the module. The checks before a call live in ``_boundary``, the global-RNG
guard in ``_rng_guard``, the module-structure caches in ``_structure``, the explanations of a
failed forward in ``_explain``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tbfunc._boundary import owner, table_slot
from tbfunc._concurrency import SharedSwitch
from tbfunc._dropout import active_dropout, keyed_dropout
from tbfunc._explain import first_line, raise_if_forward_fails, same_kind
from tbfunc._sampling import tracked
from tbfunc._structure import GENERATION, SLOTS, Facts, module_facts
from tbfunc._vmap import leading

__all__ = [
    "Strategy",
    "UnstackableOutputError",
    "Weights",
    "concat",
    "index",
    "pin_fixed_rows",
    "run",
    "run_plain",
]


Strategy = Literal["auto", "vmap", "loop"]


# Running.


class Weights(NamedTuple):
    """Sampled weights keyed by the module's own names, each with a leading axis ``samples``
    (which also holds for an empty posterior: that many deterministic forwards)."""

    tensors: dict[str, Tensor]
    samples: int
    dropout: Tensor | None = None  # (samples, 2) keys for MC-dropout masks, or no dropout


def run(
    module: nn.Module,
    weights: Weights,
    args: Any,
    kwargs: Any,
    strategy: Literal["vmap", "loop", "single"],
    entry: str,
    *,
    fallback: bool = False,
) -> Any:
    """The module's outputs for every weight sample, stacked leaf by leaf on a leading axis
    (``"single"``: the one sample's output as it is). Errors are explained in the user's terms;
    with ``fallback``, a forward that only vmap cannot run is looped instead.
    """
    switched = active_dropout(module) if weights.dropout is not None else contextlib.nullcontext()
    with switched:
        if torch.compiler.is_compiling():
            return run_plain(module, weights, args, kwargs, strategy)
        try:
            return run_plain(module, weights, args, kwargs, strategy)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            if isinstance(error, UnstackableOutputError):
                raise  # the output's type, not the strategy: looping would not help
            raise_if_forward_fails(
                error, module, lambda: _one(module, weights, 0, args, kwargs), entry, strategy
            )
            if strategy != "vmap":
                raise
            if fallback:
                return run_plain(module, weights, args, kwargs, "loop")
            message = (
                f"{entry}(strategy='vmap') failed inside torch.func.vmap, although the forward "
                f"runs for one weight sample without it: {first_line(error)} Use "
                "strategy='loop' for modules whose forward vmap cannot batch."
            )
            raise same_kind(error, message) from error


def run_plain(
    module: nn.Module,
    weights: Weights,
    args: Any,
    kwargs: Any,
    strategy: Literal["vmap", "loop", "single"],
) -> Any:
    """``run`` without the explanations (``choose_strategy``'s timing)."""
    if strategy == "single":
        return _one(module, weights, 0, args, kwargs, _slots(module, weights.tensors))
    if strategy == "vmap" and (weights.tensors or weights.dropout is not None):
        return _vmapped(module, weights, args, kwargs)
    return _looped(module, weights, args, kwargs)


def _one(
    module: nn.Module,
    weights: Weights,
    i: int,
    args: Any,
    kwargs: Any,
    slots: list[tuple[dict, str]] | None = None,
) -> Any:
    """Sample ``i`` alone: its weights, and its dropout masks if any."""
    # a lone sample by squeeze, a view whose backward is a view too; indexing's backward
    # writes a zero tensor of the whole stack and copies the gradient into it
    params = {
        name: value.squeeze(0) if weights.samples == 1 else value[i]
        for name, value in weights.tensors.items()
    }
    with keyed_dropout(None if weights.dropout is None else weights.dropout[i]):
        return _call(module, params, args, kwargs, slots)


def _slots(
    module: nn.Module, names: Any, facts: Facts | None = None
) -> list[tuple[dict, str]] | None:
    """For each name, the ``_parameters`` or ``_buffers`` table holding it and its key, or None
    where ``torch.func.functional_call``'s general path is needed: tied weights (a draw must
    reach every name of the tensor), attributes that are no plain parameter or buffer
    (parametrizations), scripted modules, and code being compiled (dynamo knows
    functional_call). Kept per module and names until the module's structure moves."""
    if torch.compiler.is_compiling() or isinstance(module, torch.jit.ScriptModule):
        return None
    if (facts or module_facts(module)).tied:
        return None
    key = tuple(names)
    per_module = SLOTS.setdefault(module, {})
    cached = per_module.get(key)
    if cached is not None and cached[0] == GENERATION[0]:
        return cached[1]
    found = [table_slot(module, name) for name in key]
    resolved = [slot for slot in found if slot is not None]
    # a name that is no plain parameter or buffer: functional_call's general path
    slots = resolved if len(resolved) == len(found) else None
    if len(per_module) > 16:
        per_module.clear()
    per_module[key] = (GENERATION[0], slots)
    return slots


def _call(
    module: nn.Module,
    params: dict[str, Tensor],
    args: Any,
    kwargs: Any,
    slots: list[tuple[dict, str]] | None,
) -> Any:
    """``torch.func.functional_call(module, params, args, kwargs)``. With ``slots`` the tensors
    are swapped into the module's tables directly and back afterwards, which is what
    functional_call does, without its per-call name resolution and checks (a fifth of a small
    MLP's vmapped forward)."""
    if slots is None:
        return torch.func.functional_call(module, params, args, kwargs)
    saved = [table[key] for table, key in slots]
    try:
        for (table, key), value in zip(slots, params.values(), strict=True):
            table[key] = value
        positional = args if isinstance(args, tuple) else (args,)
        return module(*positional, **(kwargs or {}))
    finally:
        for (table, key), value in zip(slots, saved, strict=True):
            table[key] = value


def index(outputs: Any, i: int) -> Any:
    """Sample ``i`` of stacked outputs; non-tensor leaves as they are."""
    return pytree.tree_map(lambda x: x[i] if isinstance(x, Tensor) else x, outputs)


def concat(parts: list[Any]) -> Any:
    """Join chunks of stacked outputs along the sample axis (the first chunk's non-tensors)."""
    if len(parts) == 1:
        return parts[0]
    flat = [pytree.tree_flatten(part) for part in parts]
    leaves, spec = flat[0]
    joined = [
        torch.cat([f[0][i] for f in flat]) if isinstance(leaf, Tensor) else leaf
        for i, leaf in enumerate(leaves)
    ]
    return pytree.tree_unflatten(joined, spec)


def _vmapped(module: nn.Module, weights: Weights, args: Any, kwargs: Any) -> Any:
    static: dict[str, Any] = {}
    facts = None if torch.compiler.is_compiling() else module_facts(module)
    slots = _slots(module, weights.tensors, facts)

    def forward(params: dict[str, Tensor], *dropout: Tensor) -> tuple[Tensor, ...]:
        with keyed_dropout(dropout[0]) if dropout else contextlib.nullcontext():
            out = _call(module, params, args, kwargs, slots)
        if isinstance(out, Tensor):  # the common case, without a pytree walk
            static["leaves"] = None
            return (out,)
        leaves, static["spec"] = pytree.tree_flatten(out)
        _check_leaves(leaves)
        static["leaves"] = leaves
        # vmap returns only tensors: the rest (None, ints, strings) is put back afterwards.
        return tuple(leaf for leaf in leaves if isinstance(leaf, Tensor))

    extra = () if weights.dropout is None else (weights.dropout,)
    if facts is not None and not facts.attends:  # nothing to switch (and no context to enter)
        outputs = leading(forward, weights.tensors, extra, weights.samples)
    else:
        with _batchable_kernels(weights.tensors):
            outputs = leading(forward, weights.tensors, extra, weights.samples)
    if static["leaves"] is None:
        return outputs[0]
    batched = iter(outputs)
    leaves = [next(batched) if isinstance(x, Tensor) else x for x in static["leaves"]]
    return pytree.tree_unflatten(leaves, static["spec"])


def _looped(module: nn.Module, weights: Weights, args: Any, kwargs: Any) -> Any:
    slots = _slots(module, weights.tensors)
    outs = [_one(module, weights, i, args, kwargs, slots) for i in range(weights.samples)]
    flat = [pytree.tree_flatten(out) for out in outs]
    leaves, spec = flat[0]
    _check_leaves(leaves)
    stacked = []
    for i, leaf in enumerate(leaves):
        column = [f[0][i] for f in flat]
        if isinstance(leaf, Tensor):
            stacked.append(torch.stack(column))
            continue
        differs = [other for other in column[1:] if other != leaf]
        if differs:
            raise ValueError(
                f"output leaf {i} must be a tensor or equal across samples, got {leaf!r} "
                f"and {differs[0]!r}."
            )
        stacked.append(leaf)
    return pytree.tree_unflatten(stacked, spec)


class UnstackableOutputError(TypeError):
    """The module returned an object whose tensors pytree cannot reach."""


_STATIC = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _check_leaves(leaves: list[Any]) -> None:
    """An output object that pytree cannot open (an unregistered dataclass, a custom class)
    would be passed through as one leaf, hiding its tensors from the stacking (vmap would even
    leak its traced tensors out): refuse it with the fix instead."""
    for leaf in leaves:
        if not isinstance(leaf, (Tensor, *_STATIC)):
            raise UnstackableOutputError(
                f"the module's output holds an object of type {type(leaf).__name__}, which "
                "torch.utils._pytree cannot open, so its tensors cannot be stacked over the "
                "samples. Return a tensor, tuple, list, dict or Hugging Face ModelOutput, or "
                "register the class (torch.utils._pytree.register_dataclass)."
            )


def pin_fixed_rows(module: nn.Module, names: dict[str, str], weights: dict[str, Tensor]) -> dict:
    """Rows the module keeps fixed take the module's own value in every draw.

    ``nn.Embedding(padding_idx=i)`` never trains row ``i`` (no data gradient reaches it), so a
    posterior over it would only drift with the KL; pinning it keeps predictions independent of
    padding, as in the deterministic model. ``weights`` carry a leading sample axis.
    """
    out = weights
    for name, actual in names.items():
        found = padding_row(module, actual)
        if found is None:
            continue
        layer, index = found
        fixed = layer.weight.detach()[index]
        rows = torch.arange(layer.weight.shape[0], device=fixed.device) == index
        out = dict(out) if out is weights else out
        out[name] = torch.where(rows[:, None], fixed, weights[name])
    return out


def padding_row(module: nn.Module, name: str) -> tuple[nn.Embedding | nn.EmbeddingBag, int] | None:
    """The embedding whose weight is at ``name`` and the row it keeps fixed (its
    ``padding_idx``, read at every call: it can change), or None."""
    if not name.endswith("weight"):  # before the submodule look-up: this runs every call
        return None
    layer = owner(module, name)
    if not isinstance(layer, nn.Embedding | nn.EmbeddingBag) or layer.padding_idx is None:
        return None
    return layer, layer.padding_idx


@contextlib.contextmanager
def _batchable_kernels(weights: dict[str, Tensor]) -> Iterator[None]:
    """Select kernels that vmap can batch.

    The fused transformer-layer kernel, and on the CPU the flash-attention kernel, have no
    batching rule: vmap would run them in a slow per-sample fallback, while their unfused
    versions batch properly. On CUDA the fused attention kernels batch in the forward, but the
    memory-efficient one's backward fails under vmap ("LSE is not correctly aligned"), so
    training uses the math path. ``set_fastpath_enabled`` cannot be traced: under
    ``torch.compile`` the compiler sees the non-fastpath code anyway. ``_vmapped`` skips this
    for modules without attention (``facts``): there is nothing to switch.
    """
    leaves = list(weights.values())
    unfused = all(w.is_cpu for w in leaves) or tracked(*leaves)
    if torch.compiler.is_compiling():
        with sdpa_kernel([SDPBackend.MATH]) if unfused else contextlib.nullcontext():
            yield
        return
    # process-wide settings: reference-counted across threads (tbfunc._concurrency)
    _FASTPATH_OFF.turn()
    if unfused:
        _MATH_ONLY.turn()
    try:
        yield
    finally:
        if unfused:
            _MATH_ONLY.release()
        _FASTPATH_OFF.release()


# (getter, setter, on for MATH only) for each SDPA backend this torch knows, as sdpa_kernel
_SDP_SWITCHES = tuple(
    (getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"))
    for name in ("flash", "mem_efficient", "cudnn", "overrideable", "math")
    if hasattr(torch._C, f"_get_{name}_sdp_enabled") and hasattr(torch._C, f"_set_sdp_use_{name}")
)


_SDP_MATH_ONLY = tuple(setter is torch._C._set_sdp_use_math for _, setter in _SDP_SWITCHES)


def _set_sdp(states: tuple[bool, ...]) -> None:
    # sdpa_kernel([MATH]) by hand: the context manager costs 25 µs a call, these 1 µs each
    for (_, enable), on in zip(_SDP_SWITCHES, states, strict=True):
        enable(on)


_FASTPATH_OFF = SharedSwitch(
    torch.backends.mha.get_fastpath_enabled,
    lambda: torch.backends.mha.set_fastpath_enabled(False),
    torch.backends.mha.set_fastpath_enabled,
)


_MATH_ONLY = SharedSwitch(
    lambda: tuple(enabled() for enabled, _ in _SDP_SWITCHES),
    lambda: _set_sdp(_SDP_MATH_ONLY),
    _set_sdp,
)
