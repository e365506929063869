"""The per-call shortcuts must agree with the general path they skip.

- Sampled tensors are swapped into the module's parameter tables directly, unless the module
  has tied weights, parametrizations or is scripted: same outputs as functional_call, and the
  module's own tensors are back afterwards, also when the forward raises.
- Eager forwards enter the vmap level directly (``_vmap``), not through ``torch.func.vmap``:
  the same outputs and gradients, for every kind of output leaf, and the level is closed again
  when the forward raises.
- A flat dict of nodes and tensors (``from_module``'s trees) is drawn without optree's walk:
  the draws of the general route, in the dict's own key order.
- Kernel switches for attention are skipped for modules made only of ``torch.nn`` layers
  without attention; any other module gets them.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import tbfunc as tb
from helpers import data, mlp, seeded
from tbfunc import _forward, _sampling, _structure, _vmap

KEY = tb.random.key(4)


def reference(module, posterior, x, samples=3, strategy="loop"):
    """functional_call on tb.sample's draws: the general path, by definition (vmapped for
    "vmap": a batched matmul may round differently from S single ones)."""
    if strategy == "vmap":
        drawn = tb.sample(posterior, KEY, num_samples=samples)
        return torch.func.vmap(lambda p: torch.func.functional_call(module, p, (x,)))(drawn)
    keys = tb.random.split(KEY, samples)
    return torch.stack(
        [torch.func.functional_call(module, tb.sample(posterior, k), (x,)) for k in keys]
    )


class Symmetric(nn.Module):
    def forward(self, w):
        return (w + w.T) / 2


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("kind", ["plain", "parametrized", "buffer"])
def test_swapped_tensors_give_functional_calls_outputs(kind, strategy):
    net = mlp((4, 4, 2))
    if kind == "parametrized":  # the drawn tensor feeds the parametrization
        parametrize.register_parametrization(net[0], "weight", Symmetric())
    if kind == "buffer":
        net.register_buffer("offset", torch.zeros(2))
        original = net.forward
        net.forward = lambda x: original(x) + net.offset  # type: ignore[method-assign]
    post = tb.from_module(net)  # parametrized: "0.parametrizations.weight.original" is drawn
    if kind == "buffer":
        post["offset"] = torch.ones(2)  # a plain tensor leaf replaces the buffer
    x = data(5, 4)
    before = {n: t for n, t in net.state_dict(keep_vars=True).items()}
    out = tb.predict(net, post, KEY, x, num_samples=3, strategy=strategy)
    torch.testing.assert_close(out, reference(net, post, x, 3, strategy), rtol=0, atol=0)
    after = net.state_dict(keep_vars=True)
    assert all(after[n] is t for n, t in before.items()), "the module's own tensors are back"


def test_the_module_gets_its_tensors_back_when_the_forward_raises():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            self.lin(x)
            raise RuntimeError("boom")

    net = seeded(Fails).eval()
    own = net.lin.weight
    post = tb.from_module(net)
    for strategy in ("vmap", "loop"):
        with pytest.raises(RuntimeError, match="boom"):
            tb.predict(net, post, KEY, data(2, 3), num_samples=2, strategy=strategy)
        assert net.lin._parameters["weight"] is own
        # a vmap level left open would batch (and refuse randomness in) all later code
        assert torch._C._functorch.peek_interpreter_stack() is None


class ThreeLeaves(nn.Module):
    """Outputs of every kind a forward returns: one the weights reach, one no batched input
    reaches (returned expanded to S rows), and a non-tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("scale", torch.arange(3.0))

    def forward(self, x):
        return self.drop(self.lin(x)), self.scale * 2, None


@pytest.mark.parametrize("dropout", [False, True])
def test_the_direct_vmap_level_gives_torch_func_vmaps_outputs_and_gradients(monkeypatch, dropout):
    net = seeded(ThreeLeaves).eval()
    post = {
        name: node._replace(mu=node.mu.requires_grad_(), rho=node.rho.requires_grad_())
        for name, node in tb.from_module(net).items()
    }
    x = data(5, 4)

    def run():
        out = tb.predict(net, post, KEY, x, num_samples=3, strategy="vmap", dropout=dropout)
        leaves = [post[name] for name in sorted(post)]
        grads = torch.autograd.grad(out[0].square().sum(), [t for n in leaves for t in n])
        return out, grads

    direct = run()
    monkeypatch.setattr(_vmap, "_PRIMITIVES", None)  # torch.func.vmap itself
    public = run()
    assert direct[0][1].shape == (3, 3) and direct[0][2] is None and public[0][2] is None
    torch.testing.assert_close(direct, public, rtol=0, atol=0)
    assert not torch.equal(direct[0][0][0], direct[0][0][1]), "samples differ"


def test_the_direct_vmap_level_nests_inside_torch_func_transforms():
    """Inside torch.func.grad and an outer torch.func.vmap the level is entered one deeper, as
    torch.func.vmap enters it: the same gradient as autograd, the same draws as a loop."""
    net = mlp((4, 4, 2))
    post = tb.from_module(net, sigma_scale=0.1)
    x = data(3, 4)

    def loss(p):
        return tb.predict(net, p, KEY, x, num_samples=3, strategy="vmap").square().mean()

    functional = torch.func.grad(loss)(post)
    live = {
        n: p._replace(mu=p.mu.requires_grad_(), rho=p.rho.requires_grad_()) for n, p in post.items()
    }
    loss(live).backward()
    for name, node in live.items():
        torch.testing.assert_close(functional[name].mu, node.mu.grad)
        torch.testing.assert_close(functional[name].rho, node.rho.grad)
    keys = tb.random.split(KEY, 2)
    batched = torch.func.vmap(
        lambda k: tb.predict(net, post, k, x, num_samples=3, strategy="vmap"), randomness="error"
    )(keys)
    looped = torch.stack(
        [tb.predict(net, post, k, x, num_samples=3, strategy="vmap") for k in keys]
    )
    torch.testing.assert_close(batched, looped)


def test_torch_export_gets_torch_func_vmap_itself(monkeypatch):
    """torch.export traces torch.func.vmap, not the primitives beneath it: while exporting,
    the forward must go through torch.func.vmap (and only then)."""
    calls = []
    public = torch.func.vmap

    def spy(*args, **kwargs):
        calls.append(1)
        return public(*args, **kwargs)

    monkeypatch.setattr(torch.func, "vmap", spy)
    net = mlp((4, 4, 2))
    post = tb.from_module(net)
    eager = tb.predict(net, post, KEY, data(3, 4), num_samples=2, strategy="vmap")
    assert not calls
    monkeypatch.setattr(_vmap, "_exporting", lambda: True)
    exported = tb.predict(net, post, KEY, data(3, 4), num_samples=2, strategy="vmap")
    assert calls and torch.equal(exported, eager)


def test_the_direct_vmap_level_loads_vmaps_python_batching_rules_in_a_fresh_process():
    """torch.func.vmap loads a few batching rules (nll_loss, addr, ...) on its first call; a
    process whose first vmap is tbfunc's must get them too, or those ops fall back to a slow
    per-sample loop with a warning (an error here)."""
    script = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("error")
        import torch, tbfunc as tb
        import torch.nn.functional as F

        class Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(4, 3)

            def forward(self, x):
                target = torch.zeros(len(x), dtype=torch.long)
                return F.nll_loss(self.lin(x).log_softmax(-1), target, reduction="none")

        net = Loss().eval()
        post = tb.from_module(net)
        x = torch.ones(5, 4)
        key = tb.random.key(0)
        out = tb.predict(net, post, key, x, num_samples=3, strategy="vmap")
        loop = tb.predict(net, post, key, x, num_samples=3, strategy="loop")
        torch.testing.assert_close(out, loop)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("num_samples", [None, 3])
def test_flat_dicts_get_the_general_routes_draws_in_their_own_key_order(monkeypatch, num_samples):
    post = tb.from_module(mlp((4, 5, 3)))
    tree = {  # not sorted; a compiled module's prefix; a fixed tensor
        "2.bias": post["2.bias"],
        "_orig_mod.0.weight": post["0.weight"],
        "fixed": torch.arange(2.0),
        "0.bias": post["0.bias"],
    }
    short = tb.sample(tree, KEY, num_samples=num_samples)
    # a dict subclass is no flat dict: optree keeps an OrderedDict's type (and order)
    ordered = tb.sample(collections.OrderedDict(tree), KEY, num_samples=num_samples)
    monkeypatch.setattr(_sampling, "_flat", lambda tree: None)
    general = tb.sample(tree, KEY, num_samples=num_samples)
    assert list(short) == list(general) == list(tree)
    torch.testing.assert_close(short, general, rtol=0, atol=0)
    assert type(ordered) is collections.OrderedDict
    torch.testing.assert_close(dict(ordered), general, rtol=0, atol=0)
    # the compiled module's name draws as the eager one's
    assert torch.equal(
        short["_orig_mod.0.weight"], tb.sample(post, KEY, num_samples=num_samples)["0.weight"]
    )


@pytest.mark.parametrize("num_samples", [1, 2])
def test_nelbo_on_a_flat_dict_gets_the_general_routes_loss_and_gradients(monkeypatch, num_samples):
    """nelbo hands the draw its softplus(rho) per leaf by optree's (sorted) leaf order; the
    short route must index its leaves the same way (from_module's keys are not sorted)."""
    post = {
        name: node._replace(mu=node.mu.requires_grad_(), rho=node.rho.requires_grad_())
        for name, node in tb.from_module(mlp((4, 5, 3))).items()
    }
    assert list(post) != sorted(post)
    x, y = data(6, 4), torch.arange(6) % 3
    leaves = [t for name in sorted(post) for t in post[name]]

    def run():
        loss = tb.nelbo(
            mlp((4, 5, 3)),
            post,
            KEY,
            x,
            y,
            loss_fn=F.cross_entropy,
            num_data=60,
            num_samples=num_samples,
        )
        return loss, torch.autograd.grad(loss, leaves)

    short = run()
    monkeypatch.setattr(_sampling, "_flat", lambda tree: None)
    torch.testing.assert_close(short, run(), rtol=0, atol=0)


def test_tied_weights_take_the_general_path_and_stay_tied():
    net = mlp((3, 3, 3))
    net[2].weight = net[0].weight  # tied
    assert _forward._slots(net, ["0.weight"]) is None
    post = tb.from_module(net, include="0.weight")
    x = data(2, 3)
    out = tb.predict(net, post, KEY, x, num_samples=2, strategy="vmap")
    torch.testing.assert_close(out, reference(net, post, x, 2, "vmap"), rtol=0, atol=0)


class Attention(nn.Module):
    """A user's module calling scaled_dot_product_attention itself (as Hugging Face models do)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.seen.append(
            (torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled())
        )
        q = self.proj(x)
        return F.scaled_dot_product_attention(q, q, q)


def test_attention_switches_are_set_for_modules_that_may_attend_and_restored():
    net = seeded(Attention).eval()
    post = tb.from_module(net)
    flash, fastpath = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.mha.get_fastpath_enabled(),
    )
    tb.predict(net, post, KEY, data(2, 5, 8), num_samples=2, strategy="vmap")
    assert net.seen and all(state == (False, False) for state in net.seen)
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled()) == (
        flash,
        fastpath,
    )


def test_plain_torch_nn_models_are_left_alone():
    assert not _structure.module_facts(mlp()).attends
    assert _structure.module_facts(seeded(Attention)).attends
    encoder = seeded(lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    assert _structure.module_facts(nn.Sequential(nn.Identity(), encoder)).attends


def test_a_forward_that_draws_and_then_raises_leaves_the_global_rng_as_it_was():
    """The guard restores the state on the way out of an error too (the error itself stays)."""

    class DrawsThenFails(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            torch.rand(3)
            raise RuntimeError("boom")

    net = seeded(DrawsThenFails).eval()
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        tb.predict(net, tb.from_module(net), KEY, data(1, 2), num_samples=2, strategy="loop")
    assert torch.equal(torch.get_rng_state(), before)


def test_structure_changed_after_a_call_is_seen():
    """What is kept per module (ties, attention, slots) must follow the module: tying weights,
    swapping a layer or deleting a parameter after a first predict changes the next one."""
    net = mlp((3, 3, 3))
    x = data(2, 3)
    post = tb.from_module(net, include="0.weight")
    tb.predict(net, post, KEY, x, num_samples=2, strategy="vmap")  # facts and slots kept
    net[2].weight = net[0].weight  # tied now: the draw must reach layer 2 too
    tied = tb.predict(net, post, KEY, x, num_samples=2, strategy="vmap")
    torch.testing.assert_close(tied, reference(net, post, x, 2, "vmap"), rtol=0, atol=0)

    net = mlp((3, 3, 3))
    post = tb.from_module(net, include="2.*")
    tb.predict(net, post, KEY, x, num_samples=2, strategy="loop")
    net[2] = seeded(lambda: nn.Linear(3, 3))  # a new layer: the old slots point nowhere
    swapped = tb.predict(net, post, KEY, x, num_samples=2, strategy="loop")
    torch.testing.assert_close(swapped, reference(net, post, x, 2), rtol=0, atol=0)
    assert net[2].weight is net[2]._parameters["weight"]  # and the new layer keeps its own

    net = mlp((3, 3, 3))
    net.register_buffer("shift", torch.zeros(3))
    post = {"shift": torch.ones(3), **tb.from_module(net)}
    tb.predict(net, post, KEY, x, num_samples=2, strategy="loop")
    del net.shift  # no hook fires for a deletion: the name check (every call) catches it
    with pytest.raises(ValueError, match=r"posterior\['shift'\] names no parameter or buffer"):
        tb.predict(net, post, KEY, x, num_samples=2, strategy="loop")


def test_kept_name_checks_follow_new_nodes_and_new_parameters():
    """check_matches keeps its result for the same nodes and module structure only."""
    net = mlp((3, 4, 2))
    x = data(2, 3)
    post = tb.from_module(net)
    tb.predict(net, post, KEY, x, num_samples=2)  # checked and kept
    post["0.weight"] = tb.PretrainedGaussianPosterior.from_param(torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"posterior\['0.weight'\].mu has shape \(5, 3\)"):
        tb.predict(net, post, KEY, x, num_samples=2)
    post = tb.from_module(net)
    tb.predict(net, post, KEY, x, num_samples=2)
    net[0].weight = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))  # a hook fires
    with pytest.raises(
        ValueError, match=r"dtype torch.float32 but the module's parameter has dtype torch.float64"
    ):
        tb.predict(net, post, KEY, x, num_samples=2)


def test_what_is_kept_per_module_does_not_keep_the_module_alive():
    import gc
    import weakref

    net = mlp((3, 4, 2))
    post = tb.from_module(net)
    for strategy in ("vmap", "loop", "auto"):
        tb.predict(net, post, KEY, data(2, 3), num_samples=2, strategy=strategy)
    alive = weakref.ref(net)
    del net, post
    gc.collect()
    assert alive() is None
