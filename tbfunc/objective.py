"""The training objective: the negative ELBO per data point, and training helpers.

Minibatch scaling. For N data points the negative ELBO is ``sum_i -log p(y_i | w) + KL``.
Dividing by N gives ``mean_i -log p(y_i | w) + KL / N``; on a minibatch of B points the batch
mean of the NLL is an unbiased estimate of the first term. So pass ``num_data=N`` (the dataset
size, not the batch size) and every minibatch's ``nelbo`` estimates ``-ELBO / N`` without bias.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, Literal

import optree
import torch
from torch import Tensor, nn

from tbfunc import _fused, _threefry
from tbfunc._boundary import has_rnn
from tbfunc._checks import check_key, check_positive_int, fail, is_wrapped
from tbfunc._concurrency import exclusive
from tbfunc._forward import Strategy, Weights, index, pin_fixed_rows, run
from tbfunc._predicting import dropout_keys, prepare
from tbfunc._rng_guard import rng_guard
from tbfunc._sampling import check_finite, check_tree, posterior_nodes, sample_with_kl
from tbfunc.kl import (
    accumulation_dtype,
    closed_form_kl,
    has_closed_form,
    kernel_priors,
    kl_from_draws,
)
from tbfunc.posterior import GAUSSIAN_FAMILIES, is_posterior
from tbfunc.prior import GaussianPrior

__all__ = ["nelbo", "parameters"]


def nelbo(
    module: nn.Module,
    posterior: dict[str, Any],
    key: Tensor,
    args: Any,
    target: Any,
    kwargs: dict[str, Any] | None = None,
    *,
    num_data: int,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    log_likelihood: Callable[[Any, Any], Tensor] | None = None,
    prior: Any = GaussianPrior(),  # noqa: B008 - an immutable NamedTuple of floats
    kl_weight: float = 1.0,
    num_samples: int = 1,
    strategy: Strategy = "auto",
    stick_the_landing: bool = False,
    dropout: bool = False,
) -> Tensor:
    """The negative ELBO per data point: ``mean NLL over the batch + kl_weight * KL / num_data``.

    The NLL is averaged over ``num_samples`` weight draws; draw ``s`` uses
    ``split(key, num_samples)[s]``, as in ``predict``. The KL is the closed form where every node
    has one against its prior; otherwise (or with ``stick_the_landing``) it is the Monte-Carlo
    estimate ``mean_s [log q(w_s) - log p(w_s)]`` on the same draws ``w_s`` as the likelihood
    (Blundell et al. 2015). See the module docstring for the minibatch scaling.

    ``loss_fn`` gets what the module returned (a ``ModelOutput``, a tuple, ...). The result is
    accumulated and returned in at least float32 (float64 for float64 models), whatever the
    parameters' dtype. The module must be in eval mode as for ``predict``; an empty posterior
    gives the NLL alone.

    Args:
        module, posterior, key, args, kwargs: as in ``functional_call``.
        target: passed to the likelihood with the module's output.
        num_data: the number of points in the whole data set.
        loss_fn: ``(output, target) -> mean NLL over the batch``, e.g. ``F.cross_entropy``.
        log_likelihood: instead of ``loss_fn``, ``(output, target) -> per-point log p(y | x, w)``.
        prior: one prior for every node or a dict keyed like the posterior.
        kl_weight: multiplies the KL (1 is the ELBO; < 1 for KL warm-up or cold posteriors).
        num_samples: weight draws to average the NLL over.
        strategy: ``"vmap"`` or ``"loop"`` over the draws; ``"auto"`` loops on the CPU, where
            a loop of forward/backward passes was measured faster, and for RNN layers (no vmap
            batching rule); it vmaps on accelerators, looping instead if vmap alone fails.
        stick_the_landing: evaluate ``log q`` at detached ``(mu, rho)`` in a Monte-Carlo KL
            (Roeder et al. 2017): lower-variance gradients near the optimum.
        dropout: train with Monte-Carlo dropout, masks keyed by each draw's key (as in
            ``predict``), so a model fine-tuned with dropout never reads the global RNG.

    Example:
        >>> import torch, torch.nn.functional as F, tbfunc as tb
        >>> net = torch.nn.Linear(3, 2).requires_grad_(False)
        >>> post = tb.from_module(net)
        >>> opt = tb.optim.Adam(post, lr=1e-3)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> loss = tb.nelbo(net, post, tb.random.key(0), x, y, loss_fn=F.cross_entropy,
        ...                 num_data=100, num_samples=2)
        >>> opt.zero_grad(); loss.backward(); opt.step()
    """
    key = check_key(key)
    count = check_positive_int(num_samples, "num_samples")
    data_size = check_positive_int(num_data, "num_data")
    if (loss_fn is None) == (log_likelihood is None):
        raise ValueError(
            "give exactly one of loss_fn (mean NLL over the batch) and "
            "log_likelihood (per-point log-likelihood)."
        )
    if strategy not in ("auto", "vmap", "loop"):
        fail("strategy", "one of 'auto', 'vmap', 'loop'", strategy)
    if not isinstance(kl_weight, int | float) or not 0 <= kl_weight < math.inf:
        fail("kl_weight", "a finite non-negative float", kl_weight)
    rows = _rows(target)
    if rows is not None and rows > data_size:
        raise ValueError(
            f"num_data must be the size of the whole data set, at least the batch's {rows} "
            f"rows, got int {data_size}. (It scales the KL: the batch mean of the NLL plus "
            "KL / num_data estimates -ELBO / N.)"
        )
    with exclusive(module):  # one call at a time per module (_concurrency)
        names, device = prepare(module, posterior, args, kwargs, "nelbo", dropout)

        def batch_nll(output: Any) -> Tensor:
            if loss_fn is not None:
                loss = loss_fn(output, target)
            else:
                assert log_likelihood is not None
                per_point = log_likelihood(output, target)
                loss = -per_point.mean(dtype=accumulation_dtype(per_point.dtype))
            return loss.to(accumulation_dtype(loss.dtype))

        # softplus(rho) once per node, shared by the draws and the closed-form KL; without
        # its graph where both take the fused route, whose backward reaches rho directly
        leaves = optree.tree_leaves(posterior, is_leaf=is_posterior)  # type: ignore[arg-type]
        gaussian = {i: leaf for i, leaf in enumerate(leaves) if isinstance(leaf, GAUSSIAN_FAMILIES)}
        fused = _fused.trainable([t for leaf in gaussian.values() for t in (leaf.mu, leaf.rho)])
        with torch.no_grad() if fused else contextlib.nullcontext():
            sigmas = {i: leaf.sigma for i, leaf in gaussian.items()}
        sample_keys = _threefry.split(key, count)
        # fused: the closed-form KL rides along with the draw, its gradient added in one pass
        terms = kernel_priors(posterior, prior) if fused and not stick_the_landing else None
        draws, fused_kl = sample_with_kl(
            posterior, sample_keys, sigmas, terms, check=False, validated=True
        )
        pinned = pin_fixed_rows(module, names, draws)
        masks = dropout_keys(sample_keys) if dropout else None
        weights = Weights({names[n]: w for n, w in pinned.items()}, count, masks)
        auto = strategy == "auto"
        if auto:
            strategy = _nelbo_strategy(module, device, count)
        with rng_guard("nelbo", device):
            if strategy == "loop" or count == 1:
                # one forward and loss at a time: the activations of one draw at a time
                parts = _unbind(weights)
                losses = [
                    batch_nll(run(module, parts[s], args, kwargs, "single", "nelbo"))
                    for s in range(count)
                ]
            else:
                outputs = run(module, weights, args, kwargs, "vmap", "nelbo", fallback=auto)
                losses = [batch_nll(index(outputs, s)) for s in range(count)]
    nll = torch.stack(losses).mean()
    if fused_kl is not None:
        kl = fused_kl
    elif not posterior:
        kl = torch.zeros((), dtype=nll.dtype, device=nll.device)
    elif has_closed_form(posterior, prior) and not stick_the_landing:
        kl = closed_form_kl(posterior, prior, [sigmas[i] for i in sorted(sigmas)])
    else:
        kl = kl_from_draws(posterior, prior, draws, stop_gradient=stick_the_landing)
    _check_finite_kl(kl, posterior)
    return nll + kl_weight * kl.to(nll.device) / data_size


def _rows(target: Any) -> int | None:
    """The batch's size where it is plain: the leading axis of a tensor target."""
    if isinstance(target, Tensor) and target.dim() > 0:
        return int(target.shape[0])
    return None


def _check_finite_kl(kl: Tensor, posterior: Any) -> None:
    """A non-finite ``mu`` or ``rho`` makes the KL non-finite: one scalar test per step instead
    of a sum per tensor; only then are the tensors searched, for an error that names one."""
    if torch.compiler.is_compiling() or is_wrapped(kl) or bool(torch.isfinite(kl)):
        return
    leaves, names, nodes, _, _ = posterior_nodes(posterior)
    check_finite(leaves, names, nodes)


def _nelbo_strategy(
    module: nn.Module, device: torch.device | None, count: int
) -> Literal["vmap", "loop"]:
    """Loop on the CPU (a loop of forward/backward passes was measured faster there) and for
    RNN layers anywhere (they have no vmap batching rule); vmap on accelerators otherwise."""
    if device is None or device.type == "cpu" or count == 1:
        return "loop"
    return "loop" if has_rnn(module) else "vmap"


def _unbind(weights: Weights) -> list[Weights]:
    """One ``Weights`` per draw. By ``unbind`` (one backward that stacks the gradients) and
    ``unsqueeze`` (a view): slicing each draw out would make every draw's backward write a
    zero tensor of the whole stack."""
    if weights.samples == 1:
        return [weights]
    parts = {name: value.unbind(0) for name, value in weights.tensors.items()}
    return [
        Weights(
            {name: part[s].unsqueeze(0) for name, part in parts.items()},
            1,
            None if weights.dropout is None else weights.dropout[s : s + 1],
        )
        for s in range(weights.samples)
    ]


def parameters(posterior: Any) -> list[Tensor]:
    """The posterior's tensors, set to ``requires_grad`` in place, for a ``torch.optim`` optimizer.

    The tree keeps these very tensors, so after ``optimizer.step()`` it holds the updated
    values and stays usable with ``sample``, ``predict`` and ``kl_divergence``.

    Example:
        >>> import torch, tbfunc as tb
        >>> post = tb.from_module(torch.nn.Linear(3, 2))
        >>> opt = torch.optim.Adam(tb.parameters(post), lr=1e-3)
    """
    check_tree(posterior)
    tensors: list[Tensor] = []
    seen: set[int] = set()
    for path, leaf in zip(*optree.tree_flatten_with_path(posterior)[:2], strict=True):
        if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
            fail(
                f"posterior leaf {'.'.join(map(str, path))!r}",
                "a floating-point tensor",
                leaf,
                error=TypeError,
            )
        if not leaf.is_leaf:
            raise ValueError(
                f"posterior leaf {'.'.join(map(str, path))!r} is computed from other tensors, "
                "so an optimizer cannot update it; detach it first (tensor.detach().clone())."
            )
        if id(leaf) not in seen:
            seen.add(id(leaf))
            tensors.append(leaf.requires_grad_(True))
    return tensors
