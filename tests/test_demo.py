"""The demo runs end to end (tiny settings) and reports what it promises."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import tbfunc.demo as demo


def test_demo_runs_and_reports(capsys, tmp_path):
    results = demo.main(["--pretrain-steps", "50", "--steps", "20", "--samples", "8", "--no-plot"])
    assert set(results) >= {
        "epistemic sd in range",
        "epistemic sd out of range",
        "90% interval coverage in range",
        "test NLL in range, MAP",
        "test NLL in range, BNN",
    }
    out = capsys.readouterr().out
    assert "4/4 tb.predict with 8 weight samples" in out
    assert 0 <= results["90% interval coverage in range"] <= 1


def test_demo_says_how_to_get_the_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    message = demo.plot(None, {}, None, None, None, str(tmp_path / "x.png"))
    assert message == 'no plot: matplotlib is not installed (pip install -e ".[examples]")'


def test_demo_writes_the_plot_where_asked_never_into_the_working_directory(
    capsys, tmp_path, monkeypatch
):
    """--out puts the PNG there; the default is a fresh temporary folder, printed."""
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    small = ["--pretrain-steps", "5", "--steps", "2", "--samples", "2"]
    demo.main([*small, "--out", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "tbfunc_demo.png").stat().st_size > 0
    assert f"plot written to {tmp_path / 'plots' / 'tbfunc_demo.png'}" in capsys.readouterr().out
    demo.main(small)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    written = Path(printed.removeprefix("plot written to "))
    assert written.name == "tbfunc_demo.png" and written.exists()
    assert written.parent.name.startswith("tbfunc-demo-") and written.parent != tmp_path
    assert not list(tmp_path.glob("*.png"))
