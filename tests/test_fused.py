"""The fused training route (tbfunc._fused, _train.c) and tb.optim.Adam.

The reference is the tensor-op route, which ``TBFUNC_FUSED=0`` selects in the same process:
every value and gradient must agree with it to rounding, on every path the route serves (one
and several draws, float32 and float64, each kind of prior, one thread and many), and the
route must step aside where it cannot serve (torch.func, double backward).
"""

from __future__ import annotations

import copy

import optree
import pytest
import torch
import torch.nn.functional as F

import tbfunc as tb
from helpers import data, mlp
from tbfunc import _fused, _fused_updates, _kernel_calls, _native, _noise, _parallel

needs_kernel = pytest.mark.skipif(_native.kernel() is None, reason="needs a C compiler")
pytestmark = needs_kernel


def _setup(dtype=torch.float32, sizes=(5, 16, 3)):
    net = mlp(sizes).to(dtype)
    post = tb.from_module(net, rho=-2.0)
    x = data(12, sizes[0], seed=1, dtype=dtype)
    y = torch.arange(12) % sizes[-1]
    return net, post, x, y


def _grads(monkeypatch, fused, net, post, key, x, y, **options):
    """nelbo's value, its mu/rho gradients and the names of the autograd nodes it made."""
    monkeypatch.setenv("TBFUNC_FUSED", "1" if fused else "0")
    params = tb.parameters(post)
    for p in params:
        p.grad = None
    loss = tb.nelbo(net, post, key, x, y, loss_fn=F.cross_entropy, num_data=50, **options)
    nodes = _node_names(loss.grad_fn)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params], nodes


def _node_names(fn, seen=None):
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return set()
    seen.add(fn)
    names = {type(fn).__name__}
    for child, _ in fn.next_functions:
        names |= _node_names(child, seen)
    return names


PRIORS = {
    "standard": lambda post: tb.GaussianPrior(),
    "scalars": lambda post: tb.GaussianPrior(0.1, 0.5),
    "tensors": lambda post: {
        name: tb.GaussianPrior(node.mu.detach() * 0.5, torch.full_like(node.mu, 0.3))
        for name, node in post.items()
    },
    "0-dim tensors": lambda post: tb.GaussianPrior(torch.tensor(0.05), torch.tensor(0.7)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("prior", list(PRIORS))
def test_nelbo_equals_the_tensor_op_route(monkeypatch, dtype, samples, prior):
    net, post, x, y = _setup(dtype)
    options = {"num_samples": samples, "prior": PRIORS[prior](post), "kl_weight": 0.3}
    key = tb.random.key(4)
    fused = _grads(monkeypatch, True, net, post, key, x, y, **options)
    plain = _grads(monkeypatch, False, net, post, key, x, y, **options)
    assert "_DrawBackward" in fused[2] and "_DrawBackward" not in plain[2]
    # one autograd node draws and takes the KL: no separate KL node, no accumulation of two
    assert not {"_KLBackward", "_GaussianKLBackward"} & fused[2]
    tight = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
    torch.testing.assert_close(fused[0], plain[0], **tight)
    for a, b in zip(fused[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, **tight)


@pytest.mark.parametrize(
    "options",
    [
        {"prior": tb.LaplacePrior()},  # no closed form the kernels serve: the KL apart
        {"stick_the_landing": True},  # Monte-Carlo KL through the fused draw's backward
        {"num_samples": 2, "prior": tb.LaplacePrior(0.0, 0.3)},
    ],
)
def test_draws_keep_the_fused_backward_when_the_kl_cannot(monkeypatch, options):
    net, post, x, y = _setup()
    key = tb.random.key(5)
    fused = _grads(monkeypatch, True, net, post, key, x, y, **options)
    plain = _grads(monkeypatch, False, net, post, key, x, y, **options)
    assert "_DrawBackward" in fused[2]
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-7)
    for a, b in zip(fused[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_kl_weight_and_num_data_scale_only_the_kl_gradient(monkeypatch):
    """The KL's incoming gradient is kl_weight / num_data: doubling kl_weight must move the
    gradients by exactly the KL part (an ignored scale would leave them unchanged)."""
    net, post, x, y = _setup(torch.float64)
    key = tb.random.key(6)
    grads = {}
    for fused in (True, False):
        for weight in (0.0, 1.0, 2.0):
            grads[fused, weight] = _grads(
                monkeypatch, fused, net, post, key, x, y, kl_weight=weight
            )[1]
    for fused in (True, False):
        for g0, g1, g2 in zip(grads[fused, 0.0], grads[fused, 1.0], grads[fused, 2.0], strict=True):
            torch.testing.assert_close(g2 - g0, 2 * (g1 - g0), rtol=1e-9, atol=1e-12)
            assert not torch.allclose(g1, g0)
    for a, b in zip(grads[True, 2.0], grads[False, 2.0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_gradcheck_through_the_fused_route(monkeypatch):
    monkeypatch.setenv("TBFUNC_FUSED", "1")
    net, post, x, y = _setup(torch.float64, sizes=(3, 4, 2))
    names = list(post)
    key = tb.random.key(7)

    def loss(*tensors):
        tree = {n: type(post[n])(tensors[2 * i], tensors[2 * i + 1]) for i, n in enumerate(names)}
        return tb.nelbo(
            net, tree, key, x, y, loss_fn=F.cross_entropy, num_data=20, num_samples=2,
            prior=tb.GaussianPrior(0.1, 0.8),
        )  # fmt: skip

    inputs = [t.detach().clone().requires_grad_() for n in names for t in post[n]]
    assert "_DrawBackward" in _node_names(loss(*inputs).grad_fn)
    assert torch.autograd.gradcheck(loss, inputs)
    # create_graph=True: the backward runs in tensor ops, so second derivatives exist
    with torch.random.fork_rng():  # gradgradcheck draws its grad_outputs from the global RNG
        torch.manual_seed(0)
        assert torch.autograd.gradgradcheck(loss, inputs)


def test_the_draws_are_the_no_grad_draws_bit_for_bit(monkeypatch):
    monkeypatch.setenv("TBFUNC_FUSED", "1")
    _, post, _, _ = _setup()
    tb.parameters(post)
    key = tb.random.key(8)
    with torch.no_grad():
        plain = tb.sample(post, key, num_samples=3)
    recorded = tb.sample(post, key, num_samples=3)
    for name in post:
        assert recorded[name].grad_fn is not None
        assert torch.equal(recorded[name].detach(), plain[name])


@pytest.mark.parametrize("route", ["team", "pool"])
def test_one_thread_and_many_give_the_same_kernel_results(monkeypatch, route):
    """The kernels split the concatenation of all nodes at arbitrary points (mid-node); each
    element's result must not depend on where (torch's own matmuls do, so the kernels are
    fed fixed inputs here), on either route to the threads (torch's OpenMP team, by one C
    call that cuts the parts itself, or tbfunc's pool, whose parts Python cuts)."""
    monkeypatch.setenv("TBFUNC_OPENMP", "1" if route == "team" else "0")
    shapes = [(33, 7), (33,), (5, 33)]
    rhos = [data(*s, seed=i) - 2 for i, s in enumerate(shapes)]
    mus = [data(*s, seed=10 + i) * 0.1 for i, s in enumerate(shapes)]
    sigmas = [F.softplus(r) for r in rhos]
    grads = [data(2, *s, seed=20 + i) for i, s in enumerate(shapes)]
    noise = [data(2, *s, seed=30 + i) for i, s in enumerate(shapes)]
    priors = [_kernel_calls.prior_terms(m, 0.1, 0.5) for m in mus]
    threads = torch.get_num_threads()
    results = []
    try:
        for count, smallest in ((1, 1 << 16), (2, 7), (3, 5)):
            torch.set_num_threads(count)
            monkeypatch.setattr(_parallel, "PARALLEL_MIN_NUMEL", smallest)
            kl = (torch.tensor(0.7), mus, sigmas, priors)
            params = [m.clone() for m in mus]
            moments = [torch.zeros_like(m) + 0.01 for m in mus], [torch.ones_like(m) for m in mus]
            _fused_updates.adam_step(
                params, [g[0] for g in grads], *moments, [3.0] * 3,
                lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01,
            )  # fmt: skip
            von = [m.clone() for m in mus], [r.clone() for r in rhos]
            von_state = [torch.zeros_like(m) for m in mus], [torch.ones_like(m) for m in mus]
            _fused_updates.von_step(
                (*von, [g[0] for g in grads], [g[1] for g in grads]), *von_state, None,
                [1e-3] * 3, step=2, lr=0.1, beta1=0.9, beta2=0.999, num_data=50, clip=None,
            )  # fmt: skip
            kl_grads = [torch.empty_like(m) for m in mus], [torch.empty_like(m) for m in mus]
            _fused._kl_grad(0.3, mus, rhos, sigmas, priors, *kl_grads)
            results.append(
                (
                    _fused._draw_grad(grads, noise, rhos, kl),
                    _fused._draw_grad(grads, noise, rhos, None),
                    _fused._kl_sum(mus, rhos, sigmas, priors),
                    (params, *moments),
                    (*von, *von_state),
                    kl_grads,
                )
            )
    finally:
        torch.set_num_threads(threads)
    first = results[0]
    for other in results[1:]:
        for part in (0, 1, 3, 4, 5):
            for a, b in zip(
                [t for group in other[part] for t in group],
                [t for group in first[part] for t in group],
                strict=True,
            ):
                assert torch.equal(a, b)
        assert other[2] == pytest.approx(first[2], rel=1e-12)  # partial sums in float64


def test_the_draw_keeps_exactly_the_noise_it_used(monkeypatch):
    """The kernel writes eps beside each draw (for the backward), at the right offset when a
    thread starts mid-segment: it must equal the noise op's eps, element for element."""
    shapes = [(33, 7), (33,), (5, 33)]
    mus = [data(*s, seed=i) for i, s in enumerate(shapes)]
    sigmas = [data(*s, seed=10 + i).abs() for i, s in enumerate(shapes)]
    keys = tb.random.split(tb.random.key(3), 3)
    hashes = [11, 22, 33]
    numels = [m.numel() for m in mus]
    expected = _noise.noise(keys, hashes, numels, torch.float32, torch.device("cpu"))
    expected = [
        e.view(3, *m.shape)
        for e, m in zip(expected.split([3 * n for n in numels]), mus, strict=True)
    ]
    threads = torch.get_num_threads()
    try:
        for count, smallest in ((1, 1 << 16), (2, 7), (3, 5)):
            torch.set_num_threads(count)
            monkeypatch.setattr(_noise, "_PARALLEL_MIN_NUMEL", smallest)
            draws, noise = _noise.gaussian_with_noise(keys, hashes, mus, sigmas)
            for draw, eps, want, mu, sigma in zip(draws, noise, expected, mus, sigmas, strict=True):
                assert torch.equal(eps, want)
                assert torch.equal(draw, mu + sigma * want)
    finally:
        torch.set_num_threads(threads)


def test_very_negative_rho_takes_the_same_branch_as_the_tensor_op_route(monkeypatch):
    """Below rho = -20, d log(sigma) / d rho is 1 (softplus underflows there in float32)."""
    net, post, x, y = _setup()
    with torch.no_grad():
        for node in post.values():
            node.rho.view(-1)[::2] = -25.0
    key = tb.random.key(13)
    fused = _grads(monkeypatch, True, net, post, key, x, y)
    plain = _grads(monkeypatch, False, net, post, key, x, y)
    for a, b in zip(fused[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_route_steps_aside_under_torch_func(monkeypatch):
    monkeypatch.setenv("TBFUNC_FUSED", "1")
    net, post, x, y = _setup()
    key = tb.random.key(10)

    def loss(tree):
        return tb.nelbo(net, tree, key, x, y, loss_fn=F.cross_entropy, num_data=50)

    functional = torch.func.grad(loss)(post)
    _, eager, _ = _grads(monkeypatch, True, net, post, key, x, y)
    flat = optree.tree_leaves(functional)  # the order of tb.parameters
    for a, b in zip(flat, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_node_the_forward_does_not_use_still_gets_its_kl_gradient(monkeypatch):
    net, post, x, y = _setup(torch.float64)
    post = {
        **post,
        "unused": tb.GaussianPosterior(
            torch.zeros(4, dtype=torch.float64) + 0.5, torch.full((4,), -1.0, dtype=torch.float64)
        ),
    }

    class Partial(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.unused = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))

        def forward(self, inputs):
            return self.net(inputs)

    module = Partial()
    tree = {f"net.{name}": node for name, node in post.items() if name != "unused"}
    tree["unused"] = post["unused"]
    key = tb.random.key(11)
    fused = _grads(monkeypatch, True, module, tree, key, x, y)
    plain = _grads(monkeypatch, False, module, tree, key, x, y)
    for a, b in zip(fused[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert fused[1][-1].abs().sum() > 0  # rho of the unused node: the KL's pull alone


# -- tb.optim.Adam -------------------------------------------------------------------------------


def _adam_pair(dtype, **options):
    shapes = [(30, 20), (7,), (1, 3)]
    start = [data(*shape, seed=i, dtype=dtype) for i, shape in enumerate(shapes)]
    ours = [t.clone().requires_grad_() for t in start]
    theirs = [t.clone().requires_grad_() for t in start]
    return ours, theirs, tb.optim.Adam(ours, **options), torch.optim.Adam(theirs, **options)


def _feed(ours, theirs, step, skip=None):
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if i == skip:
            a.grad = b.grad = None
            continue
        grad = data(*a.shape, seed=100 * step + i, dtype=a.dtype) * (i + 1)
        a.grad, b.grad = grad.clone(), grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [
        {"lr": 1e-2},
        {"lr": 3e-3, "weight_decay": 0.05},
        {"lr": 1e-2, "betas": (0.3, 0.9), "eps": 1e-4},  # the other branch of lerp
    ],
)
def test_adam_equals_torch_adam(dtype, options):
    ours, theirs, opt, reference = _adam_pair(dtype, **options)
    for step in range(25):
        _feed(ours, theirs, step, skip=1 if step < 3 else None)  # a late-starting tensor
        opt.step()
        reference.step()
    tight = dict(rtol=2e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-15)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **tight)
        for field in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[a][field], reference.state[b][field], **tight)
    assert float(opt.state[ours[1]]["step"]) == 22  # its own count, from its first gradient


def test_adam_state_dict_moves_between_it_and_torch_adam():
    ours, theirs, opt, reference = _adam_pair(torch.float64, lr=1e-2)
    for step in range(5):
        _feed(ours, theirs, step)
        opt.step()
        reference.step()
    swapped_ours = [t.detach().clone().requires_grad_() for t in theirs]
    swapped_theirs = [t.detach().clone().requires_grad_() for t in ours]
    ours_from_torch = tb.optim.Adam(swapped_ours, lr=1e-2)
    ours_from_torch.load_state_dict(reference.state_dict())
    torch_from_ours = torch.optim.Adam(swapped_theirs, lr=1e-2)
    torch_from_ours.load_state_dict(opt.state_dict())
    for step in range(5, 10):
        _feed(swapped_ours, swapped_theirs, step)
        ours_from_torch.step()
        torch_from_ours.step()
    for a, b in zip(swapped_ours, swapped_theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


@pytest.mark.parametrize("option", [{"amsgrad": True}, {"maximize": True}])
def test_adam_options_the_kernel_lacks_run_torch_adam(option):
    ours, theirs, opt, reference = _adam_pair(torch.float64, lr=1e-2, **option)
    for step in range(6):
        _feed(ours, theirs, step)
        opt.step()
        reference.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)  # the very same code


def test_adam_takes_a_posterior_and_a_closure():
    net, post, x, y = _setup()
    opt = tb.optim.Adam(post, lr=1e-2)
    before = copy.deepcopy({name: tuple(t.detach() for t in node) for name, node in post.items()})
    key = tb.random.key(12)

    def closure():
        opt.zero_grad()
        loss = tb.nelbo(net, post, key, x, y, loss_fn=F.cross_entropy, num_data=50)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.ndim == 0
    for name, node in post.items():
        assert not torch.equal(node.mu.detach(), before[name][0])
        assert not torch.equal(node.rho.detach(), before[name][1])


# -- tb.optim.VON's fused update -----------------------------------------------------------------


def _von_run(monkeypatch, fused, dtype, steps=6, **options):
    monkeypatch.setenv("TBFUNC_FUSED", "1" if fused else "0")
    net, post, x, y = _setup(dtype)
    options = {"lr": 0.05, **options}
    opt = tb.optim.VON(post, num_data=100, hess_init=0.3, beta2=0.99, **options)
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(tb.functional_call(net, post, tb.random.key(step), x), y).backward()
        opt.step()
    states = [opt.state[node.mu] for node in post.values()]
    return post, states


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"clip": 1e-3},  # binds: the clipped and the unclipped step differ
        {"prior_scale": "node"},
        {"prior_mean": "half"},
        {"lr": 0.2, "beta1": 0.5},
    ],
    ids=["plain", "clip", "node", "centred", "lr-beta1"],
)
def test_von_fused_update_equals_the_tensor_op_update(monkeypatch, dtype, options):
    options = dict(options)
    if options.get("prior_mean") == "half":
        _, post, _, _ = _setup(dtype)
        options["prior_mean"] = {n: node.mu.detach() * 0.5 for n, node in post.items()}
    fused, fused_states = _von_run(monkeypatch, True, dtype, **options)
    plain, plain_states = _von_run(monkeypatch, False, dtype, **options)
    tight = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for name in fused:
        torch.testing.assert_close(fused[name].mu, plain[name].mu, **tight)
        torch.testing.assert_close(fused[name].rho, plain[name].rho, **tight)
    for a, b in zip(fused_states, plain_states, strict=True):
        torch.testing.assert_close(a["hessian"], b["hessian"], **tight)
        torch.testing.assert_close(a["momentum"], b["momentum"], **tight)


def test_von_clip_and_the_centre_change_the_fused_result(monkeypatch):
    """Both options reach the kernel: ignoring either would leave the result unchanged."""
    base, _ = _von_run(monkeypatch, True, torch.float64)
    clipped, _ = _von_run(monkeypatch, True, torch.float64, clip=1e-3)
    _, post, _, _ = _setup(torch.float64)
    centres = {n: node.mu.detach() + 1.0 for n, node in post.items()}
    centred, _ = _von_run(monkeypatch, True, torch.float64, prior_mean=centres)
    for name in base:
        assert not torch.allclose(base[name].mu, clipped[name].mu)
        assert not torch.allclose(base[name].mu, centred[name].mu)


def test_inverse_softplus_is_accurate_for_tiny_and_large_sigma(monkeypatch):
    """rho = softplus^-1(1 / sqrt(N (h + delta))): a huge N (sigma ~ 1e-6) and a tiny one
    (sigma ~ 3) must both give the tensor-op route's rho and, a step later, the curvature
    estimate read through softplus(rho) (a naive log(1 - exp(-sigma)) or log(1 + exp(rho))
    loses every digit at sigma = 1e-6 in float32)."""
    for num_data in (10**12, 1):
        results = []
        for fused in (True, False):
            monkeypatch.setenv("TBFUNC_FUSED", "1" if fused else "0")
            net, post, x, y = _setup()
            opt = tb.optim.VON(post, lr=0.01, num_data=num_data, hess_init=0.1)
            for step in range(2):  # the second reads softplus(rho) of the first's tiny sigma
                opt.zero_grad()
                out = tb.functional_call(net, post, tb.random.key(step), x)
                F.cross_entropy(out, y).backward()
                opt.step()
            results.append(
                [node.rho.detach().clone() for node in post.values()]
                + [opt.state[node.mu]["hessian"].clone() for node in post.values()]
            )
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_diverged_curvature_gives_the_tensor_op_routes_infinite_rho(monkeypatch):
    """h = inf makes rho non-finite on both routes (nan: the correction term is inf / inf),
    so the next draw's finiteness check names the diverged node instead of training on with a
    made-up finite rho; and the kernel's in-place writes must reach the finiteness cache (the
    version counter) for that check to look again."""
    results = []
    for fused in (True, False):
        monkeypatch.setenv("TBFUNC_FUSED", "1" if fused else "0")
        net, post, x, y = _setup()
        opt = tb.optim.VON(post, lr=0.01, num_data=100)
        F.cross_entropy(tb.functional_call(net, post, tb.random.key(0), x), y).backward()
        opt.step()
        opt.zero_grad()
        first = next(iter(post.values()))
        opt.state[first.mu]["hessian"].view(-1)[0] = float("inf")
        F.cross_entropy(tb.functional_call(net, post, tb.random.key(1), x), y).backward()
        opt.step()
        results.append(str(first.rho.detach().view(-1)[0].item()))
        with pytest.raises(ValueError, match="must be finite"):
            tb.functional_call(net, post, tb.random.key(2), x)
    assert results == ["nan", "nan"]


def test_adam_in_place_writes_are_seen_by_autograd():
    """A graph that saved a parameter must refuse to backward after the step changed it, as
    with torch.optim.Adam (a kernel write bypasses the version counter unless bumped)."""
    for optimizer in (tb.optim.Adam, torch.optim.Adam):
        weight = data(4, 3, dtype=torch.float64).requires_grad_()
        opt = optimizer([weight], lr=0.1)
        (weight * weight).sum().backward()
        stale = (weight * weight).sum()  # saves weight at its current version
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            stale.backward()


def test_the_kl_rides_along_only_when_the_whole_tree_is_drawn_together():
    """sample_with_kl returns a KL only for a tree it drew whole: with a node of another
    family beside the Gaussian ones (or another dtype) the KL would miss that node's part, so
    it must be None and the caller computes it apart."""
    from test_io import LaplaceNode

    from tbfunc._sampling import sample_with_kl
    from tbfunc.kl import kernel_priors

    _, post, _, _ = _setup()
    tb.parameters(post)
    keys = tb.random.split(tb.random.key(14), 2)
    terms = kernel_priors(post, tb.GaussianPrior())
    _, kl = sample_with_kl(post, keys, None, terms)
    assert kl is not None and kl.grad_fn is not None
    # "extra" sorts after the layers' names: the Gaussian nodes keep their leaf indices
    mixed = {**post, "extra": LaplaceNode.from_param(torch.zeros(3))}
    _, kl = sample_with_kl(mixed, keys, None, terms)
    assert kl is None
    bias = post["0.bias"]
    wide = bias._replace(
        mu=bias.mu.detach().double().requires_grad_(),
        rho=bias.rho.detach().double().requires_grad_(),
    )
    _, kl = sample_with_kl({**post, "0.bias": wide}, keys, None, terms)
    assert kl is None


# -- the finiteness check's C pass ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_finiteness_pass_finds_one_bad_value_anywhere(dtype, bad):
    """Lengths off the vector width, the bad value at the first and last element of any tensor
    of a mixed-dtype list; the largest finite values and the subnormals are finite."""
    info = torch.finfo(dtype)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    tensors = [
        torch.full((37,), info.max, dtype=dtype),
        torch.full((5,), -torch.finfo(other).max, dtype=other),
        torch.full((1,), info.tiny / 4, dtype=dtype),
        torch.zeros(0, dtype=dtype),
        data(3, 11, seed=4, dtype=dtype),
    ]
    assert _fused.all_finite(tensors) is True
    for t in tensors:
        for position in (0, t.numel() - 1):
            if t.numel() == 0:
                continue
            flat = t.view(-1)
            kept = flat[position].item()
            flat[position] = bad
            assert _fused.all_finite(tensors) is False, (t.shape, t.dtype, position)
            flat[position] = kept
    assert _fused.all_finite(tensors) is True


@pytest.mark.parametrize("route", ["team", "pool"])
def test_the_finiteness_pass_sees_every_threads_part(monkeypatch, route):
    """Split over threads, a bad value in any part is found (not only the calling thread's),
    on either route to the threads."""
    monkeypatch.setenv("TBFUNC_OPENMP", "1" if route == "team" else "0")
    monkeypatch.setattr(_parallel, "PARALLEL_MIN_NUMEL", 1000)
    tensors = [torch.zeros(3000), torch.zeros(2500, dtype=torch.float64)]
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for t, position in ((tensors[0], 10), (tensors[0], 2999), (tensors[1], 2400)):
            t[position] = float("nan")
            assert _fused.all_finite(tensors) is False
            t[position] = 0.0
        assert _fused.all_finite(tensors) is True
    finally:
        torch.set_num_threads(threads)


def test_the_finiteness_pass_steps_aside_where_it_cannot_read():
    """Not contiguous, another dtype, an empty list: None (the tensor-op check runs)."""
    t = torch.zeros(4, 6)
    assert _fused.all_finite([t.t()]) is None
    assert _fused.all_finite([t.half()]) is None
    assert _fused.all_finite([t, torch.zeros(3, dtype=torch.int64)]) is None
    assert _fused.all_finite([]) is None


def test_a_non_contiguous_posterior_is_still_checked():
    """The tensor-op check behind the C pass: a transposed rho with a nan is refused."""
    rho = torch.zeros(6, 4)
    rho[5, 1] = float("nan")
    node = tb.GaussianPosterior(torch.zeros(4, 6), rho.t())
    with pytest.raises(ValueError, match=r"posterior\['w'\].rho must be finite, got 1"):
        tb.sample({"w": node}, tb.random.key(0))
