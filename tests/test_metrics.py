"""tb.metrics: hand-computed cases, scikit-learn references, invariants, stability and errors
(issue 10)."""

from __future__ import annotations

import math

import pytest
import torch

import tbfunc as tb
from tbfunc import metrics

sk = pytest.importorskip("sklearn.metrics")


def logits_of(seed: int, *shape: int, scale: float = 2.0) -> torch.Tensor:
    return scale * tb.random.normal(tb.random.key(seed), shape, dtype=torch.float64)


def targets_of(seed: int, count: int, classes: int) -> torch.Tensor:
    return (tb.random.normal(tb.random.key(seed), (count,)).abs() * 1000).long() % classes


# -- regression --------------------------------------------------------------------------------


def test_regression_summaries():
    draws = torch.tensor([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [6.0, 10.0]])
    torch.testing.assert_close(metrics.predictive_mean(draws), torch.tensor([3.0, 10.0]))
    torch.testing.assert_close(metrics.predictive_variance(draws), torch.tensor([3.5, 0.0]))
    torch.testing.assert_close(
        metrics.predictive_variance(draws, correction=1), torch.tensor([14 / 3, 0.0])
    )
    low, high = metrics.predictive_interval(torch.arange(101.0)[:, None], level=0.9)
    assert low.item() == 5.0 and high.item() == 95.0
    with pytest.raises(ValueError, match=r"level must be a float in \(0, 1\), got float 1.5"):
        metrics.predictive_interval(draws, level=1.5)


# -- classification: hand-computed and invariants -------------------------------------------------


def test_entropies_on_a_hand_computed_case():
    """Two samples, one example, two classes: p1 = (1, 0), p2 = (0, 1) in the limit."""
    logits = torch.tensor([[[30.0, -30.0]], [[-30.0, 30.0]]])
    torch.testing.assert_close(metrics.predictive_entropy(logits), torch.tensor([math.log(2)]))
    torch.testing.assert_close(
        metrics.expected_entropy(logits), torch.tensor([0.0]), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(metrics.mutual_information(logits), torch.tensor([math.log(2)]))
    agree = torch.tensor([[[1.0, 2.0, 0.5]]]).expand(4, 1, 3)
    assert metrics.mutual_information(agree).item() == 0.0
    torch.testing.assert_close(metrics.predictive_entropy(agree), metrics.expected_entropy(agree))


def test_entropy_decomposes_and_mutual_information_is_non_negative():
    logits = logits_of(0, 16, 50, 7)
    total = metrics.predictive_entropy(logits)
    torch.testing.assert_close(
        total, metrics.expected_entropy(logits) + metrics.mutual_information(logits)
    )
    assert (metrics.mutual_information(logits) >= 0).all() and (total <= math.log(7) + 1e-12).all()


def test_against_scikit_learn():
    logits = logits_of(1, 8, 200, 4)
    target = targets_of(2, 200, 4)
    probs = logits.softmax(-1).mean(0)
    torch.testing.assert_close(
        metrics.nll(logits, target),
        torch.tensor(sk.log_loss(target, probs, labels=range(4)), dtype=torch.float64),
    )
    torch.testing.assert_close(
        metrics.brier_score(logits, target),
        torch.tensor(sk.brier_score_loss(target, probs, labels=range(4)), dtype=torch.float64),
    )
    assert metrics.accuracy(logits, target).item() == pytest.approx(
        sk.accuracy_score(target, probs.argmax(-1))
    )
    binary = logits_of(3, 4, 300, 2)
    y = targets_of(4, 300, 2)
    p1 = binary.softmax(-1).mean(0)[:, 1]
    assert metrics.brier_score(binary, y).item() == pytest.approx(2 * sk.brier_score_loss(y, p1))
    assert metrics.nll(binary, y, reduction="sum").item() == pytest.approx(
        300 * sk.log_loss(y, p1), rel=1e-9
    )
    per = metrics.nll(binary, y, reduction="none")
    assert per.shape == (300,)


def test_ece_hand_case_calibrated_construction_and_adaptive_bins():
    # 4 examples at confidence 0.75 (3 right), 2 at 0.9 (1 right): |0.75-0.75|*4/6 + |0.5-0.9|*2/6
    p = torch.tensor([[0.75, 0.25]] * 4 + [[0.9, 0.1]] * 2, dtype=torch.float64)
    logits = p.log()[None]
    target = torch.tensor([0, 0, 0, 1, 0, 1])
    expected = 0.4 * 2 / 6
    torch.testing.assert_close(
        metrics.expected_calibration_error(logits, target),
        torch.tensor(expected, dtype=torch.float64),
    )
    # calibrated: in each bin the accuracy equals the confidence
    calibrated = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0, 0, 1])
    p2 = torch.tensor(
        [[0.75, 0.25]] * 4 + [[0.8333333333333334, 0.16666666666666666]] * 6, dtype=torch.float64
    )
    assert metrics.expected_calibration_error(p2.log()[None], calibrated).item() == pytest.approx(
        0.0, abs=1e-12
    )
    # equal-mass bins: 2 bins of 3 sorted examples: {0.75, 0.75, 0.75} and {0.75, 0.9, 0.9}
    mass = metrics.expected_calibration_error(logits, target, num_bins=2, binning="mass")
    first = abs(1.0 - 0.75) * 3 / 6  # the three lowest are all right? indices 0,1,2 -> correct
    second = abs(1 / 3 - (0.75 + 0.9 + 0.9) / 3) * 3 / 6
    torch.testing.assert_close(mass, torch.tensor(first + second, dtype=torch.float64))
    diagram = metrics.reliability_diagram(logits, target, num_bins=10)
    assert diagram.counts.sum().item() == 6 and diagram.counts[7].item() == 4
    torch.testing.assert_close(diagram.accuracy[8], torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(diagram.ece, torch.tensor(expected, dtype=torch.float64))


def test_reliability_diagram_draws_and_saves_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    logits = logits_of(5, 4, 500, 3)
    target = targets_of(6, 500, 3)
    out = metrics.reliability_diagram(logits, target, path=str(tmp_path / "rel.png"), title="test")
    assert out.figure is not None and (tmp_path / "rel.png").stat().st_size > 1000
    import matplotlib.pyplot as plt

    plt.close(out.figure)


# -- scores per example ------------------------------------------------------------------------


def test_auroc_fpr_and_aurc_against_scikit_learn_and_hand_cases():
    inside = tb.random.normal(tb.random.key(7), (400,), dtype=torch.float64)
    outside = 0.8 + tb.random.normal(tb.random.key(8), (300,), dtype=torch.float64)
    outside[:20] = inside[:20]  # ties across the two sets
    labels = [0] * 400 + [1] * 300
    scores = torch.cat([inside, outside])
    assert metrics.auroc(inside, outside).item() == pytest.approx(sk.roc_auc_score(labels, scores))
    assert metrics.auroc(inside, inside.clone()).item() == pytest.approx(0.5)
    assert metrics.auroc(torch.zeros(5), torch.ones(3)).item() == 1.0
    fpr, tpr, _ = sk.roc_curve(labels, scores)
    expected = fpr[(tpr >= 0.95).argmax()]
    assert metrics.fpr_at_tpr(inside, outside).item() == pytest.approx(expected)
    assert (
        metrics.fpr_at_tpr(
            torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([2.5, 5.0]), tpr=1.0
        ).item()
        == 0.25
    )
    # risk-coverage: confidences ranked 0.9 (right), 0.8 (wrong), 0.1 (right)
    value = metrics.aurc(torch.tensor([0.1, 0.9, 0.8]), torch.tensor([1.0, 1.0, 0.0]))
    assert value.item() == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)
    # confidence that orders all errors last beats the reverse order
    correct = torch.tensor([1.0] * 8 + [0.0] * 2)
    good = metrics.aurc(torch.linspace(1, 0, 10), correct)
    bad = metrics.aurc(torch.linspace(0, 1, 10), correct)
    assert good < bad


# -- stability, transforms, errors ---------------------------------------------------------------


def test_float32_stability_with_confident_logits():
    logits = torch.tensor([[[1000.0, -1000.0, 0.0]], [[-1000.0, 1000.0, 0.0]]])
    target = torch.tensor([2])
    value = metrics.nll(logits, target)
    assert torch.isfinite(value) and value.item() == pytest.approx(1000.0)
    assert torch.isfinite(metrics.predictive_entropy(logits)).all()
    grad = torch.func.grad(lambda z: metrics.nll(z, target))(logits)
    assert torch.isfinite(grad).all()


def test_vmap_over_batches_of_predictions_equals_the_loop():
    logits = logits_of(9, 3, 5, 20, 4)  # 3 independent predictions, each (S=5, N=20, C=4)
    target = targets_of(10, 20, 4)
    vmapped = torch.func.vmap(lambda z: metrics.nll(z, target))(logits)
    loop = torch.stack([metrics.nll(z, target) for z in logits])
    torch.testing.assert_close(vmapped, loop)


def test_bad_inputs_say_what_to_fix():
    target = torch.tensor([0, 1, 2])
    with pytest.raises(
        ValueError,
        match=r"target must be a tensor of shape \(\) .*logits seem to lack the leading sample axis",
    ):
        metrics.nll(torch.zeros(3, 4), target)
    with pytest.raises(
        ValueError, match=r"target must hold class indices in \[0, 4\), got values in \[0, 7\]"
    ):
        metrics.nll(torch.zeros(2, 3, 4), torch.tensor([0, 7, 1]))
    probs = torch.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="These look like probabilities"):
        metrics.accuracy(probs, target)
    with pytest.raises(TypeError, match="target must be an integer tensor of class indices"):
        metrics.nll(torch.zeros(2, 3, 4), target.float())
    with pytest.raises(TypeError, match=r"scores_out must be a non-empty 1-d tensor"):
        metrics.auroc(torch.zeros(3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="binning must be 'width' or 'mass'"):
        metrics.expected_calibration_error(torch.zeros(2, 3, 4), target, binning="quantile")
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none'"):
        metrics.brier_score(torch.zeros(2, 3, 4), target, reduction="max")
