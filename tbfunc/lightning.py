"""Optional Lightning integration: ``PosteriorLightningModule`` trains a posterior under a
``lightning.pytorch.Trainer`` (``pip install lightning``; ``pytorch_lightning`` works too).

What it guarantees, and why:

- The base module is held, not registered (through ``tb.PosteriorModule``): Lightning's
  ``.train()``, ``.to()``, optimizer, checkpoint and parameter summary see the posterior's
  ``mu`` and ``rho`` only. ``train_base=True`` registers it, so its trainable parameters are
  optimised (deterministically) and saved beside the posterior.
- The base module stays in eval mode whatever Lightning switches, so its dropout and batch
  norm never draw from the global RNG or update statistics; ``dropout=True`` gives keyed
  MC dropout instead (masks from each step's key).
- Every random draw comes from ``key``: training batch ``b`` of optimizer step ``t`` draws with
  ``fold_in(fold_in(train_key, t), b)``, validation, test and prediction with one fixed
  ``eval_key`` (the same weights for every batch and epoch, so epochs compare). The key is a
  buffer, so a checkpoint carries it and a resumed fit is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbfunc import _batches, random
from tbfunc._checks import check_key, check_positive_int, fail
from tbfunc.kl import kl_divergence
from tbfunc.metrics import Accumulator
from tbfunc.module import predict
from tbfunc.nn import PosteriorModule
from tbfunc.objective import nelbo
from tbfunc.optim import VON, Adam
from tbfunc.prior import GaussianPrior

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the older package name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as error:
        raise ImportError(
            "tbfunc.lightning needs Lightning: pip install lightning (or pytorch-lightning)."
        ) from error

__all__ = ["PosteriorLightningModule"]


class PosteriorLightningModule(pl.LightningModule):
    """A ``LightningModule`` that fits ``posterior`` over ``module`` by minimising ``tb.nelbo``.

    ``training_step`` logs ``train/nelbo``, ``train/nll`` and ``train/kl`` (the whole KL,
    before division by ``num_data``); ``validation_step`` / ``test_step`` run ``tb.predict``
    with ``eval_samples`` draws into a ``tb.metrics.Accumulator`` and log ``val/nll``,
    ``val/accuracy``, ``val/ece``, ``val/brier`` (``test/...``) for classification logits;
    ``predict_step`` returns ``tb.predict``'s stacked output for the batch. Override a step for
    other tasks; ``self.posterior()`` is the live tree.

    Args:
        module: the base model (put in eval mode here; never trained unless ``train_base``).
        posterior: its posterior (``tb.from_module``); its tensors become this module's
            parameters without a copy.
        key: the run's key (``tb.random.key(seed)``).
        num_data: the training set's size (``nelbo``'s minibatch scaling).
        loss_fn: ``(output, target) -> mean NLL over the batch``; by default cross-entropy on
            the logits (``output``).
        prior: a prior, a dict of priors, or a callable ``posterior -> prior`` called every
            step (e.g. ``lambda post: tb.empirical_prior(post, centres)``).
        kl_weight, num_samples: as in ``nelbo``. With a ``tb.optim.VON`` optimizer the loss is
            the data term alone: VON adds the prior's pull itself.
        eval_samples: weight draws for validation, test and prediction.
        optimizer: ``self -> torch.optim.Optimizer`` (or Lightning's dict or tuple); by
            default ``tb.optim.Adam(self.parameters(), lr=lr)`` (``torch.optim.Adam``'s update
            in one fused pass on the CPU; its checkpoints are ``torch.optim.Adam``'s).
        lr: the default optimizer's learning rate.
        dropout: keyed MC dropout in training and evaluation.
        train_base: register the base module: its trainable parameters join the optimizer and
            the checkpoint (it is still kept in eval mode, so Lightning warns "Found N
            module(s) in eval mode at the start of training": that is this guarantee).
        output: ``module output -> logits`` for the default loss and metrics.
        unpack: ``batch -> (args, kwargs, target)``; by default ``(inputs, target)`` pairs or
            dicts with ``labels``, as in ``tb.evaluate``.
    """

    keys: Tensor  # (train key, eval key), a buffer

    def __init__(
        self,
        module: nn.Module,
        posterior: dict[str, Any],
        key: Tensor,
        *,
        num_data: int,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        prior: Any = GaussianPrior(),  # noqa: B008 - an immutable NamedTuple of floats
        kl_weight: float = 1.0,
        num_samples: int = 1,
        eval_samples: int = 16,
        optimizer: Callable[[PosteriorLightningModule], Any] | None = None,
        lr: float = 1e-3,
        dropout: bool = False,
        train_base: bool = False,
        output: Callable[[Any], Tensor] | None = None,
        unpack: _batches.Unpack | None = None,
    ) -> None:
        super().__init__()
        key = check_key(key)
        self.num_data = check_positive_int(num_data, "num_data")
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.eval_samples = check_positive_int(eval_samples, "eval_samples")
        for arg, value in (("loss_fn", loss_fn), ("optimizer", optimizer), ("output", output)):
            if value is not None and not callable(value):
                fail(arg, "a callable or None", value, error=TypeError)
        if unpack is not None and not callable(unpack):
            fail("unpack", "a callable (batch -> (args, kwargs, target))", unpack, error=TypeError)
        if not isinstance(kl_weight, int | float) or kl_weight < 0:
            fail("kl_weight", "a non-negative float", kl_weight)
        if not isinstance(lr, int | float) or lr <= 0:
            fail("lr", "a positive float", lr)
        for arg, flag in (("dropout", dropout), ("train_base", train_base)):
            if not isinstance(flag, bool):
                fail(arg, "a bool", flag, error=TypeError)
        self.view = PosteriorModule(module.eval(), posterior)
        if train_base:
            self.base = module  # registered: optimised and saved beside the posterior
        self.register_buffer("keys", random.split(key))  # (train, eval); checkpointed
        self.loss_fn = loss_fn
        self.prior = prior
        self.kl_weight = float(kl_weight)
        self.optimizer_factory = optimizer
        self.lr = float(lr)
        self.dropout = dropout
        self.output = output
        self.unpack = unpack or _batches.unpack
        self._metrics = Accumulator()

    # ------------------------------------------------------------------------------------------
    # What Lightning calls.

    def train(self, mode: bool = True) -> PosteriorLightningModule:
        super().train(mode)
        self.view.module.eval()  # whatever Lightning asks: dropout is keyed or off
        return self

    def posterior(self) -> dict[str, Any]:
        """The live posterior tree (this module's parameters)."""
        return self.view.posterior()

    def forward(self, *args: Any, key: Tensor, **kwargs: Any) -> Any:
        """One Monte-Carlo forward with the draw keyed by ``key``."""
        return self.view(*args, key=key, dropout=self.dropout, **kwargs)

    def step_key(self, batch_idx: int) -> Tensor:
        """The key of training batch ``batch_idx`` at the current optimizer step."""
        return random.fold_in(random.fold_in(self.keys[0], self.global_step), batch_idx)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        args, kwargs, target = self.unpack(batch)
        post = self.view.posterior()
        prior = self.prior(post) if callable(self.prior) else self.prior
        # VON adds the prior's pull itself: it is given the data term alone
        weight = 0.0 if isinstance(self._optimizer(), VON) else self.kl_weight
        loss = nelbo(
            self.view.module,
            post,
            self.step_key(batch_idx),
            args,
            target,
            kwargs,
            num_data=self.num_data,
            loss_fn=self.loss_fn or self._cross_entropy,
            prior=prior,
            kl_weight=weight,
            num_samples=self.num_samples,
            dropout=self.dropout,
        )
        with torch.no_grad():
            kl = kl_divergence(post, prior) if post else loss.new_zeros(())
            data_term = loss - weight * kl.to(loss) / self.num_data
        batch_size = _batch_size(target)
        self.log("train/nelbo", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/nll", data_term, batch_size=batch_size)
        self.log("train/kl", kl, batch_size=batch_size)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._metrics.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._update_metrics(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._metrics.reset()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._update_metrics(batch)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """``tb.predict``'s stacked output ``(eval_samples, ...)`` for the batch (targets, if
        the batch has them, are ignored)."""
        args, kwargs, _ = self.unpack(batch)
        return self._predict(args, kwargs)

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is not None:
            return self.optimizer_factory(self)
        return Adam(self.parameters(), lr=self.lr)

    # ------------------------------------------------------------------------------------------

    def _optimizer(self) -> Any:
        trainer = self._trainer
        if trainer is None or not trainer.optimizers:
            return None
        return trainer.optimizers[0]

    def _cross_entropy(self, out: Any, target: Tensor) -> Tensor:
        logits = _batches.logits_of(out, self.output)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    def _predict(self, args: Any, kwargs: dict[str, Any]) -> Any:
        return predict(
            self.view.module,
            self.view.posterior(),
            self.keys[1],
            args,
            kwargs,
            num_samples=self.eval_samples,
            dropout=self.dropout,
        )

    def _update_metrics(self, batch: Any) -> None:
        args, kwargs, target = self.unpack(batch)
        logits = _batches.logits_of(self._predict(args, kwargs), self.output)
        self._metrics.update(logits, target)

    def _log_metrics(self, stage: str) -> None:
        if self._metrics.count == 0:
            return
        summary = self._metrics.compute()
        for name in ("nll", "accuracy", "ece", "brier"):
            value = getattr(summary, name).float()
            self.log(f"{stage}/{name}", value, prog_bar=name in ("nll", "accuracy"))


def _batch_size(target: Any) -> int | None:
    return len(target) if isinstance(target, Tensor) and target.dim() > 0 else None
