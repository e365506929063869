"""tb.diagnostics and tb.check_predictions: what ECE hides."""

from __future__ import annotations

import pytest
import torch

import tbfunc as tb
from helpers import data, mlp


def test_flags_a_node_collapsed_onto_the_prior_and_one_with_low_signal():
    net = mlp((4, 6, 3))
    post = tb.from_module(net, sigma=0.01)
    prior = tb.GaussianPrior(0.0, 0.5)
    collapsed = dict(post)
    collapsed["0.weight"] = post["0.weight"]._replace(
        rho=torch.full_like(
            post["0.weight"].rho, 0.5 + torch.log(-torch.expm1(torch.tensor(-0.5))).item()
        )
    )
    report = tb.diagnostics(collapsed, prior)
    assert report["0.weight"].at_prior == pytest.approx(1.0)
    assert "collapsed to prior" in report["0.weight"].flags
    assert "low signal" in report["0.weight"].flags  # |mu| ~ 0.3 against sigma 0.5
    assert report["2.weight"].at_prior == 0.0 and report["2.weight"].flags == ()
    assert report["0.weight"].sigma_median == pytest.approx(0.5, rel=1e-5)
    assert report["0.weight"].prior_sigma == pytest.approx(0.5)
    shares = [r.kl_share for r in report.values()]
    assert sum(shares) == pytest.approx(1.0)
    expected = float(tb.kl_divergence({"2.weight": post["2.weight"]}, prior))
    assert report["2.weight"].kl == pytest.approx(expected, rel=1e-5)
    assert report["2.weight"].snr_median == pytest.approx(
        float((post["2.weight"].mu.abs() / post["2.weight"].sigma).median()), rel=1e-5
    )


def test_flags_exploded_means_and_uses_a_dict_of_priors():
    net = mlp((4, 3))
    post = tb.from_module(net, sigma=0.01)
    exploded = {n: p._replace(mu=p.mu * 100) for n, p in post.items()}
    priors = {n: tb.GaussianPrior(0.0, 0.1) for n in post}
    assert "exploded" in tb.diagnostics(exploded, priors)["0.weight"].flags
    assert "exploded" not in tb.diagnostics(post, priors)["0.weight"].flags
    centred = {n: tb.GaussianPrior(p.mu, 0.1) for n, p in exploded.items()}  # where they went
    assert "exploded" not in tb.diagnostics(exploded, centred)["0.weight"].flags


def test_check_predictions_finds_confidently_wrong_examples_worst_first():
    logits = torch.zeros(2, 6, 3)
    logits[:, 1] = torch.tensor([0.0, 40.0, 0.0])  # target 0: NLL ~ 40
    logits[:, 4] = torch.tensor([0.0, 0.0, 200.0])  # target 0: NLL ~ 200, huge logit
    target = torch.zeros(6, dtype=torch.long)
    with pytest.warns(UserWarning) as caught:
        report = tb.check_predictions(logits, target)
    assert report.outliers.tolist() == [4, 1]
    assert report.outlier_nll[0] == pytest.approx(200.0, rel=1e-3)
    assert report.max_abs_logit == 200.0
    per = tb.metrics.nll(logits, target, reduction="none")
    assert report.outlier_share == pytest.approx(float(per[[1, 4]].sum() / per.sum()))
    assert len(caught) == 2 and "2 of 6 examples have NLL above 10" in str(caught[1].message)
    quiet = tb.check_predictions(logits, target, nll_limit=100, logit_limit=1000, warn=False)
    assert quiet.outliers.tolist() == [4] and quiet.warnings == (quiet.warnings[0],)


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match=r"posterior must be a non-empty dict"):
        tb.diagnostics({})
    post = tb.from_module(mlp((2, 2)))
    with pytest.raises(TypeError, match=r"prior\['0.weight'\] must be a tb.GaussianPrior"):
        tb.diagnostics(post, tb.LaplacePrior())
    with pytest.raises(ValueError, match=r"prior has no entry for posterior name '0.bias'"):
        tb.diagnostics(post, {"0.weight": tb.GaussianPrior()})
    with pytest.raises(ValueError, match=r"target must be a tensor of shape \(4,\)"):
        tb.check_predictions(data(2, 4, 3), torch.zeros(5, dtype=torch.long))
