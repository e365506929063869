"""Diagnostics that catch what ECE hides: collapsed or exploded nodes, and outlying predictions.

``diagnostics(posterior, prior)`` reports, per node, how many sigmas sit at the prior's scale
(the data did not pin them: the posterior there is the prior), the signal-to-noise ``|mu| /
sigma`` (below 1 the weight's sign is a coin flip) and the node's share of the KL (where the
objective's pull towards the prior lands). ``check_predictions(logits, target)`` flags
examples whose logits are huge or whose NLL is an outlier: a few confidently wrong test points
can dominate the mean NLL while ECE, a binned average, barely moves.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tbfunc._checks import fail
from tbfunc.kl import kl_divergence
from tbfunc.metrics import nll
from tbfunc.posterior import GAUSSIAN_FAMILIES
from tbfunc.prior import GaussianPrior

__all__ = ["NodeDiagnostics", "PredictionReport", "check_predictions", "diagnostics"]

AT_PRIOR = 0.9  # sigma within 10% of the prior's scale (or above it) counts as "at the prior"


class NodeDiagnostics(NamedTuple):
    """One node's report. ``at_prior``: the fraction of sigmas ``>= 0.9 x`` the prior's scale;
    ``snr_median``: the median of ``|mu| / sigma``;
    ``kl_share``: the node's KL over the total; ``flags``: short words for what to act on."""

    numel: int
    sigma_median: float
    prior_sigma: float
    at_prior: float
    snr_median: float
    kl: float
    kl_share: float
    flags: tuple[str, ...]


class PredictionReport(NamedTuple):
    """``max_abs_logit``, the median absolute logit, the indices of examples whose NLL exceeds
    ``nll_limit`` (worst first) and their NLLs, and the share of the summed NLL they hold."""

    max_abs_logit: float
    median_abs_logit: float
    outliers: Tensor
    outlier_nll: Tensor
    outlier_share: float
    warnings: tuple[str, ...]


def diagnostics(posterior: dict[str, Any], prior: Any = None) -> dict[str, NodeDiagnostics]:
    """Per node: sigmas at the prior's scale, signal-to-noise ``|mu| / sigma``, KL share.

    Flags (and what to do):

    - ``"collapsed to prior"``: over 90% of the sigmas sit at the prior's scale. The data
      pinned almost none of the node's weights: with a wide prior its draws are noise that
      costs accuracy. Learn the scale (``tb.empirical_prior``) or leave the node deterministic.
    - ``"low signal"``: median ``|mu| / sigma < 1``: most weights change sign between draws.
      Fine for a few nodes; for every node, the posterior is too wide (prior too wide, or
      ``kl_weight`` too large for the data).
    - ``"exploded"``: some ``|mu|`` exceeds 10 x the prior's scale plus the centre's size; the
      means wandered. Logits will be huge: check ``check_predictions`` on held-out data.

    Args:
        posterior: ``dict[name, Gaussian node]``.
        prior: as for ``kl_divergence`` (default ``GaussianPrior()``); only Gaussian priors
            have a scale to compare with.
    """
    if not isinstance(posterior, dict) or not posterior:
        fail(
            "posterior",
            "a non-empty dict of name -> Gaussian posterior node",
            posterior,
            error=TypeError,
        )
    prior = GaussianPrior() if prior is None else prior
    report: dict[str, NodeDiagnostics] = {}
    with torch.no_grad():
        kls = {
            name: float(kl_divergence({name: node}, _prior_of(prior, name)))
            for name, node in posterior.items()
        }
        total = sum(kls.values()) or 1.0
        for name, node in posterior.items():
            if not isinstance(node, GAUSSIAN_FAMILIES):
                fail(f"posterior[{name!r}]", "a Gaussian posterior node", node, error=TypeError)
            chosen = _prior_of(prior, name)
            if not isinstance(chosen, GaussianPrior):
                fail(
                    f"prior[{name!r}]",
                    "a tb.GaussianPrior (a scale to compare with)",
                    chosen,
                    error=TypeError,
                )
            sigma = node.sigma.double()
            scale = torch.as_tensor(chosen.sigma, dtype=torch.float64).expand_as(sigma)
            centre = torch.as_tensor(chosen.mu, dtype=torch.float64).expand_as(sigma)
            at_prior = float((sigma >= AT_PRIOR * scale).double().mean())
            snr = float((node.mu.double().abs() / sigma).median())
            exploded = bool(((node.mu.double() - centre).abs() > 10 * scale + centre.abs()).any())
            flags = tuple(
                flag
                for flag, on in (
                    ("collapsed to prior", at_prior > 0.9),
                    ("low signal", snr < 1.0),
                    ("exploded", exploded),
                )
                if on
            )
            report[name] = NodeDiagnostics(
                sigma.numel(),
                float(sigma.median()),
                float(scale.median()),
                at_prior,
                snr,
                kls[name],
                kls[name] / total,
                flags,
            )
    return report


def check_predictions(
    logits: Tensor,
    target: Tensor,
    *,
    nll_limit: float = 10.0,
    logit_limit: float = 100.0,
    warn: bool = True,
) -> PredictionReport:
    """Flag what a mean NLL or ECE hides: logits beyond ``logit_limit`` in size (the model is
    certain to ``exp(-limit)``) and examples with NLL above ``nll_limit`` (probability of the
    true class below ``exp(-10)``). With ``warn`` each finding is also a ``UserWarning``.

    Args:
        logits: ``(S, N, C)`` as ``tb.predict`` returns them.
        target: ``(N,)`` integer classes.
    """
    per_example = nll(logits, target, reduction="none").reshape(-1)
    size = logits.detach().abs()
    order = per_example.argsort(descending=True)
    outliers = order[per_example[order] > nll_limit]
    total = float(per_example.sum()) or 1.0
    share = float(per_example[outliers].sum()) / total
    found = []
    if float(size.max()) > logit_limit:
        found.append(
            f"logits reach {float(size.max()):.3g} in size (limit {logit_limit:g}): the "
            "posterior's means or sigmas may have exploded (see tb.diagnostics)."
        )
    if outliers.numel():
        found.append(
            f"{outliers.numel()} of {per_example.numel()} examples have NLL above {nll_limit:g} "
            f"(worst {float(per_example[outliers[0]]):.3g}), holding {share:.0%} of the summed "
            "NLL: confidently wrong predictions that ECE does not show."
        )
    if warn:
        for message in found:
            warnings.warn(message, UserWarning, stacklevel=2)
    return PredictionReport(
        float(size.max()),
        float(size.median()),
        outliers,
        per_example[outliers],
        share,
        tuple(found),
    )


def _prior_of(prior: Any, name: str) -> Any:
    if isinstance(prior, dict):
        if name not in prior:
            raise ValueError(f"prior has no entry for posterior name {name!r}.")
        return prior[name]
    return prior
