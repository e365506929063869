"""``strategy="auto"``: it times a call class once (not once per batch shape), keeps a bounded
cache, and times MC dropout the way the call runs it (masks from keys, never the global RNG)."""

from __future__ import annotations

import pytest
import torch

import tbfunc as tb
from helpers import data, minilm, mlp
from tbfunc import _predicting


@pytest.fixture
def timings(monkeypatch):
    """Calls of the synchronous timing (choose_strategy's) and of predict's trial decisions."""
    calls = {"timed": 0, "decided": 0}
    real_timed, real_decide = _predicting.timed, _predicting.decide

    def timed(*args, **kwargs):
        calls["timed"] += 1
        return real_timed(*args, **kwargs)

    def decide(*args, **kwargs):
        calls["decided"] += 1
        return real_decide(*args, **kwargs)

    monkeypatch.setattr(_predicting, "timed", timed)
    monkeypatch.setattr(_predicting, "decide", decide)
    return calls


def test_auto_times_a_coarse_class_once_not_every_shape(timings):
    net = mlp((6, 16, 3))
    post = tb.from_module(net, sigma_scale=0.1)
    key = tb.random.key(0)
    for batch in (64, 63, 50, 44):  # 258-384 values: one size class, one trial
        tb.predict(net, post, key, data(batch, 6), num_samples=4)
    assert timings == {"timed": 0, "decided": 1}  # no timing forwards at all
    assert len(_predicting.CHOICES[net]) == 1
    with torch.no_grad():  # the grad mode changes both strategies alike: no new trial
        tb.predict(net, post, key, data(64, 6), num_samples=4)
    assert timings["decided"] == 1
    tb.predict(net, post, key, data(500, 6), num_samples=4)  # another size class: a trial
    tb.predict(net, post, key, data(64, 6), num_samples=32)  # another sample count class
    assert timings["decided"] == 3 and len(_predicting.CHOICES[net]) == 3
    tb.predict(net, post, key, data(64, 6), num_samples=1)  # one sample: the loop, no trial
    assert timings["decided"] == 3


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_the_trial_split_gives_the_explicit_strategies_result(chunk):
    net = mlp((6, 16, 3))
    post = tb.from_module(net, sigma_scale=0.1)
    x, key = data(10, 6), tb.random.key(1)
    auto = tb.predict(net, post, key, x, num_samples=7, chunk_size=chunk)  # the trial call
    chosen = next(iter(_predicting.CHOICES[net].values())) if chunk != 1 else "loop"
    explicit = tb.predict(net, post, key, x, num_samples=7, chunk_size=chunk, strategy=chosen)
    assert torch.equal(auto, explicit)  # the chosen strategy's bits, in the trial call too
    assert torch.equal(auto, tb.predict(net, post, key, x, num_samples=7, chunk_size=chunk))
    assert auto.shape == (7, 10, 3)


def test_an_evaluation_loop_runs_the_slower_strategy_for_one_sample_only():
    """The trial is inside the first call: one sample by the slower strategy, not a batch."""
    import time

    class Sleepy(torch.nn.Module):
        def __init__(self, slow):
            super().__init__()
            self.linear, self.slow, self.forwards = torch.nn.Linear(6, 3), slow, []

        def forward(self, x):
            batched = torch._C._functorch.is_batchedtensor(self.linear.weight)
            self.forwards.append("vmap" if batched else "loop")
            if (self.slow == "vmap") == batched:
                time.sleep(0.05)
            return self.linear(x)

    from helpers import seeded

    for slow, fast in (("vmap", "loop"), ("loop", "vmap")):
        net = seeded(lambda slow=slow: Sleepy(slow)).eval()
        post = tb.from_module(net, sigma_scale=0.1)
        for batch in (64, 60, 57, 50, 49, 44):
            tb.predict(net, post, tb.random.key(batch), data(batch, 6), num_samples=4)
        assert list(_predicting.CHOICES[net].values()) == [fast]
        # the trial: the first sample looped and all four vmapped, the loop's other three
        # only when it wins; then the faster alone (4 looped forwards a batch, or 1 vmapped)
        later = ["loop"] * 4 * 5 if fast == "loop" else ["vmap"] * 5
        rest = ["loop"] * 3 if fast == "loop" else []
        assert net.forwards == ["loop", "vmap", *rest, *later]


def test_the_choice_cache_is_bounded():
    net = mlp((6, 4, 3))
    post = tb.from_module(net, sigma_scale=0.1)
    x = data(1024, 6)
    for rows in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        for samples in (1, 2, 4, 8):
            tb.choose_strategy(net, post, x[:rows], num_samples=samples)  # 44 classes
    assert 0 < len(_predicting.CHOICES[net]) <= _predicting._MAX_CHOICES


@pytest.mark.filterwarnings("ignore:.*:UserWarning")
def test_a_train_mode_transformer_with_mc_dropout_and_the_default_strategy():
    """Attention dropout follows the module's training flag; the timing must key it too."""
    model, ids, mask = minilm()
    model.train()
    try:
        post = tb.from_module(model, include="encoder.layer.5.output.dense.*", sigma_scale=0.05)
        key = tb.random.key(0)
        chosen = tb.choose_strategy(model, post, ids, {"attention_mask": mask}, dropout=True)
        assert chosen in ("vmap", "loop")
        auto = tb.predict(
            model, post, key, ids, {"attention_mask": mask}, num_samples=2, dropout=True
        )
        loop = tb.predict(
            model,
            post,
            key,
            ids,
            {"attention_mask": mask},
            num_samples=2,
            dropout=True,
            strategy="loop",
        )
        torch.testing.assert_close(auto.last_hidden_state, loop.last_hidden_state)
        assert model.training  # its flags were put back
    finally:
        model.eval()
