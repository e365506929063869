"""The examples run end to end on small sizes and report what they promise."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_evaluation_runs_and_writes_its_table_and_diagram(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    digits = load("digits_eval")
    results = digits.main(
        ["--map-steps", "60", "--bnn-steps", "20", "--samples", "4", "--out", str(tmp_path)]
    )
    assert list(results) == [
        "MAP (deterministic)",
        "BNN, prior N(w0, 0.1^2)",
        "BNN, prior N(0, 1)",
        "BNN, N(0, 1), cold (kl_weight 0.1)",
        "MC dropout (p = 0.2)",
    ]
    for row in results.values():
        assert 0.5 < row["accuracy"] <= 1 and row["NLL"] > 0 and 0 <= row["ECE"] <= 1
        assert 0 <= row["AUROC entropy, uniform noise"] <= 1
    assert results["MAP (deterministic)"]["AUROC MI, rotated 90"] == 0.5  # one model: MI = 0
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| model | accuracy | NLL | ECE | Brier | AURC |")
    assert (tmp_path / "reliability.png").stat().st_size > 1000
