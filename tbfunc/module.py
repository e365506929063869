"""A whole model: posteriors for a module's parameters, sampling, and Monte-Carlo prediction.

A posterior tree is any pytree (usually ``dict[name, node]``) whose posterior nodes are replaced
by sampled tensors. Each node's noise is keyed by its path (``fold_in(key, hash32(path))``), so
adding, removing or reordering other nodes never changes it (the drawing itself lives in
``tbfunc._sampling``).
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import optree
import torch
from torch import Tensor, nn

from tbfunc import _threefry
from tbfunc._boundary import check_matches
from tbfunc._checks import check_key, check_optional_positive_int, check_positive_int, fail
from tbfunc._concurrency import exclusive
from tbfunc._forward import Strategy, pin_fixed_rows, run
from tbfunc._predicting import check_args, choose, draw, predict_keys, prepare
from tbfunc._rng_guard import rng_guard
from tbfunc._sampling import canonical, check_tree, hash32, sample_many
from tbfunc.posterior import PretrainedGaussianPosterior, is_posterior, is_posterior_type

__all__ = [
    "choose_strategy",
    "from_module",
    "functional_call",
    "materialize",
    "mean",
    "predict",
    "sample",
]

Selector = str | Sequence[str] | Callable[[str, Tensor], bool] | None


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
            appears once, under its first name). For a ``torch.compile`` d module the
            ``_orig_mod.`` segments are dropped, so the eager and the compiled module share
            one posterior and the same noise per parameter. Integer parameters are left out.
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

    Raises:
        ValueError: no parameter was selected (a module with buffers only, a predicate that
            matches nothing, ``include`` and ``exclude`` that cancel). To run a module
            deterministically (or with dropout only), pass ``{}`` to ``predict``.

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
    with exclusive(module):  # not while another thread's draw is swapped into the module
        params: dict[str, Tensor] = {
            canonical(n): p for n, p in module.named_parameters() if p.is_floating_point()
        }
    chosen = _select(params, include, "include", keep_if_none=True)
    dropped = _select(params, exclude, "exclude", keep_if_none=False)
    names = [n for n in params if n in chosen and n not in dropped]
    if not names:
        why = (
            "include and exclude leave none"
            if params
            else f"{type(module).__name__} has no floating-point parameters"
        )
        raise ValueError(
            f"from_module selected no parameter: {why}. Pass posterior={{}} to predict or "
            "functional_call to run the module deterministically."
        )
    takes_key = "key" in inspect.signature(family.from_param).parameters
    if takes_key and key is None:
        raise ValueError(
            f"key must be given: {family.__name__}.from_param draws at random. "
            "Pass key=tb.random.key(seed)."
        )
    if not takes_key and key is not None:
        raise ValueError(f"key must be None: {family.__name__}.from_param takes no key.")
    if key is not None:
        key = check_key(key)
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
    check_tree(posterior)
    key = check_key(key)
    count = check_optional_positive_int(num_samples, "num_samples")
    if count is None:
        # squeeze, not [0]: a view whose backward writes no zero tensor
        return optree.tree_map(lambda x: x.squeeze(0), sample_many(posterior, key[None]))
    return sample_many(posterior, _threefry.split(key, count))


def mean(posterior: Any) -> Any:
    """The tree with each posterior node replaced by its ``mu``: the "mean weights"."""
    check_tree(posterior)
    return optree.tree_map(
        lambda node: node.mu if is_posterior(node) else node, posterior, is_leaf=is_posterior
    )


def functional_call(
    module: nn.Module,
    posterior: dict[str, Any],
    key: Tensor,
    args: Any,
    kwargs: dict[str, Any] | None = None,
    *,
    dropout: bool = False,
) -> Any:
    """Run ``module`` once with weights drawn from ``posterior`` (one Monte-Carlo sample).

    Equals ``torch.func.functional_call(module, sample(posterior, key), args, kwargs)``: the
    module's other parameters and buffers are used as they are, and tied weights stay tied.
    Rows the module keeps fixed (``nn.Embedding`` padding rows) take the module's own value,
    and the module must be in eval mode (see ``predict``). ``dropout=True`` adds MC-dropout
    masks keyed by ``key`` (as ``predict``'s sample with this key).
    """
    key = check_key(key)
    with exclusive(module):  # one call at a time per module (_concurrency)
        names, device = prepare(module, posterior, args, kwargs, "functional_call", dropout)
        with rng_guard("functional_call", device):
            weights = draw(module, posterior, names, key[None], dropout)
            return run(module, weights, args, kwargs, "single", "functional_call")


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
    dropout: bool = False,
) -> Any:
    """Outputs of ``num_samples`` weight draws, stacked on a new leading axis.

    Sample ``i`` uses ``split(key, num_samples)[i]``, so every strategy and chunk size gives
    the same result as the loop ``functional_call(module, posterior, keys[i], args, kwargs)``.
    The output has the module's own output type (a tensor, a tuple, a Hugging Face
    ``ModelOutput``, ...) with every tensor leaf stacked; non-tensor leaves (``None``) pass
    through. ``posterior={}`` gives ``num_samples`` deterministic forwards.

    Args:
        strategy: ``"vmap"`` draws the weights with a leading axis and vmaps the forward;
            ``"loop"`` runs the forwards one by one; ``"auto"`` follows ``choose_strategy``'s
            rules, and on a call class not yet decided times the two inside this call (see
            ``choose_strategy``).
        chunk_size: at most this many samples' weights and activations exist at once.
        dropout: Monte-Carlo dropout: every ``nn.Dropout*`` / ``AlphaDropout`` /
            ``FeatureAlphaDropout`` is active, and every dropout call that runs (also
            ``F.dropout`` inside ``forward`` and attention dropout, where the module's own
            training flag turns them on) draws its mask from sample ``i``'s key, never from
            the global RNG. Combines with a weight posterior; ``posterior={}`` is dropout
            alone. The layers' training flags are restored afterwards, even on errors.

    Raises:
        ValueError: a layer would draw from the global RNG or update its state (dropout,
            batch-norm or spectral norm in training mode: call ``module.eval()``), or an input
            is on another device than the weights.

    Example:
        >>> import torch, tbfunc as tb
        >>> net = torch.nn.Linear(3, 2)
        >>> post = tb.from_module(net)
        >>> tb.predict(net, post, tb.random.key(0), torch.ones(5, 3), num_samples=4).shape
        torch.Size([4, 5, 2])
    """
    key, count, chunk = check_args(key, num_samples, chunk_size, strategy)
    with exclusive(module):  # one call at a time per module (_concurrency)
        names, device = prepare(module, posterior, args, kwargs, "predict", dropout)
        keys = _threefry.split(key, count)
        with rng_guard("predict", device):
            return predict_keys(
                module, posterior, names, keys, args, kwargs, chunk, strategy, "predict", dropout
            )


def choose_strategy(
    module: nn.Module,
    posterior: dict[str, Any],
    args: Any = None,
    kwargs: dict[str, Any] | None = None,
    *,
    num_samples: int = 4,
    dropout: bool = False,
) -> Literal["vmap", "loop"]:
    """The strategy ``predict(strategy="auto")`` uses; it never picks one that cannot run.

    - ``"loop"`` for modules with RNN layers (``aten::lstm`` and its kin have no vmap batching
      rule), and for an empty posterior without ``dropout`` (nothing to batch); with
      ``dropout`` alone, ``"vmap"`` over the mask keys (one forward of S x B rows).
    - On the CPU, ``"loop"`` when a Bayesian weight feeds a convolution or attention layer,
      whose batched kernels were measured 2.6-3x slower.
    - Otherwise, given ``args``: both strategies are timed once on ``num_samples`` copies of the
      mean weights (two interleaved rounds, the faster of each), and the faster is kept,
      cached per module, posterior structure and a coarse class of the inputs; one whose
      forward fails is never picked. Without ``args`` (or under ``torch.compile`` or a
      ``torch.func`` transform, where nothing can be timed): ``"vmap"``.

    ``predict`` itself shares that cache but times nothing up front: on a class not yet
    decided, its call runs the first chunk vmapped and the first sample by the loop, keeps the
    faster per sample, and returns the winner's outputs (the loop's other samples run only
    when it wins). Calling ``choose_strategy`` first decides the class its way instead.
    """
    with exclusive(module):  # one call at a time per module (_concurrency)
        names, device = prepare(module, posterior, args, kwargs, "choose_strategy", dropout)
        count = check_positive_int(num_samples, "num_samples")
        with rng_guard("choose_strategy", device):
            return choose(module, posterior, names, args, kwargs, count, dropout)


def materialize(
    module: nn.Module,
    posterior: dict[str, Any],
    key: Tensor | None = None,
    *,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``module`` whose posterior parameters hold the mean weights (``mean``), or one
    draw (``sample(posterior, key)``) when ``key`` is given: a plain module to merge (PEFT
    ``merge_and_unload``), export, or serve as a point estimate.

    ``materialize(net, post)(x)`` equals ``torch.func.functional_call(net, tb.mean(post), x)``;
    with a key it equals ``tb.functional_call(net, post, key, x)``. Rows the module keeps fixed
    (``nn.Embedding`` padding rows) keep the module's value in both, as ``functional_call``
    keeps them. The
    values are cast to each parameter's dtype; the other parameters, buffers and the training
    flags are copied as they are, and ``requires_grad`` is kept.

    Args:
        module: the module the posterior was built from (``from_module``).
        posterior: its posterior.
        key: None for the mean; a key for one draw.
        inplace: write into ``module`` itself instead of a ``copy.deepcopy`` (for models too
            large to hold twice); the module is returned.

    Example:
        >>> import torch, tbfunc as tb
        >>> net = torch.nn.Linear(3, 2)
        >>> post = tb.from_module(net)
        >>> plain = tb.materialize(net, post)
        >>> torch.equal(plain.weight, post["weight"].mu)
        True
    """
    if not isinstance(inplace, bool):
        fail("inplace", "a bool", inplace, error=TypeError)
    values = mean(posterior) if key is None else sample(posterior, check_key(key))
    with exclusive(module):  # never copy a module while another thread's draw is swapped in
        names = check_matches(module, posterior)
        stacked = {name: values[name].detach()[None] for name in names}
        pinned = pin_fixed_rows(module, names, stacked)
        target = module if inplace else copy.deepcopy(module)
        params = dict(target.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, actual in names.items():
                params[actual].copy_(pinned[name][0])
    return target


def _path_key(key: Tensor, name: str) -> Tensor:
    return _threefry.fold_in_hashes(key, [hash32(name)])[0]


def _select(
    params: dict[str, Tensor], selector: Selector, arg: str, *, keep_if_none: bool
) -> set[str]:
    if selector is None:
        return set(params) if keep_if_none else set()
    if callable(selector):
        return {n for n, p in params.items() if selector(n, p)}
    if not isinstance(selector, str | Sequence):
        fail(arg, "a glob string, a list of them or a predicate", selector, error=TypeError)
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
