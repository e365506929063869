"""Posterior optimizers, ``tb.optim``.

- ``von`` / ``VON``: variational online Newton, natural-gradient mean-field VI (Khan & Rue
  2023; Shen et al. 2024), functional (``init``/``update``) and as a ``torch.optim.Optimizer``
  with its sampled route (``VON.sampled``: the draw in the module itself). The rule and its
  equations: ``_von``; the optimizer: ``_von_optimizer``.
- ``Adam``: ``torch.optim.Adam`` over a posterior's ``mu`` and ``rho`` by one C pass, with
  ``Adam.sampled``, Bayes-by-Backprop's fastest step (``_adam``).
- ``sampled``: Bayes-by-Backprop's gradient through the module itself, for any optimizer
  (``_sampled_grads``).

The block the sampled routes share (the draw written into the module's parameters) is
``_sampled``; what the optimizers share otherwise is ``_optimizers``.
"""

from __future__ import annotations

from tbfunc._adam import Adam
from tbfunc._sampled_grads import sampled
from tbfunc._von import VONState, VONTransform, von
from tbfunc._von_optimizer import VON

__all__ = ["VON", "Adam", "VONState", "VONTransform", "sampled", "von"]
