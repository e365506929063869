"""The optimizers' passes over a posterior, one C kernel call each (``_train.c``): Adam
(``tb.optim.Adam``), Bayes-by-Backprop's gradient with Adam and the next sigma
(``Adam.sampled``), and the variational-online-Newton update (``tb.optim.VON``). Callers
check ``_fused.eager`` first.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

from torch import Tensor

from tbfunc import _native
from tbfunc._kernel_calls import PriorTerms, addresses, loaded, over_threads, prior_tables, written

__all__ = ["adam_step", "bbb_adam_step", "serves_bbb_adam", "von_step"]


def adam_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """torch.optim.Adam's update (amsgrad off) of every tensor in place, in one pass; each
    tensor's own step count ``steps[i]`` (already incremented) sets its bias corrections."""
    tables = [addresses(t) for t in (params, grads, exp_avgs, exp_avg_sqs)]
    node_table = _bias_corrections(steps, lr, beta1, beta2)
    hyper = (ctypes.c_double * 5)(1 - beta1, beta2, 1 - beta2, eps, weight_decay)
    numels = [p.numel() for p in params]
    library = loaded()
    over_threads(library.tb_adam, params[0].dtype, numels, *tables, node_table, hyper)
    written(params, exp_avgs, exp_avg_sqs)


def _bias_corrections(steps: list[float], lr: float, beta1: float, beta2: float) -> Any:
    """Adam's per-tensor ``(lr / (1 - beta1^t), sqrt(1 - beta2^t))``, as the kernels take them."""
    per_node = []
    for step in steps:
        per_node += [lr / (1 - beta1**step), (1 - beta2**step) ** 0.5]
    return (ctypes.c_double * len(per_node))(*per_node)


def bbb_adam_step(
    tensors: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]],
    moments: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]],
    priors: list[PriorTerms],
    steps: list[float],
    *,
    kl_scale: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> bool:
    """Bayes-by-Backprop's gradient and Adam over every ``mu`` and ``rho``, in place, in one
    pass (``tb.optim.Adam.sampled``'s step). ``tensors``: ``(mus, rhos, the draw's weight
    gradients, its eps, its sigma)``, the sigma overwritten with ``softplus`` of the new
    ``rho``; ``moments``: Adam's ``(exp_avg, exp_avg_sq)`` of the mus, then of the rhos; each
    node's step count ``steps[i]`` (already incremented, the same for its ``mu`` and ``rho``).
    Every tensor contiguous. Returns whether every new ``mu`` and ``rho`` is finite."""
    mus, rhos, _, _, sigmas = tensors
    tables = [addresses(t) for t in (*tensors, *moments)]
    node_table = _bias_corrections(steps, lr, beta1, beta2)
    hyper = (ctypes.c_double * 6)(kl_scale, 1 - beta1, beta2, 1 - beta2, eps, weight_decay)
    numels = [m.numel() for m in mus]
    library = loaded()
    finite = over_threads(
        library.tb_bbb_adam,
        mus[0].dtype,
        numels,
        *tables,
        *prior_tables(priors),
        node_table,
        hyper,
        flagged=True,
    )
    written(mus, rhos, sigmas, *moments)
    return finite


def serves_bbb_adam() -> bool:
    """Whether the built kernels have ``bbb_adam_step``'s pass."""
    library = _native.kernel()
    return library is not None and hasattr(library, "tb_bbb_adam")


def von_step(
    tensors: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]],
    gbars: list[Tensor],
    hs: list[Tensor],
    centres: list[Tensor] | None,
    deltas: list[float],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    num_data: int,
    clip: float | None,
    sigmas: list[Tensor] | None = None,
) -> bool:
    """``tbfunc.optim``'s VON update of every node in place, in one pass: ``tensors`` is
    ``(mus, rhos, mu grads, rho grads)``, the gradients of the data term through one draw. With
    ``sigmas`` (``VON.sampled``'s route) it is ``(mus, rhos, mu grads, the draw's eps)``,
    ``sigmas`` the draw's sigma, overwritten with the new one. Every tensor (``centres`` too)
    must be contiguous: the kernel reads their addresses. Returns whether every new ``mu``
    and ``rho`` is finite."""
    mus, rhos, grad_mus, grad_rhos = tensors
    tables = [addresses(t) for t in (mus, rhos, grad_mus, grad_rhos, gbars, hs)]
    centre_table = None if centres is None else addresses(centres)
    sigma_table = None if sigmas is None else addresses(sigmas)
    delta_table = (ctypes.c_double * len(deltas))(*deltas)
    hyper = (ctypes.c_double * 7)(
        1 - beta1,
        1 - beta2,
        (1 - beta2) ** 2 / 2,
        1 / (1 - beta1**step),
        lr,
        float(num_data),
        math.inf if clip is None else clip,
    )
    numels = [m.numel() for m in mus]
    library = loaded()
    extra = (centre_table, sigma_table, delta_table, hyper)
    finite = over_threads(library.tb_von, mus[0].dtype, numels, *tables, *extra, flagged=True)
    written(mus, rhos, gbars, hs, sigmas or [])
    return finite
