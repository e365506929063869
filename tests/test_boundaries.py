"""What a new user hits first: dtypes, devices, train-mode layers, empty and malformed trees,
non-finite values, out-of-range keys, and errors that say what to fix (issue 8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tbfunc as tb
from helpers import data, mlp, seeded

KEY = tb.random.key(0)


def entry_points(net, post, x):
    """Every public entry point that runs the module, as zero-argument calls."""
    y = torch.zeros(len(x), dtype=torch.long)
    return {
        "predict": lambda: tb.predict(net, post, KEY, x, num_samples=2),
        "functional_call": lambda: tb.functional_call(net, post, KEY, x),
        "nelbo": lambda: tb.nelbo(
            net, post, KEY, x, y, loss_fn=F.cross_entropy, num_data=10, num_samples=2
        ),
    }


# -- 1. reductions in half precision -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kl_accumulates_in_float32(dtype):
    """float16 sums overflowed to inf (and inf - inf = nan); bfloat16 lost 0.1%. The KL of
    the half-precision posterior must equal the float64 KL of the very same values."""
    layer = seeded(lambda: nn.Linear(1000, 300)).to(dtype)
    post = tb.from_module(layer, sigma_scale=0.1)
    wide = {
        n: tb.PretrainedGaussianPosterior(p.mu.double(), p.rho.double()) for n, p in post.items()
    }
    kl = tb.kl_divergence(post)
    assert kl.dtype == torch.float32 and torch.isfinite(kl)
    torch.testing.assert_close(kl.double(), tb.kl_divergence(wide), rtol=1e-4, atol=0)
    mean = tb.kl_divergence(post, reduction="mean")
    torch.testing.assert_close(
        mean.double(), tb.kl_divergence(wide, reduction="mean"), rtol=1e-4, atol=0
    )
    laplace = tb.kl_divergence(post, tb.LaplacePrior(0.0, 0.5))
    torch.testing.assert_close(
        laplace.double(), tb.kl_divergence(wide, tb.LaplacePrior(0.0, 0.5)), rtol=1e-4, atol=0
    )
    mixture = tb.ScaleMixturePrior(0.5, 1.0, 0.1)
    mc = tb.kl_divergence(post, mixture, key=KEY, num_samples=2)
    assert mc.dtype == torch.float32 and torch.isfinite(mc)


def test_half_precision_nelbo_is_finite_and_float32():
    net = seeded(lambda: nn.Sequential(nn.Linear(1000, 300), nn.ReLU(), nn.Linear(300, 3)))
    net = net.half().eval()
    post = tb.from_module(net, sigma_scale=0.1)
    x = data(4, 1000).half()
    y = torch.tensor([0, 1, 2, 0])
    value = tb.nelbo(net, post, KEY, x, y, loss_fn=F.cross_entropy, num_data=100)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    per_point = tb.nelbo(
        net,
        post,
        KEY,
        x,
        y,
        log_likelihood=lambda out, t: -F.cross_entropy(out.float(), t, reduction="none"),
        num_data=100,
    )
    torch.testing.assert_close(per_point, value, rtol=1e-3, atol=1e-3)


# -- 2. inputs on another device -----------------------------------------------------------------


def test_meta_and_other_device_inputs_are_refused_by_every_entry_point():
    """vmap returned the sampled biases for a meta input; the loop raised."""
    net = mlp()
    post = tb.from_module(net)
    for name, call in entry_points(net, post, torch.empty(3, 5, device="meta")).items():
        with pytest.raises(
            ValueError,
            match=rf"args\[0\] must be a tensor with data, got a tensor of shape \(3, 5\), dtype torch.float32 on meta. {name} cannot run on meta tensors.",
        ):
            call()
    meta_net = mlp().to("meta")
    meta_post = tb.from_module(meta_net)
    with pytest.raises(
        ValueError,
        # (before, this said "Move it with .to('meta')", which then failed in the noise op)
        match=r"predict needs weights with values, got a posterior on the meta device",
    ):
        tb.predict(meta_net, meta_post, KEY, data(3, 5), num_samples=2)


# -- 4. non-finite posteriors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [("rho", float("nan"), "nan"), ("mu", float("inf"), "inf"), ("rho", float("-inf"), "-inf")],
)
def test_non_finite_nodes_are_refused_at_every_boundary(field, value, kind):
    net = mlp()
    post = tb.from_module(net, sigma_scale=0.1)
    bad = getattr(post["2.weight"], field).clone()
    bad[1, 2] = value
    post["2.weight"] = post["2.weight"]._replace(**{field: bad})
    x = data(3, 5)
    calls = {
        **entry_points(net, post, x),
        "sample": lambda: tb.sample(post, KEY),
        "kl_divergence": lambda: tb.kl_divergence(post),
    }
    for call in calls.values():
        with pytest.raises(
            ValueError,
            match=rf"posterior\['2.weight'\].{field} must be finite, got 1 non-finite value\(s\) \({kind}\) of 48. A diverged optimizer step",
        ):
            call()


def test_finite_check_survives_sums_that_overflow():
    """The cheap check sums each tensor; a finite tensor whose sum overflows is still fine."""
    big = torch.full((4,), 3e38)
    node = tb.PretrainedGaussianPosterior(big, torch.zeros(4))
    assert torch.isfinite(tb.sample({"w": node}, KEY)["w"]).all()


# -- 8. empty posteriors -------------------------------------------------------------------------


def test_from_module_refuses_to_select_nothing():
    buffers_only = nn.BatchNorm1d(3, affine=False)
    with pytest.raises(
        ValueError,
        match=r"from_module selected no parameter: BatchNorm1d has no floating-point parameters. Pass posterior=\{\} to predict",
    ):
        tb.from_module(buffers_only)
    net = mlp()
    with pytest.raises(
        ValueError, match="from_module selected no parameter: include and exclude leave none"
    ):
        tb.from_module(net, include="0.*", exclude="0.*")
    with pytest.raises(
        ValueError, match="from_module selected no parameter: include and exclude leave none"
    ):
        tb.from_module(net, include=lambda name, p: False)


@pytest.mark.parametrize("strategy", ["auto", "vmap", "loop"])
def test_empty_posterior_means_deterministic_forwards(strategy):
    net = mlp()
    x = data(4, 5)
    out = tb.predict(net, {}, KEY, x, num_samples=3, strategy=strategy, chunk_size=2)
    assert out.shape == (3, 4, 3)
    for s in range(3):
        torch.testing.assert_close(out[s], net(x), rtol=0, atol=0)
    torch.testing.assert_close(tb.functional_call(net, {}, KEY, x), net(x), rtol=0, atol=0)
    assert tb.sample({}, KEY) == {} and tb.sample({}, KEY, num_samples=2) == {}
    assert tb.choose_strategy(net, {}, x) == "loop"


def test_empty_posterior_kl_is_zero_and_nelbo_is_the_nll():
    for reduction in ("sum", "mean"):
        assert tb.kl_divergence({}, reduction=reduction).item() == 0.0
    net, x, y = mlp(), data(4, 5), torch.tensor([0, 1, 2, 0])
    value = tb.nelbo(net, {}, KEY, x, y, loss_fn=F.cross_entropy, num_data=10)
    torch.testing.assert_close(value, F.cross_entropy(net(x), y))


# -- 10. one rule for training-mode layers ---------------------------------------------------


def stateful_cases():
    spectral_old = seeded(lambda: nn.Sequential(nn.utils.spectral_norm(nn.Linear(5, 3))))
    spectral_new = seeded(
        lambda: nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(5, 3)))
    )
    return {
        "dropout": (
            seeded(lambda: nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5))),
            r"got Dropout '1' in training mode: its forward would draw dropout masks from the global RNG. Call module.eval\(\) first.",
        ),
        "alpha-dropout": (
            seeded(lambda: nn.Sequential(nn.Linear(5, 3), nn.AlphaDropout(0.2))),
            r"got AlphaDropout '1' in training mode: its forward would draw dropout masks",
        ),
        "batchnorm": (
            seeded(lambda: nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))),
            r"got BatchNorm1d '1' in training mode: its forward would update running statistics with sampled weights",
        ),
        "spectral-norm-hook": (
            spectral_old,
            r"got Linear '0' in training mode: its forward would update its spectral-norm power-iteration vectors",
        ),
        "spectral-norm-parametrization": (
            spectral_new,
            r"got _SpectralNorm '0.parametrizations.weight.0' in training mode: its forward would update its spectral-norm",
        ),
    }


@pytest.mark.parametrize("case", list(stateful_cases()))
def test_training_mode_layers_are_refused_by_every_entry_point(case):
    net, message = stateful_cases()[case]
    net.train()
    post = tb.from_module(net, include="*bias")
    x = data(4, 5)
    for name, call in entry_points(net, post, x).items():
        buffers = {n: b.clone() for n, b in net.named_buffers()}
        with pytest.raises(ValueError, match=rf"module must be in eval mode for {name}, {message}"):
            call()
        assert all(torch.equal(b, buffers[n]) for n, b in net.named_buffers())
    net.eval()
    for call in entry_points(net, post, x).values():
        call()


def test_rnn_and_attention_dropout_in_training_mode_are_refused():
    lstm = seeded(lambda: nn.LSTM(4, 4, num_layers=2, dropout=0.3)).train()
    with pytest.raises(
        ValueError, match="got LSTM '\\(root\\)' in training mode: its forward would draw dropout"
    ):
        tb.predict(lstm, tb.from_module(lstm), KEY, data(3, 2, 4), num_samples=2)
    mha = seeded(lambda: nn.MultiheadAttention(4, 2, dropout=0.1)).train()
    q = data(3, 2, 4)
    with pytest.raises(ValueError, match="got MultiheadAttention '\\(root\\)' in training mode"):
        tb.functional_call(mha, tb.from_module(mha), KEY, (q, q, q))


class FunctionalDropout(nn.Module):
    """Dropout written as a call, as in Hugging Face attention: no Dropout layer to inspect."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)

    def forward(self, x):
        return F.dropout(self.linear(x), 0.5, training=self.training)


def test_forwards_that_draw_from_the_global_rng_fail_and_leave_it_untouched():
    """The autouse fixture checks torch.get_rng_state() after the test as well."""
    net = seeded(FunctionalDropout).train()
    post = tb.from_module(net)
    before = torch.get_rng_state()
    for name, call in entry_points(net, post, data(4, 5)).items():
        with pytest.raises(
            RuntimeError,
            match=rf"{name}: the module's forward drew from the global RNG \(e.g. F.dropout with training=True",
        ):
            call()
        assert torch.equal(torch.get_rng_state(), before)
    net.eval()
    for call in entry_points(net, post, data(4, 5)).values():
        call()


# -- 11. errors that point at the cause ------------------------------------------------------


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_input_mistakes_name_the_layer_and_the_shapes_not_vmap(strategy):
    net = mlp()
    post = tb.from_module(net)
    with pytest.raises(RuntimeError) as info:
        tb.predict(net, post, KEY, data(4, 3), num_samples=2, strategy=strategy)
    message = str(info.value)
    assert message.startswith(
        "predict failed in submodule '0' (Linear(in_features=5, out_features=16, bias=True)) "
        "called with tensors ['(4, 3) torch.float32']: mat1 and mat2 shapes cannot be multiplied"
    )
    assert "strategy='loop'" not in message and message.endswith(".")
    with pytest.raises(
        RuntimeError,
        match=r"predict failed in submodule '0' .* \['\(4, 5\) torch.float64'\]: .*dtype",
    ):
        tb.predict(
            net, post, KEY, data(4, 5, dtype=torch.float64), num_samples=2, strategy=strategy
        )


class NoBatchingRule(nn.Module):
    """A forward that runs alone but that vmap cannot batch (a data-dependent .item())."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 3)

    def forward(self, x):
        out = self.linear(x)
        return out * float(out.sum().item() > 0)


def test_vmap_only_failures_suggest_the_loop_and_name_the_entry_point():
    net = seeded(NoBatchingRule).eval()
    post = tb.from_module(net)
    x, y = data(4, 5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(
        RuntimeError,
        match=r"^predict\(strategy='vmap'\) failed inside torch.func.vmap, although the forward runs for one weight sample without it: .*Use strategy='loop' for modules whose forward vmap cannot batch.$",
    ):
        tb.predict(net, post, KEY, x, num_samples=2, strategy="vmap")
    with pytest.raises(
        RuntimeError, match=r"^nelbo\(strategy='vmap'\) failed inside torch.func.vmap"
    ):
        tb.nelbo(
            net,
            post,
            KEY,
            x,
            y,
            loss_fn=F.cross_entropy,
            num_data=4,
            num_samples=2,
            strategy="vmap",
        )
    # auto never picks what cannot run, and equals the loop
    loop = tb.predict(net, post, KEY, x, num_samples=2, strategy="loop")
    assert tb.choose_strategy(net, post, x) == "loop"
    torch.testing.assert_close(tb.predict(net, post, KEY, x, num_samples=2), loop)


def test_malformed_nodes_name_the_node_and_the_field():
    net = mlp()
    post = tb.from_module(net)
    node = post["0.weight"]
    x = data(2, 5)
    cases = [
        (
            (node.mu, node.rho),
            TypeError,
            r"posterior\['0.weight'\] must be a posterior node \(e.g. tb.PretrainedGaussianPosterior\(mu, rho\)\) or a tensor, got an object of type tuple.",
        ),
        (
            node._replace(rho=None),
            TypeError,
            r"posterior\['0.weight'\].rho must be a tensor like mu \(shape \(16, 5\), torch.float32, cpu\), got an object of type NoneType.",
        ),
        (
            node._replace(rho=node.rho[:3]),
            ValueError,
            r"posterior\['0.weight'\].rho must be a tensor like mu \(shape \(16, 5\), torch.float32, cpu\), got a tensor of shape \(3, 5\)",
        ),
        (
            node._replace(rho=node.rho.double()),
            ValueError,
            r"posterior\['0.weight'\].rho must be a tensor like mu .* dtype torch.float64",
        ),
        (
            node._replace(mu=None),
            TypeError,
            r"posterior\['0.weight'\].mu must be a floating-point tensor, got an object of type NoneType.",
        ),
    ]
    for bad, error, match in cases:
        broken = {**post, "0.weight": bad}
        with pytest.raises(error, match=match):
            tb.predict(net, broken, KEY, x, num_samples=2)
        if not isinstance(bad, tuple):
            for call in (lambda b=broken: tb.sample(b, KEY), lambda b=broken: tb.kl_divergence(b)):
                with pytest.raises(error, match=match):
                    call()


# -- 13. keys ---------------------------------------------------------------------------------


def test_out_of_range_key_words_are_refused_not_masked():
    for bad in ([2**40, 5], [-5, 1], [0, 2**32]):
        with pytest.raises(
            ValueError,
            match=rf"key words must lie in \[0, 2\*\*32\), got \[{bad[0]}, {bad[1]}\]. Make one with tb.random.key\(seed\).",
        ):
            tb.random.split(torch.tensor(bad))
    net = mlp()
    with pytest.raises(ValueError, match="key words must lie in"):
        tb.predict(net, tb.from_module(net), torch.tensor([2**40, -5]), data(2, 5), num_samples=2)


def test_uint32_keys_from_jax_are_accepted_and_equal_int64_keys():
    """jax.random.key_data(...) arrives as uint32; the same words give the same bits."""
    words = [3_000_000_000, 12345]
    wide = torch.tensor(words, dtype=torch.int64)
    narrow = torch.tensor(words, dtype=torch.int64).to(torch.uint32)
    assert torch.equal(tb.random.split(narrow, 3), tb.random.split(wide, 3))
    assert torch.equal(tb.random.fold_in(narrow, 7), tb.random.fold_in(wide, 7))
    assert torch.equal(tb.random.normal(narrow, (5,)), tb.random.normal(wide, (5,)))
    net = mlp()
    post = tb.from_module(net, sigma_scale=0.1)
    torch.testing.assert_close(
        tb.predict(net, post, narrow, data(2, 5), num_samples=2),
        tb.predict(net, post, wide, data(2, 5), num_samples=2),
        rtol=0,
        atol=0,
    )


# -- planted bugs the old suite missed ---------------------------------------------------------


def test_integer_parameters_are_left_out_and_the_module_still_runs():
    net = mlp()
    net.register_parameter("steps", nn.Parameter(torch.tensor([1, 2]), requires_grad=False))
    post = tb.from_module(net, sigma_scale=0.1)
    assert "steps" not in post and len(post) == 4
    x = data(3, 5)
    assert tb.predict(net, post, KEY, x, num_samples=2).shape == (2, 3, 3)
    assert tb.functional_call(net, post, KEY, x).shape == (3, 3)


# ----------------------------------------------------------------------------------------------
# Inputs that used to be accepted silently (issue 17): each is refused by message now.


def _nelbo(net, post, **options):
    """nelbo on a batch of 5 rows."""
    x, y = torch.ones(5, 3), torch.zeros(5, dtype=torch.long)
    loss = torch.nn.functional.cross_entropy
    return tb.nelbo(net, post, tb.random.key(0), x, y, loss_fn=loss, **options)


def _tiny():
    import helpers

    net = helpers.mlp((3, 4, 2))
    return net, tb.from_module(net)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda net, post: tb.from_module(net, sigma_scale=True),
            TypeError,
            r"sigma_scale must be a positive float, got bool True",
        ),
        (
            lambda net, post: tb.from_module(net, sigma_scale=float("inf")),
            ValueError,
            r"sigma_scale must be a positive finite float, got float inf",
        ),
        (
            lambda net, post: tb.sample(None, tb.random.key(0)),
            TypeError,
            r"posterior must be a posterior node or a tree of them \(e.g. tb.from_module's dict\), got an object of type NoneType",
        ),
        (
            lambda net, post: tb.mean(None),
            TypeError,
            r"posterior must be a posterior node or a tree of them",
        ),
        (
            lambda net, post: tb.mean([1, 2]),
            TypeError,
            r"posterior leaf '0' must be a posterior node or a tensor, got int 1",
        ),
        (
            lambda net, post: tb.kl_divergence(None),
            TypeError,
            r"posterior must be a posterior node or a tree of them",
        ),
        (
            lambda net, post: tb.parameters(None),
            TypeError,
            r"posterior must be a posterior node or a tree of them",
        ),
        (
            lambda net, post: _nelbo(net, post, num_data=2),
            ValueError,
            r"num_data must be the size of the whole data set, at least the batch's 5 rows, got int 2",
        ),
        (
            lambda net, post: _nelbo(net, post, num_data=20, kl_weight=float("nan")),
            ValueError,
            r"kl_weight must be a finite non-negative float, got float nan",
        ),
        (
            lambda net, post: tb.metrics.accuracy(
                torch.full((2, 5, 3), float("nan")), torch.zeros(5, dtype=torch.long)
            ),
            ValueError,
            r"logits must be free of NaN, got a tensor of shape \(2, 5, 3\).* 30 values are NaN",
        ),
        (
            lambda net, post: tb.metrics.auroc(
                torch.tensor([float("nan"), 1.0]), torch.tensor([2.0, 3.0])
            ),
            ValueError,
            r"scores_in must be free of NaN \(NaN has no rank\).* 1 are NaN",
        ),
        (
            lambda net, post: tb.metrics.auroc(
                torch.tensor([0.0, 1.0]), torch.tensor([float("nan"), 3.0])
            ),
            ValueError,
            r"scores_out must be free of NaN",
        ),
    ],
)
def test_inputs_once_accepted_silently_are_refused(call, error, message):
    net, post = _tiny()
    with pytest.raises(error, match=message):
        call(net, post)


def test_one_nan_logit_is_refused_by_every_classification_metric():
    logits = torch.zeros(2, 4, 3)
    logits[1, 2, 0] = float("nan")
    target = torch.zeros(4, dtype=torch.long)
    for metric in (tb.metrics.accuracy, tb.metrics.nll, tb.metrics.expected_calibration_error):
        with pytest.raises(ValueError, match=r"1 values are NaN"):
            metric(logits, target)
    acc = tb.metrics.Accumulator()
    with pytest.raises(ValueError, match=r"logits must be free of NaN"):
        acc.update(logits, target)


@pytest.mark.parametrize(
    ("log_sd", "error", "message"),
    [
        (
            torch.tensor([float("nan"), 0.0]),
            ValueError,
            r"log_sd_diag\['w'\] must be finite \(a log standard deviation\).* 1 values are NaN or infinite",
        ),
        (torch.tensor([float("inf"), 0.0]), ValueError, r"log_sd_diag\['w'\] must be finite"),
        (
            torch.tensor([1, 0]),
            TypeError,
            r"log_sd_diag\['w'\] must be a floating-point tensor, got a tensor of shape \(2,\), dtype torch.int64",
        ),
    ],
)
def test_from_posteriors_refuses_a_log_sd_that_is_no_log_sd(log_sd, error, message):
    with pytest.raises(error, match=message):
        tb.interop.from_posteriors({"w": torch.zeros(2)}, {"w": log_sd})


def test_load_refuses_a_file_whose_rho_is_shaped_unlike_mu(tmp_path):
    import helpers

    net = helpers.seeded(lambda: torch.nn.Linear(3, 2))
    path = tmp_path / "post.pt"
    tb.save(tb.from_module(net), path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["weight.rho"] = torch.zeros(5)
    torch.save(payload, path)
    with pytest.raises(
        ValueError, match=r"posterior\['weight'\].rho must be a tensor like mu \(shape \(2, 3\)"
    ):
        tb.load(path)  # no module given: the file alone must be consistent


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda net, post: tb.from_module(net, include=5),
            TypeError,
            r"include must be a glob string, a list of them or a predicate, got int 5",
        ),
        (
            lambda net, post: tb.from_module(net, exclude=2.0),
            TypeError,
            r"exclude must be a glob string, a list of them or a predicate, got float 2.0",
        ),
        (
            lambda net, post: tb.predict(
                net, post, tb.random.key(0), torch.ones(2, 3), (1, 2), num_samples=2
            ),
            TypeError,
            r"kwargs must be a dict \(or mapping\) of keyword arguments or None, got an object of type tuple. Pass positional inputs as a tuple in args",
        ),
        (
            lambda net, post: tb.distributed.shard(5, rank=0, world_size=0),
            ValueError,
            r"world_size must be a positive int \(>= 1\), got int 0",
        ),
        (
            lambda net, post: tb.distributed.shard(5, rank=0.5, world_size=2),
            TypeError,
            r"rank must be an int, got float 0.5",
        ),
        (
            lambda net, post: tb.distributed.shard(5, rank=2, world_size=2),
            ValueError,
            r"rank must be in \[0, 2\), got int 2",
        ),
    ],
)
def test_raw_errors_now_name_the_argument(call, error, message):
    net, post = _tiny()
    with pytest.raises(error, match=message):
        call(net, post)


def test_unreadable_files_and_empty_batches_get_named_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path, why in ((text, r"KeyError: 101"), (empty, r"EOFError")):
        with pytest.raises(
            ValueError,
            match=rf"is not a tbfunc posterior file: it cannot be read as one \({why}.*Was it written by tb.save",
        ):
            tb.load(path)
    nothing = torch.zeros(2, 0, 3)
    for metric in (tb.metrics.accuracy, tb.metrics.expected_calibration_error):
        with pytest.raises(
            ValueError,
            match=r"logits must be a tensor holding at least one sample and example, got a tensor of shape \(2, 0, 3\).* It is empty",
        ):
            metric(nothing, torch.zeros(0, dtype=torch.long))
    acc = tb.metrics.Accumulator()
    acc.update(nothing, torch.zeros(0, dtype=torch.long))  # streaming: an empty batch adds nothing
    assert acc.count == 0


def test_a_posterior_on_the_meta_device_is_refused_by_name():
    net = mlp().to("meta")
    post = tb.from_module(net)
    x = torch.empty(2, 5, device="meta")
    for call in (
        lambda: tb.predict(net, post, tb.random.key(0), x, num_samples=2),
        lambda: tb.functional_call(net, post, tb.random.key(0), x),
    ):
        with pytest.raises(ValueError, match="meta device .shapes only.. Materialise the module"):
            call()


def test_from_posteriors_names_a_family_that_is_not_gaussian():
    params = {"w": torch.zeros(2, 3)}
    for family in ("str", tb.LaplacePrior, int):
        with pytest.raises(TypeError, match="family must be tb.PretrainedGaussianPosterior"):
            tb.interop.from_posteriors(params, {"w": torch.zeros(2, 3)}, family=family)


def test_posterior_module_refuses_another_models_view_by_shape():
    small, large = mlp((5, 4, 3)), mlp((5, 6, 3))
    view = tb.PosteriorModule(small, tb.from_module(small))
    other = tb.PosteriorModule(large, tb.from_module(large))
    with pytest.raises(
        ValueError,
        match=r"state_dict\['0.weight.mu'\] must have this view's shape \(4, 5\), got a tensor of shape \(6, 5\)",
    ):
        view.load_state_dict(other.state_dict())
    view.load_state_dict(tb.PosteriorModule(small, tb.from_module(small, rho=-1.0)).state_dict())
    assert float(view.posterior()["0.weight"].rho.detach().mean()) == -1.0
