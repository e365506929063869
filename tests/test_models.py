"""Real models a user brings (issue 8): a packaged pretrained MiniLM with Hugging Face outputs,
attention returning None, RNNs, embeddings with padding, compiled modules and compiled calls."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers
import tbfunc as tb
from helpers import data, mlp, seeded
from tbfunc._predicting import CHOICES

KEY = tb.random.key(0)
STRATEGIES = [("auto", None), ("vmap", None), ("loop", None), ("vmap", 2), ("loop", 2)]


@pytest.fixture(scope="module")
def minilm():
    return helpers.minilm()


# -- 5. outputs registered with torch's pytree ------------------------------------------------


@pytest.mark.parametrize(("strategy", "chunk"), STRATEGIES)
def test_hugging_face_outputs_keep_their_type_under_every_strategy(minilm, strategy, chunk):
    model, ids, mask = minilm
    post = tb.from_module(model, include="encoder.layer.5.output.*", sigma_scale=0.05)
    out = tb.predict(
        model,
        post,
        KEY,
        (ids,),
        {"attention_mask": mask},
        num_samples=3,
        strategy=strategy,
        chunk_size=chunk,
    )
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert out.last_hidden_state.shape == (3, 2, 5, 384) and out.pooler_output.shape == (3, 2, 384)
    keys = tb.random.split(KEY, 3)
    for s in range(3):
        one = tb.functional_call(model, post, keys[s], (ids,), {"attention_mask": mask})
        assert type(one) is type(out)
        torch.testing.assert_close(out.pooler_output[s], one.pooler_output, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.pooler_output[0], out.pooler_output[1])


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_nelbo_hands_loss_fn_what_the_module_returned(minilm, strategy):
    model, ids, mask = minilm
    post = tb.from_module(model, include="pooler.*", sigma_scale=0.05)
    seen = []

    def loss_fn(output, target):
        seen.append(type(output).__name__)
        return (output.pooler_output - target).pow(2).mean()

    value = tb.nelbo(
        model,
        post,
        KEY,
        (ids,),
        torch.zeros(2, 384),
        {"attention_mask": mask},
        num_data=10,
        loss_fn=loss_fn,
        num_samples=2,
        strategy=strategy,
    )
    assert seen == ["BaseModelOutputWithPoolingAndCrossAttentions"] * 2
    assert torch.isfinite(value)


# -- 7. non-tensor outputs -----------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "chunk"), STRATEGIES)
def test_none_outputs_pass_through(strategy, chunk):
    mha = seeded(lambda: nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    post = tb.from_module(mha, sigma_scale=0.1)
    q = data(2, 3, 8)
    out, weights = tb.predict(
        mha,
        post,
        KEY,
        (q, q, q),
        {"need_weights": False},
        num_samples=3,
        strategy=strategy,
        chunk_size=chunk,
    )
    assert weights is None and out.shape == (3, 2, 3, 8)
    loop = tb.predict(
        mha, post, KEY, (q, q, q), {"need_weights": False}, num_samples=3, strategy="loop"
    )
    torch.testing.assert_close(out, loop[0], rtol=1e-5, atol=1e-6)


class Tagged(nn.Module):
    """Returns a Python value beside the tensor; ``varying`` makes it depend on the weights."""

    def __init__(self, varying: bool) -> None:
        super().__init__()
        self.linear, self.varying = nn.Linear(3, 2), varying

    def forward(self, x):
        out = self.linear(x)
        return out, (round(float(self.linear.bias[0]), 6) if self.varying else "tag")


def test_non_tensor_leaves_must_agree_across_samples_in_the_loop():
    x = data(4, 3)
    same = seeded(lambda: Tagged(False)).eval()
    out, tag = tb.predict(same, tb.from_module(same), KEY, x, num_samples=2, strategy="loop")
    assert tag == "tag" and out.shape == (2, 4, 2)
    varying = seeded(lambda: Tagged(True)).eval()
    with pytest.raises(
        ValueError, match="output leaf 1 must be a tensor or equal across samples, got"
    ):
        tb.predict(
            varying, tb.from_module(varying, sigma=0.5), KEY, x, num_samples=2, strategy="loop"
        )


# -- 9. strategy choice ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_auto_never_picks_vmap_for_rnns(kind):
    """aten::lstm and its kin have no vmap batching rule, on the CPU as on CUDA."""
    rnn = seeded(lambda: kind(4, 6, batch_first=True)).eval()
    post = tb.from_module(rnn, sigma_scale=0.1)
    x = data(2, 5, 4)
    assert tb.choose_strategy(rnn, post) == "loop"
    out, _ = tb.predict(rnn, post, KEY, x, num_samples=3)
    loop, _ = tb.predict(rnn, post, KEY, x, num_samples=3, strategy="loop")
    torch.testing.assert_close(out, loop, rtol=0, atol=0)
    y = data(2, 5, 6)
    loss = tb.nelbo(
        rnn, post, KEY, x, y, loss_fn=lambda o, t: F.mse_loss(o[0], t), num_data=2, num_samples=2
    )
    assert torch.isfinite(loss)


class Slow(nn.Module):
    """An MLP whose forward sleeps: per call (favours vmap), or when its weight is batched
    (favours the loop). Counts its calls."""

    def __init__(self, when: str) -> None:
        super().__init__()
        self.linear, self.when, self.calls = nn.Linear(3, 2), when, 0

    def forward(self, x):
        self.calls += 1
        batched = torch._C._functorch.is_batchedtensor(self.linear.weight)
        if self.when == "per call" or (self.when == "batched" and batched):
            time.sleep(0.02)
        return self.linear(x)


@pytest.mark.parametrize(("when", "expected"), [("per call", "vmap"), ("batched", "loop")])
def test_auto_times_both_strategies_once_and_keeps_the_faster(when, expected):
    net = seeded(lambda: Slow(when)).eval()
    post = tb.from_module(net)
    x = data(4, 3)
    assert tb.choose_strategy(net, post) == "vmap"  # without inputs nothing can be timed
    assert tb.choose_strategy(net, post, x, num_samples=4) == expected
    calls = net.calls
    out = tb.predict(net, post, KEY, x, num_samples=4)
    assert tb.choose_strategy(net, post, x, num_samples=4) == expected
    timed_again = net.calls - calls - (1 if expected == "vmap" else 4)
    assert timed_again == 0, "the choice is cached per module, posterior and input shapes"
    assert list(CHOICES[net].values()) == [expected]
    torch.testing.assert_close(out, tb.predict(net, post, KEY, x, num_samples=4, strategy="loop"))
    tb.predict(net, post, KEY, data(5, 3), num_samples=4)
    assert len(CHOICES[net]) == 1, "a size in the same power-of-two class is not timed again"
    # a new size class: predict's own call is the trial, all four samples vmapped and the
    # first looped (no timing forwards); the loop's other three run only when it wins
    before = net.calls
    fresh = tb.predict(net, post, KEY, data(40, 3), num_samples=4)
    assert net.calls - before == (2 if expected == "vmap" else 5)
    assert len(CHOICES[net]) == 2 and list(CHOICES[net].values()) == [expected, expected]
    explicit = tb.predict(net, post, KEY, data(40, 3), num_samples=4, strategy=expected)
    assert torch.equal(fresh, explicit)  # the trial call gives the chosen strategy's bits


# -- 3. rows the module keeps fixed ------------------------------------------------------------


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4, padding_idx=0)
        self.head = nn.Linear(4, 2)

    def forward(self, tokens):
        return self.head(self.embed(tokens).sum(1))


def test_embedding_padding_rows_stay_fixed_in_every_draw():
    net = seeded(Bag).eval()
    post = tb.from_module(net, sigma=0.5)
    tokens = torch.tensor([[3, 4, 0, 0], [5, 0, 0, 0]])
    unpadded = torch.tensor([[3, 4], [5, 5]])
    drifted = dict(post)
    weight = post["embed.weight"]
    drifted["embed.weight"] = weight._replace(
        mu=torch.cat([torch.full((1, 4), 7.0), weight.mu[1:]]),
        rho=torch.cat([torch.full((1, 4), 3.0), weight.rho[1:]]),
    )
    for strategy in ("vmap", "loop"):
        a = tb.predict(net, post, KEY, tokens, num_samples=4, strategy=strategy)
        b = tb.predict(net, drifted, KEY, tokens, num_samples=4, strategy=strategy)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # padding adds the module's own row (zeros) whatever the draw: the first sequence's
    # prediction equals the unpadded one's
    many = tb.predict(net, post, KEY, tokens, num_samples=4)
    plain = tb.predict(net, post, KEY, unpadded[:1], num_samples=4)
    torch.testing.assert_close(many[:, 0], plain[:, 0], rtol=1e-6, atol=1e-6)
    one = tb.functional_call(net, drifted, KEY, tokens)
    torch.testing.assert_close(one, tb.functional_call(net, post, KEY, tokens), rtol=0, atol=0)
    loss = tb.nelbo(
        net,
        drifted,
        KEY,
        tokens,
        torch.zeros(2, dtype=torch.long),
        loss_fn=F.cross_entropy,
        num_data=2,
    )
    base = tb.nelbo(
        net,
        post,
        KEY,
        tokens,
        torch.zeros(2, dtype=torch.long),
        loss_fn=F.cross_entropy,
        num_data=2,
    )
    assert torch.isfinite(loss) and torch.isfinite(base)


# -- 12. compiled modules --------------------------------------------------------------------


def test_compiled_modules_share_names_and_noise_with_the_eager_module():
    net = mlp()
    compiled = torch.compile(net)
    eager_post = tb.from_module(net, sigma_scale=0.1)
    compiled_post = tb.from_module(compiled, sigma_scale=0.1)
    assert list(compiled_post) == list(eager_post) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    raw = {f"_orig_mod.{n}": node for n, node in eager_post.items()}
    drawn, drawn_raw = tb.sample(eager_post, KEY), tb.sample(raw, KEY)
    for name in eager_post:
        assert torch.equal(drawn[name], drawn_raw[f"_orig_mod.{name}"])
    x = data(3, 5)
    expected = tb.predict(net, eager_post, KEY, x, num_samples=3, strategy="loop")
    for module, post in ((compiled, eager_post), (compiled, raw), (net, compiled_post)):
        out = tb.predict(module, post, KEY, x, num_samples=3, strategy="loop")
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(
        ValueError,
        match=r"posterior has two nodes for '0.bias' \(one of them under torch.compile's '_orig_mod.' prefix\); keep one.",
    ):
        tb.sample({**eager_post, "_orig_mod.0.bias": eager_post["0.bias"]}, KEY)


# -- 6. torch.compile(fullgraph=True) of what the README says composes -------------------------


def compile_cases():
    net = mlp()
    post = tb.from_module(net, sigma_scale=0.1)
    x, y = data(4, 5), torch.tensor([0, 1, 2, 0])
    return {
        "predict": lambda: tb.predict(net, post, KEY, x, num_samples=3, chunk_size=2),
        "predict-loop": lambda: tb.predict(net, post, KEY, x, num_samples=3, strategy="loop"),
        "functional_call": lambda: tb.functional_call(net, post, KEY, x),
        "sample": lambda: tb.sample(post, KEY, num_samples=2),
        "kl_divergence": lambda: tb.kl_divergence(post),
        "nelbo": lambda: tb.nelbo(
            net, post, KEY, x, y, loss_fn=F.cross_entropy, num_data=8, num_samples=2
        ),
    }


@pytest.mark.parametrize("name", list(compile_cases()))
def test_everything_compiles_with_fullgraph(name):
    """Default options, fullgraph=True. predict goes through inductor; the rest through
    aot_eager, which traces the same graph (where fullgraph fails) without inductor's
    minute of code generation on 2 cores."""
    call = compile_cases()[name]
    torch._dynamo.reset()
    backend = "inductor" if name == "predict" else "aot_eager"
    compiled = torch.compile(call, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(), call(), rtol=1e-5, atol=1e-6)
