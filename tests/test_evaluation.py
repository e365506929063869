"""Streaming metrics (``tb.metrics.Accumulator``) and ``tb.evaluate`` against the whole-set
functions, and the bounded memory they promise."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tbfunc as tb
from benchmarks.training import peak_memory
from helpers import data, mlp, seeded
from tbfunc import metrics as M

SIZES = [1, 50, 7, 100, 45]  # uneven on purpose: a per-batch mean of means would be wrong


def _set(num_samples=8, classes=5, seed=0, scale=3.0):
    count = sum(SIZES)
    logits = scale * data(num_samples, count, classes, seed=seed)
    target = (data(count, seed=seed + 1).abs() * 7).long() % classes
    return logits, target


def _stream(logits, target, **options):
    acc = M.Accumulator(**options)
    start = 0
    for size in SIZES:
        acc.update(logits[:, start : start + size], target[start : start + size])
        start += size
    return acc


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_accumulator_equals_whole_set_metrics_on_uneven_batches(binning):
    logits, target = _set()
    got = _stream(logits, target, num_bins=10, binning=binning).compute()
    assert got.num_examples == target.numel()
    close = {"abs": 1e-6, "rel": 0}
    assert float(got.accuracy) == pytest.approx(float(M.accuracy(logits, target)), **close)
    assert float(got.nll) == pytest.approx(float(M.nll(logits, target)), **close)
    assert float(got.brier) == pytest.approx(float(M.brier_score(logits, target)), **close)
    whole = M.reliability_diagram(logits, target, num_bins=10, binning=binning)
    assert float(got.ece) == pytest.approx(float(whole.ece), **close)
    for field in ("edges", "confidence", "accuracy", "counts"):
        torch.testing.assert_close(getattr(got.reliability, field), getattr(whole, field))
    top = M.log_predictive(logits).exp().max(-1).values.double()
    correct = (M.log_predictive(logits).argmax(-1) == target).double()
    torch.testing.assert_close(got.confidence, top, atol=1e-7, rtol=0)
    assert torch.equal(got.correct, correct)
    assert float(got.aurc) == pytest.approx(float(M.aurc(top, correct)), **close)
    entropy = M.predictive_entropy(logits).double()
    information = M.mutual_information(logits).double()
    torch.testing.assert_close(got.entropy, entropy, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.mutual_information, information, atol=1e-6, rtol=0)
    assert float(got.mutual_information.min()) >= 0  # clamped as the whole-set function is
    # the ranking metrics on the kept scores: exactly the whole-set ones
    other_logits, _ = _set(seed=5, scale=1.0)
    out = _stream(other_logits, target).compute()
    assert torch.equal(
        M.auroc(got.entropy.float(), out.entropy.float()),
        M.auroc(M.predictive_entropy(logits), M.predictive_entropy(other_logits)),
    )
    assert torch.equal(
        M.fpr_at_tpr(got.mutual_information.float(), out.mutual_information.float()),
        M.fpr_at_tpr(M.mutual_information(logits), M.mutual_information(other_logits)),
    )


def test_accumulator_counts_every_token_of_a_sequence_target():
    logits = 2.0 * data(4, 6, 3, 5)  # S, batch, tokens, classes
    target = (data(6, 3, seed=2).abs() * 9).long() % 5
    acc = M.Accumulator()
    acc.update(logits[:, :4], target[:4])
    acc.update(logits[:, 4:], target[4:])
    got = acc.compute()
    assert got.num_examples == 18
    assert float(got.nll) == pytest.approx(float(M.nll(logits, target)), abs=1e-6)
    assert float(got.ece) == pytest.approx(float(M.expected_calibration_error(logits, target)))


def test_accumulator_keeps_examples_in_order_and_across_compute_calls():
    logits, target = _set()
    acc = M.Accumulator()
    acc.update(logits[:, :100], target[:100])
    first = acc.compute()
    acc.update(logits[:, 100:], target[100:])
    both = acc.compute()
    assert both.num_examples == target.numel()
    assert torch.equal(both.entropy[:100], first.entropy)
    assert float(both.nll) == pytest.approx(float(M.nll(logits, target)), abs=1e-6)
    reversed_order = M.Accumulator()
    reversed_order.update(logits[:, 100:], target[100:])
    reversed_order.update(logits[:, :100], target[:100])
    assert torch.equal(reversed_order.compute().entropy[-100:], first.entropy)
    acc.reset()
    assert acc.count == 0
    with pytest.raises(ValueError, match=r"Accumulator.compute needs at least one example"):
        acc.compute()


def test_accumulator_options_take_effect_and_bad_input_is_named():
    logits, target = _set()
    few = _stream(logits, target, num_bins=3).compute()
    many = _stream(logits, target, num_bins=30).compute()
    assert few.reliability.counts.numel() == 3 and many.reliability.counts.numel() == 30
    assert float(few.ece) == pytest.approx(
        float(M.expected_calibration_error(logits, target, num_bins=3)), abs=1e-6
    )
    with pytest.raises(ValueError, match=r"num_bins must be a positive int, got int 0"):
        M.Accumulator(num_bins=0)
    with pytest.raises(ValueError, match=r"binning must be 'width' or 'mass', got str 'equal'"):
        M.Accumulator(binning="equal")
    acc = M.Accumulator()
    with pytest.raises(ValueError, match=r"target must be a tensor of shape \(4,\)"):
        acc.update(logits[:, :4], target[:5])
    with pytest.raises(ValueError, match=r"logits seem to lack the leading sample axis"):
        acc.update(logits[0, :4], target[:4])
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\), got values in \[0, 7\]"):
        acc.update(logits[:, :2], torch.tensor([0, 7]))
    assert acc.count == 0  # a rejected batch leaves nothing behind


# ----------------------------------------------------------------------------------------------
# tb.evaluate


def _generator():
    """A DataLoader draws its worker base seed from the global RNG unless given a generator."""
    return torch.Generator().manual_seed(0)


def _model():
    net = mlp((6, 16, 4))
    post = tb.from_module(net, sigma_scale=0.3)
    x = data(83, 6, seed=3)
    y = (data(83, seed=4).abs() * 11).long() % 4
    return net, post, x, y


def test_evaluate_equals_predict_on_the_whole_set():
    net, post, x, y = _model()
    key = tb.random.key(7)
    whole = tb.predict(net, post, key, x, num_samples=6)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=17, generator=_generator()
    )  # the last batch holds 15
    got = tb.evaluate(net, post, key, loader, num_samples=6, progress=False)
    assert got.num_examples == 83
    assert float(got.nll) == pytest.approx(float(M.nll(whole, y)), abs=1e-6)
    assert float(got.accuracy) == pytest.approx(float(M.accuracy(whole, y)), abs=1e-6)
    assert float(got.ece) == pytest.approx(float(M.expected_calibration_error(whole, y)), abs=1e-6)
    torch.testing.assert_close(got.entropy, M.predictive_entropy(whole).double())
    # the options reach predict: chunking and strategy change nothing, the draws count does
    for options in ({"chunk_size": 4, "strategy": "loop"}, {"strategy": "vmap"}):
        again = tb.evaluate(net, post, key, loader, num_samples=6, progress=False, **options)
        torch.testing.assert_close(again.entropy, got.entropy)
    fewer = tb.evaluate(net, post, key, loader, num_samples=2, progress=False)
    two = tb.predict(net, post, key, x, num_samples=2)
    assert float(fewer.nll) == pytest.approx(float(M.nll(two, y)), abs=1e-6)
    assert float(fewer.nll) != pytest.approx(float(got.nll), abs=1e-4)
    other_key = tb.evaluate(net, post, tb.random.key(8), loader, num_samples=6, progress=False)
    assert float(other_key.nll) != pytest.approx(float(got.nll), abs=1e-4)
    binned = tb.evaluate(
        net, post, key, loader, num_samples=6, num_bins=4, binning="mass", progress=False
    )
    mass = M.expected_calibration_error(whole, y, num_bins=4, binning="mass")
    assert float(binned.ece) == pytest.approx(float(mass), abs=1e-6)


def test_evaluate_with_dropout_draws_keyed_masks_per_batch():
    net = seeded(
        lambda: nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
    ).eval()
    _, _, x, y = _model()
    key = tb.random.key(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=20, generator=_generator())
    got = tb.evaluate(net, {}, key, loader, num_samples=5, dropout=True, progress=False)
    by_hand = M.Accumulator()
    for xb, yb in loader:
        by_hand.update(tb.predict(net, {}, key, xb, num_samples=5, dropout=True), yb)
    assert torch.equal(got.entropy, by_hand.compute().entropy)
    plain = tb.evaluate(net, {}, key, loader, num_samples=5, progress=False)
    assert float(plain.mutual_information.max()) < 1e-6  # no dropout: the draws agree
    assert float(got.mutual_information.mean()) > 1e-3


@dataclasses.dataclass
class _Unregistered:
    logits: torch.Tensor


class _Keywords(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, features, shift=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        out = self.net(features)
        return SequenceClassifierOutput(logits=out if shift is None else out + shift)


def test_evaluate_reads_dict_batches_and_structured_outputs():
    net, post, x, y = _model()
    wrapped = _Keywords(net)
    wpost = {f"net.{name}": node for name, node in post.items()}
    key = tb.random.key(2)
    reference = tb.evaluate(net, post, key, [(x, y)], num_samples=3, progress=False)
    whole = tb.predict(wrapped, wpost, key, (), {"features": x}, num_samples=3).logits
    batches = [{"features": x[:40], "labels": y[:40]}, {"features": x[40:], "labels": y[40:]}]
    got = tb.evaluate(wrapped, wpost, key, batches, num_samples=3, progress=False)
    torch.testing.assert_close(got.entropy, M.predictive_entropy(whole).double())
    kwargs_pairs = [({"features": x}, y)]
    assert torch.equal(
        tb.evaluate(wrapped, wpost, key, kwargs_pairs, num_samples=3, progress=False).entropy,
        got.entropy,
    )
    shifted = [{"features": x, "shift": torch.tensor([5.0, 0, 0, 0]), "labels": y}]
    moved = tb.evaluate(wrapped, wpost, key, shifted, num_samples=3, progress=False)
    assert float(moved.nll) != pytest.approx(float(got.nll), abs=1e-3)  # kwargs reach forward

    class Pair(nn.Module):
        def forward(self, a, b):
            return (net(a) + net(b), None)

    pair_post = {}
    both = [((x, x), y)]
    doubled = tb.evaluate(
        Pair(), pair_post, key, both, num_samples=1, output=lambda out: out[0], progress=False
    )
    with torch.no_grad():
        expected = M.nll(2 * net(x)[None], y)
    assert float(doubled.nll) == pytest.approx(float(expected), abs=1e-6)
    custom = tb.evaluate(
        net,
        post,
        key,
        [("ignored", x, y)],
        num_samples=3,
        unpack=lambda batch: ((batch[1],), {}, batch[2]),
        progress=False,
    )
    torch.testing.assert_close(custom.entropy, reference.entropy)


@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
def test_an_output_pytree_cannot_open_is_refused_not_passed_through(strategy):
    """Before, vmap handed back the last traced sample's object (unstacked, its tensors
    escaped from vmap) and the loop compared tensors with ``!=``."""
    net, post, x, _ = _model()

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, features):
            return _Unregistered(self.net(features))

    opaque_post = {f"net.{name}": node for name, node in post.items()}
    with pytest.raises(
        TypeError,
        match=r"^the module's output holds an object of type _Unregistered, which torch.utils._pytree cannot open.*register_dataclass\)\.$",
    ):
        tb.predict(Opaque(), opaque_post, tb.random.key(0), x, num_samples=3, strategy=strategy)


def test_evaluate_errors_name_the_argument():
    net, post, x, y = _model()
    key = tb.random.key(0)
    with pytest.raises(
        TypeError,
        match=r"batches must be an iterable of batches such as a DataLoader, got a tensor of shape \(83, 6\).*TensorDataset",
    ):
        tb.evaluate(net, post, key, x, num_samples=2)
    with pytest.raises(
        TypeError,
        match=r"batch must be an \(inputs, target\) pair or a dict with 'labels', got an object of type tuple. Pass unpack=",
    ):
        tb.evaluate(net, post, key, [(x, y, y)], num_samples=2, progress=False)
    with pytest.raises(
        ValueError, match=r"a dict batch must hold 'labels' \(the targets\); it has \['features'\]"
    ):
        tb.evaluate(net, post, key, [{"features": x}], num_samples=2, progress=False)

    class Pair(nn.Module):
        def forward(self, a):
            return (net(a), None)

    with pytest.raises(
        TypeError,
        match=r"output must be a callable giving the logits.*got an object of type tuple. Pass output=lambda out: out\[0\]",
    ):
        tb.evaluate(Pair(), {}, key, [(x, y)], num_samples=2, progress=False)
    with pytest.raises(TypeError, match=r"unpack must be a callable"):
        tb.evaluate(net, post, key, [(x, y)], num_samples=2, unpack="first", progress=False)
    with pytest.raises(ValueError, match=r"Accumulator.compute needs at least one example"):
        tb.evaluate(net, post, key, [], num_samples=2, progress=False)


def test_evaluate_progress_line(capsys):
    net, post, x, y = _model()
    loader = DataLoader(TensorDataset(x, y), batch_size=30, generator=_generator())
    tb.evaluate(net, post, tb.random.key(0), loader, num_samples=2, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "83 examples" in err and err.endswith("\n")
    tb.evaluate(net, post, tb.random.key(0), iter(loader), num_samples=2, progress=True)
    assert "83 examples" in capsys.readouterr().err  # no length: the count alone
    tb.evaluate(net, post, tb.random.key(0), loader, num_samples=2, progress=False)
    assert capsys.readouterr().err == ""


def test_evaluate_memory_stays_below_the_whole_sets_logits():
    """W1-sized inputs (784 features), S=64, 50k examples, 10 classes: the whole set's logits
    alone are 64 x 50,000 x 10 float32 = 122 MiB; the streaming run must stay far below."""
    num_samples, count, batch = 64, 50_000, 1_000
    net = mlp((784, 10))
    post = tb.from_module(net, sigma_scale=0.1)

    def batches(count=count):
        for i in range(count // batch):
            x = tb.random.normal(tb.random.fold_in(tb.random.key(9), i), (batch, 784))
            yield x, torch.zeros(batch, dtype=torch.long)

    logits_bytes = num_samples * count * 10 * 4
    key = tb.random.key(0)
    for _ in range(2):  # the allocator's first growth (and auto's timing) is not per example
        tb.evaluate(net, post, key, batches(5_000), num_samples=num_samples, progress=False)
    growth = peak_memory(  # the scoreboard's measure: peak resident set, reset before the run
        lambda: tb.evaluate(net, post, key, batches(), num_samples=num_samples, progress=False),
        torch.device("cpu"),
    )
    assert growth < logits_bytes / 2, (growth / 2**20, logits_bytes / 2**20)


def test_evaluate_hands_chunk_size_and_strategy_to_predict(monkeypatch):
    """Chunking and strategy never change the numbers, so only a spy shows they arrive."""
    import tbfunc.evaluation as evaluation

    seen = []
    real = evaluation.predict

    def spy(*args, **kwargs):
        seen.append((kwargs["chunk_size"], kwargs["strategy"], kwargs["num_samples"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "predict", spy)
    net, post, x, y = _model()
    options = {"num_samples": 4, "chunk_size": 2, "strategy": "loop", "progress": False}
    tb.evaluate(net, post, tb.random.key(0), [(x[:40], y[:40]), (x[40:], y[40:])], **options)
    assert seen == [(2, "loop", 4), (2, "loop", 4)]
