"""The docstrings' examples run: every ``>>>`` block in tbfunc's modules, as doctest runs it.

The bug this catches: an entry point's example that no longer runs after its API moved (a
renamed keyword, a method that changed, a module split), which no other test reads.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest
import torch

import tbfunc

MODULES = [
    info.name
    for info in pkgutil.iter_modules(tbfunc.__path__, "tbfunc.")
    # the GPU kernel imports Triton, which the CPU build of torch does not ship
    if info.name != "tbfunc._triton" or importlib.util.find_spec("triton") is not None
]


def examples_of(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder().find(module, name) if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    runner = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS)
    with torch.random.fork_rng():  # the examples draw inputs from the global RNG
        torch.manual_seed(0)
        for test in examples_of(name):
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


def test_the_entry_points_have_examples():
    """The examples STYLE.md asks for on entry points exist, so the test above has work."""
    names = {test.name for name in MODULES for test in examples_of(name)}
    for entry in (
        "tbfunc.module.predict",
        "tbfunc.objective.nelbo",
        "tbfunc._von.von",
        "tbfunc._von_optimizer.VON",
        "tbfunc._adam.Adam",
        "tbfunc._sampled_grads.sampled",
    ):
        assert entry in names, f"{entry} lost its example; found {sorted(names)}"
