"""Drawing a posterior tree: path-keyed noise for every node, all in one op call.

Node ``l`` at path ``p`` is drawn with ``fold_in(key, hash32(p))``, so adding, removing or
reordering other nodes never changes its noise. The Gaussian nodes of one dtype and device are
drawn together, and ``mu + sigma * eps`` is fused into the noise buffer where autograd allows.
Internal: the public entry points are ``tbfunc.sample`` and ``tbfunc.predict``.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor

from tbfunc import random
from tbfunc._checks import fail, is_wrapped
from tbfunc.posterior import GAUSSIAN_FAMILIES, check_node, is_posterior

__all__ = ["canonical", "check_finite", "hash32", "posterior_nodes", "sample_many", "tracked"]


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


def posterior_nodes(tree: Any) -> tuple[list[Any], list[str], list[int], Any, list[Any]]:
    """Flatten ``tree``: ``(leaves, canonical paths, posterior-node indices, spec, paths)``,
    with every Gaussian node's fields checked."""
    paths, leaves, spec = optree.tree_flatten_with_path(tree, is_leaf=is_posterior)
    names = [canonical(".".join(str(part) for part in path)) for path in paths]
    nodes = []
    for index, leaf in enumerate(leaves):
        if is_posterior(leaf):
            check_node(leaf, _where(names[index]))
            nodes.append(index)
    return leaves, names, nodes, spec, paths


def check_finite(leaves: list[Any], names: list[str], nodes: list[int]) -> None:
    """Every posterior tensor is finite: one float32 (float64) sum per tensor and one
    ``isfinite`` per device, then an exact search only when that fails (a sum can overflow).

    Eager only: under ``torch.func`` transforms and ``torch.compile`` reading a value would be
    data-dependent control flow, so those calls are not checked.
    """
    fields = [
        (name, field, value)
        for i in nodes
        for name, (field, value) in ((names[i], item) for item in _tensor_fields(leaves[i]))
    ]
    if (
        not fields
        or torch.compiler.is_compiling()
        or any(is_wrapped(t) or t.device.type == "meta" for _, _, t in fields)
    ):
        return
    sums: dict[torch.device, list[Tensor]] = {}
    with torch.no_grad():
        for _, _, value in fields:
            wide = torch.float64 if value.dtype == torch.float64 else torch.float32
            sums.setdefault(value.device, []).append(value.sum(dtype=wide))
        if all(bool(torch.isfinite(torch.stack(group)).all()) for group in sums.values()):
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
    tree: Any, keys: Tensor, sigmas: dict[int, Tensor] | None = None, *, check: bool = True
) -> Any:
    """Draw ``len(keys)`` samples of ``tree``; every leaf gets a leading sample axis.

    ``sigmas`` optionally maps flat leaf indices to ``softplus(rho)`` already computed.
    ``check=False`` skips ``check_finite`` for a caller that checks a result instead (``nelbo``
    checks its KL: non-finite whenever a ``mu`` or ``rho`` is).
    """
    leaves, names, nodes, spec, paths = posterior_nodes(tree)
    if check:
        check_finite(leaves, names, nodes)
    count = keys.shape[0]
    # a lone node at the root is drawn with the keys themselves, every other node with
    # fold_in(key, hash32(path))
    hashes = None if paths == [()] else _hashes(names)
    drawn: list[Tensor | None] = [None] * len(leaves)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, GAUSSIAN_FAMILIES):
            groups.setdefault((leaf.mu.dtype, leaf.mu.device), []).append(index)
        elif is_posterior(leaf):
            node_keys = keys if hashes is None else random._fold_in_hashes(keys, [hashes[index]])[0]
            drawn[index] = torch.stack([leaf.sample(k) for k in node_keys])
        elif isinstance(leaf, Tensor):
            drawn[index] = leaf.expand(count, *leaf.shape)
        else:
            fail(
                f"posterior leaf {names[index]!r}",
                "a posterior node or a tensor",
                leaf,
                error=TypeError,
            )
    for (dtype, device), members in groups.items():
        nodes = [leaves[i] for i in members]
        scales = [leaves[i].sigma if sigmas is None else sigmas[i] for i in members]
        group_hashes = None if hashes is None else [hashes[i] for i in members]
        draws = _draw_gaussians(nodes, scales, keys, group_hashes, dtype, device)
        for i, value in zip(members, draws, strict=True):
            drawn[i] = value
    return optree.tree_unflatten(spec, drawn)


def _hashes(names: list[str]) -> list[int]:
    """``hash32`` of every path, refusing collisions (two nodes would share their noise)."""
    hashes = [hash32(name) for name in names]
    if len(set(hashes)) != len(hashes):
        _raise_collision(names, hashes)
    return hashes


def _draw_gaussians(
    nodes: list[Any],
    sigmas: list[Tensor],
    keys: Tensor,
    hashes: list[int] | None,
    dtype: torch.dtype,
    device: torch.device,
) -> list[Tensor]:
    """``mu + sigma * eps`` with a leading axis ``S = len(keys)`` for each node; node ``l``'s
    draw ``s`` uses ``fold_in(keys[s], hashes[l])`` (``keys[s]`` itself without hashes).

    On the CPU, plain eager code with nothing to differentiate writes ``mu + sigma * eps`` into
    each noise segment right after drawing it, while it is in cache, and draws on every CPU
    thread; this saves allocating and re-reading an S x P buffer. On GPUs with Triton the same
    code draws and applies the affine map in one kernel. Otherwise the noise comes from
    the ``tbfunc::normal_folded`` op (which derives the per-node keys itself, on the GPU in the
    kernel), and the affine map is in place when nothing records it, out of place under
    autograd, ``torch.func`` transforms or ``torch.compile`` (inductor fuses it). All paths give
    the same bits.
    """
    count = keys.shape[0]
    numels = [node.mu.numel() for node in nodes]
    sizes = [numel * count for numel in numels]
    untracked = not torch.compiler.is_compiling() and not tracked(
        keys, *(node.mu for node in nodes), *sigmas
    )
    if untracked and device.type == "cpu":
        return _draw_fused_on_cpu(nodes, sigmas, keys, hashes, sizes, dtype, device)
    if untracked and hashes is not None:
        fused = random.affine_folded(keys, hashes, [node.mu for node in nodes], sigmas)
        if fused is not None:
            return [
                chunk.view(count, *node.mu.shape)
                for node, chunk in zip(nodes, fused.split(sizes), strict=True)
            ]
    if hashes is None:
        noise_flat = random.normal_segments(keys, numels * count, dtype, device)
    else:
        noise_flat = random.normal_folded(keys, hashes, numels, dtype, device)
    draws = []
    for node, sigma, noise in zip(nodes, sigmas, noise_flat.split(sizes), strict=True):
        # with one draw, no broadcast over the sample axis: its backward needs no reduction
        noise = noise.view(node.mu.shape) if count == 1 else noise.view(count, *node.mu.shape)
        value = torch.addcmul(node.mu, sigma, noise, out=noise if untracked else None)
        draws.append(value[None] if count == 1 else value)
    return draws


def _draw_fused_on_cpu(
    nodes: list[Any],
    sigmas: list[Tensor],
    keys: Tensor,
    hashes: list[int] | None,
    sizes: list[int],
    dtype: torch.dtype,
    device: torch.device,
) -> list[Tensor]:
    """Write ``mu + sigma * eps`` into each noise segment right after drawing it (in cache)."""
    count = keys.shape[0]
    segment_keys = keys if hashes is None else random._fold_in_hashes(keys, hashes)
    mus = [node.mu.reshape(-1) for node in nodes]
    flat_sigmas = [sigma.reshape(-1) for sigma in sigmas]

    def finish(index: int, segment: Tensor) -> None:
        leaf = index // count
        torch.addcmul(mus[leaf], flat_sigmas[leaf], segment, out=segment)

    out = torch.empty(sum(sizes), dtype=dtype, device=device)
    numels = [node.mu.numel() for node in nodes for _ in range(count)]
    random.fill_noise_(out, segment_keys.reshape(-1, 2).tolist(), numels, finish)
    return [
        chunk.view(count, *node.mu.shape)
        for node, chunk in zip(nodes, out.split(sizes), strict=True)
    ]


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
