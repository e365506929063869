"""tb.optim.VON.sampled: the draw written into the module itself, the module's own backward.

The reference is the ``tb.functional_call`` route: the same draws (bit for bit), the same
weight gradients (to the rounding of the forward's products), and steps equal to rounding (the two routes compute ``g * eps`` by different
roundings: ``(g * eps * sigmoid(rho)) / sigmoid(rho)`` against ``g * eps``). ``beta2=0.5`` makes
the curvature estimate move ``sigma`` visibly, so a wrong ``h_hat`` cannot hide.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tbfunc as tb
from helpers import (
    assert_restart_is_bit_identical,
    assert_threads_train_as_alone,
    data,
    mlp,
    seeded,
)
from tbfunc import _native

OPTIONS = {"lr": 0.1, "num_data": 100, "beta2": 0.5, "hess_init": 0.3}


def _setup(dtype=torch.float32, frozen=True):
    net = mlp((4, 8, 3)).to(dtype)
    net.requires_grad_(not frozen)
    x, y = data(16, 4, seed=3, dtype=dtype), torch.arange(16) % 3
    return net, x, y


def _enter(opt, module, key):
    with opt.sampled(module, key):
        pass


def _twin(post):
    return {name: type(node)(node.mu.clone(), node.rho.clone()) for name, node in post.items()}


def _closeness(a, b):
    return max((a[n].mu - b[n].mu).abs().max().item() for n in a), max(
        (a[n].rho - b[n].rho).abs().max().item() for n in a
    )


def _both_routes(dtype, steps=4, **options):
    """Posteriors after ``steps`` steps of each route from one start."""
    net, x, y = _setup(dtype)
    reference = tb.from_module(net, sigma=0.05)
    fast = _twin(reference)
    settings = {**OPTIONS, **options}
    if settings.get("prior_mean") == "start":  # a centre near the start: the centred loops
        settings["prior_mean"] = {name: node.mu.detach() + 0.1 for name, node in fast.items()}
    opt_ref, opt_fast = tb.optim.VON(reference, **settings), tb.optim.VON(fast, **settings)
    for step in range(steps):
        key = tb.random.key(step)
        F.cross_entropy(tb.functional_call(net, reference, key, x), y).backward()
        with opt_fast.sampled(net, key):
            F.cross_entropy(net(x), y).backward()
        for name in reference:
            # the same draw; the two forwards may round the products apart
            torch.testing.assert_close(fast[name].mu.grad, reference[name].mu.grad)
            assert fast[name].rho.grad is None
        opt_ref.step()
        opt_fast.step()
        opt_ref.zero_grad()
        opt_fast.zero_grad()
    return reference, fast


@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float32, 5e-6), (torch.float64, 1e-14)], ids=["fp32", "fp64"]
)
@pytest.mark.parametrize("route", ["kernel", "tensor ops"])
@pytest.mark.parametrize(
    "options",
    [{}, {"prior_mean": "start", "clip": 0.05}, {"prior_scale": "layer"}],
    ids=["plain", "centred+clip", "learned scale"],
)
def test_steps_equal_the_functional_call_route(monkeypatch, dtype, tolerance, route, options):
    # catches: h_hat from the wrong tensor (rho's stale gradient, the noise of another draw),
    # eps and g multiplied in the wrong place, the noise route ignored by either step route or
    # by one of the kernel's loops (centred or not)
    if route == "tensor ops":
        monkeypatch.setenv("TBFUNC_FUSED", "0")
    reference, fast = _both_routes(dtype, **options)
    mu_gap, rho_gap = _closeness(reference, fast)
    assert mu_gap < tolerance and rho_gap < tolerance
    # the steps moved sigma: a route that ignored the curvature would stand out
    start = tb.from_module(_setup(dtype)[0], sigma=0.05)
    assert min(_closeness(start, fast)) > 1e3 * tolerance


def test_the_draw_route_without_the_kernel_gives_the_same_bits(monkeypatch):
    # catches: the tensor-op draw rounding differently from the kernel (mu + (sigma * eps))
    net = _setup(torch.float32)[0]
    post = tb.from_module(net, sigma=0.05)
    opt = tb.optim.VON(post, **OPTIONS)
    key = tb.random.key(3)
    expected = tb.sample(post, key)
    monkeypatch.setattr(_native, "kernel", lambda: None)
    with opt.sampled(net, key):
        for name, weight in net.named_parameters():
            assert torch.equal(weight, expected[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_inside_the_block_the_module_holds_the_draw_and_gets_its_own_back(dtype):
    # catches: a draw keyed otherwise than tb.sample, values or flags not restored, a .grad
    # the user had on the module lost or overwritten
    net, x, y = _setup(dtype)
    own = {name: p.clone() for name, p in net.named_parameters()}
    net[0].bias.grad = torch.full_like(net[0].bias, 7.0)
    post = tb.from_module(net, sigma=0.05)
    opt = tb.optim.VON(post, **OPTIONS)
    key = tb.random.key(11)
    expected = tb.sample(post, key)
    with opt.sampled(net, key) as inside:
        assert inside is net
        for name, weight in net.named_parameters():
            assert torch.equal(weight, expected[name]) and weight.requires_grad
            assert weight.grad is None
        F.cross_entropy(net(x), y).backward()
    for name, weight in net.named_parameters():
        assert torch.equal(weight, own[name]) and not weight.requires_grad
    assert torch.equal(net[0].bias.grad, torch.full_like(net[0].bias, 7.0))
    assert net[0].weight.grad is None
    # the next draw differs (a key ignored would repeat it)
    opt.step()
    opt.zero_grad()
    with opt.sampled(net, tb.random.key(12)):
        assert not torch.equal(net[0].weight, expected["0.weight"])


def test_micro_batches_of_one_draw_accumulate_and_another_key_is_refused():
    # catches: a second block overwriting the first's gradient instead of adding to it, and
    # a second draw silently mixing two noises into one curvature estimate
    net, x, y = _setup()
    reference = tb.from_module(net, sigma=0.05)
    fast = _twin(reference)
    opt_ref, opt_fast = tb.optim.VON(reference, **OPTIONS), tb.optim.VON(fast, **OPTIONS)
    key = tb.random.key(5)
    F.cross_entropy(tb.functional_call(net, reference, key, x), y, reduction="sum").backward()
    for half in (slice(0, 8), slice(8, 16)):
        with opt_fast.sampled(net, key):
            F.cross_entropy(net(x[half]), y[half], reduction="sum").backward()
    for name in reference:
        torch.testing.assert_close(fast[name].mu.grad, reference[name].mu.grad)
    with pytest.raises(ValueError, match=r"second draw with another key before step\(\)"):
        _enter(opt_fast, net, tb.random.key(6))
    opt_ref.step()
    opt_fast.step()
    mu_gap, rho_gap = _closeness(reference, fast)
    assert mu_gap < 1e-5 and rho_gap < 1e-5
    _enter(opt_fast, net, tb.random.key(6))  # after step() a new key is fine
    opt_fast.zero_grad()
    _enter(opt_fast, net, tb.random.key(7))  # zero_grad() forgets a pending draw too


def test_one_step_takes_one_route():
    # catches: a step that silently mixes rho.grad (one draw) with the kept noise (another)
    net, x, y = _setup()
    post = tb.from_module(net, sigma=0.05)
    opt = tb.optim.VON(post, **OPTIONS)
    F.cross_entropy(tb.functional_call(net, post, tb.random.key(0), x), y).backward()
    with opt.sampled(net, tb.random.key(1)):
        F.cross_entropy(net(x), y).backward()
    with pytest.raises(RuntimeError, match=r"has a rho gradient and a sampled\(\) draw"):
        opt.step()
    opt.zero_grad()
    _enter(opt, net, tb.random.key(2))  # a block without a backward: nothing to step on
    with pytest.raises(RuntimeError, match=r"has no gradient in mu and rho.*opt\.sampled"):
        opt.step()


def test_an_error_inside_the_block_restores_the_module_and_leaves_no_gradient():
    net, x, y = _setup()
    own = {name: p.clone() for name, p in net.named_parameters()}
    post = tb.from_module(net, sigma=0.05)
    opt = tb.optim.VON(post, **OPTIONS)
    with pytest.raises(KeyError), opt.sampled(net, tb.random.key(0)):
        F.cross_entropy(net(x), y).backward()
        raise KeyError("the user's own error")
    for name, weight in net.named_parameters():
        assert torch.equal(weight, own[name]) and not weight.requires_grad and weight.grad is None
    assert all(node.mu.grad is None for node in post.values())
    with opt.sampled(net, tb.random.key(9)):  # nothing pending: any key
        pass


def test_a_padding_row_keeps_the_module_value_as_functional_call_does():
    # catches: the in-place draw overwriting the row tb.functional_call pins
    net = seeded(
        lambda: nn.Sequential(nn.Embedding(6, 3, padding_idx=2), nn.Flatten(), nn.Linear(6, 2))
    )
    net.requires_grad_(False)
    tokens, y = torch.tensor([[1, 2], [2, 5], [0, 4]]), torch.tensor([0, 1, 1])
    reference = tb.from_module(net, sigma=0.3)
    fast = _twin(reference)
    opt_ref, opt_fast = tb.optim.VON(reference, **OPTIONS), tb.optim.VON(fast, **OPTIONS)
    key = tb.random.key(4)
    out_ref = tb.functional_call(net, reference, key, tokens)
    F.cross_entropy(out_ref, y).backward()
    with opt_fast.sampled(net, key):
        assert torch.equal(net[0].weight[2], reference["0.weight"].mu[2])
        out = net(tokens)
        F.cross_entropy(out, y).backward()
    assert torch.equal(out, out_ref)
    opt_ref.step()
    opt_fast.step()
    assert max(_closeness(reference, fast)) < 1e-5


def test_parameters_outside_the_posterior_train_as_usual():
    # catches: the block touching (or restoring over) a parameter the posterior leaves out
    net, x, y = _setup(frozen=False)
    post = tb.from_module(net, include="0.*", sigma=0.05)
    opt = tb.optim.VON(post, **OPTIONS)
    head = net[2].weight
    before = head.detach().clone()
    with opt.sampled(net, tb.random.key(0)):
        F.cross_entropy(net(x), y).backward()
    assert head.grad is not None and head.grad.abs().sum() > 0 and head.requires_grad
    assert torch.equal(head.detach(), before)
    with torch.no_grad():
        head -= 0.1 * head.grad  # the user's own update of the head, after the block
    with opt.sampled(net, tb.random.key(0)):  # pending key: the same draw again is fine
        assert torch.equal(head.detach(), before - 0.1 * head.grad)


def test_checkpoint_restart_is_bit_identical():
    net, x, y = _setup()

    def run(post, opt, start):
        for step in range(start, start + 3):
            with opt.sampled(net, tb.random.key(step)):
                F.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()

    post = tb.from_module(net, sigma=0.05)
    assert_restart_is_bit_identical(post, lambda p: tb.optim.VON(p, **OPTIONS), run, 3)


def test_bad_input_is_refused_with_the_argument_named():
    net = _setup()[0]
    post = tb.from_module(net, sigma=0.05)
    opt = tb.optim.VON(post, **OPTIONS)
    with pytest.raises(TypeError, match="module"):
        _enter(opt, "net", tb.random.key(0))  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="key"):
        _enter(opt, net, torch.tensor([1.5, 2.5]))
    dtypes = r"posterior\['0.weight'\].mu has dtype torch.float32 but the module's"
    with pytest.raises(ValueError, match=dtypes):
        _enter(opt, net.double(), tb.random.key(0))
    other = mlp((4, 5, 3)).requires_grad_(False)
    with pytest.raises(ValueError, match="0.weight"):
        _enter(opt, other, tb.random.key(0))
    with torch.no_grad():
        post["2.bias"].rho[0] = float("nan")
    with pytest.raises(ValueError, match=r"rho must be finite"):
        _enter(opt, net.float(), tb.random.key(0))


def test_two_threads_training_on_one_module_each_see_only_their_own_draw():
    # catches: a block that does not hold the module, so that one thread's draw (or its
    # restore) lands in the middle of another thread's forward and backward
    net, x, y = _setup()

    def train(post, seed, out):
        opt = tb.optim.VON(post, **OPTIONS)
        for step in range(25):
            with opt.sampled(net, tb.random.key(seed + step)):
                F.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()
        out.append(post)

    assert_threads_train_as_alone(net, tb.from_module(net, sigma=0.05), train)


def test_after_a_step_the_draw_takes_the_steps_sigma_until_rho_is_written():
    # catches: a kept sigma used after rho changed (stale draws), a kept sigma never used (the
    # saving lost), and one that is not the step's 1 / sqrt(N (h + delta))
    net, x, y = _setup()
    post = tb.from_module(net, sigma=0.05)
    opt = tb.optim.VON(post, **OPTIONS)
    with opt.sampled(net, tb.random.key(0)):
        F.cross_entropy(net(x), y).backward()
    opt.step()
    opt.zero_grad()
    key = tb.random.key(1)
    expected = tb.sample(post, key)
    differs = 0
    with opt.sampled(net, key):
        for name, weight in net.named_parameters():
            node, state = post[name], opt.state[post[name].mu]
            h, delta = state["hessian"], OPTIONS.get("weight_decay", 1e-4)
            # the kernel's sqrtf is IEEE's (torch's float32 sqrt may miss it by an ulp): by
            # float64, exact for a float32's square root once rounded back
            precision = (h + delta) * OPTIONS["num_data"]
            step_sigma = 1 / torch.sqrt(precision.double()).float()
            assert torch.equal(state["sigma"], step_sigma)
            torch.testing.assert_close(state["sigma"], node.sigma, rtol=1e-6, atol=0)
            torch.testing.assert_close(weight, expected[name], rtol=1e-6, atol=1e-7)
            differs += int(not torch.equal(weight, expected[name]))
    assert differs > 0  # the step's sigma, not softplus(rho), drew them
    assert all("sigma" in st for st in opt.state_dict()["state"].values())  # kept for restarts
    opt.zero_grad()
    with torch.no_grad():
        for node in post.values():
            node.rho.add_(0.0)  # a write: same values, a new version
    assert all("sigma" not in st for st in opt.state_dict()["state"].values())
    with opt.sampled(net, key):
        for name, weight in net.named_parameters():
            assert torch.equal(weight, expected[name])


def test_a_compiled_module_trains_as_the_eager_one():
    # catches: a compiled forward that keeps the weights it saw at compile time instead of
    # reading the draw written into the parameters
    net, x, y = _setup()
    eager_post = tb.from_module(net, sigma=0.05)
    compiled_post = _twin(eager_post)
    eager_opt = tb.optim.VON(eager_post, **OPTIONS)
    compiled_opt = tb.optim.VON(compiled_post, **OPTIONS)
    compiled = torch.compile(net)
    for step in range(3):
        key = tb.random.key(step)
        for module, opt in ((compiled, compiled_opt), (net, eager_opt)):
            with opt.sampled(module, key):
                F.cross_entropy(module(x), y).backward()
            opt.step()
            opt.zero_grad()
    assert max(_closeness(eager_post, compiled_post)) < 1e-5
    assert min(_closeness(tb.from_module(net, sigma=0.05), compiled_post)) > 1e-3
