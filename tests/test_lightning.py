"""``tbfunc.lightning.PosteriorLightningModule`` under a real ``Trainer``: the same numbers as a
plain loop with the same keys, a bit-identical resume, checkpoints without the base, the base
kept in eval mode, and validation / prediction through ``tb.predict``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tbfunc as tb
from helpers import seeded

pl = pytest.importorskip("lightning.pytorch")
from tbfunc.lightning import PosteriorLightningModule  # noqa: E402

pytestmark = [
    # Lightning 2.6 on torch 2.13 asks for a deprecated pytree class; not our code.
    pytest.mark.filterwarnings(
        "ignore:`isinstance.treespec, LeafSpec.` is deprecated:FutureWarning"
    ),
    # Lightning's advice for real runs (more workers, a logger, a small data set's few
    # batches), not errors of ours.
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*number of training batches.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*LightningModule.log.*no logger configured.*:UserWarning"),
    pytest.mark.filterwarnings(
        "ignore:.*Checkpoint directory.*exists and is not empty.*:UserWarning"
    ),
]

BATCH, EPOCHS = 64, 2


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    return (x[:640], y[:640]), (x[640:896], y[640:896])


def _net(dropout=0.0):
    return seeded(
        lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 10))
    ).eval()


def _loaders(key):
    (xt, yt), (xv, yv) = _digits()
    train = DataLoader(
        TensorDataset(xt, yt),
        batch_size=BATCH,
        sampler=tb.KeyedSampler(len(xt), key),
        generator=torch.Generator().manual_seed(0),  # the loader's own seed draw, not global
    )
    val = DataLoader(TensorDataset(xv, yv), batch_size=100, generator=torch.Generator())
    return train, val


def _trainer(tmp_path=None, epochs=EPOCHS, **options):
    callbacks = []
    if tmp_path is not None:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
        )
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=tmp_path is not None,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        **options,
    )


def _model(net, **options):
    post = tb.from_module(net, sigma_scale=0.1)
    options.setdefault("lr", 1e-2)
    return PosteriorLightningModule(net, post, tb.random.key(5), num_data=640, **options)


def _plain_loop(net, train, optimizer, kl_weight=1.0):
    """The loop the module must equal: step t, batch b draws with
    fold_in(fold_in(train_key, t), b)."""
    post = tb.from_module(net, sigma_scale=0.1)
    opt = optimizer(post)
    train_key, _ = tb.random.split(tb.random.key(5))
    step = 0
    for epoch in range(EPOCHS):
        train.sampler.set_epoch(epoch)
        for b, (xb, yb) in enumerate(train):
            key = tb.random.fold_in(tb.random.fold_in(train_key, step), b)
            loss = tb.nelbo(
                net,
                post,
                key,
                xb,
                yb,
                num_data=640,
                loss_fn=nn.functional.cross_entropy,
                kl_weight=kl_weight,
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return post, step


def test_a_trainer_fit_equals_the_plain_loop_with_the_same_keys(tmp_path):
    net = _net()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    model = _model(net, eval_samples=8)
    train, val = _loaders(tb.random.key(1))
    _trainer().fit(model, train, val)

    plain_net = _net()
    post, step = _plain_loop(
        plain_net, train, lambda post: torch.optim.Adam(tb.parameters(post), lr=1e-2)
    )
    _, eval_key = tb.random.split(tb.random.key(5))
    # the default optimizer is the fused Adam: torch.optim.Adam's update, to rounding
    assert type(model.optimizers().optimizer) is tb.optim.Adam
    assert model.global_step == step
    fitted = model.posterior()
    for name, node in post.items():
        torch.testing.assert_close(fitted[name].mu, node.mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fitted[name].rho, node.rho, rtol=1e-5, atol=1e-6)
    expected = tb.evaluate(plain_net, post, eval_key, val, num_samples=8, progress=False)
    logged = _trainer().validate(model, val, verbose=False)[0]
    assert logged["val/accuracy"] == pytest.approx(float(expected.accuracy), abs=1e-6)
    assert logged["val/nll"] == pytest.approx(float(expected.nll), abs=1e-5)
    assert float(expected.accuracy) > 0.7  # it learned digits (chance: 0.1)
    for name, p in net.named_parameters():  # the base never trained
        assert torch.equal(p, before[name])


@pytest.mark.filterwarnings("ignore:The dirpath has changed:UserWarning")
def test_resuming_from_the_epoch_one_checkpoint_is_bit_identical(tmp_path):
    train, val = _loaders(tb.random.key(1))
    whole = _model(_net())
    _trainer(tmp_path / "whole").fit(whole, train, val)
    first = sorted((tmp_path / "whole").glob("epoch=0*.ckpt"))
    assert len(first) == 1
    resumed = _model(_net())
    _trainer(tmp_path / "resumed").fit(resumed, train, val, ckpt_path=str(first[0]))
    assert resumed.global_step == whole.global_step
    a, b = whole.state_dict(), resumed.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the checkpoint holds the posterior (and its key), nothing of the base
    saved = torch.load(first[0], weights_only=False)["state_dict"]
    names = {f"view.{n}.{f}" for n in tb.from_module(_net()) for f in ("mu", "rho")}
    assert set(saved) == names | {"keys"}


def test_the_base_is_neither_registered_nor_switched_to_training():
    net = _net(dropout=0.5)
    modes = []
    net.register_forward_pre_hook(lambda layer, inputs: modes.append(layer.training))
    model = _model(net)
    assert sum(p.numel() for p in model.parameters()) == 2 * sum(
        p.numel() for p in net.parameters()
    )
    assert not any(name.startswith("view.module") for name, _ in model.named_parameters())
    train, val = _loaders(tb.random.key(1))
    _trainer(epochs=1).fit(model, train, val)
    assert modes and not any(modes)  # Lightning's .train() never reached the base
    assert not net.training and not net[2].training


@pytest.mark.filterwarnings("ignore:Found 5 module.s. in eval mode:UserWarning")
def test_train_base_optimises_and_saves_the_base_beside_the_posterior():
    net = _net()
    head_before = net[0].bias.detach().clone()
    post = tb.from_module(net, include="3.*", sigma_scale=0.1)  # the last layer Bayesian
    model = PosteriorLightningModule(
        net, post, tb.random.key(5), num_data=640, train_base=True, lr=1e-2
    )
    state = model.state_dict()
    assert "base.0.weight" in state and "view.3.weight.mu" in state
    modes = []
    net.register_forward_pre_hook(lambda layer, inputs: modes.append(layer.training))
    train, val = _loaders(tb.random.key(1))
    _trainer(epochs=1).fit(model, train, val)
    assert not torch.equal(net[0].bias, head_before)  # trained, deterministically
    assert modes and not any(modes)  # registered, yet never switched to training
    model.train()  # what older Lightning releases (and user code) call before fitting
    assert model.training and not net.training and not net[2].training
    frozen = _net()
    frozen_post = tb.from_module(frozen, include="3.*", sigma_scale=0.1)
    untouched = PosteriorLightningModule(frozen, frozen_post, tb.random.key(5), num_data=640)
    _trainer(epochs=1).fit(untouched, train, val)
    assert torch.equal(frozen[0].bias, head_before)


def test_keyed_dropout_trains_with_masks_from_the_step_key():
    train, val = _loaders(tb.random.key(1))
    with_dropout = _model(_net(dropout=0.5), dropout=True)
    _trainer(epochs=1).fit(with_dropout, train, val)
    without = _model(_net(dropout=0.5))
    _trainer(epochs=1).fit(without, train, val)
    a = with_dropout.posterior()["0.weight"].mu
    b = without.posterior()["0.weight"].mu
    assert not torch.allclose(a, b)  # the masks changed the gradients; the RNG guard holds


def test_predict_step_returns_tb_predict_for_each_batch():
    model = _model(_net(), eval_samples=4)
    _, val = _loaders(tb.random.key(1))
    outputs = _trainer().predict(model, val)
    eval_key = tb.random.split(tb.random.key(5))[1]
    assert len(outputs) == 3
    for (xb, _), out in zip(val, outputs, strict=True):
        assert out.shape == (4, len(xb), 10)
        torch.testing.assert_close(
            out, tb.predict(model.view.module, model.posterior(), eval_key, xb, num_samples=4)
        )


def test_the_natural_gradient_optimizer_equals_its_plain_loop():
    def von(post):
        return tb.optim.VON(post, lr=0.1, num_data=640, hess_init=0.3)

    model = _model(_net(), optimizer=lambda m: von(m.posterior()))
    train, val = _loaders(tb.random.key(1))
    trainer = _trainer(epochs=EPOCHS)
    trainer.fit(model, train, val)
    # VON adds the prior's pull itself: the loss it is given is the data term alone
    post, _ = _plain_loop(_net(), train, von, kl_weight=0.0)
    fitted = model.posterior()
    for name, node in post.items():
        torch.testing.assert_close(fitted[name].mu, node.mu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fitted[name].rho, node.rho, rtol=1e-5, atol=1e-6)
    logged = trainer.callback_metrics
    assert float(logged["train/nelbo"]) == pytest.approx(float(logged["train/nll"]), abs=1e-6)
    assert float(logged["val/accuracy"]) > 0.4  # 20 steps from chance (0.1)


def test_bad_arguments_are_named():
    net = _net()
    post = tb.from_module(net)
    key = tb.random.key(0)
    with pytest.raises(ValueError, match=r"num_data must be a positive int \(>= 1\), got int 0"):
        PosteriorLightningModule(net, post, key, num_data=0)
    with pytest.raises(TypeError, match=r"optimizer must be a callable or None, got str 'adam'"):
        PosteriorLightningModule(net, post, key, num_data=10, optimizer="adam")
    with pytest.raises(TypeError, match=r"train_base must be a bool, got int 1"):
        PosteriorLightningModule(net, post, key, num_data=10, train_base=1)
    with pytest.raises(TypeError, match=r"key must be a key tensor"):
        PosteriorLightningModule(net, post, 3, num_data=10)
