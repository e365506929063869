"""The CPU noise stream: Philox-4x32-10 + Box-Muller keyed by the whole 64-bit key.

The C kernel and its tensor-op twin must agree bit for bit on every path (segments of every
length, any split of the work, fused affine or not, both dtypes); the stream must be a function
of all 64 key bits; and the statistics must be those of N(0, 1) and U[0, 1).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import tbfunc as tb
from tbfunc import _native, _noise, _philox, _softplus, testing
from tbfunc._sampling import hash32

CPU = torch.device("cpu")
KERNEL = _native.kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C compiler: the kernel is not built")


def kernel_fill(keys, hashes, numels, uniform=False):
    """The C kernel into the op's flat layout."""
    samples = keys.shape[0] if hashes else keys.shape[0] // len(numels)
    out = torch.empty(samples * sum(numels))
    _noise._fill_flat(KERNEL, out, keys, hashes or [], numels, uniform)
    return out


def reference_fill(keys, hashes, numels, uniform=False):
    segment_keys, segment_numels = _noise._segments(keys, hashes or [], numels)
    return _philox.fill(segment_keys, segment_numels, uniform)


# -- known answers -------------------------------------------------------------------------------


def test_philox_matches_random123():
    """Random123's known-answer vector for philox4x32_10 (key 0, counter 0), in C and tensors."""
    expected = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    zero = torch.zeros((), dtype=torch.int64)
    assert [int(w) for w in _philox.philox(zero, zero, zero)] == expected
    if KERNEL is not None:
        import ctypes

        words = (ctypes.c_int64 * 4)()
        KERNEL.tb_philox(0, 0, 0, words)
        assert list(words) == expected


def test_the_stream_is_pinned():
    """A regression pin: these values are the stream's definition (README, "Noise"). A change
    to the generator, the Box-Muller step or the block layout moves them."""
    got = tb.random.normal(tb.random.key(0), (6,))
    expected = [
        0.9911375641822815,
        -0.9246625900268555,
        -0.6176089644432068,
        -0.48206859827041626,
        -0.15363816916942596,
        0.1808258295059204,
    ]
    assert got.tolist() == expected
    uniform = _noise.noise(tb.random.key(0)[None], None, [4], torch.float32, CPU, uniform=True)
    words = _philox.philox(*(torch.tensor(v) for v in tb.random.key(0).tolist()), torch.tensor(0))
    assert uniform.tolist() == [(int(w) >> 8) * 2.0**-24 for w in words]


def test_c_and_python_use_the_same_constants():
    folder = Path(_native.__file__).parent
    source = "".join((folder / name).read_text() for name in ("_noise.c", "_cephes.h"))
    defined = dict(re.findall(r"#define (\w+) (-?0x[0-9a-f.]+p[-+]?\d+)f", source))
    # the exp polynomial serves the training kernels only; everything else is the noise's
    exp_only = {"LOG2E", *(f"EXP_P{i}" for i in range(6))}
    assert set(defined) - exp_only == set(_philox.CONSTANTS)
    for name, value in _philox.CONSTANTS.items():
        assert float.fromhex(defined[name]) == value, name
        assert torch.tensor(value, dtype=torch.float32).item() == value, f"{name} is no float32"


# -- the kernel equals its tensor twin on every path ---------------------------------------------

segment_lengths = st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 31, 33, 255, 256, 257, 1000, 1031])


@needs_kernel
@given(
    st.lists(segment_lengths, min_size=1, max_size=4),
    st.integers(1, 3),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**64 - 1),
)
def test_kernel_equals_the_tensor_reference(numels, samples, fold, uniform, seed):
    keys = tb.random.split(tb.random.key(seed), samples if fold else samples * len(numels))
    hashes = [hash32(f"n{i}") for i in range(len(numels))] if fold else None
    assert torch.equal(
        kernel_fill(keys, hashes, numels, uniform), reference_fill(keys, hashes, numels, uniform)
    )


@needs_kernel
@pytest.mark.parametrize("route", ["team", "pool"])
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_any_split_of_the_work_gives_the_same_bits(monkeypatch, threads, route):
    """Threads start mid-segment and mid-block: the bits must not move, on torch's OpenMP
    team or on tbfunc's pool."""
    monkeypatch.setenv("TBFUNC_OPENMP", "1" if route == "team" else "0")
    monkeypatch.setattr(_noise, "_PARALLEL_MIN_NUMEL", 1)  # split even tiny draws
    keys = tb.random.split(tb.random.key(3), 3)
    numels = [1, 9, 262, 3]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        split = kernel_fill(keys, [1, 2, 3, 4], numels)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(split, reference_fill(keys, [1, 2, 3, 4], numels))


@needs_kernel
@pytest.mark.parametrize("route", ["team", "pool"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [2, 3, 5])
def test_the_fused_affine_draw_is_the_same_at_every_split(monkeypatch, dtype, threads, route):
    """float32 and float64 draws written by the kernel (mu + sigma * eps, and eps kept) with a
    thread boundary mid-segment and mid-block equal the one-thread draw bit for bit, on
    either route to the threads."""
    monkeypatch.setenv("TBFUNC_OPENMP", "1" if route == "team" else "0")
    keys = tb.random.split(tb.random.key(6), 3)
    mus = [tb.random.normal(tb.random.key(i), (n,), dtype=dtype) for i, n in enumerate((5, 301))]
    sigmas = [m.abs() + 0.1 for m in mus]
    one = _noise.gaussian_with_noise(keys, [21, 22], mus, sigmas)
    monkeypatch.setattr(_noise, "_PARALLEL_MIN_NUMEL", 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        split = _noise.gaussian_with_noise(keys, [21, 22], mus, sigmas)
        plain = _noise.gaussian(keys, [21, 22], mus, sigmas)
    finally:
        torch.set_num_threads(before)
    for a, b, c in zip(one[0] + one[1], split[0] + split[1], plain + one[1], strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_affine_equals_the_op_and_tensor_ops(dtype):
    """mu + sigma * eps written by the kernel == the op's eps then the same two roundings,
    and node.sample == the same node drawn in a tree under autograd."""
    keys = tb.random.split(tb.random.key(5), 4)
    mus = [tb.random.normal(tb.random.key(i), (n,), dtype=dtype) for i, n in enumerate((7, 300))]
    sigmas = [
        tb.random.normal(tb.random.key(9 + i), m.shape, dtype=dtype).abs()
        for i, m in enumerate(mus)
    ]
    fused = _noise.gaussian(keys, [11, 12], mus, sigmas)
    tracked = _noise.gaussian(keys, [11, 12], [m.clone().requires_grad_() for m in mus], sigmas)
    for a, b in zip(fused, tracked, strict=True):
        assert torch.equal(a, b.detach())
    eps = _noise.noise(keys, [11, 12], [7, 300], dtype, CPU).split([28, 1200])
    for value, mu, sigma, e in zip(fused, mus, sigmas, eps, strict=True):
        assert torch.equal(value, mu + sigma * e.view(4, -1))


def test_float64_noise_is_the_float32_noise_widened():
    key = tb.random.key(8)
    assert torch.equal(
        tb.random.normal(key, (100,), dtype=torch.float64),
        tb.random.normal(key, (100,)).double(),
    )
    half = tb.random.normal(key, (100,), dtype=torch.float16)
    assert torch.equal(half, tb.random.normal(key, (100,)).half())


def test_without_the_kernel_every_entry_point_gives_the_same_bits(monkeypatch):
    """The tensor-op fallback (no C compiler) is the same stream, through the same entries."""
    with torch.random.fork_rng():
        net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2)
        )
    post = tb.from_module(net.eval())
    x = tb.random.normal(tb.random.key(1), (5, 4))
    key = tb.random.key(2)

    def everything():
        return [
            tb.random.normal(key, (3, 5), dtype=torch.float64),
            tb.random.split(key, 4),
            tb.random.fold_in(key, 7),
            *tb.sample(post, key, num_samples=3).values(),
            tb.predict(net, post, key, x, num_samples=3, dropout=True, strategy="vmap"),
            tb.predict(net, post, key, x, num_samples=3, dropout=True, strategy="loop"),
        ]

    native = everything()
    monkeypatch.setattr(_native, "kernel", lambda: None)
    for a, b in zip(native, everything(), strict=True):
        assert torch.equal(a, b)


def test_a_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TBFUNC_CACHE_DIR", str(tmp_path / "cache"))
    _native.kernel.cache_clear()
    try:
        with pytest.warns(
            RuntimeWarning,
            match=r"CPU noise kernel is unavailable: the compiler '.*no-such-compiler' \(from \$CC\) was not found",
        ):
            assert _native.kernel() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _native.kernel() is None  # cached: no second warning
        monkeypatch.setenv("TBFUNC_NATIVE", "0")
        _native.kernel.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _native.kernel() is None  # switched off on purpose: silent
    finally:
        monkeypatch.undo()
        _native.kernel.cache_clear()


@needs_kernel
def test_the_build_is_cached_and_survives_concurrent_first_builds(tmp_path):
    """Two processes building into an empty cache at once both load a whole library."""
    code = "import tbfunc as tb, torch; print(float(tb.random.normal(tb.random.key(0), (1,))))"
    env = {**os.environ, "TBFUNC_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0].strip() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert outputs[0] == outputs[1] == str(float(tb.random.normal(tb.random.key(0), (1,))))
    built = list(tmp_path.glob("noise-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.so.*"))
    # the library and its checksum, no half-written leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [built[0].name, f"{built[0].stem}.sha256"]
    )


# -- every key bit selects the stream ------------------------------------------------------------


def test_a_million_keys_give_a_million_distinct_noise_vectors():
    """With 32-bit seeds, ~116 of 10**6 keys would share a stream (birthday bound); with the
    64-bit key, a shared 4-draw vector has probability ~10**12 / 2**64 ~ 3e-8."""
    keys = tb.random.split(tb.random.key(0), 1_000_000)
    noise = torch.func.vmap(lambda k: tb.random.normal(k, (4,)))(keys)
    assert torch.unique(noise, dim=0).shape[0] == 1_000_000


@pytest.mark.parametrize("word", [0, 1])
def test_every_key_bit_changes_the_noise(word):
    """Flipping any one of the 64 key bits gives another stream (a seed built from 32 bits, or
    from a mix that drops some, fails for the bits it drops)."""
    base = tb.random.fold_in(tb.random.key(12), 3)
    noise = tb.random.normal(base, (8,))
    for bit in range(32):
        flipped = base.clone()
        flipped[word] ^= 1 << bit
        assert not torch.equal(tb.random.normal(flipped, (8,)), noise), (word, bit)


# -- statistics ---------------------------------------------------------------------------------

FAIL_PROB = 1e-6  # per assertion; the draws are fixed, so each test is deterministic


def test_normal_moments_tails_and_angles():
    """N(0, 1) in moments (both too wide and too narrow fail), in the KS distance, in the tail
    mass beyond 2, 3 and 4 sigma (a log or sqrt off by a factor moves it), and Box-Muller
    pairs must point every way (an octant mapped twice or missed shows in the angle bins)."""
    noise = tb.random.normal(tb.random.key(21), (2_000_000,), dtype=torch.float64)
    testing.assert_moments(noise[:, None], 0.0, 1.0, fail_prob=FAIL_PROB)
    testing.assert_normal(noise[:, None], 0.0, 1.0, fail_prob=FAIL_PROB)
    count = noise.numel()
    z = 5.5  # two-sided normal quantile for fail_prob ~ 4e-8
    for cut in (2.0, 3.0, 4.0):
        expected = math.erfc(cut / math.sqrt(2)) * count
        seen = int((noise.abs() > cut).sum())
        assert abs(seen - expected) < z * math.sqrt(expected), (cut, seen, expected)
    pairs = noise.view(-1, 2)  # elements 2i, 2i + 1 come from one Box-Muller pair
    angle = torch.atan2(pairs[:, 1], pairs[:, 0])
    bins = torch.histc(angle, bins=64, min=-math.pi, max=math.pi)
    expected = pairs.shape[0] / 64
    chi2 = float(((bins - expected) ** 2 / expected).sum())
    assert chi2 < 63 + 5.5 * math.sqrt(2 * 63), chi2  # chi2(63): mean 63, sd sqrt(126)


def test_neighbours_in_a_block_are_independent():
    """Elements sharing a Philox block (and a Box-Muller pair) must not be correlated."""
    noise = tb.random.normal(tb.random.key(22), (400_000,)).view(-1, 4)
    testing.assert_independent(noise[:, 0], noise[:, 1], fail_prob=FAIL_PROB)  # one pair
    testing.assert_independent(noise[:, 1], noise[:, 2], fail_prob=FAIL_PROB)  # two pairs
    testing.assert_independent(noise[:-1, 3], noise[1:, 0], fail_prob=FAIL_PROB)  # two blocks


def test_uniforms_cover_zero_to_one():
    u = _noise.noise(tb.random.key(23)[None], None, [1_000_000], torch.float64, CPU, uniform=True)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    bins = torch.histc(u, bins=100, min=0.0, max=1.0)
    chi2 = float(((bins - 10_000) ** 2 / 10_000).sum())
    assert chi2 < 99 + 5.5 * math.sqrt(2 * 99), chi2


# -- caches that must not go stale ---------------------------------------------------------------


def test_a_posterior_changed_in_place_is_checked_again():
    """Finite tensors are remembered by version; an in-place write must be seen."""
    with torch.random.fork_rng():
        net = torch.nn.Linear(3, 2)
    post = tb.from_module(net)
    tb.sample(post, tb.random.key(0))  # checked and remembered
    with torch.no_grad():
        post["weight"].rho[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"posterior\['weight'\].rho must be finite, got 1"):
        tb.sample(post, tb.random.key(0))
    with torch.no_grad():
        post["weight"].rho.fill_(-3.0)
        post["bias"].mu.copy_(torch.tensor([float("inf"), 0.0]))
    with pytest.raises(ValueError, match=r"posterior\['bias'\].mu must be finite"):
        tb.predict(net, post, tb.random.key(0), torch.ones(1, 3), num_samples=2)


def test_trees_of_one_shape_but_other_names_draw_other_noise():
    """Layouts are cached by tree structure, which holds the names."""
    node = tb.PretrainedGaussianPosterior.from_param(torch.zeros(5))
    a = tb.sample({"a": node}, tb.random.key(0))["a"]
    b = tb.sample({"b": node}, tb.random.key(0))["b"]
    assert not torch.equal(a, b)
    assert torch.equal(a, node.sample(tb.random.fold_in(tb.random.key(0), hash32("a"))))


@needs_kernel
def test_a_build_without_march_native_gives_the_same_bits(tmp_path):
    """A compiler that refuses -march=native gets the portable build (no AVX2 Philox, no
    vector transposes): the numbers must not change."""
    refusing = tmp_path / "cc"
    refusing.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = "-march=native" ] && exit 1; done\n'
        f'exec {shutil.which("cc") or shutil.which("gcc")} "$@"\n'
    )
    refusing.chmod(0o755)
    code = (
        "import torch, tbfunc as tb\n"
        "post = {'w': tb.PretrainedGaussianPosterior(torch.zeros(3, 700), torch.zeros(3, 700))}\n"
        "draws = [tb.random.normal(tb.random.key(5), (1001,)),\n"
        "         tb.sample(post, tb.random.key(6), num_samples=3)['w'].reshape(-1)]\n"
        "print(repr([float(v) for d in draws for v in d[::97]]))\n"
    )
    env = {**os.environ, "CC": str(refusing), "TBFUNC_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    post = {"w": tb.PretrainedGaussianPosterior(torch.zeros(3, 700), torch.zeros(3, 700))}
    here = [
        tb.random.normal(tb.random.key(5), (1001,)),
        tb.sample(post, tb.random.key(6), num_samples=3)["w"].reshape(-1),
    ]
    assert done.stdout.strip() == repr([float(v) for d in here for v in d[::97]])
    assert len(list((tmp_path / "cache").glob("noise-*.so"))) == 1


# -- softplus(rho), the other half of a draw, at every thread count -----------------------------


def _disagreeing(dtype):
    """A value where torch's scalar and vectorised softplus loops give other last bits (None
    if this CPU's two loops agree on the grid): a strided view takes the scalar loop."""
    xs = torch.linspace(-12.0, 12.0, 4001, dtype=dtype)
    vector = F.softplus(xs)
    scalar = F.softplus(torch.stack([xs, xs], 1).reshape(-1)[::2])
    differ = (vector != scalar).nonzero()
    return None if differ.numel() == 0 else float(xs[differ[0, 0]])


def _at_threads(threads, fn, *args):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def _into(rho, out):
    return _softplus.softplus(rho, out=out)


def _sigma_of(node):
    return node.sigma


def _draw_of(node):
    return tb.sample({"w": node}, tb.random.key(1))["w"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_has_the_one_thread_bits_at_every_thread_count(dtype):
    """torch's own F.softplus moves a few last bits with the thread count on tensors above the
    grain size (the parts' scalar tails move); sigma, and so every draw, must not. Filled with
    a value the two loops round apart, every moved tail shows."""
    value = _disagreeing(dtype)
    if value is None:
        pytest.skip("this CPU's scalar and vectorised softplus agree: nothing can move")
    moved = 0
    # 131,415 over 5 threads: parts of 26,283 = 43 mod 64, so the part ending at 78,849 (= 1 mod
    # 64) ran 11 scalar elements from 78,838: a window must reach a whole step back
    for n in (_softplus.GRAIN, _softplus.GRAIN + 1, 40_001, 65_567, 100_003, 131_415):
        rho = torch.full((n,), value, dtype=dtype)
        one = _at_threads(1, F.softplus, rho)
        for threads in (2, 3, 5):
            moved += int((_at_threads(threads, F.softplus, rho) != one).sum())
        for family in (tb.GaussianPosterior, tb.PretrainedGaussianPosterior):
            node = family(torch.zeros(n, dtype=dtype), rho)
            draw = _at_threads(1, _draw_of, node)
            for threads in (2, 3, 5):
                assert torch.equal(_at_threads(threads, _sigma_of, node), one), (n, threads)
                assert torch.equal(_at_threads(threads, _draw_of, node), draw), (family, threads)
        for threads in (2, 3, 5):  # into a kept tensor (tb.optim.sampled's route)
            out = torch.empty_like(rho)
            assert _at_threads(threads, _into, rho, out) is out
            assert torch.equal(out, one), ("out", n, threads)
    assert moved > 0  # torch's softplus did move: the check above has teeth


def test_the_thread_invariant_softplus_keeps_torchs_gradients():
    """The same gradient as F.softplus (its own backward), and a second derivative too."""
    rho = tb.random.normal(tb.random.key(3), (70_001,), dtype=torch.float64).mul(4).requires_grad_()
    weights = tb.random.normal(tb.random.key(4), (70_001,), dtype=torch.float64)

    def grads(fn):
        (g,) = torch.autograd.grad((fn(rho) * weights).sum(), rho, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), rho)
        return g.detach(), gg

    ours = _at_threads(2, grads, _softplus.softplus)
    torchs = _at_threads(1, grads, F.softplus)
    assert torch.equal(ours[0], torchs[0])
    torch.testing.assert_close(ours[1], torchs[1], rtol=1e-12, atol=0)


def test_the_thread_invariant_softplus_steps_aside_under_transforms():
    """Under vmap the values are F.softplus's (no data-dependent window writes in a trace)."""
    rho = tb.random.normal(tb.random.key(5), (2, 40_000))
    out = _at_threads(2, torch.func.vmap(_softplus.softplus), rho)
    assert torch.allclose(out, F.softplus(rho), rtol=0, atol=1e-6)


def test_part_bounds_cover_both_schedulers():
    """OpenMP's even parts and the native pool's grain-sized ones (at least the grain each)."""
    assert _softplus.part_bounds(100_000, 2) == {50_000}  # the two agree here
    assert _softplus.part_bounds(100_000, 4) == {25_000, 50_000, 75_000} | {32_768, 65_536, 98_304}
    assert _softplus.part_bounds(40_000, 8) == {20_000, 32_768}


# torch's first forward-mode AD call imports its jvp decompositions, which script functions and
# warn from inside torch (not tbfunc's code)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_the_thread_invariant_softplus_and_the_fused_route_step_aside_under_forward_ad():
    """Forward-mode AD carries tangents the windows' in-place writes and the kernels' pointer
    writes would drop: softplus's tangent must be sigmoid(rho) times the input's, and the fused
    route must not claim the tensors."""
    import torch.autograd.forward_ad as fwad

    from tbfunc import _fused

    rho = tb.random.normal(tb.random.key(6), (40_000,))
    with fwad.dual_level():
        dual = fwad.make_dual(rho, torch.ones_like(rho))
        tangent = fwad.unpack_dual(_at_threads(2, _softplus.softplus, dual)).tangent
        assert not _fused.eager([rho])
    assert tangent is not None
    torch.testing.assert_close(tangent, torch.sigmoid(rho))
