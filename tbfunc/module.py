"""A whole model: posteriors for a module's parameters, sampling, and Monte-Carlo prediction.

A posterior tree is any pytree (usually ``dict[name, node]``) whose posterior nodes are replaced
by sampled tensors. Each node's noise is keyed by its path (``fold_in(key, hash32(path))``), so
adding, removing or reordering other nodes never changes it (the drawing itself lives in
``tbfunc._sampling``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import optree
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tbfunc import random
from tbfunc._checks import check_key, check_optional_positive_int, check_positive_int, fail
from tbfunc._sampling import hash32, sample_many, tracked
from tbfunc.posterior import PretrainedGaussianPosterior, is_posterior, is_posterior_type

__all__ = ["from_module", "functional_call", "mean", "predict", "sample"]

Selector = str | Sequence[str] | Callable[[str, Tensor], bool] | None
Strategy = Literal["auto", "vmap", "loop"]

# Modules whose weights, once batched by vmap, fall off PyTorch's fast CPU kernels (grouped
# convolutions, the unfused attention path): a loop of S forwards is faster there.
_SLOW_UNDER_VMAP_ON_CPU = (nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.RNNBase)


def from_module(
    module: nn.Module,
    posterior: Any = PretrainedGaussianPosterior,
    *,
    include: Selector = None,
    exclude: Selector = None,
    key: Tensor | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Posteriors over a module's floating-point parameters; the module is not modified.

    Args:
        module: any ``nn.Module``; names are those of ``named_parameters()`` (a tied weight
            appears once, under its first name).
        posterior: the family, e.g. ``PretrainedGaussianPosterior`` (centred on the module's
            weights) or ``GaussianPosterior`` (random ``mu``; needs ``key``).
        include: glob pattern(s) or a predicate ``(name, param) -> bool``; only matching
            parameters get a posterior. A pattern that matches nothing is an error.
        exclude: likewise; matching parameters stay the module's own, deterministic.
        key: for families whose ``from_param`` draws (``key=``); each parameter gets
            ``fold_in(key, hash32(name))``.
        **kwargs: passed to ``posterior.from_param`` (e.g. ``sigma_scale=0.1``).

    Returns:
        ``dict[name, posterior node]`` in ``named_parameters()`` order.

    Example:
        >>> import torch, tbfunc as tb
        >>> post = tb.from_module(torch.nn.Linear(3, 2), include="weight")
        >>> list(post)
        ['weight']
    """
    if not isinstance(module, nn.Module):
        fail("module", "an nn.Module", module, error=TypeError)
    if not (isinstance(posterior, type) and is_posterior_type(posterior)):
        fail(
            "posterior",
            "a posterior family such as tb.PretrainedGaussianPosterior",
            posterior,
            error=TypeError,
        )
    family: Any = posterior
    params: dict[str, Tensor] = {
        n: p for n, p in module.named_parameters() if p.is_floating_point()
    }
    chosen = _select(params, include, "include", keep_if_none=True)
    dropped = _select(params, exclude, "exclude", keep_if_none=False)
    names = [n for n in params if n in chosen and n not in dropped]
    takes_key = "key" in inspect.signature(family.from_param).parameters
    if takes_key and key is None:
        raise ValueError(
            f"key must be given: {family.__name__}.from_param draws at random. "
            "Pass key=tb.random.key(seed)."
        )
    if not takes_key and key is not None:
        raise ValueError(f"key must be None: {family.__name__}.from_param takes no key.")
    if key is not None:
        check_key(key)
        return {n: family.from_param(params[n], key=_path_key(key, n), **kwargs) for n in names}
    return {n: family.from_param(params[n], **kwargs) for n in names}


def sample(posterior: Any, key: Tensor, *, num_samples: int | None = None) -> Any:
    """The tree with each posterior node replaced by a draw (other tensor leaves pass through).

    A node at path ``p`` is drawn as ``node.sample(fold_in(key, hash32(p)))``; a lone node at
    the root is drawn with ``key`` itself. With ``num_samples=S`` every leaf gains a leading
    axis ``S`` and ``sample(post, key, num_samples=S)[i] == sample(post, split(key, S)[i])``.

    Args:
        posterior: a posterior node or a pytree of them (e.g. from ``from_module``).
        key: a key.
        num_samples: the number of draws, or None for one draw without a sample axis.
    """
    check_key(key)
    count = check_optional_positive_int(num_samples, "num_samples")
    if count is None:
        return optree.tree_map(lambda x: x[0], sample_many(posterior, key[None]))
    return sample_many(posterior, random._split(key, count))


def mean(posterior: Any) -> Any:
    """The tree with each posterior node replaced by its ``mu``: the "mean weights"."""
    return optree.tree_map(
        lambda node: node.mu if is_posterior(node) else node, posterior, is_leaf=is_posterior
    )


def functional_call(
    module: nn.Module,
    posterior: dict[str, Any],
    key: Tensor,
    args: Any,
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """Run ``module`` once with weights drawn from ``posterior`` (one Monte-Carlo sample).

    Equals ``torch.func.functional_call(module, sample(posterior, key), args, kwargs)``: the
    module's other parameters and buffers are used as they are, and tied weights stay tied.
    """
    _check_matches(module, posterior)
    return torch.func.functional_call(module, sample(posterior, key), args, kwargs)


def predict(
    module: nn.Module,
    posterior: dict[str, Any],
    key: Tensor,
    args: Any,
    kwargs: dict[str, Any] | None = None,
    *,
    num_samples: int,
    chunk_size: int | None = None,
    strategy: Strategy = "auto",
) -> Any:
    """Outputs of ``num_samples`` weight draws, stacked on a new leading axis.

    Sample ``i`` uses ``split(key, num_samples)[i]``, so every strategy and chunk size gives
    the same result as the loop ``functional_call(module, posterior, keys[i], args, kwargs)``.

    Args:
        strategy: ``"vmap"`` draws the weights with a leading axis and vmaps the forward;
            ``"loop"`` runs the forwards one by one; ``"auto"`` picks vmap, except on the CPU
            when a Bayesian weight belongs to a convolution, attention or RNN layer, where
            batched weights leave PyTorch's fast kernels.
        chunk_size: at most this many samples' weights and activations exist at once.

    Raises:
        ValueError: a dropout or batch-norm layer is in training mode (``module.eval()``).

    Example:
        >>> import torch, tbfunc as tb
        >>> net = torch.nn.Linear(3, 2)
        >>> post = tb.from_module(net)
        >>> tb.predict(net, post, tb.random.key(0), torch.ones(5, 3), num_samples=4).shape
        torch.Size([4, 5, 2])
    """
    count = check_positive_int(num_samples, "num_samples")
    chunk = check_optional_positive_int(chunk_size, "chunk_size") or count
    check_key(key)
    if strategy not in ("auto", "vmap", "loop"):
        fail("strategy", "one of 'auto', 'vmap', 'loop'", strategy)
    _check_matches(module, posterior)
    _check_eval_mode(module)
    if strategy == "auto":
        strategy = choose_strategy(module, posterior)
    keys = random._split(key, count)
    outputs = []
    for start in range(0, count, chunk):
        weights = sample_many(posterior, keys[start : start + chunk])
        if strategy == "vmap":
            outputs.append(_vmapped_forward(module, weights, args, kwargs))
        else:
            outputs.append(_looped_forward(module, weights, args, kwargs))
    if len(outputs) == 1:
        return outputs[0]
    return optree.tree_map(lambda *parts: torch.cat(parts), *outputs)


def choose_strategy(module: nn.Module, posterior: dict[str, Any]) -> Literal["vmap", "loop"]:
    """The strategy ``predict(strategy="auto")`` uses for this module and posterior."""
    leaves: list[Any] = optree.tree_leaves(posterior, is_leaf=is_posterior)  # type: ignore[arg-type]
    on_cpu = all(_device_of(leaf).type == "cpu" for leaf in leaves)
    if not on_cpu:
        return "vmap"
    for name in posterior:
        owner = module.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, _SLOW_UNDER_VMAP_ON_CPU):
            return "loop"
    return "vmap"


def _path_key(key: Tensor, name: str) -> Tensor:
    return random._fold_in_hashes(key, [hash32(name)])[0]


# ----------------------------------------------------------------------------------------------
# Running the module.


def _vmapped_forward(module: nn.Module, weights: Any, args: Any, kwargs: Any) -> Any:
    def forward(params: Any) -> Any:
        return torch.func.functional_call(module, params, args, kwargs)

    # The fused transformer-layer kernel, and on the CPU the flash-attention kernel, have no
    # batching rule: vmap would run them in a slow per-sample fallback. Their unfused versions
    # batch properly, so select those while vmapping.
    # On CUDA the fused attention kernels batch in the forward, but the memory-efficient one's
    # backward fails under vmap ("LSE is not correctly aligned"): training uses the math path.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    leaves = optree.tree_leaves(weights)
    unfused = all(w.device.type == "cpu" for w in leaves) or tracked(*leaves)
    try:
        with sdpa_kernel([SDPBackend.MATH]) if unfused else contextlib.nullcontext():
            return torch.func.vmap(forward)(weights)
    except RuntimeError as error:
        raise RuntimeError(
            f"predict(strategy='vmap') failed inside torch.func.vmap: {error} "
            "Use strategy='loop' for modules whose forward vmap cannot batch."
        ) from error
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _looped_forward(module: nn.Module, weights: Any, args: Any, kwargs: Any) -> Any:
    count = optree.tree_leaves(weights)[0].shape[0]
    outputs = [
        torch.func.functional_call(module, _index(weights, i), args, kwargs) for i in range(count)
    ]
    return optree.tree_map(lambda *parts: torch.stack(parts), *outputs)


# ----------------------------------------------------------------------------------------------
# Validation.


def _check_matches(module: nn.Module, posterior: Any) -> None:
    """Names, shapes, dtypes and devices of ``posterior`` against the module's tensors."""
    if not isinstance(module, nn.Module):
        fail("module", "an nn.Module", module, error=TypeError)
    if not isinstance(posterior, dict):
        fail(
            "posterior",
            "a dict of parameter name -> posterior node",
            posterior,
            "Build one with tb.from_module(module).",
            TypeError,
        )
    tensors: dict[str, Tensor] = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    for name, node in posterior.items():
        if name not in tensors:
            close = fnmatch.filter(tensors, f"*{name.rpartition('.')[2]}*")[:5]
            raise ValueError(
                f"posterior[{name!r}] names no parameter or buffer of {type(module).__name__}"
                + (f"; close names: {close}." if close else ".")
            )
        value = node.mu if is_posterior(node) else node
        field = f"posterior[{name!r}]" + (".mu" if is_posterior(node) else "")
        target = tensors[name]
        for what, mine, theirs in (
            ("shape", tuple(value.shape), tuple(target.shape)),
            ("dtype", value.dtype, target.dtype),
            ("device", value.device.type, target.device.type),
        ):
            if mine != theirs:
                raise ValueError(
                    f"{field} has {what} {mine} but the module's parameter has {what} {theirs}."
                )


def _check_eval_mode(module: nn.Module) -> None:
    for name, layer in module.named_modules():
        stochastic = isinstance(layer, nn.modules.dropout._DropoutNd) and layer.p > 0
        updating = isinstance(layer, nn.modules.batchnorm._BatchNorm) and (
            layer.track_running_stats
        )
        if layer.training and (stochastic or updating):
            raise ValueError(
                f"module must be in eval mode for predict, got {type(layer).__name__} "
                f"{name or '(root)'!r} in training mode: its forward would "
                + ("draw from the global RNG" if stochastic else "update running statistics")
                + ". Call module.eval() first."
            )


def _select(
    params: dict[str, Tensor], selector: Selector, arg: str, *, keep_if_none: bool
) -> set[str]:
    if selector is None:
        return set(params) if keep_if_none else set()
    if callable(selector):
        return {n for n, p in params.items() if selector(n, p)}
    patterns = [selector] if isinstance(selector, str) else list(_as_patterns(selector, arg))
    matched: set[str] = set()
    for pattern in patterns:
        hits = set(fnmatch.filter(params, pattern))
        if not hits:
            shown = list(params)[:8]
            more = ", ..." if len(params) > 8 else ""
            raise ValueError(
                f"{arg} pattern {pattern!r} matches no floating-point parameter; "
                f"the names are {shown}{more}."
            )
        matched |= hits
    return matched


def _as_patterns(selector: Iterable[Any], arg: str) -> Iterable[str]:
    for pattern in selector:
        if not isinstance(pattern, str):
            fail(arg, "a glob string, a list of them or a predicate", selector, error=TypeError)
        yield pattern


def _index(weights: Any, i: int) -> Any:
    return optree.tree_map(lambda w: w[i], weights)


def _device_of(leaf: Any) -> torch.device:
    return leaf.mu.device if is_posterior(leaf) else leaf.device
