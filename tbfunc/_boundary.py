"""Checks at the boundary, one set for every entry point: a posterior against its module (names,
shapes, dtypes), layers that would draw from the global RNG or update state, input devices
(private)."""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from tbfunc._checks import check_posterior_dict, fail
from tbfunc._dropout import DROPOUT_LAYERS
from tbfunc._sampling import canonical
from tbfunc._structure import GENERATION, MATCHES, module_layers
from tbfunc.posterior import GAUSSIAN_FAMILIES, check_node, is_posterior

__all__ = [
    "check_inputs",
    "check_matches",
    "check_modes",
    "has_rnn",
    "owner",
    "table_slot",
    "tensor_leaves",
    "weights_device",
]


def check_matches(module: nn.Module, posterior: Any) -> dict[str, str]:
    """Validate ``posterior`` against the module; return ``{posterior name: module name}``.

    A name may be the module's own or its canonical form (without ``_orig_mod.``, which
    ``torch.compile`` inserts), so one posterior serves the eager and the compiled module.
    The result is kept for the same module structure (see ``GENERATION``) and the same node
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
    cached = MATCHES.get(module)
    if cached is not None and cached[0] == GENERATION[0] and _same_nodes(posterior, cached[1]):
        return cached[2]
    names = _check_matches(module, posterior)
    witnesses = _witnesses(posterior)
    if witnesses is not None:
        MATCHES[module] = (GENERATION[0], witnesses, names)
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
        slot = table_slot(module, name)
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


def table_slot(module: nn.Module, name: str) -> tuple[dict, str] | None:
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
    # the common case, a module left in training mode with no layer to refuse, without
    # building names (``named_modules`` costs more than the check); names only to report the
    # first refused layer in ``named_modules`` order
    if not any(_refused(layer, dropout) for layer in module_layers(module)):
        return
    name, layer = next((n, m) for n, m in module.named_modules() if _refused(m, dropout))
    raise ValueError(
        f"module must be in eval mode for {entry}, got {type(layer).__name__} "
        f"{name or '(root)'!r} in training mode: its forward would "
        f"{_stateful_in_training(layer)}. Call module.eval() first."
    )


def _refused(layer: nn.Module, dropout: bool) -> bool:
    if not layer.training or (dropout and isinstance(layer, DROPOUT_LAYERS)):
        return False
    return bool(_stateful_in_training(layer))


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


def check_inputs(args: Any, kwargs: Any, device: torch.device | None, entry: str) -> None:
    """Floating-point inputs must sit on the weights' device type (meta inputs never do).

    vmap would otherwise compute with mismatched devices or return garbage (a meta input gives
    the sampled biases); integer tensors (lengths, indices) and scalars may stay on the CPU.
    """
    if kwargs is not None and not isinstance(kwargs, Mapping):
        fail(
            "kwargs",
            "a dict (or mapping) of keyword arguments or None",
            kwargs,
            "Pass positional inputs as a tuple in args.",
            error=TypeError,
        )
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
    return any(isinstance(layer, nn.RNNBase) for layer in module_layers(module))


def weights_device(module: nn.Module, posterior: dict[str, Any]) -> torch.device | None:
    for node in posterior.values():
        return node.mu.device if is_posterior(node) else node.device
    for tensor in module.parameters():
        return tensor.device
    return None


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
