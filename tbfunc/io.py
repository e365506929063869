"""Saving and loading posteriors: tensors and strings only, never code.

A posterior is stored as a flat state dict, ``"<parameter name>.<field>" -> tensor``
(``"0.weight.mu"``, ``"0.weight.rho"``), beside the family of each node by name. Files are
written by ``torch.save`` and read by ``torch.load(weights_only=True)``, whose unpickler
admits tensors, dicts, strings and numbers only: a crafted file that tries to run code is
refused. A family outside tbfunc is stored by its import path and resolved only against the
classes the caller allows; nothing is imported by name.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from tbfunc._checks import check_posterior_dict, fail
from tbfunc._sampling import canonical
from tbfunc.posterior import (
    GaussianPosterior,
    PretrainedGaussianPosterior,
    check_node,
    is_posterior,
)

__all__ = ["from_state_dict", "load", "save", "state_dict"]

FORMAT = "tbfunc.posterior"
VERSION = 1
_BUILTIN: dict[str, type] = {
    "GaussianPosterior": GaussianPosterior,
    "PretrainedGaussianPosterior": PretrainedGaussianPosterior,
}


def state_dict(posterior: dict[str, Any]) -> dict[str, Tensor]:
    """The posterior as ``{"<name>.<field>": tensor}`` (the tensors themselves, not copies).

    Example:
        >>> import torch, tbfunc as tb
        >>> list(tb.state_dict(tb.from_module(torch.nn.Linear(2, 1))))
        ['weight.mu', 'weight.rho', 'bias.mu', 'bias.rho']
    """
    out: dict[str, Tensor] = {}
    for name, node in _nodes(posterior).items():
        for field, value in zip(node._fields, node, strict=True):
            if not isinstance(value, Tensor):
                fail(f"posterior[{name!r}].{field}", "a tensor", value, error=TypeError)
            out[f"{name}.{field}"] = value
    return out


def from_state_dict(
    state_dict: dict[str, Tensor], *, family: type | dict[str, type] = PretrainedGaussianPosterior
) -> dict[str, Any]:
    """Rebuild a posterior from ``state_dict`` (the inverse of ``tb.state_dict``).

    Args:
        state_dict: ``{"<name>.<field>": tensor}``; every node must have exactly its family's
            fields.
        family: the node type, one for all nodes or a dict by name (the in-memory state dict
            does not record it; ``tb.save`` files do).
    """
    if not isinstance(state_dict, dict):
        fail("state_dict", "a dict of '<name>.<field>' -> tensor", state_dict, error=TypeError)
    fields: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        name, dot, field = str(key).rpartition(".")
        if not dot or not name:
            raise ValueError(
                f"state_dict key {key!r} must read '<parameter name>.<field>' (e.g. '0.weight.mu')."
            )
        if not isinstance(value, Tensor):
            fail(f"state_dict[{key!r}]", "a tensor", value, error=TypeError)
        fields.setdefault(name, {})[field] = value
    posterior = {}
    for name, values in fields.items():
        kind = family.get(name) if isinstance(family, dict) else family
        if kind is None:
            raise ValueError(f"family has no entry for {name!r}; give one for every node.")
        expected = list(getattr(kind, "_fields", ()))
        if sorted(values) != sorted(expected):
            raise ValueError(
                f"state_dict node {name!r} must have the fields {expected} of "
                f"{kind.__name__}, got {sorted(values)}."
            )
        posterior[name] = kind(*(values[f] for f in expected))
    return posterior


def save(posterior: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``posterior`` to ``path`` (``torch.save`` of tensors, strings and ints only).

    Shared tensors stay shared and non-contiguous tensors keep their strides (``torch.save``
    stores storages); tensors are saved from the device they are on.
    """
    families = {name: _family_id(type(node)) for name, node in _nodes(posterior).items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "families": families,
        "state_dict": state_dict(posterior),
    }
    torch.save(payload, path)


def load(
    path: str | os.PathLike,
    module: nn.Module | None = None,
    *,
    families: Iterable[type] = (),
    map_location: Any = None,
) -> dict[str, Any]:
    """Read a posterior written by ``tb.save``, without unpickling code.

    Args:
        path: the file.
        module: if given, names, shapes and dtypes are checked against its parameters, and
            every difference is listed in one error.
        families: the posterior classes outside tbfunc that the file may name (by import
            path); tbfunc's own are always allowed.
        map_location: as in ``torch.load`` (e.g. ``"cpu"``).

    Raises:
        ValueError: the file is not a tbfunc posterior, asks to run code, names a family not
            allowed, or does not match ``module``.
    """
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol warning: refused below anyway
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{_describe_file(path)} was refused: it holds more than tensors, strings and numbers "
            f"(torch.load(weights_only=True) said: {str(error).splitlines()[0]})"
        ) from error
    except (KeyError, EOFError, RuntimeError) as error:
        # a text file (pickle reads its first byte as an opcode: KeyError 101), an empty or
        # truncated file (EOFError, or the zip reader's RuntimeError)
        detail = str(error).splitlines()[0] if str(error) else "no detail"
        raise ValueError(
            f"{_describe_file(path)} is not a tbfunc posterior file: it cannot be read as one "
            f"({type(error).__name__}: {detail}). Was it written by tb.save, and copied whole?"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{_describe_file(path)} is not a tbfunc posterior file (no {FORMAT!r}).")
    if payload.get("version") != VERSION:
        raise ValueError(
            f"{_describe_file(path)} has format version {payload.get('version')!r}; "
            f"this tbfunc reads version {VERSION}."
        )
    allowed = {**_BUILTIN, **{_family_id(kind): kind for kind in families}}
    kinds = {}
    for name, family_id in payload["families"].items():
        if family_id not in allowed:
            raise ValueError(
                f"family {family_id!r} of node {name!r} is not allowed: pass "
                f"families=[{family_id.rpartition('.')[2]}] to load it."
            )
        kinds[name] = allowed[family_id]
    posterior = from_state_dict(payload["state_dict"], family=kinds)
    for name, node in posterior.items():  # a damaged file: rho shaped or typed unlike mu
        check_node(node, f"{_describe_file(path)}: posterior[{name!r}]")
    if module is not None:
        check_against(module, posterior)
    return posterior


def _describe_file(path: Any) -> str:
    return repr(os.fspath(path)) if isinstance(path, str | os.PathLike) else "the file"


def check_against(module: nn.Module, posterior: dict[str, Any]) -> None:
    """Every difference between the posterior and the module's parameters, in one error."""
    params = {canonical(n): p for n, p in module.named_parameters(remove_duplicate=False)}
    problems = []
    for name, node in posterior.items():
        target = params.get(canonical(name))
        if target is None:
            problems.append(f"{name!r} is not a parameter of {type(module).__name__}")
            continue
        for field, value in zip(node._fields, node, strict=True):
            if tuple(value.shape) != tuple(target.shape):
                problems.append(
                    f"{name}.{field} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(target.shape)}"
                )
            if value.dtype != target.dtype:
                problems.append(
                    f"{name}.{field} has dtype {value.dtype}, the parameter {target.dtype}"
                )
    if problems:
        raise ValueError(
            f"posterior does not match {type(module).__name__}: " + "; ".join(problems) + "."
        )


def _nodes(posterior: Any) -> dict[str, Any]:
    check_posterior_dict(posterior)
    for name, node in posterior.items():
        if not (is_posterior(node) and hasattr(node, "_fields")):
            fail(
                f"posterior[{name!r}]",
                "a posterior node (a NamedTuple such as tb.PretrainedGaussianPosterior)",
                node,
                error=TypeError,
            )
    return posterior


def _family_id(kind: type) -> str:
    if _BUILTIN.get(kind.__name__) is kind:
        return kind.__name__
    return f"{kind.__module__}.{kind.__qualname__}"
