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
    calls = []
    real = _predicting.timed

    def spy(*args, **kwargs):
        calls.append(args[3] if len(args) > 3 else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(_predicting, "timed", spy)
    return calls


def test_auto_times_a_coarse_class_once_not_every_shape(timings):
    net = mlp((6, 16, 3))
    post = tb.from_module(net, sigma_scale=0.1)
    key = tb.random.key(0)
    for batch in (64, 63, 50, 44):  # 258-384 values: one size class, one timing
        tb.predict(net, post, key, data(batch, 6), num_samples=4)
    assert len(timings) == 1
    with torch.no_grad():  # the grad mode changes both strategies alike: no new timing
        tb.predict(net, post, key, data(64, 6), num_samples=4)
    assert len(timings) == 1
    tb.predict(net, post, key, data(500, 6), num_samples=4)  # another size class: timed
    tb.predict(net, post, key, data(64, 6), num_samples=32)  # another sample count class
    assert len(timings) == 3


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
