"""What ``tb.optim``'s optimizers share: the posterior's Gaussian nodes, the finite-number
check of their knobs, and the bookkeeping of the sigma a sampled step keeps (valid while
``rho``'s version counter stays where that step left it).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from tbfunc._checks import fail
from tbfunc._sampling import remember_finite
from tbfunc.posterior import GAUSSIAN_FAMILIES

__all__ = ["finite_number", "gaussian_nodes", "remember_all_finite", "versions", "without_sigma"]


def gaussian_nodes(posterior: Any) -> dict[str, Any]:
    if not isinstance(posterior, dict):
        fail(
            "posterior",
            "a dict of parameter name -> Gaussian posterior node",
            posterior,
            "Build one with tb.from_module(module).",
            TypeError,
        )
    nodes = {name: node for name, node in posterior.items() if isinstance(node, GAUSSIAN_FAMILIES)}
    if not nodes:
        fail("posterior", "a dict with at least one Gaussian posterior node", posterior)
    return nodes


def finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def versions(tensors: list[Tensor]) -> list[int]:
    return [t._version for t in tensors]


def without_sigma(saved: dict[str, Any]) -> dict[str, Any]:
    """An optimizer ``state_dict`` without the kept sigmas of the sampled routes (they belong
    to ``rho`` as a step left it, and ``rho`` has changed since)."""
    saved["state"] = {
        index: {k: v for k, v in state.items() if k != "sigma"}
        for index, state in saved["state"].items()
    }
    return saved


def remember_all_finite(*groups: list[Tensor]) -> None:
    for group in groups:
        for tensor in group:
            remember_finite(tensor)
