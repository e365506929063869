"""Drawing a posterior tree: path-keyed noise for every node, all in one op call.

Node ``l`` at path ``p`` is drawn with ``fold_in(key, hash32(p))``, so adding, removing or
reordering other nodes never changes its noise. The Gaussian nodes of one dtype and device are
drawn together, and ``mu + sigma * eps`` is fused into the noise buffer where autograd allows.
Internal: the public entry points are ``tbfunc.sample`` and ``tbfunc.predict``.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from tbfunc import _fused, _noise, _threefry
from tbfunc._checks import fail, is_wrapped
from tbfunc.posterior import GAUSSIAN_FAMILIES, check_node, is_posterior

__all__ = [
    "canonical",
    "check_finite",
    "check_tree",
    "hash32",
    "posterior_nodes",
    "remember_finite",
    "sample_many",
    "sample_with_kl",
    "tracked",
]


def hash32(path: str) -> int:
    """FNV-1a over the code points of ``path``: plain Python, so ``torch.compile`` traces it
    (``zlib.crc32`` breaks ``fullgraph=True``)."""
    value = 0x811C9DC5
    for char in path:
        value = ((value ^ ord(char)) * 0x01000193) & 0xFFFFFFFF
    return value


def canonical(name: str) -> str:
    """A parameter name without the ``_orig_mod`` segments that ``torch.compile`` inserts, so
    the compiled and the eager module share names and noise."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


class _Layout(NamedTuple):
    """What depends only on a tree's structure: its paths, canonical names and their hashes."""

    paths: list[Any]
    names: list[str]
    hashes: list[int] | None  # None for a lone node at the root (drawn with the key itself)


_LAYOUTS: dict[Any, _Layout] = {}  # by optree spec
_FLAT_LAYOUTS: dict[tuple, tuple[tuple, _Layout]] = {}  # flat dicts, by their keys
_MAX_LAYOUTS = 256
_FLAT_LEAVES = (*GAUSSIAN_FAMILIES, Tensor)
# id(tensor) -> (a weak reference to it, the version counter at which it was found finite): an
# in-place update (an optimizer step, copy_) bumps the counter, so only tensors changed since
# their last check are read again. An entry leaves with its tensor.
_FINITE: dict[int, tuple[weakref.ref, int]] = {}


def check_tree(tree: Any, arg: str = "posterior") -> None:
    """A posterior node, or a tree whose leaves are posterior nodes or tensors (``{}`` is a
    valid, empty tree); ``None``, numbers and other leaves are refused, naming the leaf."""
    if tree is None or isinstance(tree, bool | int | float | str | bytes):
        fail(
            arg,
            "a posterior node or a tree of them (e.g. tb.from_module's dict)",
            tree,
            error=TypeError,
        )
    if _is_flat(tree):
        return  # from_module's trees: every leaf valid, without optree's walk of the paths
    paths, leaves, _ = optree.tree_flatten_with_path(tree, is_leaf=is_posterior)
    for path, leaf in zip(paths, leaves, strict=True):
        if not (is_posterior(leaf) or isinstance(leaf, Tensor)):
            where = ".".join(map(str, path))
            fail(f"{arg} leaf {where!r}", "a posterior node or a tensor", leaf, error=TypeError)


def posterior_nodes(tree: Any) -> tuple[list[Any], list[str], list[int], Any, list[Any]]:
    """Flatten ``tree``: ``(leaves, canonical paths, posterior-node indices, spec, paths)``,
    with every Gaussian node's fields checked."""
    leaves, spec, layout = _flatten(tree)
    nodes = []
    for index, leaf in enumerate(leaves):
        if is_posterior(leaf):
            check_node(leaf, _where(layout.names[index]))
            nodes.append(index)
    return leaves, layout.names, nodes, spec, layout.paths


def _flatten(tree: Any) -> tuple[list[Any], Any, _Layout]:
    """Leaves, spec and layout; the layout is computed once per tree structure (eager)."""
    if torch.compiler.is_compiling():
        paths, leaves, spec = optree.tree_flatten_with_path(tree, is_leaf=is_posterior)
        return leaves, spec, _layout(paths)
    leaves, spec = optree.tree_flatten(tree, is_leaf=is_posterior)
    layout = _LAYOUTS.get(spec)
    if layout is None:
        paths = optree.tree_flatten_with_path(tree, is_leaf=is_posterior)[0]
        layout = _layout(paths)
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[spec] = layout
    return leaves, spec, layout


def _flat(tree: Any) -> tuple[list[Any], _Layout, tuple] | None:
    """A flat dict of Gaussian nodes and tensors (``from_module``'s trees, the common case):
    its leaves, layout and keys in optree's order (sorted: callers index leaves by it), without
    optree's walk and spec (a third of a small model's draw); None for any other tree, which
    ``_flatten`` then handles."""
    if torch.compiler.is_compiling() or not _is_flat(tree):
        return None
    given = tuple(tree)
    cached = _FLAT_LAYOUTS.get(given)
    if cached is None:
        try:
            order = tuple(sorted(given))
        except TypeError:  # keys of mixed types: optree's own rule
            return None
        cached = (order, _layout([(key,) for key in order]))
        if len(_FLAT_LAYOUTS) >= _MAX_LAYOUTS:
            _FLAT_LAYOUTS.clear()
        _FLAT_LAYOUTS[given] = cached
    order, layout = cached
    return [tree[key] for key in order], layout, order


def _is_flat(tree: Any) -> bool:
    """A plain dict whose every value is a Gaussian node or a tensor."""
    return type(tree) is dict and all(isinstance(leaf, _FLAT_LEAVES) for leaf in tree.values())


def _layout(paths: list[Any]) -> _Layout:
    names = [canonical(".".join(str(part) for part in path)) for path in paths]
    # a lone node at the root is drawn with the keys themselves, every other node with
    # fold_in(key, hash32(path)); colliding hashes are refused (the layout is not kept)
    return _Layout(paths, names, None if paths == [()] else node_hashes(names))


def check_finite(leaves: list[Any], names: list[str], nodes: list[int]) -> None:
    """Every posterior tensor is finite: one C pass over them all where the kernel serves
    (plain contiguous CPU float32/float64 tensors, ``_fused.all_finite``), else one float32
    (float64) sum per tensor and one ``isfinite`` per device; then an exact search only when
    that fails (a sum can overflow; the search names the tensor and its bad values).

    A tensor found finite is not read again until its version counter moves (every in-place
    update bumps it; writes through ``.data`` or a NumPy view do not, and are not seen).
    Eager only: under ``torch.func`` transforms and ``torch.compile`` reading a value would be
    data-dependent control flow, so those calls are not checked.
    """
    if torch.compiler.is_compiling():
        return
    fields = []
    for i in nodes:
        node = leaves[i]
        items = (
            (("mu", node.mu), ("rho", node.rho))
            if isinstance(node, GAUSSIAN_FAMILIES)
            else _tensor_fields(node)
        )
        for field, value in items:
            entry = _FINITE.get(id(value))
            if entry is None or entry[1] != value._version or entry[0]() is not value:
                fields.append((names[i], field, value))
    if not fields or any(is_wrapped(t) or t.is_meta for _, _, t in fields):
        return
    values = [value for _, _, value in fields]
    if _fused.all_finite(values):  # one C pass; None where it does not serve
        for value in values:
            remember_finite(value)
        return
    sums: dict[torch.device, list[Tensor]] = {}
    with torch.no_grad():
        for _, _, value in fields:
            wide = torch.float64 if value.dtype == torch.float64 else torch.float32
            sums.setdefault(value.device, []).append(value.sum(dtype=wide))
        if all(bool(torch.isfinite(torch.stack(group)).all()) for group in sums.values()):
            for _, _, value in fields:
                remember_finite(value)
            return
        for name, field, value in fields:
            bad = ~torch.isfinite(value)
            count = int(bad.sum())
            if count:
                kinds = sorted({"nan" if v != v else str(v) for v in value[bad][:1000].tolist()})
                raise ValueError(
                    f"{_where(name)}.{field} must be finite, got {count} non-finite "
                    f"value(s) ({', '.join(kinds)}) of {value.numel()}. A diverged optimizer "
                    "step is the usual cause: lower the learning rate or restore a checkpoint."
                )


def sample_many(
    tree: Any,
    keys: Tensor,
    sigmas: dict[int, Tensor] | None = None,
    *,
    check: bool = True,
    validated: bool = False,
) -> Any:
    """Draw ``len(keys)`` samples of ``tree``; every leaf gets a leading sample axis.

    Node ``l``'s sample ``s`` uses ``fold_in(keys[s], hash32(path_l))`` (``keys[s]`` itself for
    a lone node at the root). The Gaussian nodes of one dtype and device are drawn by one
    ``_noise.gaussian`` call. ``sigmas`` optionally maps flat leaf indices to ``softplus(rho)``
    already computed. ``check=False`` skips ``check_finite`` for a caller that checks a result
    instead (``nelbo`` checks its KL: non-finite whenever a ``mu`` or ``rho`` is).
    ``validated=True``: the caller has checked the nodes' fields already (``check_matches``).
    """
    return _sample(tree, keys, sigmas, None, check, validated)[0]


def sample_with_kl(
    tree: Any,
    keys: Tensor,
    sigmas: dict[int, Tensor] | None,
    priors: dict[int, Any] | None,
    *,
    check: bool = True,
    validated: bool = False,
) -> tuple[Any, Tensor | None]:
    """``sample_many``, and the closed-form KL of the tree against ``priors`` (flat leaf index ->
    ``_kernel_calls.PriorTerms``, one per Gaussian node) computed by the same fused autograd node,
    whose backward adds the KL's gradient in the draw's pass. The KL is None (compute it apart)
    unless the whole tree takes the fused route together: one dtype, no custom families, ``priors``
    given and complete."""
    return _sample(tree, keys, sigmas, priors, check, validated)


def _sample(
    tree: Any,
    keys: Tensor,
    sigmas: dict[int, Tensor] | None,
    priors: dict[int, Any] | None,
    check: bool,
    validated: bool,
) -> tuple[Any, Tensor | None]:
    flat = _flat(tree)
    spec, order = None, ()
    if flat is not None:
        leaves, layout, order = flat
    else:
        leaves, spec, layout = _flatten(tree)
    names, hashes = layout.names, layout.hashes
    count = keys.shape[0]
    drawn = list(leaves)
    nodes: list[int] = []
    custom: list[int] = []  # posterior families of the user's own: drawn by their sample()
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, GAUSSIAN_FAMILIES):
            if not validated:
                check_node(leaf, _where(names[index]))
            groups.setdefault((leaf.mu.dtype, leaf.mu.device), []).append(index)
            nodes.append(index)
        elif is_posterior(leaf):
            custom.append(index)
            nodes.append(index)
        elif isinstance(leaf, Tensor):
            drawn[index] = leaf.expand(count, *leaf.shape)
        else:
            fail(
                f"posterior leaf {names[index]!r}",
                "a posterior node or a tensor",
                leaf,
                error=TypeError,
            )
    if check:
        check_finite(leaves, names, nodes)
    for index in custom:
        node_keys = keys if hashes is None else _threefry.fold_in_hashes(keys, [hashes[index]])[0]
        drawn[index] = torch.stack([leaves[index].sample(k) for k in node_keys])
    kl = None
    for members in groups.values():
        member_hashes = None if hashes is None else [hashes[i] for i in members]
        mus = [leaves[i].mu for i in members]
        rhos = [leaves[i].rho for i in members]
        if _fused.trainable(mus + rhos):
            # the same bits as below; the backward to mu and rho is one pass (_fused)
            with torch.no_grad():
                values = [leaves[i].sigma if sigmas is None else sigmas[i] for i in members]
            whole = priors is not None and len(groups) == 1 and not custom
            terms = [priors[i] for i in members] if whole else None  # type: ignore[index]
            draws, kl = _fused.draw(keys, member_hashes, mus, rhos, values, terms)
        else:
            values = [leaves[i].sigma if sigmas is None else sigmas[i] for i in members]
            draws = _noise.gaussian(keys, member_hashes, mus, values)
        for i, value in zip(members, draws, strict=True):
            drawn[i] = value
    if spec is not None:
        return spec.unflatten(drawn), kl
    by_key = dict(zip(order, drawn, strict=True))
    return {key: by_key[key] for key in tree}, kl  # the dict's own order, as optree rebuilds


def node_hashes(names: list[str]) -> list[int]:
    """``hash32`` of every canonical path, refusing collisions (two nodes would share their
    noise): what ``sample`` folds into the key per node."""
    hashes = [hash32(name) for name in names]
    if len(set(hashes)) != len(hashes):
        _raise_collision(names, hashes)
    return hashes


def remember_finite(tensor: Tensor) -> None:
    """Record ``tensor`` as finite at its current version, so that ``check_finite`` does not
    read it again until it changes: for a kernel that has just written it and checked it."""
    if tensor.is_inference():  # inference tensors keep no version counter
        return
    key = id(tensor)
    entry = _FINITE.get(key)
    if entry is not None and entry[0]() is tensor:  # seen before: keep its weakref
        _FINITE[key] = (entry[0], tensor._version)
        return
    _FINITE[key] = (weakref.ref(tensor, lambda _: _FINITE.pop(key, None)), tensor._version)


def _where(name: str) -> str:
    return f"posterior[{name!r}]" if name else "posterior"


def _tensor_fields(node: Any) -> list[tuple[str, Tensor]]:
    fields = getattr(node, "_fields", ())
    return [(f, v) for f, v in zip(fields, node, strict=False) if isinstance(v, Tensor)]


def tracked(*tensors: Tensor) -> bool:
    """Whether autograd or a ``torch.func`` transform records operations on ``tensors``."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _raise_collision(names: list[str], hashes: list[int]) -> None:
    seen: dict[int, str] = {}
    for name, value in zip(names, hashes, strict=True):
        if value in seen and seen[value] == name:
            raise ValueError(
                f"posterior has two nodes for {name!r} (one of them under torch.compile's "
                "'_orig_mod.' prefix); keep one."
            )
        if value in seen:
            raise ValueError(
                f"posterior paths {seen[value]!r} and {name!r} hash to the same 32-bit value, "
                "so they would share noise; rename one of them."
            )
        seen[value] = name
