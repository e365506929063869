"""The README's benchmark tables and the bars they are held to, from the evaluations' JSON.

    python examples/summarize.py --classification DIR [DIR ...] --uci DIR [DIR ...]

Reads ``results.json`` of ``classification_eval.py`` and ``uci_eval.py``, prints one markdown
table per data set (classification: mean +- sd over seeds; UCI: mean +- standard error over
splits, beside the published PBP / MC dropout / deep ensemble numbers), and every bar with the
numbers it was judged on and "met" or "missed".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# shared/data/uci/README.md: published test log-likelihood (PBP, MC dropout 2018, ensemble)
PUBLISHED = {
    "boston": (-2.57, -2.40, -2.41),
    "concrete": (-3.16, -2.93, -3.06),
    "energy": (-2.04, -1.21, -1.38),
    "wine-quality-red": (-0.97, -0.93, -0.94),
    "yacht": (-1.63, -1.25, -1.18),
}
CLASSIFICATION_METRICS = ["accuracy", "nll", "ece", "brier", "auroc_rotated", "auroc_noise"]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sd(values: list[float]) -> float:
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1))


def classification_tables(results: dict) -> str:
    lines = []
    for name, table in results.items():
        metrics = [m for m in CLASSIFICATION_METRICS if m in next(iter(table.values()))]
        lines += [
            f"**{name}** (test rows, mean +- sd over seeds)",
            "",
            "| row | " + " | ".join(metrics) + " |",
            "|---" * (len(metrics) + 1) + "|",
        ]
        for row, values in table.items():
            cells = [f"{mean(values[m]):.3f} +- {sd(values[m]):.3f}" for m in metrics]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def uci_table(results: dict) -> str:
    lines = ["| data set | row | test log-likelihood | RMSE |", "|---|---|---|---|"]
    for name, table in results.items():
        for row, values in table.items():
            n = len(values["test_ll"])
            ll, rmse = values["test_ll"], values["rmse"]
            lines.append(
                f"| {name} | {row} | {mean(ll):.2f} +- {sd(ll) / math.sqrt(n):.2f} | "
                f"{mean(rmse):.2f} +- {sd(rmse) / math.sqrt(n):.2f} |"
            )
        if name in PUBLISHED:
            pbp, dropout, ensemble = PUBLISHED[name]
            lines.append(
                f"| {name} | published PBP / MC dropout / ensemble | {pbp} / {dropout} / "
                f"{ensemble} | |"
            )
    return "\n".join(lines)


def bars(classification: dict | None, uci: dict | None) -> list[tuple[str, bool, str]]:
    """``(bar, met, the numbers)`` for every bar of the benchmark."""
    out: list[tuple[str, bool, str]] = []

    def m(data: str, row: str, metric: str) -> float:
        assert classification is not None
        return mean(classification[data][row][metric])

    if classification:
        for data in classification:
            rows = classification[data]
            if "recommended" in rows and "MAP" in rows:
                a, b = m(data, "recommended", "accuracy"), m(data, "MAP", "accuracy")
                out.append(
                    (f"{data}: recommended accuracy >= MAP's", a >= b, f"{a:.4f} vs {b:.4f}")
                )
                a, b = m(data, "recommended", "nll"), m(data, "MAP", "nll")
                out.append((f"{data}: recommended NLL <= MAP's", a <= b, f"{a:.4f} vs {b:.4f}"))
            if "pretrained, learned prior" in rows and "MAP" in rows:
                a, b = m(data, "pretrained, learned prior", "accuracy"), m(data, "MAP", "accuracy")
                out.append(
                    (
                        f"{data}: pretrained accuracy >= MAP's - 0.003",
                        a >= b - 0.003,
                        f"{a:.4f} vs {b:.4f}",
                    )
                )
                a, b = m(data, "pretrained, learned prior", "nll"), m(data, "MAP", "nll")
                out.append((f"{data}: pretrained NLL < MAP's", a < b, f"{a:.4f} vs {b:.4f}"))
        if "digits" in classification:
            rows = classification["digits"]
            rec = m("digits", "recommended", "nll")
            if "IVON" in rows:
                ivon = m("digits", "IVON", "nll")
                out.append(
                    ("digits: recommended NLL <= IVON's", rec <= ivon, f"{rec:.4f} vs {ivon:.4f}")
                )
                ng = m("digits", "natural gradient", "nll")
                out.append(
                    (
                        "digits: natural-gradient NLL <= IVON's",
                        ng <= ivon,
                        f"{ng:.4f} vs {ivon:.4f}",
                    )
                )
            drop = m("digits", "MC dropout", "nll")
            out.append(
                (
                    "digits: recommended NLL <= MC dropout's + 0.01",
                    rec <= drop + 0.01,
                    f"{rec:.4f} vs {drop:.4f} + 0.01",
                )
            )
            auroc = m("digits", "recommended", "auroc_rotated")
            out.append(
                ("digits: recommended AUROC (rotated) >= 0.70", auroc >= 0.70, f"{auroc:.3f}")
            )
        for data in ("breast_cancer", "wine"):
            if data in classification:
                rows = classification[data]
                best = min(m(data, r, "nll") for r in ("MAP + temperature", "IVON") if r in rows)
                rec = m(data, "recommended", "nll")
                out.append(
                    (
                        f"{data}: recommended NLL <= 1.05 x min(MAP + temperature, IVON)",
                        rec <= 1.05 * best,
                        f"{rec:.4f} vs 1.05 x {best:.4f}",
                    )
                )
    if uci:
        beats_dropout: list[str] = []
        for data, table in uci.items():
            if data not in PUBLISHED or "recommended" not in table:
                continue
            ll = mean(table["recommended"]["test_ll"])
            pbp, dropout, _ = PUBLISHED[data]
            out.append(
                (f"UCI {data}: recommended test LL >= PBP's", ll >= pbp, f"{ll:.3f} vs {pbp}")
            )
            if ll >= dropout:
                beats_dropout.append(data)
        out.append(
            (
                "UCI: recommended >= published MC dropout on at least 3 sets",
                len(beats_dropout) >= 3,
                f"{len(beats_dropout)} of {len(uci)}"
                + (f" ({', '.join(beats_dropout)})" if beats_dropout else ""),
            )
        )
    return out


def merged(folders: list[str]) -> dict:
    """The folders' ``results.json`` files, a later folder's rows replacing an earlier one's
    (a rerun of some rows), in the benchmark's row order."""
    from recipes import ROWS

    out: dict[str, dict[str, dict]] = {}
    for folder in folders:
        for name, table in json.loads((Path(folder) / "results.json").read_text()).items():
            out.setdefault(name, {}).update(table)
    return {name: {r: t[r] for r in ROWS if r in t} for name, t in out.items()}


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--classification", nargs="+", default=[], help="classification_eval output folders"
    )
    parser.add_argument("--uci", nargs="+", default=[], help="uci_eval output folders")
    args = parser.parse_args(argv)
    classification = uci = None
    parts = []
    if args.classification:
        classification = merged(args.classification)
        parts.append(classification_tables(classification))
    if args.uci:
        uci = merged(args.uci)
        parts.append(uci_table(uci))
    rows = bars(classification, uci)
    parts.append(
        "| bar | result | numbers |\n|---|---|---|\n"
        + "\n".join(
            f"| {bar} | {'met' if met else '**missed**'} | {numbers} |"
            for bar, met, numbers in rows
        )
    )
    text = "\n\n".join(parts)
    print(text)
    return text


if __name__ == "__main__":
    main()
