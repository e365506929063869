"""An evaluation you can rerun: uncertainty on real data that ships offline (scikit-learn digits).

    python examples/digits_eval.py --out digits-eval

1. ``load_digits`` (1,797 8x8 images), split by a keyed permutation: 1,200 train, 597 test.
2. A deterministic MLP 64-128-128-10 (MAP, Adam + weight decay), and the same MLP with
   Dropout(0.2) after each hidden layer, trained with key-driven dropout masks
   (``tb.functional_call(..., dropout=True)``).
3. Bayes-by-Backprop from the pretrained MLP with ``tb.nelbo``: prior N(w0, 0.1^2) centred on the
   pretrained weights, prior N(0, 1), and a cold posterior (N(0, 1), ``kl_weight=0.1``).
4. MC dropout: ``tb.predict(dropout_net, {}, key, x, dropout=True)``.
5. One table (markdown): accuracy, NLL, ECE, Brier, AURC on the test set, and the OOD AUROC of
   predictive entropy and of mutual information against (a) the test digits rotated by 90
   degrees and (b) uniform-noise images; and a reliability diagram PNG.

Everything draws from ``tb.random`` keys: the run is the same on every machine of one kind.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tbfunc as tb

KEY = tb.random.key(2026)


def load(key: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = tb.random.normal(key, (len(x),)).argsort()
    train, test = order[:1200], order[1200:]
    return x[train], y[train], x[test], y[test]


def mlp(dropout: float = 0.0) -> nn.Module:
    with torch.random.fork_rng():  # the initial weights only; the global RNG is kept
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for a, b in ((64, 128), (128, 128)):
            layers += [nn.Linear(a, b), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        return nn.Sequential(*layers, nn.Linear(128, 10))


def train_map(net: nn.Module, x: Tensor, y: Tensor, steps: int, dropout: bool) -> nn.Module:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    params = dict(net.named_parameters())
    for step in range(steps):
        rows = _batch(step, len(x), 128)
        key = tb.random.fold_in(KEY, step)
        if dropout:  # masks from keys, not the global RNG
            out = tb.functional_call(net.eval(), {}, key, x[rows], dropout=True)
        else:
            out = torch.func.functional_call(net.eval(), params, (x[rows],))
        loss = F.cross_entropy(out, y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def train_bnn(
    net: nn.Module, x: Tensor, y: Tensor, steps: int, prior: str, kl_weight: float = 1.0
) -> dict:
    posterior = tb.from_module(net, sigma=0.01)
    chosen = (
        tb.pretrained_prior(net, posterior, sigma=0.1)
        if prior == "pretrained"
        else (tb.GaussianPrior(0.0, 1.0))
    )
    opt = torch.optim.Adam(tb.parameters(posterior), lr=1e-2)
    for step in range(steps):
        rows = _batch(step, len(x), 128)
        loss = tb.nelbo(
            net,
            posterior,
            tb.random.fold_in(KEY, 10**6 + step),
            x[rows],
            y[rows],
            loss_fn=F.cross_entropy,
            num_data=len(x),
            prior=chosen,
            kl_weight=kl_weight,
            num_samples=2,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: type(p)(p.mu.detach(), p.rho.detach()) for n, p in posterior.items()}


def ood_sets(x_test: Tensor) -> dict[str, Tensor]:
    rotated = torch.rot90(x_test.view(-1, 8, 8), 1, dims=(1, 2)).reshape(-1, 64)
    noise = torch.special.ndtr(tb.random.normal(tb.random.key(7), tuple(x_test.shape)))
    return {"rotated 90": rotated, "uniform noise": noise}


def evaluate(logits: Tensor, target: Tensor, ood_logits: dict[str, Tensor]) -> dict[str, float]:
    m = tb.metrics
    confidence = m.predictive_entropy(logits).neg()
    correct = (tb.metrics.predictive_mean(logits.softmax(-1)).argmax(-1) == target).double()
    row = {
        "accuracy": m.accuracy(logits, target).item(),
        "NLL": m.nll(logits, target).item(),
        "ECE": m.expected_calibration_error(logits, target).item(),
        "Brier": m.brier_score(logits, target).item(),
        "AURC": m.aurc(confidence, correct).item(),
    }
    for name, other in ood_logits.items():
        row[f"AUROC entropy, {name}"] = m.auroc(
            m.predictive_entropy(logits), m.predictive_entropy(other)
        ).item()
        row[f"AUROC MI, {name}"] = m.auroc(
            m.mutual_information(logits), m.mutual_information(other)
        ).item()
    row["mean entropy, uniform noise"] = (
        m.predictive_entropy(ood_logits["uniform noise"]).mean().item()
    )
    return row


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--map-steps", type=int, default=3000)
    parser.add_argument("--bnn-steps", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=64, help="MC samples per prediction")
    parser.add_argument("--out", default="digits-eval", help="folder for results.md and the PNG")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x, y, x_test, y_test = load(tb.random.key(0))
    ood = ood_sets(x_test)
    net = train_map(mlp(), x, y, args.map_steps, dropout=False)
    dropout_net = train_map(mlp(0.2), x, y, args.map_steps, dropout=True)
    variants = {
        "BNN, prior N(w0, 0.1^2)": train_bnn(net, x, y, args.bnn_steps, "pretrained"),
        "BNN, prior N(0, 1)": train_bnn(net, x, y, args.bnn_steps, "standard"),
        "BNN, N(0, 1), cold (kl_weight 0.1)": train_bnn(net, x, y, args.bnn_steps, "standard", 0.1),
    }
    k = tb.random.key(99)
    results: dict[str, dict[str, float]] = {}
    with torch.no_grad():

        def outputs(call):
            return call(x_test), {name: call(images) for name, images in ood.items()}

        test, others = outputs(lambda images: net(images)[None])
        results["MAP (deterministic)"] = evaluate(test, y_test, others)
        for name, posterior in variants.items():
            test, others = outputs(
                lambda images, p=posterior: tb.predict(net, p, k, images, num_samples=args.samples)
            )
            results[name] = evaluate(test, y_test, others)
            if name.startswith("BNN, prior N(w0"):
                tb.metrics.reliability_diagram(
                    test, y_test, path=str(out / "reliability.png"), title="BNN N(w0, 0.1^2)"
                )
        test, others = outputs(
            lambda images: tb.predict(
                dropout_net, {}, k, images, num_samples=args.samples, dropout=True
            )
        )
        results["MC dropout (p = 0.2)"] = evaluate(test, y_test, others)
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"\n{time.perf_counter() - start:.0f} s; written to {out.resolve()}")
    return results


def markdown(results: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(results.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines)


def _batch(step: int, count: int, size: int) -> Tensor:
    """Minibatch ``step`` of an epoch-wise keyed shuffle."""
    epoch, index = divmod(step * size, count)
    order = tb.random.normal(tb.random.fold_in(KEY, 10**9 + epoch), (count,)).argsort()
    return order[index : index + size]


if __name__ == "__main__":
    main()
