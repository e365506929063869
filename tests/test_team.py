"""Where a kernel call's parts run: torch's own OpenMP team (``_native.team``, ``_parts.h``)
where the library shares torch's runtime, else tbfunc's thread pool (``_parallel``).

The results are the same on both routes (``test_fused``, ``test_streams`` and
``test_concurrency`` run their thread tests on each); these tests check that the choice is
made as documented: the team where it can be shared, the pool only where it cannot or where
``TBFUNC_OPENMP=0`` asks for it, and never a second OpenMP runtime loaded beside torch's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tbfunc as tb
from helpers import data, mlp
from tbfunc import _native, _noise, _parallel

needs_kernel = pytest.mark.skipif(_native.kernel() is None, reason="needs a C compiler")
pytestmark = needs_kernel
shared = _native._openmp_runtime() is not None


def test_the_library_shares_torchs_openmp_runtime_where_torch_runs_on_gnus():
    """Where torch's threads are GNU OpenMP's (``libgomp.so.1``), the build takes -fopenmp and
    the loader hands it torch's copy: one runtime in the process, and the team route on.
    Elsewhere the build has no OpenMP and the pool serves."""
    library = _native.kernel()
    assert library is not None
    assert bool(library.tb_openmp()) == shared
    assert _native.team(library) == shared
    if shared:  # the best build first: -march=native kept, OpenMP added
        assert _native.preferred_flags() == [*_native._FLAGS, "-fopenmp"]
        # no second copy of GNU's runtime under its own name beside torch's
        names = [path for path in _native._openmp_libraries() if path.endswith("/libgomp.so.1")]
        assert names == [_native._openmp_runtime()]


def test_other_packages_renamed_openmp_copies_do_not_hide_torchs(monkeypatch):
    """scikit-learn maps its own ``libgomp-<hash>.so.1`` beside torch's: only the copy under
    GNU's own name is the one a -fopenmp build is handed, and two of those would be ambiguous."""
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch runs no OpenMP here")
    torchs = "/site-packages/torch/lib/libgomp.so.1"
    renamed = "/site-packages/scikit_learn.libs/libgomp-e985bcbb.so.1.0.0"
    for mapped, expected in (
        ({torchs, renamed}, torchs),
        ({renamed}, None),
        ({torchs, "/usr/lib/x86_64-linux-gnu/libgomp.so.1"}, None),
    ):
        monkeypatch.setattr(_native, "_openmp_libraries", lambda mapped=mapped: mapped)
        _native._openmp_runtime.cache_clear()
        try:
            assert _native._openmp_runtime() == expected, mapped
        finally:
            monkeypatch.undo()
            _native._openmp_runtime.cache_clear()


def test_openmp_zero_switches_the_team_off(monkeypatch):
    monkeypatch.setenv("TBFUNC_OPENMP", "0")
    library = _native.kernel()
    assert library is not None
    assert not _native.team(library)


def _every_kernel():
    """A draw with its KL (tb_fill, tb_kl), its backward (tb_draw_grad), a fused Adam step
    (tb_adam), a VON step (tb_von), the finiteness pass of a new posterior (tb_finite) and an
    Adam.sampled step (tb_bbb_adam)."""
    with torch.random.fork_rng():  # the suite guards the global generator
        torch.manual_seed(0)
        net = mlp((30, 40, 5))
    post = tb.from_module(net, rho=-3.0)
    x, y = data(8, 30, seed=1), torch.arange(8) % 5
    opt = tb.optim.Adam(post, lr=1e-3)
    loss = tb.nelbo(net, post, tb.random.key(0), x, y, loss_fn=F.cross_entropy, num_data=80)
    loss.backward()
    opt.step()
    von_post = tb.from_module(net, rho=-3.0)
    von = tb.optim.VON(von_post, num_data=80)
    out = tb.functional_call(net, von_post, tb.random.key(1), x)
    F.cross_entropy(out, y).backward()
    von.step()
    tb.sample(von_post, tb.random.key(2))
    bbb_post = tb.from_module(net, rho=-3.0)
    bbb = tb.optim.Adam(bbb_post, lr=1e-3)
    frozen = copy.deepcopy(net).requires_grad_(False)
    with bbb.sampled(frozen, tb.random.key(3), num_data=80):
        F.cross_entropy(frozen(x), y).backward()
    bbb.step()


@pytest.mark.parametrize("route", ["team", "pool"])
def test_the_route_asked_for_is_the_route_taken(monkeypatch, route):
    """With the pool made to fail, every kernel still runs on the team route, and the pool
    route reaches the pool: a ``team`` argument ignored, or the switch not read, fails."""
    if route == "team" and not shared:
        pytest.skip("torch's OpenMP runtime cannot be shared here: the pool is the only route")
    monkeypatch.setenv("TBFUNC_OPENMP", "1" if route == "team" else "0")
    monkeypatch.setattr(_parallel, "PARALLEL_MIN_NUMEL", 64)  # split even these small nodes
    monkeypatch.setattr(_noise, "_PARALLEL_MIN_NUMEL", 64)

    def no_pool():
        raise RuntimeError("the pool was used")

    monkeypatch.setattr(_parallel, "_thread_pool", no_pool)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if route == "team":
            _every_kernel()
        else:
            with pytest.raises(RuntimeError, match="the pool was used"):
                _every_kernel()
    finally:
        torch.set_num_threads(threads)


class _Recording:
    """The kernel library, with every ``*_parts`` call recorded as (name, parts)."""

    def __init__(self, library):
        self._library = library
        self.calls: list[tuple[str, int]] = []

    def __getattr__(self, name):
        function = getattr(self._library, name)
        if not name.endswith("_parts"):
            return function
        # (total, parts) sit last, or before the per-part results (tb_kl's partial sums, the
        # finiteness flags of tb_finite and of the two update kernels)
        flagged = ("tb_kl_parts", "tb_finite_parts", "tb_von_parts", "tb_bbb_adam_parts")
        at = -2 if name in flagged else -1

        def call(*args):
            self.calls.append((name, int(args[at])))
            return function(*args)

        call.__name__ = name
        return call


@pytest.mark.skipif(not shared, reason="torch's OpenMP runtime cannot be shared here")
def test_every_kernel_reaches_the_team_with_one_part_per_thread(monkeypatch):
    """Each kernel a training step uses goes to its ``_parts`` twin with as many parts as
    threads: a twin called with one part (correct, but on one thread) or a kernel left on the
    pool fails."""
    recording = _Recording(_native.kernel())
    monkeypatch.setattr(_native, "kernel", lambda: recording)
    monkeypatch.setattr(_parallel, "PARALLEL_MIN_NUMEL", 64)
    monkeypatch.setattr(_noise, "_PARALLEL_MIN_NUMEL", 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        _every_kernel()
    finally:
        torch.set_num_threads(threads)
    names = {name for name, _ in recording.calls}
    assert names == {
        "tb_fill_parts", "tb_kl_parts", "tb_draw_grad_parts", "tb_adam_parts", "tb_von_parts",
        "tb_finite_parts", "tb_bbb_adam_parts",
    }  # fmt: skip
    assert {parts for _, parts in recording.calls} == {3}


def test_the_part_functions_write_each_parts_own_result():
    """``tb_kl_parts`` and ``tb_finite_parts`` leave part p's result in out[p], so the caller
    sums the KL's partials in a fixed order and no two threads write one word: each equals
    the plain kernel over that part's range."""
    import ctypes

    library = _native.kernel()
    mu, rho = data(1000, seed=1) * 0.1, data(1000, seed=2) - 3
    sigma = F.softplus(rho)
    table = lambda values: (ctypes.c_int64 * len(values))(*values)  # noqa: E731
    tensors = [table([1000]), table([mu.data_ptr()]), table([rho.data_ptr()])]
    tensors.append(table([sigma.data_ptr()]))
    priors = [table([0]), (ctypes.c_double * 1)(0.0), table([0]), (ctypes.c_double * 1)(0.5)]
    parts = (ctypes.c_double * 3)()
    library.tb_kl_parts(0, 1, *tensors, *priors, 1000, 3, parts)
    for p, (a, b) in enumerate(((0, 333), (333, 666), (666, 1000))):
        one = (ctypes.c_double * 1)(0.0)
        library.tb_kl(0, 1, *tensors, *priors, a, b, one)
        assert parts[p] == one[0] != 0.0
    values = torch.zeros(1000)
    values[700] = float("inf")
    flags = (ctypes.c_int64 * 3)()
    library.tb_finite_parts(
        1, table([0]), table([1000]), table([values.data_ptr()]), 1000, 3, flags
    )
    assert list(flags) == [0, 0, 1]
