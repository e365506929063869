"""The same contracts on a CUDA device (skipped without one; run on the lent GPU machine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tbfunc as tb
from helpers import CUDA, data, mlp
from tbfunc import testing
from tbfunc._sampling import hash32

pytestmark = [CUDA, pytest.mark.cuda]
KEY = tb.random.key(0)


def test_normal_on_cuda():
    out = tb.random.normal(KEY, (1000, 10), device="cuda", dtype=torch.float64)
    assert out.device.type == "cuda" and out.dtype == torch.float64
    assert torch.equal(out, tb.random.normal(KEY, (1000, 10), device="cuda", dtype=torch.float64))
    testing.assert_moments(out.cpu(), 0.0, 1.0, fail_prob=1e-6)
    testing.assert_normal(out.cpu(), 0.0, 1.0, fail_prob=1e-6)
    keys = tb.random.split(KEY, 4)
    loop = torch.stack([tb.random.normal(k, (7,), device="cuda") for k in keys])
    assert torch.equal(
        torch.func.vmap(lambda k: tb.random.normal(k, (7,), device="cuda"))(keys), loop
    )
    assert tb.random.normal(KEY, (5,), device="cuda", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_sampling_and_predict_on_cuda():
    net = mlp((5, 32, 3)).cuda()
    post = tb.from_module(net, sigma_scale=0.1)
    many = tb.sample(post, KEY, num_samples=4)
    assert all(v.device.type == "cuda" for v in many.values())
    one = tb.sample(post, tb.random.split(KEY, 4)[3])
    assert all(torch.equal(many[n][3], one[n]) for n in post)
    drawn = tb.sample(post, KEY)
    for name, node in post.items():
        assert torch.equal(drawn[name], node.sample(tb.random.fold_in(KEY, hash32(name))))
    x = data(6, 5).cuda()
    loop = torch.stack([tb.functional_call(net, post, k, x) for k in tb.random.split(KEY, 8)])
    for strategy in ("vmap", "loop", "auto"):
        out = tb.predict(net, post, KEY, x, num_samples=8, strategy=strategy, chunk_size=3)
        torch.testing.assert_close(out, loop, rtol=1e-4, atol=1e-5)


def test_training_step_on_cuda():
    net = mlp((5, 16, 3)).cuda()
    post = tb.from_module(net)
    opt = torch.optim.Adam(tb.parameters(post), lr=1e-2)
    x, y = data(8, 5).cuda(), (torch.arange(8) % 3).cuda()
    for strategy in ("vmap", "loop"):
        loss = tb.nelbo(
            net,
            post,
            KEY,
            x,
            y,
            loss_fn=F.cross_entropy,
            num_data=100,
            num_samples=3,
            strategy=strategy,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert post["0.weight"].rho.grad.device.type == "cuda"
    kl = tb.kl_divergence(post, tb.GaussianPrior(0.0, 0.5))
    reference = sum(
        torch.distributions.kl_divergence(
            node.distribution, torch.distributions.Normal(0.0, 0.5)
        ).sum()
        for node in post.values()
    )
    torch.testing.assert_close(kl, reference)


@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")  # inductor's advice
def test_compiled_on_cuda():
    net = mlp((5, 16, 3)).cuda()
    post = tb.from_module(net, sigma_scale=0.1)
    x = data(4, 5).cuda()

    def run(p, key):
        return tb.functional_call(net, p, key, (x,))

    compiled = torch.compile(run, fullgraph=True)
    torch.testing.assert_close(compiled(post, KEY), run(post, KEY), rtol=1e-5, atol=1e-6)


def test_kernel_derives_the_same_keys_as_the_host():
    """On CUDA one kernel draws every segment and runs fold_in itself: the bits must equal
    drawing each segment alone with the key the host derives."""
    from tbfunc._noise import noise as normal_folded

    keys = tb.random.split(KEY, 3)
    hashes, numels = [5, 2**32 - 1, 77], [3000, 20, 1]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        flat = normal_folded(keys, hashes, numels, dtype, torch.device("cuda"))
        expected = torch.cat(
            [
                tb.random.normal(tb.random.fold_in(k, h), (n,), device="cuda", dtype=dtype)
                for h, n in zip(hashes, numels, strict=True)
                for k in keys
            ]
        )
        assert torch.equal(flat, expected), dtype
    testing.assert_independent(flat[:3000].cpu(), flat[3000:6000].cpu())


def test_fused_kernel_and_autograd_paths_agree():
    """Without gradients one kernel writes mu + sigma * eps; with them the op draws eps and
    autograd records an addcmul. Both must give the same draws."""
    net = mlp((5, 300, 3)).cuda()
    post = tb.from_module(net, sigma_scale=0.1)
    plain = tb.sample(post, KEY, num_samples=3)
    tracked = {
        n: tb.PretrainedGaussianPosterior(p.mu.clone().requires_grad_(), p.rho)
        for n, p in post.items()
    }
    recorded = tb.sample(tracked, KEY, num_samples=3)
    for name in post:
        torch.testing.assert_close(recorded[name].detach(), plain[name], rtol=0, atol=1e-6)


def test_sampled_routes_on_cuda():
    """tb.optim.sampled's gradient equals nelbo's on the GPU (the tensor-op route), and
    Adam.sampled's steps equal tb.optim.sampled + step() there."""
    net = mlp((5, 16, 3)).cuda().requires_grad_(False)
    x, y = data(8, 5, seed=1).cuda(), (torch.arange(8) % 3).cuda()
    post = tb.from_module(net, sigma=0.3)
    params = tb.parameters(post)
    key = tb.random.key(4)
    loss = tb.nelbo(net, post, key, x, y, loss_fn=F.cross_entropy, num_data=40, num_samples=2)
    want = torch.autograd.grad(loss, params)
    for k in tb.random.split(key, 2):
        with tb.optim.sampled(net, post, k, num_data=40, num_samples=2):
            F.cross_entropy(net(x), y).backward()
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
    a = {n: type(v)(v.mu.detach().clone(), v.rho.detach().clone()) for n, v in post.items()}
    b = {n: type(v)(v.mu.detach().clone(), v.rho.detach().clone()) for n, v in post.items()}
    opt_a, opt_b = tb.optim.Adam(a, lr=0.05), tb.optim.Adam(b, lr=0.05)
    for step in range(3):
        k = tb.random.key(step)
        opt_a.zero_grad()
        with tb.optim.sampled(net, a, k, num_data=40):
            F.cross_entropy(net(x), y).backward()
        opt_a.step()
        opt_b.zero_grad()
        with opt_b.sampled(net, k, num_data=40):
            F.cross_entropy(net(x), y).backward()
        opt_b.step()
    for name in a:
        torch.testing.assert_close(b[name].mu, a[name].mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b[name].rho, a[name].rho, rtol=1e-5, atol=1e-6)
