"""``PosteriorModule``: an ``nn.Module`` view of a model and its posterior, for the tools that
expect modules (``torch.optim``, ``state_dict`` checkpoints, ``DistributedDataParallel``,
``torch.compile``, Lightning).

The view owns the posterior's tensors as ``nn.Parameter`` s and nothing else: the base module is
held, not registered, so it is never mutated, moved or saved by the view, and its other
parameters stay deterministic and its own.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tbfunc._boundary import check_matches
from tbfunc._checks import fail
from tbfunc.kl import kl_divergence
from tbfunc.module import functional_call
from tbfunc.objective import nelbo
from tbfunc.posterior import is_posterior
from tbfunc.prior import GaussianPrior

__all__ = ["PosteriorModule"]

_SEPARATOR = (
    ":"  # parameter names cannot hold ".": "0.weight" + "mu" is registered as "0:weight:mu"
)


class PosteriorModule(nn.Module):
    """An ``nn.Module`` whose parameters are a posterior's ``mu`` and ``rho``.

    ``forward(*args, key, **kwargs)`` is ``tb.functional_call(module, self.posterior(), key, args,
    kwargs)``. ``state_dict()`` has the keys of ``tb.state_dict`` (``"0.weight.mu"``), so a
    checkpoint from the view and a ``tb.save`` file hold the same names. ``.to(device, dtype)``
    moves the posterior only: move the base module yourself (it is not the view's to change).

    Args:
        module: the base module (eval mode, as for ``tb.predict``).
        posterior: a posterior of ``module`` (``tb.from_module(module, ...)``); its tensors become
            the view's parameters without a copy.

    Example:
        >>> import torch, tbfunc as tb
        >>> net = torch.nn.Linear(3, 2)
        >>> view = tb.PosteriorModule(net, tb.from_module(net))
        >>> list(view.state_dict())
        ['weight.mu', 'weight.rho', 'bias.mu', 'bias.rho']
        >>> view(torch.ones(4, 3), key=tb.random.key(0)).shape
        torch.Size([4, 2])
    """

    def __init__(self, module: nn.Module, posterior: dict[str, Any]) -> None:
        super().__init__()
        check_matches(module, posterior)
        self._base: nn.Module
        object.__setattr__(self, "_base", module)  # held, not registered: never moved or saved
        self._layout: dict[str, tuple[type, tuple[str, ...]]] = {}
        for name, node in posterior.items():
            if not (is_posterior(node) and hasattr(node, "_fields")):
                fail(f"posterior[{name!r}]", "a posterior node", node, error=TypeError)
            if _SEPARATOR in name:
                raise ValueError(
                    f"posterior name {name!r} contains {_SEPARATOR!r}, which PosteriorModule "
                    "uses to encode dots in parameter names; rename it."
                )
            self._layout[name] = (type(node), tuple(node._fields))
            for field, value in zip(node._fields, node, strict=True):
                self.register_parameter(_key(name, field), nn.Parameter(value.detach()))
        self.register_state_dict_post_hook(_dotted_keys)
        self.register_load_state_dict_pre_hook(_encoded_keys)

    @property
    def module(self) -> nn.Module:
        """The base module (not a submodule of the view)."""
        return self._base

    def posterior(self) -> dict[str, Any]:
        """The pure tree, whose tensors are this view's parameters (same storage, and gradients
        flow back to them)."""
        return {
            name: family(*(getattr(self, _key(name, field)) for field in fields))
            for name, (family, fields) in self._layout.items()
        }

    def forward(self, *args: Any, key: Tensor, dropout: bool = False, **kwargs: Any) -> Any:
        """One Monte-Carlo forward: ``tb.functional_call`` with a draw keyed by ``key``
        (and MC-dropout masks with ``dropout=True``)."""
        return functional_call(self._base, self.posterior(), key, args, kwargs, dropout=dropout)

    def kl_divergence(self, prior: Any = GaussianPrior(), **kwargs: Any) -> Tensor:  # noqa: B008
        """``tb.kl_divergence(self.posterior(), prior, **kwargs)``."""
        return kl_divergence(self.posterior(), prior, **kwargs)

    def nelbo(
        self,
        key: Tensor,
        args: Any,
        target: Any,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Tensor:
        """``tb.nelbo(self.module, self.posterior(), key, args, target, kwargs, **options)``."""
        return nelbo(self._base, self.posterior(), key, args, target, kwargs, **options)

    def extra_repr(self) -> str:
        return f"module={type(self._base).__name__}, nodes={len(self._layout)}"


def _key(name: str, field: str) -> str:
    return f"{name.replace('.', _SEPARATOR)}{_SEPARATOR}{field}"


def _dotted_keys(module: nn.Module, state: dict[str, Any], prefix: str, local: Any) -> None:
    for key in [k for k in state if k.startswith(prefix) and _SEPARATOR in k[len(prefix) :]]:
        state[prefix + key[len(prefix) :].replace(_SEPARATOR, ".")] = state.pop(key)


def _encoded_keys(module: nn.Module, state: dict[str, Any], prefix: str, *rest: Any) -> None:
    layout: dict[str, tuple[type, tuple[str, ...]]] = module._layout  # type: ignore[assignment]
    for name, (_, fields) in layout.items():
        for field in fields:
            dotted = f"{prefix}{name}.{field}"
            if dotted in state:
                state[prefix + _key(name, field)] = state.pop(dotted)
            value = state.get(prefix + _key(name, field))
            own = getattr(module, _key(name, field))
            if isinstance(value, Tensor) and value.shape != own.shape:
                raise ValueError(
                    f"state_dict[{dotted!r}] must have this view's shape {tuple(own.shape)}, got "
                    f"a tensor of shape {tuple(value.shape)}. It is another model's view (or "
                    "posterior file): load it into a PosteriorModule of the model it came from."
                )
