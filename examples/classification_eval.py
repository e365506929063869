"""A fair classification benchmark you can rerun: tbfunc against what users would pick instead.

    python examples/classification_eval.py --datasets digits,breast_cancer,wine --seeds 3 --out DIR

Per data set (scikit-learn's bundled digits, breast cancer, wine; nothing is downloaded) and
seed: a keyed 60/20/20 split into train, validation and test rows; an MLP d-128-128-C; every
row trained on the same minibatches; S = 64 draws per prediction; one metric implementation
(``tb.metrics``) for all rows. Rows:

- ``MAP``: Adam + weight decay; the checkpoint the post-hoc rows start from.
- ``MAP + temperature``: the MAP logits divided by a temperature fitted on the validation split
  (``tb.metrics.fit_temperature``).
- ``deep ensemble``: 5 MAPs from different initialisations (the MAP is the first).
- ``MC dropout``: the MLP with Dropout(0.2), trained and predicted with keyed masks.
- ``recommended``: the natural-gradient posterior below, calibrated as ``Recipe.temperature``
  says (the README's "the way"; chosen with ``--evaluate-on val``: no temperature).
- ``pretrained, learned prior``: Bayes-by-Backprop (``tb.nelbo`` + Adam) with posterior and
  prior centred on the MAP weights, the prior's scale learned per node
  (``tb.empirical_prior``, refitted every step).
- ``natural gradient``: ``tb.optim.VON`` from a fresh initialisation.
- ``IVON``: ``ivon-opt`` with the same settings (skipped when not installed).
- ``laplace last-layer``: laplace-torch's KFAC Laplace of the MAP's last layer, prior
  precision by marginal likelihood, GLM predictive (skipped when not installed).

Metrics on the test rows: accuracy, NLL, ECE (15 equal-width bins), Brier, and for digits the
AUROC of predictive entropy against the test digits rotated by 90 degrees and against uniform
noise images. ``--evaluate-on val`` reports on the second half of the validation rows instead,
with temperatures fitted on the first half (how the recipe was chosen). Writes
``results.json`` (``{data set: {row: {metric: [one value per seed]}}}``) and ``results.md``
(mean +- sd over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipes

import tbfunc as tb

ROWS = recipes.ROWS
DATASETS = ["digits", "breast_cancer", "wine"]
METRICS = ["accuracy", "nll", "ece", "brier", "auroc_rotated", "auroc_noise"]


def load(name: str, key: Tensor) -> dict[str, Tensor]:
    """Train/val/test rows of a scikit-learn data set, features scaled on the training rows."""
    from sklearn import datasets

    data = {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
    }[name]()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = tb.random.normal(key, (len(x),)).argsort()
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    parts = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    if name == "digits":
        x = x / 16.0  # pixels in [0, 1], so the rotated and noise images share the scale
    else:
        mean, sd = x[parts["train"]].mean(0), x[parts["train"]].std(0).clamp_min(1e-6)
        x = (x - mean) / sd
    out = {}
    for part, rows in parts.items():
        out[f"x_{part}"], out[f"y_{part}"] = x[rows], y[rows]
    return out


def mlp(inputs: int, classes: int, seed: int, dropout: float = 0.0) -> nn.Module:
    with torch.random.fork_rng():  # the initial weights only; the caller's RNG is kept
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for a, b in ((inputs, 128), (128, 128)):
            layers += [nn.Linear(a, b), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        return nn.Sequential(*layers, nn.Linear(128, classes))


def ood_sets(x: Tensor) -> dict[str, Tensor]:
    """Digits only: the evaluation images rotated by 90 degrees, and uniform-noise images."""
    rotated = torch.rot90(x.view(-1, 8, 8), 1, dims=(1, 2)).reshape(-1, 64)
    noise = torch.special.ndtr(tb.random.normal(tb.random.key(7), tuple(x.shape)))
    return {"rotated": rotated, "noise": noise}


def scores(logits: Tensor, target: Tensor, ood: dict[str, Tensor]) -> dict[str, float]:
    m = tb.metrics
    row = {
        "accuracy": float(m.accuracy(logits, target)),
        "nll": float(m.nll(logits, target)),
        "ece": float(m.expected_calibration_error(logits, target)),
        "brier": float(m.brier_score(logits, target)),
    }
    for name, other in ood.items():
        row[f"auroc_{name}"] = float(
            m.auroc(m.predictive_entropy(logits), m.predictive_entropy(other))
        )
    return row


def run_one(
    name: str, seed: int, rows: list[str], recipe: recipes.Recipe, samples: int, part: str
) -> dict[str, dict[str, float]]:
    key = tb.random.fold_in(tb.random.key(2026), seed)
    data = load(name, tb.random.fold_in(key, 0))
    x, y = data["x_train"], data["y_train"]
    inputs, classes = x.shape[1], int(y.max()) + 1
    x_fit_t, y_fit_t = data["x_val"], data["y_val"]  # where temperatures are fitted
    x_eval, y_eval = data[f"x_{part}"], data[f"y_{part}"]
    if part == "val":  # choosing a recipe: fit on one half of the validation rows, score on
        half = len(x_fit_t) // 2  # the other, or a fitted temperature would look too good
        x_fit_t, y_fit_t = x_fit_t[:half], y_fit_t[:half]
        x_eval, y_eval = x_eval[half:], y_eval[half:]
    ood = ood_sets(x_eval) if name == "digits" else {}
    lik = recipes.classification_loglik
    batches = tb.random.fold_in(key, 1)
    pred_key = tb.random.fold_in(key, 2)
    results: dict[str, dict[str, float]] = {}
    models: dict[str, Any] = {}

    def record(row: str, model: Any, temperature: float = 1.0) -> None:
        def out(inputs_: Tensor) -> Tensor:
            return recipes.predict(model, pred_key, inputs_, samples) / temperature

        logits = out(x_eval)
        report = tb.check_predictions(logits, y_eval, warn=False)
        results[row] = scores(logits, y_eval, {k: out(v) for k, v in ood.items()})
        results[row]["nll_outliers"] = float(report.outliers.numel())

    def val_temperature(model: Any, low: float = 0.05) -> float:
        logits = recipes.predict(model, pred_key, x_fit_t, samples)
        return tb.metrics.fit_temperature(logits, y_fit_t, bounds=(low, 20.0))

    need_map = {
        "MAP",
        "MAP + temperature",
        "deep ensemble",
        "recommended",
        "pretrained, learned prior",
        "laplace last-layer",
    } & set(rows)
    if need_map:
        models["MAP"], _ = recipes.train_map(mlp(inputs, classes, seed), x, y, lik, batches, recipe)
    if "MAP" in rows:
        record("MAP", models["MAP"])
    if "MAP + temperature" in rows:
        record("MAP + temperature", models["MAP"], val_temperature(models["MAP"]))
    if "deep ensemble" in rows:
        members = [models["MAP"]] + [
            recipes.train_map(
                mlp(inputs, classes, 1000 * seed + i),
                x,
                y,
                lik,
                tb.random.fold_in(key, 100 + i),
                recipe,
            )[0]
            for i in range(1, 5)
        ]
        record("deep ensemble", members)
    if "MC dropout" in rows:
        net, _ = recipes.train_map(
            mlp(inputs, classes, seed, recipe.dropout), x, y, lik, batches, recipe, dropout=True
        )
        record("MC dropout", recipes.Dropout(net))
    if "pretrained, learned prior" in rows:
        posterior, _ = recipes.train_bbb(
            models["MAP"], x, y, lik, batches, recipe, centre="pretrained", per="node"
        )
        record("pretrained, learned prior", (models["MAP"], posterior))
    if {"natural gradient", "recommended"} & set(rows):
        net = mlp(inputs, classes, seed).requires_grad_(False)
        posterior, _ = recipes.train_von(net, x, y, lik, batches, recipe)
        posterior = recipes.widened(posterior, recipe.von_sigma_scale)
        if "natural gradient" in rows:
            record("natural gradient", (net, posterior))
        if "recommended" in rows:  # the same posterior, then a temperature fitted on val
            record(
                "recommended",
                (net, posterior),
                recipes.temperature(recipe, val_temperature, (net, posterior)),
            )
    if "IVON" in rows:
        trained = recipes.train_ivon(mlp(inputs, classes, seed), x, y, lik, batches, recipe)
        if trained is not None:
            record("IVON", trained[0])
    if "laplace last-layer" in rows:
        approx = recipes.train_laplace(models["MAP"], x, y, lik, recipe)
        if approx is not None:
            record("laplace last-layer", approx)
    return {row: results[row] for row in ROWS if row in results}  # the table's order


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--rows", default=";".join(ROWS), help="a ';'-separated subset (row names hold commas)"
    )
    parser.add_argument("--samples", type=int, default=64, help="MC samples per prediction")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every step count")
    parser.add_argument("--evaluate-on", choices=["test", "val"], default="test")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a recipes.Recipe field (how the recipe was chosen on validation data)",
    )
    parser.add_argument("--out", default="classification-eval")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny networks: threads cost more than they give
    rows = [r.strip() for r in args.rows.split(";") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown rows {unknown}; choose from {ROWS}")
    base = recipes.override(recipes.Recipe(), args.set, parser.error)
    recipe = recipes.scaled(base, args.steps_scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    start = time.perf_counter()
    names = [d for d in args.datasets.split(",") if d]
    for name in names:
        if name not in DATASETS:
            parser.error(f"--datasets: unknown data set {name!r}; choose from {DATASETS}")
        table = results.setdefault(name, {})
        for seed in range(args.seeds):
            one = run_one(name, seed, rows, recipe, args.samples, args.evaluate_on)
            for row, values in one.items():
                for metric, value in values.items():
                    table.setdefault(row, {}).setdefault(metric, []).append(value)
            print(f"{name} seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = markdown(results, args)
    (out / "results.md").write_text(text)
    print(text)
    return results


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"Evaluated on the {args.evaluate_on} rows; mean +- sd over {args.seeds} seeds, "
        f"S = {args.samples}.",
        "",
    ]
    for name, table in results.items():
        metrics = [m for m in [*METRICS, "nll_outliers"] if any(m in r for r in table.values())]
        lines += [
            f"### {name}",
            "",
            "| row | " + " | ".join(metrics) + " |",
            "|---" * (len(metrics) + 1) + "|",
        ]
        for row, values in table.items():
            cells = [_cell(values.get(m)) for m in metrics]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(values: list[float] | None) -> str:
    if not values:
        return ""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    return f"{mean:.3f} +- {sd:.3f}"


if __name__ == "__main__":
    main()
