"""Whole models: from_module, sample, mean, functional_call, predict, and their composition."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

import tbfunc as tb
from helpers import data, mlp, seeded
from tbfunc._sampling import hash32

KEY = tb.random.key(0)


# -- from_module --------------------------------------------------------------------------------


def test_from_module_covers_floating_parameters_and_leaves_module_alone():
    net = mlp()
    before = {n: p.clone() for n, p in net.named_parameters()}
    post = tb.from_module(net, sigma_scale=0.1)
    assert list(post) == [n for n, _ in net.named_parameters()]
    for name, node in post.items():
        assert isinstance(node, tb.PretrainedGaussianPosterior)
        assert torch.equal(node.mu, before[name])
        torch.testing.assert_close(node.sigma, (0.1 * before[name].abs()).clamp_min(1e-3))
    for name, param in net.named_parameters():
        assert torch.equal(param, before[name]) and isinstance(param, nn.Parameter)


def test_from_module_include_exclude():
    net = mlp((5, 6, 7, 3))
    assert list(tb.from_module(net, include="*.weight")) == ["0.weight", "2.weight", "4.weight"]
    assert list(tb.from_module(net, include=["4.*"])) == ["4.weight", "4.bias"]
    assert list(tb.from_module(net, exclude="*.bias")) == ["0.weight", "2.weight", "4.weight"]
    only_big = tb.from_module(net, include=lambda name, p: p.numel() >= 30)
    assert list(only_big) == ["0.weight", "2.weight"]
    assert list(tb.from_module(net, include="*.weight", exclude="0.*")) == ["2.weight", "4.weight"]


def test_from_module_random_family_needs_a_key():
    net = mlp()
    a = tb.from_module(net, tb.GaussianPosterior, key=tb.random.key(1))
    b = tb.from_module(net, tb.GaussianPosterior, key=tb.random.key(1))
    assert all(torch.equal(a[n].mu, b[n].mu) for n in a)
    assert not torch.equal(a["0.bias"].mu[:3], a["2.bias"].mu[:3])
    with pytest.raises(ValueError, match=r"key must be given: GaussianPosterior.from_param draws"):
        tb.from_module(net, tb.GaussianPosterior)
    with pytest.raises(ValueError, match="key must be None: PretrainedGaussianPosterior"):
        tb.from_module(net, key=KEY)


def test_from_module_errors():
    net = mlp()
    with pytest.raises(
        ValueError,
        match=r"include pattern 'head\.\*' matches no floating-point parameter; the names are \['0.weight'",
    ):
        tb.from_module(net, include="head.*")
    with pytest.raises(ValueError, match=r"exclude pattern 'bias' matches no"):
        tb.from_module(net, exclude="bias")
    with pytest.raises(TypeError, match="module must be an nn.Module, got an object of type dict"):
        tb.from_module({})
    with pytest.raises(TypeError, match="posterior must be a posterior family"):
        tb.from_module(net, posterior="gaussian")
    with pytest.raises(
        TypeError, match="include must be a glob string, a list of them or a predicate"
    ):
        tb.from_module(net, include=[3])


# -- sample and mean ---------------------------------------------------------------------------


def test_num_samples_equals_split_keys():
    post = tb.from_module(mlp(), sigma_scale=0.1)
    many = tb.sample(post, KEY, num_samples=5)
    for i, key in enumerate(tb.random.split(KEY, 5)):
        one = tb.sample(post, key)
        assert all(torch.equal(many[n][i], one[n]) for n in post)
    assert all(many[n].shape == (5, *post[n].mu.shape) for n in post)


def test_fused_and_autograd_paths_draw_the_same_bits():
    """Without gradients the CPU writes mu + sigma * eps while drawing; with them the op path
    runs: the draws must not depend on which one ran."""
    post = tb.from_module(mlp(), sigma_scale=0.1)
    plain = tb.sample(post, KEY, num_samples=3)
    tracked = {
        n: tb.PretrainedGaussianPosterior(p.mu.clone().requires_grad_(), p.rho)
        for n, p in post.items()
    }
    for num_samples in (3, None):
        recorded = tb.sample(tracked, KEY, num_samples=num_samples)
        reference = plain if num_samples else tb.sample(post, KEY)
        assert all(recorded[n].requires_grad for n in post)
        assert all(torch.equal(recorded[n].detach(), reference[n]) for n in post)


def test_node_noise_is_keyed_by_its_path():
    post = tb.from_module(mlp((5, 6, 7, 3)))
    drawn = tb.sample(post, KEY)
    for name, node in post.items():
        assert torch.equal(drawn[name], node.sample(tb.random.fold_in(KEY, hash32(name))))
    # making one more or one fewer layer Bayesian, or reordering, changes no other draw
    fewer = {n: post[n] for n in reversed(list(post)) if n != "2.weight"}
    redrawn = tb.sample(fewer, KEY)
    assert all(torch.equal(redrawn[n], drawn[n]) for n in fewer)
    # a lone node at the root uses the key itself
    assert torch.equal(tb.sample(post["0.bias"], KEY), post["0.bias"].sample(KEY))


def test_nested_trees_and_tensor_leaves():
    post = tb.from_module(mlp())
    fixed = torch.ones(2)
    tree = {"a": [post["0.weight"], fixed], "b": (post["2.bias"],)}
    drawn = tb.sample(tree, KEY, num_samples=3)
    assert drawn["a"][0].shape == (3, 16, 5) and drawn["b"][0].shape == (3, 3)
    assert torch.equal(drawn["a"][1], fixed.expand(3, 2))
    one = tb.sample(tree, KEY)
    assert torch.equal(one["a"][0], post["0.weight"].sample(tb.random.fold_in(KEY, hash32("a.0"))))


def test_mean_is_the_tree_of_mu():
    post = tb.from_module(mlp())
    means = tb.mean(post)
    assert list(means) == list(post)
    assert all(means[n] is post[n].mu for n in post)


class Laplace(NamedTuple):
    """A user-defined family, to check the protocol is enough."""

    mu: torch.Tensor
    rho: torch.Tensor

    @classmethod
    def from_param(cls, param):
        return cls(param.detach().clone(), torch.full_like(param, -2.0))

    @property
    def sigma(self):
        return torch.nn.functional.softplus(self.rho)

    @property
    def distribution(self):
        return torch.distributions.Laplace(self.mu, self.sigma)

    def sample(self, key):
        u = tb.random.normal(key, self.mu.shape, dtype=self.mu.dtype)
        return self.mu + self.sigma * torch.sign(u) * u.abs()


def test_user_defined_family():
    net = mlp()
    post = tb.from_module(net, Laplace)
    assert isinstance(post["0.weight"], tb.VariationalPosterior)
    many = tb.sample(post, KEY, num_samples=2)
    key1 = tb.random.split(KEY, 2)[1]
    assert torch.equal(
        many["0.bias"][1], post["0.bias"].sample(tb.random.fold_in(key1, hash32("0.bias")))
    )
    out = tb.predict(net, post, KEY, data(4, 5), num_samples=2)
    assert out.shape == (2, 4, 3)


def test_hash_collisions_are_refused():
    node = tb.from_module(mlp())["0.bias"]
    assert hash32("layer822778.weight") == hash32("layer1148682.weight")
    with pytest.raises(
        ValueError,
        match="posterior paths 'layer[0-9]+.weight' and 'layer[0-9]+.weight' hash to the same 32-bit value, so they would share noise",
    ):
        tb.sample({"layer822778.weight": node, "layer1148682.weight": node}, KEY)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_sample_keeps_parameter_dtype(dtype):
    net = mlp().to(dtype)
    post = tb.from_module(net)
    drawn = tb.sample(post, KEY, num_samples=2)
    assert all(drawn[n].dtype == dtype for n in post)
    out = tb.predict(net, post, KEY, data(3, 5, dtype=dtype), num_samples=2)
    assert out.dtype == dtype and torch.isfinite(out).all()


# -- functional_call and predict -----------------------------------------------------------------


def test_functional_call_is_torch_func_functional_call_with_sampled_weights():
    net = mlp()
    post = tb.from_module(net, include="2.*", sigma_scale=0.2)
    x = data(4, 5)
    expected = torch.func.functional_call(net, tb.sample(post, KEY), (x,))
    assert torch.equal(tb.functional_call(net, post, KEY, (x,)), expected)
    # the deterministic part is the module's own
    assert torch.equal(tb.functional_call(net, {}, KEY, x), net(x))


def loop_reference(module, post, key, args, num_samples):
    keys = tb.random.split(key, num_samples)
    return torch.stack([tb.functional_call(module, post, k, args) for k in keys])


class Tied(nn.Module):
    """An embedding shared with the output layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


def cnn():
    net = seeded(
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 5),
        )
    )
    # non-trivial running statistics, so the test sees that the buffers are used
    net[1].running_mean.copy_(torch.linspace(-1, 1, 4))
    net[1].running_var.copy_(torch.linspace(0.5, 2, 4))
    return net.eval()


MODELS = {
    "mlp": lambda: (mlp(), data(6, 5)),
    "cnn_bn": lambda: (cnn(), data(2, 3, 8, 8)),
    "transformer": lambda: (
        seeded(
            lambda: nn.TransformerEncoder(
                nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True),
                2,
                enable_nested_tensor=False,
            )
        ).eval(),
        data(2, 5, 8),
    ),
    "tied": lambda: (seeded(Tied).eval(), torch.tensor([[1, 2, 3], [4, 5, 10]])),
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
def test_predict_equals_the_loop(model, strategy):
    net, x = MODELS[model]()
    post = tb.from_module(net, sigma_scale=0.1)
    expected = loop_reference(net, post, KEY, (x,), 5)
    for chunk in (None, 2):
        out = tb.predict(net, post, KEY, (x,), num_samples=5, strategy=strategy, chunk_size=chunk)
        if strategy == "loop":
            assert torch.equal(out, expected)  # the very same kernels
        else:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert out.shape[0] == 5 and not torch.allclose(out[0], out[1])


def test_tied_weights_stay_tied():
    net = seeded(Tied).eval()
    post = tb.from_module(net)
    assert list(post) == ["embed.weight"]
    ids = torch.tensor([0, 3, 7])
    weight = tb.sample(post, KEY)["embed.weight"]
    expected = torch.tanh(weight[ids]) @ weight.T
    torch.testing.assert_close(tb.functional_call(net, post, KEY, ids), expected)


def test_partial_posterior_and_multi_head_attention():
    attn = seeded(lambda: nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    x = data(2, 4, 8)
    post = tb.from_module(attn, include="out_proj.*")
    assert list(post) == ["out_proj.weight", "out_proj.bias"]

    def first(mod, p, k):
        return tb.functional_call(mod, p, k, (x, x, x))[0]

    keys = tb.random.split(KEY, 3)
    expected = torch.stack([first(attn, post, k) for k in keys])
    out = tb.predict(attn, post, KEY, (x, x, x), num_samples=3)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    assert out[1].shape == (3, 2, 4, 4)  # the attention weights come back too, stacked


def test_auto_strategy_choice():
    assert tb.choose_strategy(mlp(), tb.from_module(mlp())) == "vmap"
    net = cnn()
    assert tb.choose_strategy(net, tb.from_module(net)) == "loop"
    assert tb.choose_strategy(net, tb.from_module(net, include="5.*")) == "vmap"


def test_predict_does_not_modify_the_module():
    net = cnn()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    tb.predict(net, tb.from_module(net), KEY, data(2, 3, 8, 8), num_samples=3)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


# -- errors -------------------------------------------------------------------------------------


def test_predict_and_functional_call_errors():
    net = mlp()
    post = tb.from_module(net)
    x = data(2, 5)
    with pytest.raises(ValueError, match=r"num_samples must be a positive int \(>= 1\), got int 0"):
        tb.predict(net, post, KEY, x, num_samples=0)
    with pytest.raises(TypeError, match="num_samples must be a positive int, got float 2.0"):
        tb.predict(net, post, KEY, x, num_samples=2.0)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int \(>= 1\), got int -1"):
        tb.predict(net, post, KEY, x, num_samples=2, chunk_size=-1)
    with pytest.raises(
        ValueError, match="strategy must be one of 'auto', 'vmap', 'loop', got str 'fast'"
    ):
        tb.predict(net, post, KEY, x, num_samples=2, strategy="fast")
    with pytest.raises(ValueError, match=r"num_samples must be a positive int \(>= 1\)"):
        tb.sample(post, KEY, num_samples=0)
    with pytest.raises(
        ValueError, match=r"posterior\['fc.weight'\] names no parameter or buffer of Sequential"
    ):
        tb.functional_call(net, {"fc.weight": post["0.weight"]}, KEY, x)
    wrong = {"0.weight": tb.PretrainedGaussianPosterior.from_param(torch.zeros(16, 4))}
    with pytest.raises(
        ValueError,
        match=r"posterior\['0.weight'\].mu has shape \(16, 4\) but the module's parameter has shape \(16, 5\)",
    ):
        tb.functional_call(net, wrong, KEY, x)
    double = {
        "0.bias": tb.PretrainedGaussianPosterior.from_param(torch.zeros(16, dtype=torch.float64))
    }
    with pytest.raises(
        ValueError,
        match=r"posterior\['0.bias'\].mu has dtype torch.float64 but the module's parameter has dtype torch.float32",
    ):
        tb.predict(net, double, KEY, x, num_samples=2)
    with pytest.raises(
        TypeError, match="posterior must be a dict of parameter name -> posterior node"
    ):
        tb.functional_call(net, [post["0.bias"]], KEY, x)
    with pytest.raises(
        TypeError, match="posterior leaf '0.bias' must be a posterior node or a tensor, got str 'x'"
    ):
        tb.sample({"0.bias": "x"}, KEY)
    with pytest.raises(ValueError, match="key must be an int64 or uint32 tensor of shape"):
        tb.predict(net, post, torch.zeros(2), x, num_samples=2)


# -- composition with torch.func and torch.compile --------------------------------------------


def test_grad_with_respect_to_the_posterior_tree():
    net = mlp()
    post = tb.from_module(net, sigma_scale=0.1)
    x, y = data(8, 5), data(8, 3, seed=1)

    def loss(p):
        return ((tb.functional_call(net, p, KEY, x) - y) ** 2).mean()

    grads = torch.func.grad(loss)(post)
    assert list(grads) == list(post)
    assert all(type(grads[n]) is tb.PretrainedGaussianPosterior for n in post)
    # the same gradient through ordinary autograd
    leaves = {
        n: tb.PretrainedGaussianPosterior(
            p.mu.clone().requires_grad_(), p.rho.clone().requires_grad_()
        )
        for n, p in post.items()
    }
    loss(leaves).backward()
    for n in post:
        torch.testing.assert_close(grads[n].mu, leaves[n].mu.grad)
        torch.testing.assert_close(grads[n].rho, leaves[n].rho.grad)


def test_sample_gradcheck_float64():
    post = tb.from_module(mlp().double(), include="2.*", sigma_scale=0.3)

    def draw(mu_w, rho_w, mu_b, rho_b):
        tree = {
            "w": tb.PretrainedGaussianPosterior(mu_w, rho_w),
            "b": tb.PretrainedGaussianPosterior(mu_b, rho_b),
        }
        out = tb.sample(tree, KEY, num_samples=2)
        return out["w"], out["b"]

    inputs = tuple(t.clone().requires_grad_() for n in post for t in post[n])
    assert torch.autograd.gradcheck(draw, inputs)


def test_jacrev_of_outputs_with_respect_to_mean_weights():
    net = mlp()
    post = tb.from_module(net)
    x = data(3, 5)
    jac = torch.func.jacrev(lambda w: torch.func.functional_call(net, w, (x,)))(tb.mean(post))
    assert jac["0.weight"].shape == (3, 3, 16, 5)
    # the Jacobian w.r.t. the last bias is the identity per example
    torch.testing.assert_close(jac["2.bias"][0, :, :], torch.eye(3))


def test_vmap_over_keys_equals_loop():
    net = mlp()
    post = tb.from_module(net, sigma_scale=0.1)
    x = data(4, 5)
    keys = tb.random.split(KEY, 4)
    vmapped = torch.func.vmap(lambda k: tb.functional_call(net, post, k, x))(keys)
    torch.testing.assert_close(vmapped, loop_reference(net, post, KEY, x, 4), rtol=1e-6, atol=1e-6)
    drawn = torch.func.vmap(lambda k: tb.sample(post, k))(keys)
    assert all(torch.equal(drawn[n], tb.sample(post, KEY, num_samples=4)[n]) for n in post)


def test_compiled_functional_call_equals_eager():
    net = mlp()
    post = tb.from_module(net, sigma_scale=0.1)
    x = data(4, 5)

    def run(p, key):
        return tb.functional_call(net, p, key, (x,))

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(post, KEY), run(post, KEY), rtol=0, atol=0)
    other = tb.random.key(1)
    torch.testing.assert_close(compiled(post, other), run(post, other), rtol=0, atol=0)


def test_a_chunks_weights_are_freed_before_the_next_chunk_is_drawn(monkeypatch):
    """chunk_size bounds memory only if two chunks' weights never coexist (before, chunk_size
    = S/2 saved nothing: +1876 MiB against +1858 MiB unchunked, issue 17)."""
    import weakref

    from tbfunc import _predicting

    net = mlp((5, 16, 3))
    post = tb.from_module(net, sigma_scale=0.1)
    drawn, alive_at_draw = [], []
    real = _predicting.draw

    def spy(*args, **kwargs):
        alive_at_draw.append(sum(ref() is not None for ref in drawn))
        weights = real(*args, **kwargs)
        drawn.extend(weakref.ref(t) for t in weights.tensors.values())
        return weights

    monkeypatch.setattr(_predicting, "draw", spy)
    for strategy in ("vmap", "loop"):
        drawn.clear()
        alive_at_draw.clear()
        tb.predict(
            net, post, tb.random.key(0), data(4, 5), num_samples=6, chunk_size=2, strategy=strategy
        )
        assert alive_at_draw == [0, 0, 0], strategy
