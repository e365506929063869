"""Posteriors to and from the peers: torchbayesian 0.2.1 and posteriors 0.1.3 (``vi.diag``).

Both peers are optional: the torchbayesian state-dict path and the posteriors conversions need
neither package; building a torchbayesian module needs torchbayesian.

- torchbayesian rewrites a module in place: parameter ``<path>.<name>`` becomes
  ``module.<path>.reparametrizations.<name>.variational_posterior.{mu,rho}``, with
  ``sigma = softplus(rho)`` as here.
- posteriors' diagonal VI state holds ``params`` (the means) and ``log_sd_diag``
  (``log sigma``), ``sigma = exp(log_sd)``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import Tensor, nn

from tbfunc._checks import check_posterior_dict, fail
from tbfunc.kl import log_softplus
from tbfunc.posterior import (
    GAUSSIAN_FAMILIES,
    GaussianPosterior,
    PretrainedGaussianPosterior,
    is_posterior,
)

__all__ = ["from_posteriors", "from_torchbayesian", "to_posteriors", "to_torchbayesian"]

_KEY = re.compile(
    r"^(?:module\.)?(?:(.*)\.)?reparametrizations\.([^.]+)\.variational_posterior\.(mu|rho)$"
)
_SMALL_LOG_SD = -20.0  # below this, softplus^-1(exp(l)) = l + exp(l) / 2 to float64 precision
_INSTALL = 'pip install "torchbayesian==0.2.1"'


def from_torchbayesian(
    source: nn.Module | dict[str, Tensor], *, family: type | None = None
) -> dict[str, Any]:
    """A tbfunc posterior from a torchbayesian ``BayesianModule`` or its ``state_dict()``.

    Names are the original parameter names (``"0.weight"``); ``mu`` and ``rho`` are detached
    copies. The family comes from the module's posterior classes (torchbayesian's
    ``GaussianPosterior`` and ``PretrainedGaussianPosterior`` map to ours); a bare state dict
    does not record it: ``family`` (default ``PretrainedGaussianPosterior``) decides.
    """
    if isinstance(source, nn.Module):
        tensors = source.state_dict()
        kinds = _families_of(source)
    elif isinstance(source, dict):
        tensors, kinds = source, {}
    else:
        fail(
            "source", "a torchbayesian BayesianModule or its state_dict()", source, error=TypeError
        )
    fields: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match:
            path, name, field = match.groups()
            fields.setdefault(f"{path}.{name}" if path else name, {})[field] = value
    if not fields:
        raise ValueError(
            "source holds no torchbayesian posterior: expected keys like "
            "'module.<path>.reparametrizations.<name>.variational_posterior.mu'."
        )
    posterior = {}
    for name, pair in fields.items():
        if set(pair) != {"mu", "rho"}:
            raise ValueError(
                f"torchbayesian posterior {name!r} lacks { ({'mu', 'rho'} - set(pair)) }."
            )
        kind = family or kinds.get(name, PretrainedGaussianPosterior)
        posterior[name] = kind(pair["mu"].detach().clone(), pair["rho"].detach().clone())
    return posterior


def to_torchbayesian(module: nn.Module, posterior: dict[str, Any]) -> nn.Module:
    """A torchbayesian ``BayesianModule`` over a copy of ``module`` holding ``posterior``.

    torchbayesian makes every parameter Bayesian with one family, so ``posterior`` must cover
    all of the module's parameters with one of tbfunc's two Gaussian families. ``module`` is
    not modified; torchbayesian's initial draws use a forked global RNG, which stays untouched.
    """
    try:
        from torchbayesian import bnn
    except ImportError as error:
        raise ImportError(f"to_torchbayesian needs torchbayesian: {_INSTALL}.") from error
    names = [name for name, _ in module.named_parameters()]
    missing = [name for name in names if name not in posterior]
    if missing:
        raise ValueError(
            f"posterior must cover every parameter (torchbayesian makes all of them Bayesian), "
            f"got none for {missing[:8]}. Build it with tb.from_module(module)."
        )
    kinds = {type(node) for node in posterior.values()}
    if len(kinds) != 1 or not kinds <= {GaussianPosterior, PretrainedGaussianPosterior}:
        raise ValueError(
            "posterior must hold one family, tb.GaussianPosterior or "
            f"tb.PretrainedGaussianPosterior, got {sorted(k.__name__ for k in kinds)}."
        )
    kind = "normal" if kinds == {GaussianPosterior} else "pretrained_normal"
    with torch.random.fork_rng(devices=[]):
        bayesian = bnn.BayesianModule(copy.deepcopy(module), variational_posterior=kind)
    state = {}
    for name, node in posterior.items():
        path, _, leaf = name.rpartition(".")
        prefix = f"module.{path}." if path else "module."
        stem = f"{prefix}reparametrizations.{leaf}.variational_posterior"
        state[f"{stem}.mu"], state[f"{stem}.rho"] = node.mu.detach(), node.rho.detach()
    bayesian.load_state_dict(state, strict=False)
    return bayesian


def to_posteriors(posterior: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(params, log_sd_diag)`` for ``posteriors.vi.diag.init(params, optimizer,
    init_log_sds=log_sd_diag)``: the means, and ``log sigma`` computed from ``rho`` without
    underflow (``log_softplus``)."""
    params, log_sds = {}, {}
    for name, node in _gaussian_nodes(posterior).items():
        params[name] = node.mu.detach().clone()
        log_sds[name] = log_softplus(node.rho.detach())
    return params, log_sds


def from_posteriors(
    params: dict[str, Tensor],
    log_sd_diag: dict[str, Tensor],
    *,
    family: type = PretrainedGaussianPosterior,
) -> dict[str, Any]:
    """A tbfunc posterior from posteriors' ``VIDiagState.params`` and ``.log_sd_diag``:
    ``mu = params``, ``rho = softplus^-1(exp(log_sd))``, stable for very small sigma."""
    if not isinstance(params, dict) or not isinstance(log_sd_diag, dict):
        fail("params and log_sd_diag", "dicts of name -> tensor", params, error=TypeError)
    if family not in GAUSSIAN_FAMILIES:
        fail(
            "family",
            "tb.PretrainedGaussianPosterior or tb.GaussianPosterior (a Gaussian family: "
            "posteriors' vi.diag state is Gaussian)",
            family,
            error=TypeError,
        )
    if list(params) != list(log_sd_diag):
        raise ValueError(
            f"params and log_sd_diag must have the same names, got {list(params)[:5]} and "
            f"{list(log_sd_diag)[:5]}."
        )
    posterior = {}
    for name, mu in params.items():
        log_sd = log_sd_diag[name]
        if not isinstance(log_sd, Tensor) or not log_sd.is_floating_point():
            fail(f"log_sd_diag[{name!r}]", "a floating-point tensor", log_sd, error=TypeError)
        log_sd = log_sd.detach()
        if log_sd.shape != mu.shape:
            raise ValueError(
                f"log_sd_diag[{name!r}] has shape {tuple(log_sd.shape)} but params[{name!r}] "
                f"has shape {tuple(mu.shape)}."
            )
        if not bool(torch.isfinite(log_sd).all()):
            fail(
                f"log_sd_diag[{name!r}]",
                "finite (a log standard deviation)",
                log_sd,
                f"{int((~torch.isfinite(log_sd)).sum())} values are NaN or infinite.",
            )
        posterior[name] = family(mu.detach().clone(), _rho_from_log_sigma(log_sd))
    return posterior


def _rho_from_log_sigma(log_sd: Tensor) -> Tensor:
    wide = log_sd.to(torch.promote_types(log_sd.dtype, torch.float32))
    small = torch.clamp(wide, max=_SMALL_LOG_SD)
    large = torch.clamp(wide, min=_SMALL_LOG_SD)
    sigma = torch.exp(large)
    rho = torch.where(
        wide < _SMALL_LOG_SD,
        small + torch.exp(small) / 2,
        sigma + torch.log(-torch.expm1(-sigma)),
    )
    return rho.to(log_sd.dtype)


def _families_of(bayesian: nn.Module) -> dict[str, type]:
    kinds: dict[str, type] = {}
    for key, sub in bayesian.named_modules():
        match = _KEY.match(f"{key}.mu")
        if match:
            path, name, _ = match.groups()
            ours = {
                "GaussianPosterior": GaussianPosterior,
                "PretrainedGaussianPosterior": PretrainedGaussianPosterior,
            }.get(type(sub).__name__)
            if ours is None:
                raise ValueError(
                    f"torchbayesian posterior {type(sub).__name__} at {key!r} has no tbfunc "
                    "counterpart (GaussianPosterior, PretrainedGaussianPosterior)."
                )
            kinds[f"{path}.{name}" if path else name] = ours
    return kinds


def _gaussian_nodes(posterior: Any) -> dict[str, Any]:
    check_posterior_dict(posterior)
    for name, node in posterior.items():
        if not (
            is_posterior(node) and isinstance(node, GaussianPosterior | PretrainedGaussianPosterior)
        ):
            fail(f"posterior[{name!r}]", "a Gaussian posterior node", node, error=TypeError)
    return posterior
