"""tbfunc: turn any PyTorch model into a Bayesian neural network, functionally.

Bayes-by-Backprop (mean-field Gaussian variational inference) on ``torch.func``: a posterior is
a pytree of ``(mu, rho)`` tensors, sampling is a pure function of those tensors and an explicit
key, ``functional_call`` runs the unchanged model with sampled weights, and ``vmap`` batches the
Monte-Carlo samples.
"""

from tbfunc import distributed, interop, metrics, optim, random
from tbfunc.data import KeyedSampler
from tbfunc.diagnostics import check_predictions, diagnostics
from tbfunc.evaluation import evaluate
from tbfunc.io import from_state_dict, load, save, state_dict
from tbfunc.kl import kl_divergence
from tbfunc.likelihood import GaussianLikelihood, HeteroscedasticGaussianLikelihood
from tbfunc.module import (
    choose_strategy,
    from_module,
    functional_call,
    materialize,
    mean,
    predict,
    sample,
)
from tbfunc.nn import PosteriorModule
from tbfunc.objective import nelbo, parameters
from tbfunc.posterior import GaussianPosterior, PretrainedGaussianPosterior, VariationalPosterior
from tbfunc.prior import (
    GaussianPrior,
    LaplacePrior,
    ScaleMixturePrior,
    empirical_prior,
    pretrained_prior,
)

__version__ = "0.1.0"

__all__ = [
    "GaussianLikelihood",
    "GaussianPosterior",
    "GaussianPrior",
    "HeteroscedasticGaussianLikelihood",
    "KeyedSampler",
    "LaplacePrior",
    "PosteriorModule",
    "PretrainedGaussianPosterior",
    "ScaleMixturePrior",
    "VariationalPosterior",
    "__version__",
    "check_predictions",
    "choose_strategy",
    "diagnostics",
    "distributed",
    "empirical_prior",
    "evaluate",
    "from_module",
    "from_state_dict",
    "functional_call",
    "interop",
    "kl_divergence",
    "load",
    "materialize",
    "mean",
    "metrics",
    "nelbo",
    "optim",
    "parameters",
    "predict",
    "pretrained_prior",
    "random",
    "sample",
    "save",
    "state_dict",
]
