"""Running a module on stacked weight samples: vmap or a loop, the same rules for every entry.

``predict``, ``functional_call`` and ``nelbo`` all go through here, so they share one set of
checks (names, shapes, devices, training-mode layers), one treatment of outputs (any pytree
registered with ``torch.utils._pytree``, such as Hugging Face ``ModelOutput``; non-tensor leaves
such as ``None`` pass through), one guard that the forward never touched the global RNG, and one
way of explaining failures. Internal.
"""

from __future__ import annotations

import contextlib
import fnmatch
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tbfunc._checks import check_posterior_dict, fail
from tbfunc._concurrency import SharedSwitch
from tbfunc._dropout import DROPOUT_LAYERS, active_dropout, keyed_dropout
from tbfunc._sampling import canonical, tracked
from tbfunc.posterior import GAUSSIAN_FAMILIES, check_node, is_posterior

__all__ = [
    "Strategy",
    "Weights",
    "check_inputs",
    "check_matches",
    "check_modes",
    "concat",
    "has_rnn",
    "index",
    "owner",
    "pin_fixed_rows",
    "rng_guard",
    "run",
    "run_plain",
    "tensor_leaves",
    "weights_device",
]

Strategy = Literal["auto", "vmap", "loop"]


# ----------------------------------------------------------------------------------------------
# Checks at the boundary.


def check_matches(module: nn.Module, posterior: Any) -> dict[str, str]:
    """Validate ``posterior`` against the module; return ``{posterior name: module name}``.

    A name may be the module's own or its canonical form (without ``_orig_mod.``, which
    ``torch.compile`` inserts), so one posterior serves the eager and the compiled module.
    The result is kept for the same module structure (see ``_GENERATION``) and the same node
    tensors (by identity), so repeated calls on one posterior do not redo the checks.
    """
    if not isinstance(module, nn.Module):
        fail("module", "an nn.Module", module, error=TypeError)
    check_posterior_dict(posterior)
    if torch.compiler.is_compiling():
        # no cache under the compiler: reading the library's mutable state (the structure
        # counter, the tables) would become a guard, and any module created anywhere would
        # recompile the caller; the checks trace once into nothing
        return _check_matches(module, posterior)
    cached = _MATCHES.get(module)
    if cached is not None and cached[0] == _GENERATION[0] and _same_nodes(posterior, cached[1]):
        return cached[2]
    names = _check_matches(module, posterior)
    witnesses = _witnesses(posterior)
    if witnesses is not None:
        _MATCHES[module] = (_GENERATION[0], witnesses, names)
    return names


def _witnesses(posterior: dict) -> tuple | None:
    """``(name, weak mu, weak rho)`` per node: what a kept check is valid for (our Gaussian
    nodes only; other families are checked every time)."""
    found = []
    for name, node in posterior.items():
        if not isinstance(node, GAUSSIAN_FAMILIES):
            return None
        found.append((name, weakref.ref(node.mu), weakref.ref(node.rho)))
    return tuple(found)


def _same_nodes(posterior: dict, witnesses: tuple) -> bool:
    if len(posterior) != len(witnesses):
        return False
    for (name, node), (seen, mu, rho) in zip(posterior.items(), witnesses, strict=True):
        if (
            name != seen
            or not isinstance(node, GAUSSIAN_FAMILIES)
            or node.mu is not mu()
            or node.rho is not rho()
        ):
            return False
    return True


def _check_matches(module: nn.Module, posterior: dict) -> dict[str, str]:
    tensors: dict[str, Tensor] = {}  # filled lazily: most names are found by a direct look-up
    by_canonical: dict[str, str] = {}
    names: dict[str, str] = {}
    for name, node in posterior.items():
        slot = _slot(module, name)
        target = None if slot is None else slot[0][slot[1]]
        actual: str | None = name
        if target is None:
            if not tensors:
                tensors.update(module.named_parameters(remove_duplicate=False))
                tensors.update(module.named_buffers(remove_duplicate=False))
                by_canonical.update((canonical(n), n) for n in tensors)
            actual = by_canonical.get(canonical(name))
        where = f"posterior[{name!r}]"
        if actual is None:
            close = fnmatch.filter(by_canonical, f"*{name.rpartition('.')[2]}*")[:5]
            raise ValueError(
                f"{where} names no parameter or buffer of {type(module).__name__}"
                + (f"; close names: {close}." if close else ".")
            )
        if is_posterior(node):
            check_node(node, where)
            value, field = node.mu, f"{where}.mu"
        elif isinstance(node, Tensor):
            value, field = node, where
        else:
            fail(
                where,
                "a posterior node (e.g. tb.PretrainedGaussianPosterior(mu, rho)) or a tensor",
                node,
                error=TypeError,
            )
        target = tensors[actual] if target is None else target
        if (
            value.shape != target.shape
            or value.dtype != target.dtype
            # no device objects in the common case: both on the CPU
            or (not (value.is_cpu and target.is_cpu) and value.device.type != target.device.type)
        ):
            for what, mine, theirs in (
                ("shape", tuple(value.shape), tuple(target.shape)),
                ("dtype", value.dtype, target.dtype),
                ("device", value.device.type, target.device.type),
            ):
                if mine != theirs:
                    raise ValueError(
                        f"{field} has {what} {mine} but the module's parameter has {what} {theirs}."
                    )
        names[name] = actual
    return names


def owner(module: nn.Module, name: str) -> nn.Module | None:
    """The submodule that holds the tensor at ``name`` (a walk of ``_modules``, several times
    cheaper than ``get_submodule``), or None."""
    found: Any = module
    for part in name.split(".")[:-1]:
        found = found._modules.get(part) if isinstance(found, nn.Module) else None
        if found is None:
            return None
    return found if isinstance(found, nn.Module) else None


def _slot(module: nn.Module, name: str) -> tuple[dict, str] | None:
    """The ``_parameters`` or ``_buffers`` table holding a tensor at ``name``, and its key,
    found without walking the whole module; None where no plain parameter or buffer is."""
    holder = owner(module, name)
    if holder is None:
        return None
    leaf = name.rpartition(".")[2]
    for table in (holder._parameters, holder._buffers):
        if table.get(leaf) is not None:
            return table, leaf
    return None


def check_modes(module: nn.Module, entry: str, dropout: bool = False) -> None:
    """One rule for every entry point: no layer may draw from the global RNG or update state.

    Refused in training mode: dropout with ``p > 0`` (``nn.Dropout*``, ``AlphaDropout``, RNN and
    attention dropout), normalisation layers that track running statistics, and spectral norm
    (it updates its power-iteration vectors). Forwards that draw from the global RNG by other
    means (``F.dropout(..., training=True)``) are caught by ``rng_guard``. With ``dropout``
    the dropout layers are allowed: their masks come from keys (``tbfunc._dropout``).
    """
    for name, layer in _training_layers(module):
        if dropout and isinstance(layer, DROPOUT_LAYERS):
            continue
        reason = _stateful_in_training(layer)
        if reason:
            raise ValueError(
                f"module must be in eval mode for {entry}, got {type(layer).__name__} "
                f"{name or '(root)'!r} in training mode: its forward would {reason}. "
                "Call module.eval() first."
            )


def _training_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for the layers in training mode; names are built only if there are
    any (``named_modules`` costs more than the check on every call)."""
    if any(layer.training for layer in _layers(module)):
        yield from ((n, m) for n, m in module.named_modules() if m.training)


def check_inputs(args: Any, kwargs: Any, device: torch.device | None, entry: str) -> None:
    """Floating-point inputs must sit on the weights' device type (meta inputs never do).

    vmap would otherwise compute with mismatched devices or return garbage (a meta input gives
    the sampled biases); integer tensors (lengths, indices) and scalars may stay on the CPU.
    """
    for where, leaf in tensor_leaves(args, kwargs):
        if leaf.device.type == "meta" and (device is None or device.type != "meta"):
            fail(where, "a tensor with data", leaf, f"{entry} cannot run on meta tensors.")
        if (
            device is not None
            and leaf.is_floating_point()
            and leaf.dim() > 0
            and leaf.device.type != device.type
        ):
            fail(
                where,
                f"on the weights' device ({device.type})",
                leaf,
                f"Move it with .to({device.type!r}).",
            )


def has_rnn(module: nn.Module) -> bool:
    """RNN layers (``aten::lstm`` and its kin) have no vmap batching rule: such modules loop."""
    return any(isinstance(layer, nn.RNNBase) for layer in _layers(module))


def weights_device(module: nn.Module, posterior: dict[str, Any]) -> torch.device | None:
    for node in posterior.values():
        return node.mu.device if is_posterior(node) else node.device
    for tensor in module.parameters():
        return tensor.device
    return None


class rng_guard:
    """Fail, and restore the global RNG, if the forward inside drew from it (eager only).

    A class rather than a generator context manager: it runs on every call, and the CPU state
    is compared as bytes (cheaper than ``torch.equal`` on the 5 KB state tensor)."""

    def __init__(self, entry: str, device: torch.device | None) -> None:
        self.entry = entry
        self.cuda = device if device is not None and device.type == "cuda" else None

    def __enter__(self) -> None:
        self.active = not torch.compiler.is_compiling()
        if self.active:
            self.before = torch.get_rng_state()
            cuda = self.cuda
            self.cuda_before = torch.cuda.get_rng_state(cuda) if cuda is not None else self.before

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if not self.active:
            return
        changed = _differ(self.before, torch.get_rng_state())
        cuda = self.cuda
        if cuda is not None and not torch.equal(self.cuda_before, torch.cuda.get_rng_state(cuda)):
            changed = True
            torch.cuda.set_rng_state(self.cuda_before, cuda)
        if changed:
            torch.set_rng_state(self.before)
            if kind is None:
                raise RuntimeError(
                    f"{self.entry}: the module's forward drew from the global RNG (e.g. "
                    "F.dropout with training=True, or a random layer in training mode), which "
                    "tbfunc never reads; the RNG state was restored. Call module.eval() first."
                )


def _differ(before: Tensor, after: Tensor) -> bool:
    """Two CPU RNG states, compared as bytes where they have data (inside a ``torch.func``
    transform even these fresh tensors are wrapped: ``torch.equal`` then)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return not torch.equal(before, after)
    return before.numpy().tobytes() != after.numpy().tobytes()


def pin_fixed_rows(module: nn.Module, names: dict[str, str], weights: dict[str, Tensor]) -> dict:
    """Rows the module keeps fixed take the module's own value in every draw.

    ``nn.Embedding(padding_idx=i)`` never trains row ``i`` (no data gradient reaches it), so a
    posterior over it would only drift with the KL; pinning it keeps predictions independent of
    padding, as in the deterministic model. ``weights`` carry a leading sample axis.
    """
    out = weights
    for name, actual in names.items():
        if not actual.endswith("weight"):  # before the submodule look-up: this runs every call
            continue
        layer = owner(module, actual)
        if not isinstance(layer, nn.Embedding | nn.EmbeddingBag) or layer.padding_idx is None:
            continue
        fixed = layer.weight.detach()[layer.padding_idx]
        rows = torch.arange(layer.weight.shape[0], device=fixed.device) == layer.padding_idx
        out = dict(out) if out is weights else out
        out[name] = torch.where(rows[:, None], fixed, weights[name])
    return out


# ----------------------------------------------------------------------------------------------
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
            _raise_if_forward_fails(error, module, weights, args, kwargs, entry, strategy)
            if strategy != "vmap":
                raise
            if fallback:
                return run_plain(module, weights, args, kwargs, "loop")
            message = (
                f"{entry}(strategy='vmap') failed inside torch.func.vmap, although the forward "
                f"runs for one weight sample without it: {_first_line(error)} Use "
                "strategy='loop' for modules whose forward vmap cannot batch."
            )
            raise _same_kind(error, message) from error


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
    params = {name: value[i] for name, value in weights.tensors.items()}
    with keyed_dropout(None if weights.dropout is None else weights.dropout[i]):
        return _call(module, params, args, kwargs, slots)


def _slots(
    module: nn.Module, names: Any, facts: _Facts | None = None
) -> list[tuple[dict, str]] | None:
    """For each name, the ``_parameters`` or ``_buffers`` table holding it and its key, or None
    where ``torch.func.functional_call``'s general path is needed: tied weights (a draw must
    reach every name of the tensor), attributes that are no plain parameter or buffer
    (parametrizations), scripted modules, and code being compiled (dynamo knows
    functional_call). Kept per module and names until the module's structure moves."""
    if torch.compiler.is_compiling() or isinstance(module, torch.jit.ScriptModule):
        return None
    if (facts or _facts(module)).tied:
        return None
    key = tuple(names)
    per_module = _SLOTS.setdefault(module, {})
    cached = per_module.get(key)
    if cached is not None and cached[0] == _GENERATION[0]:
        return cached[1]
    found = [_slot(module, name) for name in key]
    resolved = [slot for slot in found if slot is not None]
    # a name that is no plain parameter or buffer: functional_call's general path
    slots = resolved if len(resolved) == len(found) else None
    if len(per_module) > 16:
        per_module.clear()
    per_module[key] = (_GENERATION[0], slots)
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
    facts = None if torch.compiler.is_compiling() else _facts(module)
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

    inputs = (weights.tensors,) if weights.dropout is None else (weights.tensors, weights.dropout)
    if facts is not None and not facts.attends:  # nothing to switch (and no context to enter)
        outputs = torch.func.vmap(forward)(*inputs)
    else:
        with _batchable_kernels(weights.tensors):
            outputs = torch.func.vmap(forward)(*inputs)
    if static["leaves"] is None:
        return outputs[0]
    batched = iter(outputs)
    leaves = [next(batched) if isinstance(x, Tensor) else x for x in static["leaves"]]
    return pytree.tree_unflatten(leaves, static["spec"])


class _Facts(NamedTuple):
    tied: bool  # a tensor under two names: functional_call's untying path is needed
    attends: bool  # some layer may run attention (see _batchable_kernels)


# Module structure changes (a parameter, buffer or submodule registered or assigned anywhere)
# bump this counter through torch's global registration hooks: what is derived from a module's
# structure is kept until it moves. Walking the module on every call cost a tenth of a small
# model's predict. Deleting an attribute fires no hook; it cannot add a tie or an attention
# layer, and check_matches, run on every call, refuses a posterior name that is gone.
_GENERATION = [0]
_FACTS: weakref.WeakKeyDictionary[nn.Module, tuple[int, _Facts]] = weakref.WeakKeyDictionary()
_SLOTS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_MATCHES: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
_LAYERS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _structure_moved(*_: Any) -> None:
    _GENERATION[0] += 1


for _register in (
    torch.nn.modules.module.register_module_parameter_registration_hook,
    torch.nn.modules.module.register_module_buffer_registration_hook,
    torch.nn.modules.module.register_module_module_registration_hook,
):
    _register(_structure_moved)


def _facts(module: nn.Module) -> _Facts:
    """One walk over the layers (kept until the structure moves). Without ties,
    functional_call's untying walk (a tenth of a small MLP's forward) is skipped; with them, a
    draw for one name reaches the other, so tied weights stay tied. ``attends`` is False only
    for modules made of ``torch.nn``'s own layers, none of them attention: any class of the
    user's (or of a library's) may call ``scaled_dot_product_attention``."""
    compiling = torch.compiler.is_compiling()  # no cache there: see check_matches
    cached = None if compiling else _FACTS.get(module)
    if cached is not None and cached[0] == _GENERATION[0]:
        return cached[1]
    seen: set[int] = set()
    count = 0
    attends = False
    for layer in _layers(module):  # _parameters and _buffers directly: no name building
        kind = type(layer)
        if not attends and (
            not kind.__module__.startswith("torch.nn.modules.") or issubclass(kind, _ATTENTION)
        ):
            attends = True
        for table in (layer._parameters, layer._buffers):
            for tensor in table.values():
                if tensor is not None:
                    seen.add(id(tensor))
                    count += 1
    facts = _Facts(len(seen) != count, attends)
    if not compiling:
        _FACTS[module] = (_GENERATION[0], facts)
    return facts


def _layers(module: nn.Module) -> list[nn.Module]:
    """Every submodule once, the module first: ``modules()`` without its generators, kept
    until the structure moves (the submodules only: a value that held the module itself would
    keep its weak key alive)."""
    compiling = torch.compiler.is_compiling()  # no cache there: see check_matches
    cached = None if compiling else _LAYERS.get(module)
    if cached is not None and cached[0] == _GENERATION[0]:
        return [module, *cached[1]]
    found, stack, seen = [], [module], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append(layer)
        stack.extend(child for child in layer._modules.values() if child is not None)
    if not compiling:
        _LAYERS[module] = (_GENERATION[0], found[1:])
    return found


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


@contextlib.contextmanager
def _batchable_kernels(weights: dict[str, Tensor]) -> Iterator[None]:
    """Select kernels that vmap can batch.

    The fused transformer-layer kernel, and on the CPU the flash-attention kernel, have no
    batching rule: vmap would run them in a slow per-sample fallback, while their unfused
    versions batch properly. On CUDA the fused attention kernels batch in the forward, but the
    memory-efficient one's backward fails under vmap ("LSE is not correctly aligned"), so
    training uses the math path. ``set_fastpath_enabled`` cannot be traced: under
    ``torch.compile`` the compiler sees the non-fastpath code anyway. ``_vmapped`` skips this
    for modules without attention (``_facts``): there is nothing to switch.
    """
    leaves = list(weights.values())
    unfused = all(w.device.type == "cpu" for w in leaves) or tracked(*leaves)
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


_ATTENTION = (
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


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


# ----------------------------------------------------------------------------------------------
# Explaining failures.


def _raise_if_forward_fails(
    error: BaseException,
    module: nn.Module,
    weights: Weights,
    args: Any,
    kwargs: Any,
    entry: str,
    strategy: str,
) -> None:
    """Rerun sample 0 alone with hooks: if it fails too, the inputs or the module are at fault:
    raise its error with the failing submodule and the shapes it got. Otherwise return."""
    with _locating(module) as where:
        try:
            _one(module, weights, 0, args, kwargs)
        except Exception as plain:
            blame = (
                " It fails for one weight sample without vmap too, so the inputs or the module "
                "are at fault, not vmap."
                if strategy == "vmap"
                else ""
            )
            message = f"{entry} failed in {where()}: {_first_line(plain)}{blame}"
            raise _same_kind(plain, message) from error


@contextlib.contextmanager
def _locating(module: nn.Module) -> Iterator[Callable[[], str]]:
    """Track the running submodules with temporary hooks. A forward that raises never reaches
    its forward hook, so after a failure the top of the stack is the innermost culprit."""
    stack: list[str] = []

    def push(name: str) -> Callable[..., None]:
        def hook(layer: nn.Module, inputs: Any) -> None:
            shapes = [
                f"{tuple(x.shape)} {x.dtype}"
                for x in pytree.tree_leaves(inputs)
                if isinstance(x, Tensor)
            ]
            label = f"submodule {name!r}" if name else "the module's own forward"
            stack.append(f"{label} ({_short(layer)}) called with tensors {shapes}")

        return hook

    def pop(layer: nn.Module, inputs: Any, output: Any) -> None:
        stack.pop()

    handles = []
    for name, layer in module.named_modules():
        handles.append(layer.register_forward_pre_hook(push(name)))
        handles.append(layer.register_forward_hook(pop))
    try:
        yield lambda: stack[-1] if stack else "the module"
    finally:
        for handle in handles:
            handle.remove()


def _short(layer: nn.Module) -> str:
    text = repr(layer).split("\n")[0]
    return text if len(text) <= 100 else text[:97] + "..."


def _first_line(error: BaseException) -> str:
    text = str(error).strip().split("\n")[0].rstrip(".")
    return text + "."


def _same_kind(error: BaseException, message: str) -> BaseException:
    try:
        return type(error)(message)
    except Exception:
        return RuntimeError(message)


def _stateful_in_training(layer: nn.Module) -> str:
    if isinstance(layer, nn.modules.dropout._DropoutNd) and layer.p > 0:
        return "draw dropout masks from the global RNG"
    if isinstance(layer, nn.RNNBase | nn.MultiheadAttention) and layer.dropout > 0:
        return "draw dropout masks from the global RNG"
    if isinstance(layer, nn.modules.batchnorm._NormBase) and layer.track_running_stats:
        return "update running statistics with sampled weights"
    if type(layer).__name__ == "_SpectralNorm" or any(
        type(hook).__name__ == "SpectralNorm" for hook in layer._forward_pre_hooks.values()
    ):
        return "update its spectral-norm power-iteration vectors"
    return ""


def tensor_leaves(args: Any, kwargs: Any) -> Iterator[tuple[str, Tensor]]:
    positional = args if isinstance(args, tuple) else (args,)
    for i, arg in enumerate(positional):
        # a tensor is its own only leaf: no pytree walk for the common case
        for leaf in (arg,) if isinstance(arg, Tensor) else pytree.tree_leaves(arg):
            if isinstance(leaf, Tensor):
                yield f"args[{i}]", leaf
    for name, value in (kwargs or {}).items():
        for leaf in (value,) if isinstance(value, Tensor) else pytree.tree_leaves(value):
            if isinstance(leaf, Tensor):
                yield f"kwargs[{name!r}]", leaf
