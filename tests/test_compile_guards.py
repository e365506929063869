"""Compiled calls do not recompile when unrelated modules are created: nothing in tbfunc's
compiled path reads the library's mutable state (the structure counter, the caches), which
dynamo would otherwise turn into guards (issue 17: a recompile per ``nn.Linear`` created)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tbfunc as tb
from helpers import data, mlp, seeded


@pytest.mark.parametrize("entry", ["predict-vmap", "predict-loop", "functional_call", "nelbo"])
def test_no_recompile_after_warm_up_nor_after_a_new_module(entry):
    net = mlp((4, 8, 2))
    post = tb.from_module(net, sigma_scale=0.1)
    key = tb.random.key(0)
    x, y = data(3, 4), torch.zeros(3, dtype=torch.long)

    def call(p, x):
        if entry.startswith("predict"):
            return tb.predict(net, p, key, x, num_samples=2, strategy=entry.split("-")[1])
        if entry == "functional_call":
            return tb.functional_call(net, p, key, x)
        return tb.nelbo(net, p, key, x, y, num_data=10, loss_fn=nn.functional.cross_entropy)

    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    expected = call(post, x)
    torch.testing.assert_close(compiled(post, x), expected)
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(post, x), expected)
        for _ in range(3):
            mlp((3, 3))  # unrelated modules: they move tbfunc's structure counter
        seeded(lambda: nn.Linear(2, 2))
        torch.testing.assert_close(compiled(post, x), expected)
