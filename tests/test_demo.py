"""The demo runs end to end (tiny settings) and reports what it promises."""

from __future__ import annotations

import sys

import tbfunc.demo as demo


def test_demo_runs_and_reports(capsys, tmp_path):
    results = demo.main(["--pretrain-steps", "50", "--steps", "20", "--samples", "8", "--plot", ""])
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
