"""``tb.materialize``: the posterior mean (or one draw) written into a plain copy of the module,
and the Bayesian-LoRA recipe that merges it with PEFT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tbfunc as tb
from helpers import data, minilm, mlp, seeded


def _shifted(net, shift=0.5):
    """A posterior whose mean is not the module's weights (else a no-op would pass)."""
    post = tb.from_module(net, sigma_scale=0.2)
    return {name: node._replace(mu=node.mu + shift) for name, node in post.items()}


def test_the_mean_copy_computes_what_functional_call_with_the_mean_computes():
    net = mlp((5, 16, 3))
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    post = _shifted(net)
    x = data(7, 5)
    plain = tb.materialize(net, post)
    assert plain is not net
    expected = torch.func.functional_call(net, tb.mean(post), (x,))
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)
    for name, p in net.named_parameters():  # the original is untouched
        assert torch.equal(p, before[name])
    assert all(p.requires_grad for p in plain.parameters())
    assert not plain(x).allclose(net(x))


def test_a_key_writes_one_draw_the_draw_functional_call_uses():
    net = mlp((5, 16, 3))
    post = _shifted(net)
    x = data(7, 5)
    for seed in (0, 1):
        key = tb.random.key(seed)
        torch.testing.assert_close(
            tb.materialize(net, post, key)(x), tb.functional_call(net, post, key, x)
        )
    first = tb.materialize(net, post, tb.random.key(0))(x)
    assert not first.allclose(tb.materialize(net, post, tb.random.key(1))(x))
    assert not first.allclose(tb.materialize(net, post)(x))


def test_only_posterior_names_change_and_inplace_writes_into_the_module():
    net = mlp((5, 16, 3))
    post = _shifted(net)
    del post["0.bias"]
    plain = tb.materialize(net, post)
    assert torch.equal(plain[0].bias, net[0].bias)  # not in the posterior: kept
    assert torch.equal(plain[0].weight, post["0.weight"].mu)
    same = tb.materialize(net, post, inplace=True)
    assert same is net
    assert torch.equal(net[0].weight, post["0.weight"].mu)


def test_padding_rows_and_tied_weights_stay_as_functional_call_keeps_them():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(6, 4, padding_idx=0)
            self.out = nn.Linear(4, 6, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, ids):
            return self.out(self.embed(ids))

    net = seeded(Tied).eval()
    post = _shifted(net)
    assert list(post) == ["embed.weight"]
    ids = torch.tensor([[0, 1, 2, 5]])
    key = tb.random.key(3)
    for chosen in (None, key):
        plain = tb.materialize(net, post, chosen)
        assert plain.out.weight is plain.embed.weight
        assert torch.equal(plain.embed.weight[0], net.embed.weight[0])  # padding row pinned
        if chosen is None:
            weight = post["embed.weight"].mu.clone()
            weight[0] = net.embed.weight[0]
            reference = torch.func.functional_call(net, {"embed.weight": weight}, (ids,))
        else:
            reference = tb.functional_call(net, post, key, ids)
        torch.testing.assert_close(plain(ids), reference)


def test_a_materialized_model_exports_through_its_state_dict():
    net = mlp((5, 16, 3))
    post = _shifted(net)
    fresh = mlp((5, 16, 3), seed=9)
    fresh.load_state_dict(tb.materialize(net, post).state_dict())
    x = data(4, 5)
    torch.testing.assert_close(fresh(x), torch.func.functional_call(net, tb.mean(post), (x,)))


def test_materialize_errors_name_the_argument():
    net = mlp((5, 16, 3))
    post = tb.from_module(net)
    with pytest.raises(TypeError, match=r"inplace must be a bool, got str 'yes'"):
        tb.materialize(net, post, inplace="yes")
    with pytest.raises(ValueError, match=r"key must be an int64 or uint32 tensor of shape \(2,\)"):
        tb.materialize(net, post, torch.zeros(3, dtype=torch.int64))
    other = tb.from_module(mlp((5, 8, 3)))
    with pytest.raises(ValueError, match=r"posterior\['0.weight'\]"):
        tb.materialize(net, other)


# ----------------------------------------------------------------------------------------------
# PEFT: Bayesian LoRA on the packaged MiniLM, merged for export.


# peft 0.18 asks transformers 5 for a renamed attribute; not our code
LORA_WARNING = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"


def _lora():
    peft = pytest.importorskip("peft")
    model, ids, mask = minilm()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False
    )
    with torch.random.fork_rng():  # init_lora_weights=False: A and B random (B not zero)
        torch.manual_seed(0)
        lora = peft.get_peft_model(model, config).eval()
    return lora, ids, mask


@pytest.mark.filterwarnings(LORA_WARNING)
def test_bayesian_lora_trains_a_matrices_only_and_merges_the_mean():
    lora, ids, mask = _lora()
    post = tb.from_module(lora, include="*lora_A*", sigma_scale=0.1)
    assert post and all(".lora_A." in name for name in post)
    prior = tb.pretrained_prior(lora, post, sigma=0.1)  # centred on A as it starts
    b_before = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_B" in n}
    opt = torch.optim.Adam(
        [*tb.parameters(post), *(p for n, p in lora.named_parameters() if "lora_B" in n)], lr=1e-2
    )
    target = data(2, 384, seed=4)

    def loss_fn(out, y):
        return (out.last_hidden_state[:, 0] - y).pow(2).mean()

    mu_before = {n: node.mu.detach().clone() for n, node in post.items()}
    for step in range(2):
        loss = tb.nelbo(
            lora,
            post,
            tb.random.fold_in(tb.random.key(0), step),
            (ids,),
            target,
            {"attention_mask": mask},
            num_data=100,
            loss_fn=loss_fn,
            prior=prior,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(post[n].mu, mu_before[n]) for n in post)  # A's posterior trained
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # B trained deterministically beside it
            assert not torch.equal(p, b_before[name])
        elif "lora_A" not in name:
            assert not p.requires_grad  # the frozen base stays frozen
    mean_out = torch.func.functional_call(
        lora, tb.mean(post), (ids,), {"attention_mask": mask}
    ).last_hidden_state
    merged = tb.materialize(lora, post).merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(ids, attention_mask=mask).last_hidden_state
        own = lora(ids, attention_mask=mask).last_hidden_state
    # merged (W + B A) x against W x + B (A x): rounding apart, which the thread count and
    # the BLAS kernels move (2.8e-5 seen after other tests); another A is 1e-3 or more apart
    torch.testing.assert_close(got, mean_out.detach(), atol=1e-4, rtol=1e-4)
    assert (got - own).abs().max() > 1e-3  # the module's own A would have been another model
    # the LoRA model itself still holds its own A: the merge happened on a copy
    assert any("lora_A" in name for name, _ in lora.named_parameters())
