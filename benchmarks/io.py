"""Keeping a posterior: tb.save + tb.load against torch.save + torch.load of the module's own
state_dict (the posterior holds twice the tensors: mu and rho)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import tbfunc as tb


def contenders(model: nn.Module, folder: Path | None = None) -> dict[str, Callable[[], object]]:
    posterior = tb.from_module(model)
    state = model.state_dict()
    where = Path(folder or tempfile.mkdtemp(prefix="tbfunc-bench-io-"))

    def module_state() -> object:
        torch.save(state, where / "module.pt")
        return torch.load(where / "module.pt", weights_only=True)

    def posterior_file() -> object:
        tb.save(posterior, where / "posterior.pt")
        return tb.load(where / "posterior.pt", module=model)

    def view_state() -> object:
        view = tb.PosteriorModule(model, posterior)
        torch.save(view.state_dict(), where / "view.pt")
        return view.load_state_dict(torch.load(where / "view.pt", weights_only=True))

    return {
        "torch.save + torch.load, module state_dict": module_state,
        "tb.save + tb.load": posterior_file,
        "PosteriorModule state_dict, torch.save + load": view_state,
    }
