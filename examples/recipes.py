"""Training recipes shared by the evaluations (``classification_eval.py``, ``uci_eval.py``).

Every recipe trains from the same data with the same minibatches (a keyed shuffle per epoch)
and returns something ``predict`` turns into stacked outputs ``(S, N, ...)``. The likelihood is
``lik(output, target) -> per-point log-likelihood``; a regression likelihood carries a learned
noise (``tb.GaussianLikelihood``), trained by Adam beside whatever trains the weights.

- ``train_map``: Adam + weight decay (also the checkpoint every post-hoc method starts from);
  with ``dropout=True``, key-driven dropout masks (the MC-dropout row).
- ``train_bbb``: Bayes-by-Backprop from the MAP weights, with ``tb.nelbo`` and the prior's
  scale re-fitted every step by ``tb.empirical_prior`` (centred on 0: the recommended recipe;
  centred on the MAP weights: the pretrained workflow).
- ``train_von``: ``tb.optim.VON`` (natural-gradient mean-field VI) from a fresh network, each
  step's draw written into the net by ``opt.sampled`` (the README recipe's route). The
  recommended recipe is this posterior, calibrated as validation splits chose: no temperature
  for classification, and the observation noise refitted on the validation slice for
  regression (``uci_eval.UCI``).
- ``train_ivon``: the ``ivon-opt`` package (optional; a peer, never a dependency).
- ``train_laplace``: laplace-torch's last-layer Laplace around the MAP (optional, likewise).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tbfunc as tb

LogLik = Callable[[Tensor, Tensor], Tensor]

# the benchmark's rows, in its tables' order (both evaluations)
ROWS = [
    "MAP",
    "MAP + temperature",
    "deep ensemble",
    "MC dropout",
    "recommended",
    "pretrained, learned prior",
    "natural gradient",
    "IVON",
    "laplace last-layer",
]


class Recipe(NamedTuple):
    """The settings shared by every data set (chosen on validation splits only)."""

    batch_size: int = 128
    map_steps: int = 2000
    map_lr: float = 1e-3
    map_weight_decay: float = 1e-4
    bbb_steps: int = 1000
    bbb_lr: float = 1e-3
    bbb_sigma: float = 1e-3  # initial posterior sd around the MAP weights
    bbb_samples: int = 1
    von_steps: int = 2000
    von_lr: float = 0.2  # 0.1 before: validation's argmin of 0.1/0.15/0.2/0.3 (README, "The way")
    von_hess_init: float = 0.3
    von_weight_decay: float = 1e-3  # the prior precision; 1e-4 before (README, "The way")
    von_beta2: float = 0.99999
    von_prior_scale: str = "fixed"  # or "layer"/"node": the prior precision learned
    von_clip: float = 1.0  # bounds the first steps, while h is still a guess (0: none)
    dropout: float = 0.2
    # every sigma of the VON posterior times this at prediction time: validation kept 1 (the
    # posterior's own width; README, "The way")
    von_sigma_scale: float = 1.0
    # the recommended row's calibration on the validation rows: "none", "fit", or "soften"
    # (T >= 1 only). Chosen "none" for classification: fitted on 35-114 validation points, a
    # temperature was catastrophic on held-out rows (README, "Benchmark"). UCI's setting
    # (uci_eval.UCI) refits the noise instead: "fit" won on its validation halves
    temperature: str = "none"


def override(recipe: Recipe, settings: list[str], error: Callable[[str], Any]) -> Recipe:
    """``recipe`` with ``FIELD=VALUE`` settings applied (values cast to the field's type)."""
    changes: dict[str, Any] = {}
    for setting in settings:
        field, _, value = setting.partition("=")
        if field not in Recipe._fields or not value:
            error(
                f"--set: expected FIELD=VALUE with FIELD in {list(Recipe._fields)}, got {setting!r}"
            )
            continue
        changes[field] = type(getattr(recipe, field))(value)
    return recipe._replace(**changes)


def scaled(recipe: Recipe, factor: float) -> Recipe:
    """Every step count multiplied by ``factor`` (at least 1): quick runs and tests."""
    steps = {
        f: max(1, int(getattr(recipe, f) * factor)) for f in Recipe._fields if f.endswith("_steps")
    }
    return recipe._replace(**steps)


def temperature(recipe: Recipe, fit: Callable[..., float], model: Any) -> float:
    """The recommended row's temperature: 1, fitted on validation rows, or fitted but at least 1
    (softening only: a small, error-free validation split pushes a fitted T below 1)."""
    if recipe.temperature == "none":
        return 1.0
    return fit(model, 1.0) if recipe.temperature == "soften" else fit(model)


def classification_loglik(output: Tensor, target: Tensor) -> Tensor:
    return -F.cross_entropy(output, target, reduction="none")


def progress_range(label: str, count: int) -> Iterator[int]:
    """``range(count)``, with a progress line on stderr when it is a terminal (these loops run
    for thousands of steps per row and seed)."""
    show = sys.stderr.isatty()
    start, every = time.perf_counter(), max(1, count // 20)
    for step in range(count):
        yield step
        if show and (step + 1) % every == 0:
            elapsed = time.perf_counter() - start
            line = f"\r    {label}: step {step + 1}/{count}  {elapsed:5.1f}s"
            print(line, end="", file=sys.stderr, flush=True)
    if show:
        print("\r" + " " * 50 + "\r", end="", file=sys.stderr, flush=True)


def batch_rows(key: Tensor, step: int, count: int, size: int) -> Tensor:
    """Minibatch ``step`` of an epoch-wise keyed shuffle (the last batch of an epoch may be
    short; every row is seen once an epoch)."""
    per_epoch = -(-count // size)
    epoch, index = divmod(step, per_epoch)
    order = tb.random.normal(tb.random.fold_in(key, epoch), (count,)).argsort()
    return order[index * size : (index + 1) * size]


def lik_params(lik: Any) -> list[Tensor]:
    return [lik.rho.requires_grad_(True)] if isinstance(lik, tb.GaussianLikelihood) else []


def detached(lik: Any) -> Any:
    return (
        tb.GaussianLikelihood(lik.rho.detach()) if isinstance(lik, tb.GaussianLikelihood) else lik
    )


def train_map(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    lik: Any,
    key: Tensor,
    recipe: Recipe,
    *,
    dropout: bool = False,
) -> tuple[nn.Module, Any]:
    """MAP (maximum a posteriori: Adam with weight decay); ``dropout=True`` trains with keyed
    dropout masks. The net is trained in place and returned in eval mode."""
    params = dict(net.named_parameters())
    opt = torch.optim.Adam(
        [
            {"params": list(params.values()), "weight_decay": recipe.map_weight_decay},
            {"params": lik_params(lik), "weight_decay": 0.0},
        ],
        lr=recipe.map_lr,
    )
    net.eval()
    for step in progress_range("MAP", recipe.map_steps):
        rows = batch_rows(key, step, len(x), recipe.batch_size)
        if dropout:
            out = tb.functional_call(
                net, {}, tb.random.fold_in(key, 10**6 + step), x[rows], dropout=True
            )
        else:
            out = net(x[rows])
        loss = -lik(out, y[rows]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.requires_grad_(False)
    return net, detached(lik)


def train_bbb(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    lik: Any,
    key: Tensor,
    recipe: Recipe,
    *,
    centre: str = "zero",
    per: str = "layer",
    kl_weight: float = 1.0,
) -> tuple[dict, Any]:
    """Bayes-by-Backprop from the (MAP) weights of ``net``: ``tb.nelbo`` with the prior's scale
    fitted every step (``tb.empirical_prior``), centred on 0 or on the MAP weights."""
    posterior = tb.from_module(net, sigma=recipe.bbb_sigma)
    centres = tb.pretrained_prior(net, posterior) if centre == "pretrained" else tb.GaussianPrior()
    opt = torch.optim.Adam(tb.parameters(posterior) + lik_params(lik), lr=recipe.bbb_lr)
    for step in progress_range("BBB", recipe.bbb_steps):
        rows = batch_rows(key, step, len(x), recipe.batch_size)
        prior = tb.empirical_prior(posterior, centres, per=per)  # type: ignore[arg-type]
        loss = tb.nelbo(
            net,
            posterior,
            tb.random.fold_in(key, 10**6 + step),
            x[rows],
            y[rows],
            log_likelihood=lik,
            num_data=len(x),
            prior=prior,
            kl_weight=kl_weight,
            num_samples=recipe.bbb_samples,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _frozen(posterior), detached(lik)


def train_von(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    lik: Any,
    key: Tensor,
    recipe: Recipe,
    *,
    prior_mean: dict[str, Tensor] | None = None,
) -> tuple[dict, Any]:
    """Natural-gradient mean-field VI (``tb.optim.VON``), one draw per step, from ``net``'s
    current weights (``prior_mean``: centre the prior there, e.g. on pretrained weights); a
    regression noise is trained by Adam on the same loss."""
    posterior = tb.from_module(net)
    num_data = len(x)
    # the first draw at the sigma the curvature guess implies
    sigma0 = (num_data * (recipe.von_hess_init + recipe.von_weight_decay)) ** -0.5
    posterior = {
        n: p._replace(rho=torch.full_like(p.rho, _inv_softplus(sigma0)))
        for n, p in posterior.items()
    }
    opt = tb.optim.VON(
        posterior,
        lr=recipe.von_lr,
        num_data=num_data,
        hess_init=recipe.von_hess_init,
        weight_decay=recipe.von_weight_decay,
        beta2=recipe.von_beta2,
        clip=recipe.von_clip or None,
        prior_mean=prior_mean,
        prior_scale=recipe.von_prior_scale,  # type: ignore[arg-type]
    )
    noise_params = lik_params(lik)
    noise_opt = torch.optim.Adam(noise_params, lr=recipe.map_lr) if noise_params else None
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.von_steps)
    for step in progress_range("VON", recipe.von_steps):
        rows = batch_rows(key, step, len(x), recipe.batch_size)
        opt.zero_grad()
        if noise_opt is not None:
            noise_opt.zero_grad()
        # the draw written into the net itself (the README's recipe, the fast route): the
        # loss is the data term of that draw, the prior enters as weight decay
        with opt.sampled(net, tb.random.fold_in(key, 10**6 + step)):
            loss = -lik(net(x[rows]), y[rows]).mean()
            loss.backward()
        opt.step()
        schedule.step()
        if noise_opt is not None:
            noise_opt.step()
    return _frozen(posterior), detached(lik)


class IVONModel(NamedTuple):
    net: nn.Module
    optimizer: Any


def train_ivon(
    net: nn.Module, x: Tensor, y: Tensor, lik: Any, key: Tensor, recipe: Recipe
) -> tuple[IVONModel, Any] | None:
    """The ``ivon-opt`` package with the same step count, step size, curvature guess and
    prior precision as ``train_von``; None when it is not installed."""
    try:
        import ivon
    except ImportError:
        return None
    with _seeded(key):
        opt = ivon.IVON(
            net.parameters(),
            lr=recipe.von_lr,
            ess=len(x),
            hess_init=recipe.von_hess_init,
            weight_decay=recipe.von_weight_decay,
            beta2=recipe.von_beta2,
            clip_radius=recipe.von_clip or float("inf"),
        )
        noise_params = lik_params(lik)
        noise_opt = torch.optim.Adam(noise_params, lr=recipe.map_lr) if noise_params else None
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.von_steps)
        net.eval()
        for step in progress_range("IVON", recipe.von_steps):
            rows = batch_rows(key, step, len(x), recipe.batch_size)
            with opt.sampled_params(train=True):
                opt.zero_grad()
                if noise_opt is not None:
                    noise_opt.zero_grad()
                loss = -lik(net(x[rows]), y[rows]).mean()
                loss.backward()
            opt.step()
            schedule.step()
            if noise_opt is not None:
                noise_opt.step()
    return IVONModel(net, opt), detached(lik)


class LaplaceModel(NamedTuple):
    laplace: Any  # a fitted laplace.Laplace
    regression: bool


def train_laplace(
    net: nn.Module, x: Tensor, y: Tensor, lik: Any, recipe: Recipe
) -> LaplaceModel | None:
    """laplace-torch's Laplace approximation of the MAP ``net``'s last layer: a KFAC
    (generalised Gauss-Newton) Hessian over the training rows and one prior precision fitted by
    the marginal likelihood, its default method. A regression ``lik`` fixes the observation
    noise at the MAP's learned one. ``net`` itself is left as it is (frozen); None when
    laplace-torch is not installed (``pip install --no-deps laplace-torch`` and its own
    dependencies, README "Benchmark")."""
    try:
        from laplace import Laplace
    except ImportError:
        return None
    regression = isinstance(lik, tb.GaussianLikelihood)
    noise = {"sigma_noise": float(lik.noise)} if regression else {}
    approx = Laplace(
        copy.deepcopy(net).requires_grad_(True),  # it differentiates the last layer
        "regression" if regression else "classification",
        subset_of_weights="last_layer",
        hessian_structure="kron",
        **noise,
    )
    rows = torch.utils.data.TensorDataset(x, y)
    approx.fit(torch.utils.data.DataLoader(rows, batch_size=recipe.batch_size))
    with warnings.catch_warnings():  # its reminder that link_approx defaults to probit, given
        # for classification whatever the arguments (they only matter for a grid search)
        warnings.filterwarnings("ignore", message="By default `link_approx`")
        approx.optimize_prior_precision(
            pred_type="glm", method="marglik", prior_structure="scalar", link_approx="mc"
        )
    return LaplaceModel(approx, regression)


def predict(model: Any, key: Tensor, x: Tensor, num_samples: int) -> Tensor:
    """Stacked outputs ``(S, N, ...)`` of any recipe's result."""
    with torch.no_grad():
        if isinstance(model, nn.Module):  # MAP: one deterministic model
            return model(x)[None]
        if isinstance(model, list):  # a deep ensemble
            return torch.stack([member(x) for member in model])
        if isinstance(model, IVONModel):
            outs = []
            with _seeded(key):
                for _ in range(num_samples):
                    with model.optimizer.sampled_params():
                        outs.append(model.net(x))
            return torch.stack(outs)
        if isinstance(model, LaplaceModel):
            # the linearised (GLM) predictive, sampled: function draws for regression, the
            # class probabilities of each draw for classification (their logs are logits)
            with _seeded(key):
                draws = model.laplace.predictive_samples(x, pred_type="glm", n_samples=num_samples)
            return draws if model.regression else draws.clamp_min(1e-38).log()
        if isinstance(model, Dropout):
            return tb.predict(model.net, {}, key, x, num_samples=num_samples, dropout=True)
        net, posterior = model
        return tb.predict(net, posterior, key, x, num_samples=num_samples)


class Dropout(NamedTuple):
    net: nn.Module


def widened(posterior: dict, factor: float) -> dict:
    """``posterior`` with every sigma multiplied by ``factor`` (the means kept): the check of
    whether the trained width is the one the predictive wants. ``factor`` 1 returns it as it is."""
    if factor == 1.0:
        return posterior
    return {
        n: p._replace(rho=torch.log(torch.expm1(p.sigma * factor))) for n, p in posterior.items()
    }


def _frozen(posterior: dict) -> dict:
    return {n: p._replace(mu=p.mu.detach(), rho=p.rho.detach()) for n, p in posterior.items()}


def _inv_softplus(sigma: float) -> float:
    return float(torch.tensor(sigma).expm1().log())


@contextlib.contextmanager
def _seeded(key: Tensor) -> Iterator[None]:
    """IVON draws from the global RNG: seed it from the key inside a fork, so the caller's RNG
    is untouched and the run is repeatable."""
    with torch.random.fork_rng():
        torch.manual_seed(int(tb.random.fold_in(key, 7)[0]))
        yield
