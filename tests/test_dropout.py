"""Key-driven Monte-Carlo dropout (issue 10): masks are a function of the key, vmap equals the
loop, the global RNG and the layers' flags are untouched, and the masks have the right law."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tbfunc as tb
from helpers import data, minilm, seeded

KEY = tb.random.key(0)


def dropout_mlp() -> nn.Module:
    return seeded(
        lambda: nn.Sequential(
            nn.Linear(5, 32),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(32, 32),
            nn.SELU(),
            nn.AlphaDropout(0.2),
            nn.Linear(32, 3),
        )
    ).eval()


def dropout_cnn() -> nn.Module:
    return seeded(
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.Dropout2d(0.5),
            nn.SELU(),
            nn.FeatureAlphaDropout(0.3),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 3),
        )
    ).eval()


CASES = {"mlp": (dropout_mlp, (6, 5)), "cnn": (dropout_cnn, (3, 2, 5, 5))}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bayesian", [False, True])
def test_masks_are_a_function_of_the_key_and_vmap_equals_the_loop(case, bayesian):
    build, shape = CASES[case]
    net = build()
    post = tb.from_module(net, sigma_scale=0.1) if bayesian else {}
    x = data(*shape)
    flags = [m.training for m in net.modules()]
    vmapped = tb.predict(net, post, KEY, x, num_samples=5, strategy="vmap", dropout=True)
    loop = tb.predict(net, post, KEY, x, num_samples=5, strategy="loop", dropout=True)
    chunked = tb.predict(net, post, KEY, x, num_samples=5, chunk_size=2, dropout=True)
    torch.testing.assert_close(vmapped, loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked, loop, rtol=1e-5, atol=1e-6)
    again = tb.predict(net, post, KEY, x, num_samples=5, strategy="loop", dropout=True)
    assert torch.equal(again, loop)
    keys = tb.random.split(KEY, 5)
    for i in (0, 3):
        one = tb.functional_call(net, post, keys[i], x, dropout=True)
        torch.testing.assert_close(one, loop[i], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loop[0], loop[1])  # samples draw different masks
    other = tb.predict(net, post, tb.random.key(1), x, num_samples=5, strategy="loop", dropout=True)
    assert not torch.allclose(other, loop)
    plain = tb.predict(net, post, KEY, x, num_samples=5, strategy="loop")
    assert not torch.allclose(plain, loop)  # the switch is not ignored
    assert [m.training for m in net.modules()] == flags


def test_flags_are_restored_when_the_call_raises():
    net = dropout_mlp()
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        tb.predict(net, {}, KEY, data(4, 7), num_samples=2, dropout=True)
    assert not any(m.training for m in net.modules())
    net.train()
    net[2].train()  # a user's own flags, whatever they are, come back as they were
    net[5].eval()
    before = [m.training for m in net.modules()]
    tb.predict(net, {}, KEY, data(4, 5), num_samples=2, dropout=True)
    assert [m.training for m in net.modules()] == before


def test_the_masks_have_the_right_law():
    """Dropout(p): zeros with probability p (a 6-sigma binomial band over 80,000 values), the
    rest scaled by 1 / (1 - p); alpha dropout takes exactly PyTorch's two values."""
    count, p = 20000, 0.3
    out = tb.predict(nn.Dropout(p), {}, KEY, torch.ones(count), num_samples=4, dropout=True)
    rate = (out == 0).double().mean().item()
    assert abs(rate - p) < 6 * math.sqrt(p * (1 - p) / out.numel())
    assert torch.allclose(out[out != 0], torch.tensor(1 / (1 - p)))
    alpha = tb.predict(
        nn.AlphaDropout(0.2), {}, KEY, torch.ones(count), num_samples=2, dropout=True
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = F.alpha_dropout(torch.ones(count), 0.2, training=True)
    torch.testing.assert_close(alpha.unique(), reference.unique())
    channels = tb.predict(
        nn.Dropout2d(0.5), {}, KEY, torch.ones(2, 64, 3, 3), num_samples=2, dropout=True
    )
    per_channel = channels.flatten(-2)
    assert torch.equal(per_channel.amin(-1), per_channel.amax(-1))  # one draw per channel
    assert 0 < (per_channel[..., 0] == 0).double().mean() < 1


def test_nelbo_trains_with_keyed_dropout_in_training_mode():
    net = dropout_mlp().train()
    post = tb.from_module(net, sigma_scale=0.1)
    x, y = data(8, 5), torch.arange(8) % 3
    options = dict(loss_fn=F.cross_entropy, num_data=80, num_samples=3)
    with pytest.raises(ValueError, match="module must be in eval mode for nelbo, got Dropout '2'"):
        tb.nelbo(net, post, KEY, x, y, **options)
    value = tb.nelbo(net, post, KEY, x, y, dropout=True, **options)
    keys = tb.random.split(KEY, 3)
    nll = torch.stack(
        [F.cross_entropy(tb.functional_call(net, post, k, x, dropout=True), y) for k in keys]
    ).mean()
    torch.testing.assert_close(value, nll + tb.kl_divergence(post) / 80)
    vmapped = tb.nelbo(net, post, KEY, x, y, dropout=True, strategy="vmap", **options)
    torch.testing.assert_close(vmapped, value, rtol=1e-5, atol=1e-6)
    grads = torch.func.grad(lambda p: tb.nelbo(net, p, KEY, x, y, dropout=True, **options))(post)
    assert torch.isfinite(grads["0.weight"].mu).all()
    assert net.training and all(m.training for m in net.modules())


def test_the_packaged_minilm_with_module_and_attention_dropout():
    """eval(): the nn.Dropout layers are switched on; train(): Hugging Face's attention passes
    dropout_p=0.1 to scaled_dot_product_attention, which is keyed too (the global RNG, checked
    by the autouse fixture, stays untouched)."""
    model, ids, mask = minilm()
    kwargs = {"attention_mask": mask}
    outputs = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        runs = {
            strategy: tb.predict(
                model, {}, KEY, (ids,), kwargs, num_samples=3, strategy=strategy, dropout=True
            ).pooler_output
            for strategy in ("vmap", "loop")
        }
        torch.testing.assert_close(runs["vmap"], runs["loop"], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(runs["loop"][0], runs["loop"][1])
        outputs[mode] = runs["loop"]
        assert model.training == (mode == "train")
    assert not torch.allclose(outputs["eval"], outputs["train"])  # attention dropout is on


def test_dropout_alone_vmaps_over_the_mask_keys():
    net = dropout_mlp()
    assert tb.choose_strategy(net, {}, data(2, 5)) == "loop"  # nothing to batch
    assert tb.choose_strategy(net, {}, data(2, 5), dropout=True) == "vmap"


def test_dropout_must_be_a_bool():
    with pytest.raises(TypeError, match="dropout must be a bool, got str 'yes'"):
        tb.predict(dropout_mlp(), {}, KEY, data(2, 5), num_samples=2, dropout="yes")
