"""tb.optim.sampled: Bayes-by-Backprop's gradient through the module's own forward and backward.

The reference is ``tb.nelbo``'s gradient with autograd through ``tb.functional_call``: the same
draws (the keys ``split(key, S)``), so the two agree to the rounding of the forward's products,
on the kernel route and on the tensor-op one (``TBFUNC_FUSED=0``), for closed-form and
Monte-Carlo KLs. ``kl_weight`` and ``num_data`` away from 1 and a prior away from the default
make a KL term that is dropped, doubled or scaled wrongly show.
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

NUM_DATA = 40
KL_WEIGHT = 0.7


def _setup(dtype=torch.float32):
    net = mlp((4, 8, 3)).to(dtype).requires_grad_(False)
    x, y = data(16, 4, seed=3, dtype=dtype), torch.arange(16) % 3
    return net, x, y


def _post(net):
    # sigma large enough that the KL's gradient is a visible share of the total
    return tb.from_module(net, sigma=0.3)


def _nelbo_grads(net, post, key, x, y, prior, samples):
    params = tb.parameters(post)
    loss = tb.nelbo(
        net,
        post,
        key,
        x,
        y,
        loss_fn=F.cross_entropy,
        num_data=NUM_DATA,
        prior=prior,
        kl_weight=KL_WEIGHT,
        num_samples=samples,
    )
    return torch.autograd.grad(loss, params)


def _sampled_grads(net, post, key, x, y, prior, samples):
    params = tb.parameters(post)
    for p in params:
        p.grad = None
    for draw_key in tb.random.split(key, samples):
        with tb.optim.sampled(
            net,
            post,
            draw_key,
            num_data=NUM_DATA,
            prior=prior,
            kl_weight=KL_WEIGHT,
            num_samples=samples,
        ):
            F.cross_entropy(net(x), y).backward()
    return [p.grad for p in params]


def _assert_grads_close(got, want, dtype):
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


PRIORS = {
    "default": lambda post: tb.GaussianPrior(),
    "scalar": lambda post: tb.GaussianPrior(0.1, 0.5),
    # a centre and scale per element: the kernel's tensor-prior loops
    "tensor": lambda post: {
        n: tb.GaussianPrior(node.mu.detach() * 0.5, torch.full_like(node.mu, 0.4))
        for n, node in post.items()
    },
    "mixture": lambda post: tb.ScaleMixturePrior(0.5, 1.0, 0.1),  # no closed form: MC KL
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("prior_kind", list(PRIORS))
@pytest.mark.parametrize("fused", ["1", "0"])
def test_gradient_equals_nelbo(dtype, samples, prior_kind, fused, monkeypatch):
    monkeypatch.setenv("TBFUNC_FUSED", fused)
    net, x, y = _setup(dtype)
    post = _post(net)
    prior = PRIORS[prior_kind](post)
    key = tb.random.key(5)
    want = _nelbo_grads(net, post, key, x, y, prior, samples)
    got = _sampled_grads(net, post, key, x, y, prior, samples)
    _assert_grads_close(got, want, dtype)


def test_kernel_route_serves_and_agrees_with_tensor_ops(monkeypatch):
    """The kernel pass runs where it should (a route that always fell back would pass the
    test above), and the fallback gives the same gradient."""
    if _native.kernel() is None:
        pytest.skip("tbfunc's C kernels are not built here")
    from tbfunc import _fused

    calls = []
    real = _fused.posterior_grads
    monkeypatch.setattr(_fused, "posterior_grads", lambda *a: calls.append(1) or real(*a))
    net, x, y = _setup()
    post = _post(net)
    prior = tb.GaussianPrior(0.0, 0.5)
    fast = _sampled_grads(net, post, tb.random.key(2), x, y, prior, 1)
    assert calls == [1]
    monkeypatch.setenv("TBFUNC_FUSED", "0")
    slow = _sampled_grads(net, post, tb.random.key(2), x, y, prior, 1)
    assert calls == [1]
    _assert_grads_close(fast, slow, torch.float32)


def test_draw_is_tb_sample_and_module_is_restored():
    net, x, y = _setup()
    # a transposed (non-contiguous) parameter: its strides come back too
    net[2].weight = nn.Parameter(net[2].weight.detach().t().contiguous().t(), requires_grad=False)
    assert not net[2].weight.is_contiguous()
    net[0].weight.requires_grad_(True)  # a flag the block must give back
    sentinel = torch.full_like(net[0].weight, 7.0)
    net[0].weight.grad = sentinel
    own = {n: p.detach().clone() for n, p in net.named_parameters()}
    layout = {n: (p.data_ptr(), p.stride()) for n, p in net.named_parameters()}
    post = _post(net)
    key = tb.random.key(11)
    expected = tb.sample(post, key)
    with tb.optim.sampled(net, post, key, num_data=NUM_DATA) as module:
        assert module is net
        for name, p in net.named_parameters():
            assert torch.equal(p, expected[name]), name
            assert p.requires_grad and p.grad is None
        F.cross_entropy(net(x), y).backward()
    for name, p in net.named_parameters():
        assert torch.equal(p, own[name]), name
        assert (p.data_ptr(), p.stride()) == layout[name], name  # its own memory again
    assert net[0].weight.grad is sentinel and torch.equal(sentinel, torch.full_like(sentinel, 7.0))
    assert net[0].weight.requires_grad and not net[2].weight.requires_grad


def test_accumulates_into_existing_gradients():
    net, x, y = _setup()
    post = _post(net)
    prior = tb.GaussianPrior()
    once = [g.clone() for g in _sampled_grads(net, post, tb.random.key(1), x, y, prior, 1)]
    # a second block with the same draw on top of the first: twice the gradient
    again = tb.random.split(tb.random.key(1), 1)[0]
    with tb.optim.sampled(net, post, again, num_data=NUM_DATA, kl_weight=KL_WEIGHT):
        F.cross_entropy(net(x), y).backward()
    for p, g in zip(tb.parameters(post), once, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)


def test_gradients_held_elsewhere_are_never_written():
    """The block writes mu's gradient over the weight gradient and reuses the rho gradient it
    handed out last time: only where nothing else holds them. A user's reference (a log, a
    view) keeps its values."""
    net, x, y = _setup()
    post = _post(net)
    params = tb.parameters(post)
    inside = []
    with tb.optim.sampled(net, post, tb.random.key(0), num_data=NUM_DATA):
        F.cross_entropy(net(x), y).backward()
        inside.append(net[0].weight.grad)  # the user keeps the weight gradient
    weight_grad = inside[0].clone()
    assert not torch.equal(post["0.weight"].mu.grad, weight_grad)  # the KL's share is in
    torch.testing.assert_close(inside[0], weight_grad)
    held = [p.grad for p in params]
    view = params[1].grad.view(-1)  # a view alone must also keep its storage unwritten
    # a tensor on the same memory that is not a view, and a storage object held alone
    alias = torch.empty(0).set_(params[2].grad.untyped_storage(), 0, params[2].grad.shape)
    storage = params[3].grad.untyped_storage()
    values = [h.clone() for h in held]
    stored = bytes(storage)
    del held[2:4]
    for p in params:
        p.grad = None
    with tb.optim.sampled(net, post, tb.random.key(1), num_data=NUM_DATA):
        F.cross_entropy(net(x), y).backward()
    for h, v in zip(held, values[:2] + values[4:], strict=True):
        assert torch.equal(h, v)
    assert torch.equal(view, values[1].view(-1))
    assert torch.equal(alias, values[2])
    assert bytes(storage) == stored
    for p, v in zip(params, values, strict=True):
        assert not torch.equal(p.grad, v)  # the second block's gradients are elsewhere


def test_rho_gradients_are_reused_once_dropped():
    """After ``zero_grad()`` drops them the next block writes the same memory (no fresh pages
    per step); the values are the new gradients, as without reuse."""
    net, x, y = _setup()
    post = _post(net)
    opt = tb.optim.Adam(post, lr=1e-2)
    rhos = [node.rho for node in post.values()]
    addresses = []
    for step in range(3):
        opt.zero_grad()
        key = tb.random.key(step)
        block_key = tb.random.split(key, 1)[0]
        with tb.optim.sampled(net, post, block_key, num_data=NUM_DATA, kl_weight=KL_WEIGHT):
            F.cross_entropy(net(x), y).backward()
        addresses.append([r.grad.data_ptr() for r in rhos])
        want = _nelbo_grads(net, post, key, x, y, tb.GaussianPrior(), 1)
        _assert_grads_close([p.grad for p in tb.parameters(post)], want, torch.float32)
        opt.step()
    assert addresses[1] == addresses[2]


def test_trains_like_nelbo():
    """Five Adam steps by each route from one start stay together to rounding."""
    net, x, y = _setup()
    reference = _post(net)
    fast = {n: type(v)(v.mu.clone(), v.rho.clone()) for n, v in reference.items()}
    opt_ref, opt_fast = tb.optim.Adam(reference, lr=0.05), tb.optim.Adam(fast, lr=0.05)
    for step in range(5):
        key = tb.random.key(step)
        opt_ref.zero_grad()
        tb.nelbo(net, reference, key, x, y, loss_fn=F.cross_entropy, num_data=NUM_DATA).backward()
        opt_ref.step()
        opt_fast.zero_grad()
        with tb.optim.sampled(net, fast, tb.random.split(key, 1)[0], num_data=NUM_DATA):
            F.cross_entropy(net(x), y).backward()
        opt_fast.step()
    for name in reference:
        torch.testing.assert_close(fast[name].mu, reference[name].mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast[name].rho, reference[name].rho, rtol=1e-5, atol=1e-6)
    assert (fast["0.weight"].mu - net[0].weight).abs().max() > 0.05  # it did train


def test_error_inside_the_block_restores_and_leaves_no_gradient():
    net, x, _ = _setup()
    post = _post(net)
    own = [p.detach().clone() for p in net.parameters()]
    with (
        pytest.raises(RuntimeError, match="boom"),
        tb.optim.sampled(net, post, tb.random.key(0), num_data=NUM_DATA),
    ):
        net(x).sum().backward()
        raise RuntimeError("boom")
    for p, o in zip(net.parameters(), own, strict=True):
        assert torch.equal(p, o) and p.grad is None
    assert all(p.grad is None for p in tb.parameters(post))


def test_embedding_padding_row_keeps_the_module_value():
    emb = seeded(lambda: nn.Embedding(6, 3, padding_idx=2)).requires_grad_(False)
    post = tb.from_module(emb, sigma=0.3)
    with tb.optim.sampled(emb, post, tb.random.key(0), num_data=NUM_DATA):
        assert torch.equal(emb.weight[2], torch.zeros(3))
        assert not torch.equal(emb.weight[1], post["weight"].mu[1])
        emb(torch.tensor([1, 2, 3])).sum().backward()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_data": 0}, ValueError, "num_data"),
        ({"num_data": 10, "num_samples": 0}, ValueError, "num_samples"),
        ({"num_data": 10, "kl_weight": -1.0}, ValueError, "kl_weight"),
        ({"num_data": 10, "kl_weight": float("nan")}, ValueError, "kl_weight"),
        ({"num_data": True}, TypeError, "num_data"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, error, message):
    net, _, _ = _setup()
    post = _post(net)
    with (
        pytest.raises(error, match=message),
        tb.optim.sampled(net, post, tb.random.key(0), **kwargs),
    ):
        pass


def test_bad_module_and_posterior_are_refused():
    net, _, _ = _setup()
    post = _post(net)
    with (
        pytest.raises(TypeError, match="module.*nn.Module"),
        tb.optim.sampled(lambda x: x, post, tb.random.key(0), num_data=10),
    ):
        pass
    with (
        pytest.raises(TypeError, match="posterior"),
        tb.optim.sampled(net, [1, 2], tb.random.key(0), num_data=10),
    ):
        pass
    mixed = dict(post)
    mixed["0.bias"] = net[0].bias.detach().clone()  # a fixed tensor, not a Gaussian node
    with (
        pytest.raises(TypeError, match=r"posterior\['0.bias'\].*Gaussian node"),
        tb.optim.sampled(net, mixed, tb.random.key(0), num_data=10),
    ):
        pass


# -- tb.optim.Adam.sampled: the gradient, Adam and the next sigma in one pass -------------------

ADAM = {"lr": 0.05, "weight_decay": 0.01}


def _twin(post):
    return {name: type(node)(node.mu.clone(), node.rho.clone()) for name, node in post.items()}


def _adam_routes(dtype, prior, steps=6, **options):
    """Posteriors after ``steps`` steps of tb.optim.sampled + Adam.step and of Adam.sampled
    from one start; the second optimizer too."""
    net, x, y = _setup(dtype)
    reference = _post(net)
    fast = _twin(reference)
    settings = {**ADAM, **options}
    opt_ref, opt_fast = tb.optim.Adam(reference, **settings), tb.optim.Adam(fast, **settings)
    for step in range(steps):
        key = tb.random.key(step)
        opt_ref.zero_grad()
        with tb.optim.sampled(
            net, reference, key, num_data=NUM_DATA, prior=prior, kl_weight=KL_WEIGHT
        ):
            F.cross_entropy(net(x), y).backward()
        opt_ref.step()
        opt_fast.zero_grad()
        with opt_fast.sampled(net, key, num_data=NUM_DATA, prior=prior, kl_weight=KL_WEIGHT):
            F.cross_entropy(net(x), y).backward()
        opt_fast.step()
    return reference, fast, opt_fast


def _assert_posteriors_close(a, b, dtype):
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name in a:
        torch.testing.assert_close(b[name].mu, a[name].mu, rtol=tol, atol=tol)
        torch.testing.assert_close(b[name].rho, a[name].rho, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prior_kind", list(PRIORS))
@pytest.mark.parametrize("fused", ["1", "0"])
def test_adam_sampled_steps_equal_the_gradient_route(dtype, prior_kind, fused, monkeypatch):
    """Six steps: a wrong KL term, Adam moment, step count or a sigma not renewed after each
    step (the next draws would use the old one) pulls the two apart."""
    monkeypatch.setenv("TBFUNC_FUSED", fused)
    net, _, _ = _setup(dtype)
    prior = PRIORS[prior_kind](_post(net))
    reference, fast, _ = _adam_routes(dtype, prior)
    _assert_posteriors_close(reference, fast, dtype)
    start = _post(_setup(dtype)[0])
    assert (fast["0.weight"].rho - start["0.weight"].rho).abs().max() > 1e-3  # rho moved


def test_adam_sampled_takes_the_one_pass_where_it_serves(monkeypatch):
    if _native.kernel() is None:
        pytest.skip("tbfunc's C kernels are not built here")
    from tbfunc import _fused_updates

    calls = []
    real = _fused_updates.bbb_adam_step
    monkeypatch.setattr(
        _fused_updates, "bbb_adam_step", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    _adam_routes(torch.float32, tb.GaussianPrior(), steps=2)
    assert len(calls) == 2
    # amsgrad: not the pass's update, so the gradient route, with the same result
    reference, fast, _ = _adam_routes(torch.float32, tb.GaussianPrior(), steps=3, amsgrad=True)
    assert len(calls) == 2
    _assert_posteriors_close(reference, fast, torch.float32)


def test_adam_sampled_draws_tb_sample_first_then_the_kept_sigma():
    net, x, y = _setup()
    post = _post(net)
    opt = tb.optim.Adam(post, **ADAM)
    key = tb.random.key(3)
    expected = tb.sample(post, key)
    with opt.sampled(net, key, num_data=NUM_DATA):
        for name, p in net.named_parameters():
            assert torch.equal(p, expected[name]), name
        F.cross_entropy(net(x), y).backward()
    old_sigma = post["0.weight"].sigma.clone()
    opt.step()
    kept = opt.state[post["0.weight"].rho]["sigma"]
    # the kernel's softplus of the new rho: torch's to an ulp, and not the old sigma
    torch.testing.assert_close(kept, post["0.weight"].sigma, rtol=3e-7, atol=0)
    assert not torch.equal(kept, old_sigma)
    opt.zero_grad()
    key = tb.random.key(4)
    noise = tb.sample({n: type(v)(torch.zeros_like(v.mu), v.rho) for n, v in post.items()}, key)
    with opt.sampled(net, key, num_data=NUM_DATA):
        eps = noise["0.weight"] / post["0.weight"].sigma
        torch.testing.assert_close(net[0].weight, post["0.weight"].mu + kept * eps)
    # a write to rho retires the kept sigma: the draw is tb.sample's again
    opt.zero_grad()
    with torch.no_grad():
        post["0.weight"].rho.add_(0.25)
    key = tb.random.key(5)
    expected = tb.sample(post, key)
    with opt.sampled(net, key, num_data=NUM_DATA):
        for name, p in net.named_parameters():
            assert torch.equal(p, expected[name]), name


def test_adam_sampled_restart_is_bit_identical():
    net, x, y = _setup()

    def run(post, opt, start):
        for step in range(start, start + 3):
            opt.zero_grad()
            with opt.sampled(net, tb.random.key(step), num_data=NUM_DATA):
                F.cross_entropy(net(x), y).backward()
            opt.step()

    assert_restart_is_bit_identical(_post(net), lambda p: tb.optim.Adam(p, **ADAM), run, 3)


def test_adam_sampled_micro_batches_add_up():
    net, x, y = _setup()
    reference, fast = _post(net), None
    fast = _twin(reference)
    opt_ref, opt_fast = tb.optim.Adam(reference, **ADAM), tb.optim.Adam(fast, **ADAM)
    halves = [(x[:8], y[:8]), (x[8:], y[8:])]
    for step in range(3):
        key = tb.random.key(step)
        opt_ref.zero_grad()
        opt_fast.zero_grad()
        for xs, ys in halves:
            with tb.optim.sampled(net, reference, key, num_data=NUM_DATA, num_samples=2):
                F.cross_entropy(net(xs), ys).backward()
            with opt_fast.sampled(net, key, num_data=NUM_DATA):
                (F.cross_entropy(net(xs), ys) / 2).backward()
        opt_ref.step()
        opt_fast.step()
    # the KL once per step in both: the first route adds half of it per block
    _assert_posteriors_close(reference, fast, torch.float32)


def test_adam_sampled_refusals_name_the_fix():
    net, x, y = _setup()
    post = _post(net)
    opt = tb.optim.Adam(post, **ADAM)
    with opt.sampled(net, tb.random.key(0), num_data=NUM_DATA):
        F.cross_entropy(net(x), y).backward()
    with (
        pytest.raises(ValueError, match="another key before step"),
        opt.sampled(net, tb.random.key(1), num_data=NUM_DATA),
    ):
        pass
    with (
        pytest.raises(ValueError, match="same num_data, kl_weight and prior"),
        opt.sampled(net, tb.random.key(0), num_data=NUM_DATA + 1),
    ):
        pass
    with (
        pytest.raises(ValueError, match="same num_data, kl_weight and prior"),
        opt.sampled(net, tb.random.key(0), num_data=NUM_DATA, prior=tb.GaussianPrior(0.0, 0.5)),
    ):
        pass
    with opt.sampled(net, tb.random.key(0), num_data=NUM_DATA, prior=tb.GaussianPrior(0.0, 1.0)):
        pass  # an equal prior is the same objective
    post["0.bias"].rho.grad = torch.zeros_like(post["0.bias"].rho)
    with pytest.raises(RuntimeError, match=r"posterior\['0.bias'\] has a gradient.*one route"):
        opt.step()
    opt.zero_grad()  # forgets the draw: the next step has nothing to do
    before = [p.clone() for p in tb.parameters(post)]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, tb.parameters(post), strict=True))
    plain = tb.optim.Adam(tb.parameters(post), **ADAM)
    with (
        pytest.raises(TypeError, match=r"tree.*got one built from tensors.*tb.optim.sampled"),
        plain.sampled(net, tb.random.key(0), num_data=NUM_DATA),
    ):
        pass
    grouped = tb.optim.Adam(_post(net), **ADAM)
    grouped.add_param_group({"params": [torch.zeros(3, requires_grad=True)]})
    with (
        pytest.raises(TypeError, match="one parameter group; got 2 parameter groups"),
        grouped.sampled(net, tb.random.key(0), num_data=NUM_DATA),
    ):
        pass
    with (
        pytest.raises(ValueError, match="kl_weight"),
        opt.sampled(net, tb.random.key(0), num_data=NUM_DATA, kl_weight=-1),
    ):
        pass


def test_adam_sampled_error_in_the_block_leaves_nothing_to_step():
    net, x, _ = _setup()
    post = _post(net)
    opt = tb.optim.Adam(post, **ADAM)
    before = [p.clone() for p in tb.parameters(post)]
    with pytest.raises(RuntimeError, match="boom"), opt.sampled(net, tb.random.key(0), num_data=9):
        net(x).sum().backward()
        raise RuntimeError("boom")
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, tb.parameters(post), strict=True))


@pytest.mark.parametrize("route", ["tb.optim.sampled", "Adam.sampled"])
def test_two_threads_training_on_one_module_each_see_only_their_own_draw(route):
    # catches: a block that does not hold the module (one thread's draw or restore landing in
    # another's forward), and per-module scratch (the draw, its noise, the rho gradients)
    # shared between two posteriors trained on one module
    net, x, y = _setup()

    def train(post, seed, out):
        opt = tb.optim.Adam(post, **ADAM)
        for step in range(15):
            opt.zero_grad()
            key = tb.random.key(seed + step)
            if route == "Adam.sampled":
                block = opt.sampled(net, key, num_data=NUM_DATA)
            else:
                block = tb.optim.sampled(net, post, key, num_data=NUM_DATA)
            with block:
                F.cross_entropy(net(x), y).backward()
            opt.step()
        out.append(post)

    assert_threads_train_as_alone(net, _post(net), train)


@pytest.mark.parametrize("optimizer", ["Adam", "VON"])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_step_that_leaves_a_non_finite_value_is_caught_at_the_next_draw(
    optimizer, threads, monkeypatch
):
    """The update kernels check what they write, so that a clean step needs no finiteness
    pass before the next draw; a NaN in the last part of the last node must still be
    refused there (a flag ignored, or one part's flag lost, would let the NaN draw on)."""
    from tbfunc import _fused, _parallel

    if _native.kernel() is None:
        pytest.skip("tbfunc's C kernels are not built here")
    monkeypatch.setattr(_parallel, "PARALLEL_MIN_NUMEL", 16)  # several parts even here
    net, x, y = _setup()
    post = _post(net)
    if optimizer == "Adam":
        opt = tb.optim.Adam(post, **ADAM)
        enter = lambda key: opt.sampled(net, key, num_data=NUM_DATA)  # noqa: E731
    else:
        opt = tb.optim.VON(post, lr=0.1, num_data=NUM_DATA)
        enter = lambda key: opt.sampled(net, key)  # noqa: E731
    passes = []
    real = _fused.all_finite
    monkeypatch.setattr(_fused, "all_finite", lambda t: passes.append(len(t)) or real(t))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for step, poison in enumerate((False, False, True)):
            opt.zero_grad()
            with enter(tb.random.key(step)):
                F.cross_entropy(net(x), y).backward()
                if poison:
                    net[2].bias.grad[-1] = float("nan")
            opt.step()
        assert len(passes) == 1  # the first draw's check only: the clean steps needed none
        refused = r"posterior\['2.bias'\]\.(mu|rho) must be finite"
        with pytest.raises(ValueError, match=refused), enter(tb.random.key(9)):
            pass
    finally:
        torch.set_num_threads(before)


def test_a_step_that_leaves_only_rho_non_finite_is_caught_at_the_next_draw():
    """Adam.sampled's pass flags rho as well as mu: a NaN in rho before the step leaves mu
    finite (its gradient and update do not read rho) and the new rho NaN, which the next draw
    must refuse."""
    if _native.kernel() is None:
        pytest.skip("tbfunc's C kernels are not built here")
    net, x, y = _setup()
    post = _post(net)
    opt = tb.optim.Adam(post, **ADAM)
    with opt.sampled(net, tb.random.key(0), num_data=NUM_DATA):
        F.cross_entropy(net(x), y).backward()
    with torch.no_grad():
        post["2.bias"].rho[-1] = float("nan")
    opt.step()
    assert torch.isfinite(post["2.bias"].mu).all() and post["2.bias"].rho[-1].isnan()
    with (
        pytest.raises(ValueError, match=r"posterior\['2.bias'\]\.rho must be finite"),
        opt.sampled(net, tb.random.key(1), num_data=NUM_DATA),
    ):
        pass
