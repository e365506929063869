"""Tests for bugs a mutation run of the suite left alive (issue 17), one per planted bug."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

import tbfunc as tb
from helpers import data, mlp, seeded
from tbfunc import metrics as M


class _TwoSites(nn.Module):
    """Two dropout layers on the same ones: their masks must be drawn independently."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Dropout(0.5), nn.Dropout(0.5)

    def forward(self, x):
        return torch.stack([self.first(x), self.second(x)])


def test_two_dropout_sites_in_one_forward_get_different_masks():
    """Planted: the per-call counter not advancing, so every site reuses the first mask."""
    net = _TwoSites().eval()
    out = tb.functional_call(net, {}, tb.random.key(0), torch.ones(4000), dropout=True)
    first, second = out[0] > 0, out[1] > 0
    assert 0.45 < float(first.float().mean()) < 0.55  # each is a fair p=0.5 mask
    agreement = float((first == second).float().mean())
    # independent masks agree on half the units (sd 0.008 for 4000): 0.5 +- 0.05 fails with
    # probability < 1e-9; a shared mask agrees everywhere
    assert 0.45 < agreement < 0.55


def test_reliability_bins_average_within_each_bin():
    """Planted: per-bin confidence divided by the total count instead of the bin's."""
    probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.55, 0.45], [0.52, 0.48], [0.9, 0.1]])
    target = torch.tensor([0, 1, 0, 1, 0])
    diagram = M.reliability_diagram(probs.log()[None], target, num_bins=2)
    # bin (0.5, 1.0] holds all five: mean confidence of the five, accuracy 3/5
    assert diagram.counts.tolist() == [0, 5]
    assert float(diagram.confidence[1]) == pytest.approx((0.95 + 0.85 + 0.55 + 0.52 + 0.9) / 5)
    assert float(diagram.accuracy[1]) == pytest.approx(3 / 5)
    four = M.reliability_diagram(probs.log()[None], target, num_bins=4)  # (.5,.75], (.75,1]
    assert four.counts.tolist() == [0, 0, 2, 3]
    assert float(four.confidence[2]) == pytest.approx((0.55 + 0.52) / 2)
    assert float(four.confidence[3]) == pytest.approx((0.95 + 0.85 + 0.9) / 3)


def test_equal_mass_bins_do_not_depend_on_the_order_of_the_examples():
    """Planted: the sorting permutation applied the wrong way round (index[order] swapped for
    index = order-based), which only shows on inputs that are not already sorted."""
    logits = 2.0 * data(1, 60, 4, seed=3)
    target = (data(60, seed=4).abs() * 9).long() % 4
    order = data(60, seed=5).argsort()
    a = M.reliability_diagram(logits, target, num_bins=6, binning="mass")
    b = M.reliability_diagram(logits[:, order], target[order], num_bins=6, binning="mass")
    assert a.counts.tolist() == [10] * 6
    torch.testing.assert_close(a.confidence, b.confidence)
    torch.testing.assert_close(a.accuracy, b.accuracy)
    # and each bin holds the 10 examples of its confidence rank, by hand
    confidence = M.log_predictive(logits).exp().max(-1).values.double()
    ranked = confidence.sort().values
    for i in range(6):
        assert float(a.confidence[i]) == pytest.approx(float(ranked[10 * i : 10 * i + 10].mean()))


def test_posterior_module_forward_passes_dropout_on():
    """Planted: PosteriorModule.forward dropping ``dropout=`` on its way to functional_call."""
    net = seeded(lambda: nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 2))).eval()
    view = tb.PosteriorModule(net, tb.from_module(net, sigma_scale=0.01))
    x, key = data(8, 4), tb.random.key(1)
    with_dropout = view(x, key=key, dropout=True)
    expected = tb.functional_call(net, view.posterior(), key, x, dropout=True)
    torch.testing.assert_close(with_dropout, expected)
    assert not torch.allclose(with_dropout, view(x, key=key))


def test_the_kernel_and_the_tensor_op_fallback_agree_past_a_chunk_boundary():
    """Planted: the fallback filling chunks one element short, or the kernel's fused affine
    map reading eps at an offset: draws longer than one fallback chunk (65,536 blocks) must
    be bit-equal both ways, for a whole tree and per node."""
    from tbfunc import _native, _philox

    if _native.kernel() is None:
        pytest.skip("needs the C kernel")
    count = 4 * _philox._CHUNK + 7  # values: past the first chunk of blocks, odd tail
    fast = tb.random.normal(tb.random.key(5), (count,))
    library = _native.kernel
    try:
        _native.kernel = lambda: None  # the fallback, as without a compiler
        slow = tb.random.normal(tb.random.key(5), (count,))
    finally:
        _native.kernel = library
    assert torch.equal(fast, slow)
    # the fused mu + sigma * eps equals the affine map of the node's plain noise, bit for bit
    # (an offset into eps would shift every value after it)
    from tbfunc.module import _path_key

    net = mlp((300, 700, 2))
    post = tb.from_module(net, sigma_scale=0.3)
    key = tb.random.key(6)
    drawn = tb.sample(post, key)
    for name, node in post.items():
        eps = tb.random.normal(_path_key(key, name), node.mu.shape)
        assert torch.equal(drawn[name], node.mu + node.sigma * eps), name


class _Attention(nn.Module):
    """Scaled-dot-product attention with attention dropout and a chosen ``scale``."""

    def __init__(self, scale, causal=False):
        super().__init__()
        self.scale, self.causal = scale, causal

    def forward(self, q, k, v):
        return nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=0.5, scale=self.scale, is_causal=self.causal
        )


def test_keyed_attention_dropout_keeps_the_users_scale_and_causality():
    """Planted: the keyed math path of SDPA under MC dropout ignoring ``scale=``."""
    q, k, v = (data(1, 2, 6, 8, seed=s) for s in (1, 2, 3))
    key = tb.random.key(5)

    def run(scale, causal=False, values=v):
        net = _Attention(scale, causal).eval()
        return tb.functional_call(net, {}, key, (q, k, values), dropout=True)

    default, explicit = run(None), run(8**-0.5)
    assert torch.allclose(default, explicit, atol=1e-6)  # the same masks, the same factor
    assert not torch.allclose(run(0.05), default, atol=1e-3)  # another scale is honoured
    # causal: the first query sees the first key only, whatever the later values are
    later = v.clone()
    later[..., 1:, :] += 10.0
    assert torch.allclose(run(None, True)[..., 0, :], run(None, True, later)[..., 0, :])
    assert not torch.allclose(run(None, False)[..., 0, :], run(None, False, later)[..., 0, :])


class GaussianPosterior(NamedTuple):  # a user's own class
    """A user's family that happens to share the built-in's name (and fields)."""

    mu: torch.Tensor
    rho: torch.Tensor

    @classmethod
    def from_param(cls, param, **kwargs):
        return cls(param.detach().clone(), torch.full_like(param, -3.0))

    @property
    def sigma(self):
        return nn.functional.softplus(self.rho)

    @property
    def distribution(self):
        return torch.distributions.Normal(self.mu, self.sigma)

    def sample(self, key):
        return self.mu + self.sigma * tb.random.normal(key, self.mu.shape)


def test_save_tells_a_users_family_from_the_builtin_of_the_same_name(tmp_path):
    """Planted: save deciding that a node is built-in by its class name alone."""
    own = {"w": GaussianPosterior(torch.zeros(3), torch.full((3,), -2.0))}
    tb.save(own, tmp_path / "own.pt")
    with pytest.raises(ValueError, match="family 'test_mutation_gaps.GaussianPosterior'"):
        tb.load(tmp_path / "own.pt")
    loaded = tb.load(tmp_path / "own.pt", families=[GaussianPosterior])
    assert type(loaded["w"]) is GaussianPosterior
    tb.save({"w": tb.GaussianPosterior(torch.zeros(3), torch.zeros(3))}, tmp_path / "builtin.pt")
    assert type(tb.load(tmp_path / "builtin.pt")["w"]) is tb.GaussianPosterior


def test_load_refuses_a_node_with_more_fields_than_its_family(tmp_path):
    """Planted: load accepting extra fields where the stored family has fewer."""
    state = {"w.mu": torch.zeros(2), "w.rho": torch.zeros(2), "w.extra": torch.zeros(2)}
    with pytest.raises(
        ValueError, match=r"must have the fields \['mu', 'rho'\] .*got \['extra', 'mu', 'rho'\]"
    ):
        tb.from_state_dict(state)


def test_from_torchbayesian_copies_and_to_torchbayesian_keeps_the_family():
    """Planted: from_torchbayesian sharing storage with the module; to_torchbayesian mapping
    the two Gaussian families the wrong way round."""
    bnn = pytest.importorskip("torchbayesian.bnn")
    for family, kind in (
        (tb.GaussianPosterior, "normal"),
        (tb.PretrainedGaussianPosterior, "pretrained_normal"),
    ):
        net = mlp()
        key = tb.random.key(0) if family is tb.GaussianPosterior else None
        post = tb.from_module(net, family, key=key)
        with torch.random.fork_rng():  # torchbayesian initialises from the global RNG
            converted = tb.interop.to_torchbayesian(net, post)
        kinds = {
            type(sub).__name__
            for sub in converted.modules()
            if isinstance(sub, bnn.VariationalPosterior)
        }
        assert kinds == {"GaussianPosterior" if kind == "normal" else "PretrainedGaussianPosterior"}
        back = tb.interop.from_torchbayesian(converted)
        assert {type(node) for node in back.values()} == {family}
        before = {name: node.mu.detach().clone() for name, node in back.items()}
        with torch.no_grad():
            for param in converted.parameters():
                param.add_(1.0)
        for name, node in back.items():
            assert torch.equal(node.mu, before[name])  # a copy, not a view of the module


class _DropoutThenNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop, self.norm, self.linear = nn.Dropout(0.2), nn.BatchNorm1d(5), nn.Linear(5, 2)

    def forward(self, x):
        return self.linear(self.norm(self.drop(x)))


def test_dropout_true_still_refuses_every_other_layer_in_training_mode():
    """Planted: with dropout=True the training-mode check skipping every layer kind, not only
    dropout (a train-mode BatchNorm then runs and its running_mean moves)."""
    net = seeded(_DropoutThenNorm).train()
    post = tb.from_module(net, include="linear.*")
    x, y = data(8, 5), torch.arange(8) % 2
    before = net.norm.running_mean.clone()
    for call in (
        lambda: tb.predict(net, post, tb.random.key(0), x, num_samples=2, dropout=True),
        lambda: tb.functional_call(net, post, tb.random.key(0), x, dropout=True),
        lambda: tb.nelbo(
            net, post, tb.random.key(0), x, y, loss_fn=nn.functional.cross_entropy,
            num_data=8, dropout=True,
        ),
    ):  # fmt: skip
        with pytest.raises(ValueError, match="BatchNorm1d 'norm' in training mode"):
            call()
    assert torch.equal(net.norm.running_mean, before)
    net.norm.eval()  # only the dropout layer in training mode: allowed, keyed
    out = tb.functional_call(net, post, tb.random.key(0), x, dropout=True)
    assert out.shape == (8, 2)


# -- the kinds of gap the planted bugs stood for ------------------------------------------------


def _alpha_dropped(out):
    return out == out.amin()  # for an input of ones, a dropped unit takes the smaller value


@pytest.mark.parametrize(
    ("layer", "shape", "unit_dims", "dropped"),
    [
        (nn.Dropout(0.3), (4000,), 0, lambda out: out == 0),
        (nn.Dropout1d(0.3), (40, 100, 3), 1, lambda out: out == 0),
        (nn.Dropout2d(0.3), (40, 100, 2, 2), 2, lambda out: out == 0),
        (nn.Dropout3d(0.3), (40, 100, 2, 1, 2), 3, lambda out: out == 0),
        (nn.AlphaDropout(0.3), (4000,), 0, _alpha_dropped),
        (nn.FeatureAlphaDropout(0.3), (40, 100, 2, 2), 2, _alpha_dropped),
    ],
    ids=["Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlpha"],
)
def test_every_dropout_variant_has_its_law(layer, shape, unit_dims, dropped):
    """Each variant drops a fraction p of its units (elements, or whole channels), within a
    6-sigma binomial band (failure probability < 2e-9 each), and a channel is dropped whole."""
    out = tb.predict(layer, {}, tb.random.key(3), torch.ones(shape), num_samples=2, dropout=True)
    mask = dropped(out)
    if unit_dims:
        flat = mask.flatten(-unit_dims)
        assert torch.equal(flat.all(-1), flat.any(-1))  # one draw per channel
        mask = flat[..., 0]
    units = mask.numel()
    rate = mask.double().mean().item()
    assert abs(rate - 0.3) < 6 * (0.3 * 0.7 / units) ** 0.5, (rate, units)
    if not isinstance(layer, nn.AlphaDropout | nn.FeatureAlphaDropout):
        assert torch.allclose(out[~dropped(out)], torch.tensor(1 / 0.7))


def test_every_field_of_the_streaming_metrics_is_invariant_to_the_examples_order():
    """Planted kind: a permutation applied the wrong way round, or a field computed from the
    batch order; every scalar and bin must not move when the examples are shuffled, and the
    per-example scores must follow their examples."""
    logits = data(8, 300, 5, seed=4) * 2
    target = torch.arange(300) % 5
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    for binning in ("width", "mass"):
        results = []
        for perm, sizes in ((torch.arange(300), (300,)), (order, (7, 93, 200))):
            acc = M.Accumulator(num_bins=10, binning=binning)
            start = 0
            for size in sizes:
                rows = perm[start : start + size]
                acc.update(logits[:, rows], target[rows])
                start += size
            results.append(acc.compute())
        plain, shuffled = results
        for field in ("accuracy", "nll", "brier", "ece", "aurc"):
            torch.testing.assert_close(
                getattr(shuffled, field), getattr(plain, field), rtol=1e-6, atol=1e-7
            )
        for field in ("edges", "confidence", "accuracy", "counts", "ece"):
            torch.testing.assert_close(
                getattr(shuffled.reliability, field),
                getattr(plain.reliability, field),
                rtol=1e-6,
                atol=1e-7,
            )
        for field in ("confidence", "correct", "entropy", "mutual_information"):
            # (per example to float32 rounding: the batch's shape moves the vectorised sums)
            torch.testing.assert_close(
                getattr(shuffled, field), getattr(plain, field)[order], rtol=1e-5, atol=1e-6
            )


def test_the_layout_cache_keys_on_names_not_on_counts_or_order():
    """Planted kind: a cache keyed on too little (the number of nodes, their order): the same
    nodes in another order draw the same per name, renamed nodes draw anew, and alternating
    between the trees never mixes their layouts."""
    first = tb.GaussianPosterior(torch.zeros(3), torch.zeros(3))
    second = tb.GaussianPosterior(torch.zeros(2, 2), torch.zeros(2, 2))
    a = {"a": first, "b": second}
    reordered = {"b": second, "a": first}
    renamed = {"x": first, "y": second}
    key = tb.random.key(7)
    draws_a = tb.sample(a, key)
    for _ in range(2):
        for name, value in tb.sample(reordered, key).items():
            assert torch.equal(value, draws_a[name])
        other = tb.sample(renamed, key)
        assert not torch.equal(other["x"], draws_a["a"])
        for name, value in tb.sample(a, key).items():
            assert torch.equal(value, draws_a[name])
