"""tb.random: known answers, transform equivalences, statistics and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tbfunc as tb
from tbfunc import testing
from tbfunc._threefry import threefry2x32 as _threefry2x32

M = 0xFFFFFFFF


def words(key: torch.Tensor) -> list:
    return key.tolist()


# -- known answers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "counter", "expected"),
    [  # Random123 known-answer vectors for threefry2x32_20: (key words, counter words, output).
        ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
        ((M, M), (M, M), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ],
)
def test_threefry_matches_random123(key, counter, expected):
    out = _threefry2x32(*(torch.tensor(w, dtype=torch.int64) for w in (*key, *counter)))
    assert tuple(int(w) for w in out) == expected


def test_split_and_fold_in_match_jax():
    # Values from jax 0.10.2: jax.random.split / fold_in on jax.random.PRNGKey(seed).
    assert words(tb.random.split(tb.random.key(0), 4)) == [
        [1797259609, 2579123966],
        [928981903, 3453687069],
        [4146024105, 2718843009],
        [2467461003, 3840466878],
    ]
    assert words(tb.random.fold_in(tb.random.key(0), 1)) == [928981903, 3453687069]
    assert words(tb.random.split(tb.random.key(42), 3)) == [
        [1832780943, 270669613],
        [64467757, 2916123636],
        [2465931498, 255383827],
    ]
    assert words(tb.random.fold_in(tb.random.key(42), 7)) == [2547012911, 1371500959]


def test_key_layout():
    assert words(tb.random.key(42)) == [0, 42]
    assert words(tb.random.key(2**40 + 5)) == [2**8, 5]
    assert words(tb.random.key(-1)) == [M, M]
    key = tb.random.key(3)
    assert key.dtype == torch.int64 and key.shape == (2,) and key.device.type == "cpu"


def test_fold_in_accepts_int_tensors_and_large_ints():
    key = tb.random.key(1)
    assert torch.equal(tb.random.fold_in(key, torch.tensor(9)), tb.random.fold_in(key, 9))
    assert torch.equal(
        tb.random.fold_in(key, torch.tensor(9, dtype=torch.int32)), tb.random.fold_in(key, 9)
    )
    assert torch.equal(tb.random.fold_in(key, 2**64 - 1), tb.random.fold_in(key, -1))
    assert not torch.equal(tb.random.fold_in(key, 2**32), tb.random.fold_in(key, 0))


# -- noise ------------------------------------------------------------------------------------


def test_normal_is_a_function_of_the_key():
    key = tb.random.key(7)
    a = tb.random.normal(key, (3, 4))
    assert torch.equal(a, tb.random.normal(key, (3, 4)))
    assert not torch.equal(a, tb.random.normal(tb.random.key(8), (3, 4)))
    # keys that differ only in the high word draw different noise (the CPU seed mixes both)
    high = tb.random.normal(torch.tensor([1, 7]), (8,))
    assert not torch.equal(high, tb.random.normal(torch.tensor([0, 7]), (8,)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_normal_dtype(dtype):
    out = tb.random.normal(tb.random.key(0), (5,), dtype=dtype)
    assert out.dtype == dtype and out.shape == (5,)
    assert tb.random.normal(tb.random.key(0), ()).shape == ()
    assert tb.random.normal(tb.random.key(0), 0).shape == (0,)


def test_normal_statistics():
    noise = tb.random.normal(tb.random.key(123), (20000,), dtype=torch.float64)
    testing.assert_normal(noise[:, None], 0.0, 1.0, fail_prob=1e-6)
    testing.assert_moments(noise[:, None], 0.0, 1.0, fail_prob=1e-6)


def test_split_keys_draw_independent_noise():
    keys = tb.random.split(tb.random.key(5), 2)
    a, b = (tb.random.normal(k, (5000,)) for k in keys)
    testing.assert_independent(a, b, fail_prob=1e-6)


def test_vmap_over_keys_equals_loop():
    keys = tb.random.split(tb.random.key(3), 5)
    loop = torch.stack([tb.random.normal(k, (2, 3)) for k in keys])
    assert torch.equal(torch.func.vmap(lambda k: tb.random.normal(k, (2, 3)))(keys), loop)
    split_loop = torch.stack([tb.random.split(k, 3) for k in keys])
    assert torch.equal(torch.func.vmap(lambda k: tb.random.split(k, 3))(keys), split_loop)
    data = torch.arange(5)
    fold_loop = torch.stack([tb.random.fold_in(k, d) for k, d in zip(keys, data, strict=True)])
    assert torch.equal(torch.func.vmap(tb.random.fold_in)(keys, data), fold_loop)
    # a Python int under vmap: the scalar C route cannot read a batched key and steps aside
    int_loop = torch.stack([tb.random.fold_in(k, 2**63 + 5) for k in keys])
    assert torch.equal(torch.func.vmap(lambda k: tb.random.fold_in(k, 2**63 + 5))(keys), int_loop)


def test_nested_vmap_over_keys():
    keys = tb.random.split(tb.random.key(3), 6).reshape(2, 3, 2)
    nested = torch.func.vmap(torch.func.vmap(lambda k: tb.random.normal(k, (4,))))(keys)
    loop = torch.stack([torch.stack([tb.random.normal(k, (4,)) for k in row]) for row in keys])
    assert torch.equal(nested, loop)


def test_compiled_equals_eager():
    def draw(key):
        a, b = tb.random.split(key)
        return tb.random.normal(tb.random.fold_in(a, 3), (4,)) + tb.random.normal(b, (4,))

    key = tb.random.key(11)
    compiled = torch.compile(draw, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(key), draw(key))


@given(testing.keys(), st.integers(1, 6))
def test_split_rows_differ(key, num):
    keys = tb.random.split(key, num)
    assert keys.shape == (num, 2) and keys.dtype == torch.int64
    assert len({tuple(k) for k in keys.tolist()}) == num
    assert ((keys >= 0) & (keys <= M)).all()


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (
            torch.zeros(2, dtype=torch.int32),
            ValueError,
            r"key must be an int64 or uint32 tensor of shape \(2,\), got a tensor of shape \(2,\), dtype torch.int32",
        ),
        (
            torch.zeros(3, dtype=torch.int64),
            ValueError,
            r"key must be an int64 or uint32 tensor of shape \(2,\), got a tensor of shape \(3,\)",
        ),
        (
            [0, 1],
            TypeError,
            r"key must be a key tensor, got an object of type list. Make one with tb.random.key",
        ),
    ],
)
def test_bad_keys(bad, error, match):
    for call in (
        lambda: tb.random.split(bad),
        lambda: tb.random.fold_in(bad, 1),
        lambda: tb.random.normal(bad, (2,)),
    ):
        with pytest.raises(error, match=match):
            call()


def test_bad_arguments():
    key = tb.random.key(0)
    with pytest.raises(ValueError, match=r"num must be a positive int \(>= 1\), got int 0"):
        tb.random.split(key, 0)
    with pytest.raises(TypeError, match="seed must be an int, got float 1.5"):
        tb.random.key(1.5)
    with pytest.raises(ValueError, match=r"seed must be an int in \[-2\*\*63, 2\*\*64\)"):
        tb.random.key(2**64)
    with pytest.raises(TypeError, match="data must be an integer tensor, got a tensor of shape"):
        tb.random.fold_in(key, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"data must be a tensor of shape \(\)"):
        tb.random.fold_in(key, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="shape must be an int or a sequence of non-negative ints"):
        tb.random.normal(key, (2, -1))
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        tb.random.normal(key, (2,), dtype=torch.int64)


@given(testing.keys(), st.integers(0, 2**64 - 1), st.integers(1, 4))
def test_python_and_tensor_threefry_agree(key, data, num):
    """The eager Python-int path and the tensor-op path (used under vmap/compile) are one function."""
    from tbfunc import _threefry as r

    word = torch.tensor(data - 2**64 if data >= 2**63 else data)
    x0, x1 = _threefry2x32(key[0], key[1], (word >> 32) & M, word & M)
    assert r.fold_in(key, word).tolist() == [int(x0), int(x1)]
    # the scalar route a training loop takes (the C kernel from the two words) is the same
    assert r.fold_in_int(key, int(word)).tolist() == [int(x0), int(x1)]
    assert tb.random.fold_in(key, data).tolist() == [int(x0), int(x1)]
    counter = torch.arange(num)
    y0, y1 = _threefry2x32(key[0:1], key[1:2], torch.zeros_like(counter), counter)
    assert r.split(key, num).tolist() == torch.stack((y0, y1), -1).tolist()


def test_normal_folded_segments_and_vmap():
    """The op behind tb.sample: node-major segments keyed by fold_in(keys[s], hashes[l])."""
    from tbfunc._noise import noise

    def normal_folded(keys, hashes, numels, dtype, device):
        return noise(keys, hashes, numels, dtype, device)

    keys = tb.random.split(tb.random.key(4), 3)
    hashes, numels = [5, 2**32 - 1, 77], [4, 20, 1]
    flat = normal_folded(keys, hashes, numels, torch.float32, torch.device("cpu"))
    expected = torch.cat(
        [
            tb.random.normal(tb.random.fold_in(k, h), (n,))
            for h, n in zip(hashes, numels, strict=True)
            for k in keys
        ]
    )
    assert torch.equal(flat, expected)
    batches = tb.random.split(tb.random.key(5), 6).reshape(2, 3, 2)
    vmapped = torch.func.vmap(
        lambda k: normal_folded(k, hashes, numels, torch.float32, torch.device("cpu"))
    )(batches)
    loop = torch.stack(
        [normal_folded(k, hashes, numels, torch.float32, torch.device("cpu")) for k in batches]
    )
    assert torch.equal(vmapped, loop)


# -- planted bugs: weak key mixing, thread-count dependence ------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((7, 3), (3, 7)),  # swapped words
        ((7, 3), (7 ^ 0x5A5A, 3 ^ 0x5A5A)),  # equal XOR of the words
        ((0x10000007, 3), (0x20000007, 3)),  # differ only in the high word
        ((7, 3), (7, 0x80000003)),  # differ only in the top bit of the low word
        ((1, 0), (0, 1)),
    ],
)
def test_keys_that_a_weak_seed_mix_would_merge_draw_different_noise(a, b):
    """A seed built as w0 ^ w1, w0 + w1 or one word alone would make each pair share a stream."""
    noise_a = tb.random.normal(torch.tensor(a), (16,))
    noise_b = tb.random.normal(torch.tensor(b), (16,))
    assert not torch.equal(noise_a, noise_b)


def test_large_draws_do_not_depend_on_the_thread_count():
    """Above the parallel threshold the CPU draws on every thread; the bits must not move, and
    every (node, sample) segment must equal node.sample(fold_in(split(key, S)[s], hash))."""
    from tbfunc._noise import _PARALLEL_MIN_NUMEL
    from tbfunc._sampling import hash32

    post = {
        "big.weight": tb.PretrainedGaussianPosterior(torch.zeros(300, 700), torch.zeros(300, 700)),
        "small.bias": tb.PretrainedGaussianPosterior(torch.ones(7), torch.full((7,), -1.0)),
        "mid.weight": tb.PretrainedGaussianPosterior(torch.zeros(50, 60), torch.zeros(50, 60)),
    }
    count = 4
    assert count * 300 * 700 > 2 * _PARALLEL_MIN_NUMEL
    threads = torch.get_num_threads()
    try:
        draws = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            draws[n] = tb.sample(post, KEY_7, num_samples=count)
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):
        for name in post:
            assert torch.equal(draws[n][name], draws[1][name]), (n, name)
    keys = tb.random.split(KEY_7, count)
    for name, node in post.items():
        for s in range(count):
            expected = node.sample(tb.random.fold_in(keys[s], hash32(name)))
            assert torch.equal(draws[1][name][s], expected), (name, s)


KEY_7 = tb.random.key(7)
