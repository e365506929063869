"""The scoreboard's quick mode runs, so the benchmark suite cannot rot (timings are not checked)."""

from __future__ import annotations

import json
import time

import pytest
import torch

import tbfunc as tb
from benchmarks import timing
from benchmarks import training as training_bench
from benchmarks.__main__ import main


def test_quick_scoreboard(tmp_path):
    with torch.random.fork_rng():  # the peers draw from the global RNG
        report = main(
            [
                "--quick",
                "--workloads",
                "W1,W2",
                "--sections",
                "overhead,predict,sample,train,io,uncertainty,distributed",
                "--out",
                str(tmp_path),
            ]
        )
    saved = json.loads((tmp_path / "results.json").read_text())
    # 15 tables, the training ones at 1 and 2 threads (4 more)
    assert saved["runs"] and len(saved["runs"]) == len(report["runs"]) == 19
    assert saved["runs"][1]["title"].endswith(
        "right after another library's forward on another model (untimed)"
    )
    for tiny_run in saved["runs"][:2]:
        tiny = {r["name"]: r for r in tiny_run["results"]}
        for name in ("floor", "floor + rng", "tb.predict", "tb.sample", "torchbayesian vmap"):
            assert tiny[name]["error"] is None and tiny[name]["median_s"] > 0, name
    assert torch.get_num_threads() == 2  # --threads' default: the 1-thread section restored it
    first = {r["name"]: r for r in saved["runs"][2]["results"]}
    for name in ("limit", "tb.predict", "tb.predict vmap", "tb.predict loop"):
        assert first[name]["error"] is None and first[name]["median_s"] > 0
    one_sample = ("tbfunc VON step", "tbfunc VON step, sampled", training_bench.POOL_VON)
    for name in (*one_sample, training_bench.ADAM_SAMPLED):
        von = [r for run in saved["runs"] for r in run["results"] if r.get("name") == name]
        assert len(von) == 4 and all(r["error"] is None and r["median_s"] > 0 for r in von)
    training = [run for run in saved["runs"] if "training step" in run["title"]]
    assert {run["title"].rsplit(", ", 1)[1] for run in training} == {"1 thread(s)", "2 thread(s)"}
    for run in training:
        rows = {r["name"]: r for r in run["results"]}
        for name in (
            "tbfunc nelbo + tb.optim.Adam (fused)",
            "tbfunc nelbo + torch Adam, tensor ops (TBFUNC_FUSED=0)",
            "deterministic step, tb.optim.Adam",
            training_bench.POOL_FUSED,
            training_bench.SAMPLED,
        ):
            assert rows[name]["error"] is None and rows[name]["median_s"] > 0, name
    text = (tmp_path / "results.md").read_text()
    assert text.count("tbfunc nelbo + tb.optim.Adam, ms per step (profiler): draw + KL ") == 8
    phases = "tbfunc VON step, sampled, ms per step (timed phases): draw into the module "
    assert text.count(phases) == 4  # the 1-sample tables
    assert "| W1 MLP 784-512-512-10, S=2 |" in text  # the sharded-predict scaling table
    assert "| tb.predict |" in text
    # W1 (an MLP) is timed, W2 (convolutions) is a loop without timing
    assert text.count("tb.predict auto strategy: ") == 2
    assert (
        "tb.predict auto strategy: loop\n\ntb.predict auto choice: s: 0.0" in text.split("## W2")[1]
    )


def test_the_untimed_call_before_each_timed_one_runs_and_is_left_out(monkeypatch):
    """``interleaved(before=...)``: ``before`` runs ahead of every call, warm-up included, and
    none of its time is counted (a clock that only the calls and ``before`` move)."""
    clock, log = [0.0], []

    def step(name, seconds):
        def run():
            log.append(name)
            clock[0] += seconds

        return run

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    results = timing.interleaved(
        {"a": step("a", 1.0), "b": step("b", 2.0)},
        repeats=3,
        warmup=1,
        device=torch.device("cpu"),
        before=lambda name: step(f"before {name}", 100.0)(),
    )
    assert log == ["before a", "a", "before b", "b"] * 4
    assert results["a"].times == [1.0] * 3 and results["b"].times == [2.0] * 3


def test_overhead_ab_switches_every_short_route_off_and_back(monkeypatch):
    from benchmarks import overhead_ab
    from tbfunc import _fused, _sampling, _threefry, _vmap

    flat, primitives, scalar = _sampling._flat, _vmap._PRIMITIVES, _threefry.fold_in_int
    finite = _fused.all_finite
    post = {"a": tb.GaussianPosterior(torch.zeros(3), torch.zeros(3))}
    key = tb.random.key(1)
    with overhead_ab.routes(short=False):
        assert _vmap._PRIMITIVES is None and _sampling._flat(post) is None
        assert _threefry.fold_in_int is not scalar
        assert _fused.all_finite([torch.zeros(3)]) is None  # the tensor-op check instead
        slow = tb.random.fold_in(key, 2**63 + 3)  # the tensor form: the same key
    assert torch.equal(slow, tb.random.fold_in(key, 2**63 + 3))
    assert _sampling._flat is flat and _vmap._PRIMITIVES is primitives
    assert _threefry.fold_in_int is scalar and _fused.all_finite is finite
    with overhead_ab.routes(short=True):
        assert _sampling._flat(post) is not None and _vmap._PRIMITIVES is primitives
    monkeypatch.setattr(overhead_ab, "CALLS", 1)
    between: list[str] = []
    monkeypatch.setattr(overhead_ab.overhead, "other_library", lambda device: between.append)
    with torch.random.fork_rng():  # torchbayesian draws from the global RNG
        text = overhead_ab.main(["--rounds", "1", "--after-other"])
    # ahead of each call: 2 rounds (the first a warm-up) of 5 calls x 2 settings + 3 anchors
    assert len(between) == 26 and between[-1] == "torchbayesian vmap"
    calls = ("tb.predict vmap", "tb.predict", "tb.sample", "tb.random.fold_in")
    for name in (*calls, "tb.sample after an in-place update"):
        assert f"| {name}, short routes on |" in text and f"| {name}, short routes off |" in text
    assert "| torchbayesian vmap |" in text and "after another library's forward" in text


def test_streaming_memory_benchmark_runs(tmp_path):
    from benchmarks.evaluate import main as evaluate_main

    out = tmp_path / "evaluate.md"
    text = evaluate_main(
        ["--examples", "200", "--batch", "100", "--samples", "2", "--out", str(out)]
    )
    assert "tb.evaluate (streaming)" in text and "whole set" in text
    assert out.read_text().startswith("# Streaming evaluation: memory")


def test_threads_benchmark_runs():
    from benchmarks.threads import main as threads_main

    before = torch.get_num_threads()
    text = threads_main(["--width", "8", "--calls", "2", "--rounds", "1"])
    assert "2 threads, a module each" in text and "one shared module" in text
    assert torch.get_num_threads() == before  # restored


def test_frozen_base_benchmark_runs():
    from benchmarks.frozen_base import main as frozen_main

    text = frozen_main(["--batch", "2", "--tokens", "4", "--rounds", "1", "--steps", "1"])
    assert "trainable (" in text and "frozen" in text


def test_kernel_ab_builds_a_revision_and_serves_each_build_its_own_steps(tmp_path):
    # the A/B of two kernel builds: a swap that left one build serving both columns would
    # report a change as no change
    from benchmarks import kernel_ab
    from tbfunc import _native

    real = _native.kernel()
    assert kernel_ab.build("HEAD", tmp_path).tb_von is not None  # the revision compiles

    class Spy:
        def __init__(self) -> None:
            self.calls: set[str] = set()

        def __getattr__(self, name: str):
            self.calls.add(name)
            return getattr(real, name)

    spies = {"a": Spy(), "b": Spy()}
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        table = kernel_ab.compare(spies, "W1", 1, 1)
    torch.set_num_threads(threads)
    for spy in spies.values():
        assert {"tb_fill", "tb_draw_grad", "tb_adam", "tb_von"} <= spy.calls
    assert set(table) == {"a", "b"}
    assert all(row["VON"] > 0 and row["deterministic ms"] > 0 for row in table.values())
    assert _native.kernel() is real  # restored


def test_fit_benchmark_times_every_fit_against_the_adam_fit(monkeypatch):
    """Each contender's fit runs the steps asked for (a fit that skipped its loop would time
    as free), the ratios are to the Adam fit of the same rounds, and the threads come back."""
    from benchmarks import fit

    counted = {"Adam": 0, "VON": 0, "Adam.sampled": 0}

    class CountingAdam(torch.optim.Adam):
        def step(self, closure=None):
            counted["Adam"] += 1
            return super().step(closure)

    class CountingVON(tb.optim.VON):
        def step(self, closure=None):
            counted["VON"] += 1
            return super().step(closure)

    real_sampled = tb.optim.Adam.sampled

    def counting_sampled(self, module, key, **kwargs):
        counted["Adam.sampled"] += 1
        return real_sampled(self, module, key, **kwargs)

    monkeypatch.setattr(fit.torch.optim, "Adam", CountingAdam)
    monkeypatch.setattr(fit.tb.optim, "VON", CountingVON)
    monkeypatch.setattr(tb.optim.Adam, "sampled", counting_sampled)
    before = torch.get_num_threads()
    with torch.random.fork_rng():  # ivon-opt draws from the global RNG (it forks too)
        table = fit.compare(steps=3, rounds=2, threads=1)
    assert torch.get_num_threads() == before
    # a warm-up fit of min(steps, 20) and two timed fits: 3 fits of 3 steps each (VON: both
    # routes), and Adam.sampled's block entered once a step
    assert counted == {"Adam": 9, "VON": 18, "Adam.sampled": 9}
    names = {"Adam (MAP)", "tb.optim.VON", "tb.optim.VON, sampled", "tb.nelbo + tb.optim.Adam"}
    names |= {"tb.optim.Adam.sampled"}
    assert names <= set(table)
    assert table["Adam (MAP)"][1] == 1.0
    assert all(seconds > 0 and ratio > 0 for seconds, ratio in table.values())
    text = fit.main(["--steps", "2", "--rounds", "1", "--threads", "1"])
    assert "| 1 | tb.optim.VON |" in text and "x Adam fit" in text
    assert "| threads | step | forward | backward | update |" in text


def test_fit_benchmark_phases_time_each_part_of_both_steps(monkeypatch):
    """Each phase is timed around its own call: a VON update made slow shows in "update"
    only, and the Adam step's phases are its own."""
    from benchmarks import fit

    real_step = tb.optim.VON.step

    def slow_step(self, closure=None):
        time.sleep(0.02)
        return real_step(self, closure)

    monkeypatch.setattr(tb.optim.VON, "step", slow_step)
    before = torch.get_num_threads()
    with torch.random.fork_rng():
        parts = fit.phases(steps=4, threads=1 if before > 1 else 2)
    assert torch.get_num_threads() == before  # restored
    assert set(parts) == {"Adam (MAP)", "tb.optim.VON", "tb.optim.VON, sampled"}
    for name in ("tb.optim.VON", "tb.optim.VON, sampled"):
        assert parts[name]["update"] >= 20
        assert parts[name]["forward"] < 20 and parts[name]["backward"] < 20
    assert all(parts["Adam (MAP)"][p] < 20 for p in ("forward", "backward", "update"))


def test_the_sampled_von_row_runs_the_sampled_route(monkeypatch):
    """ "tbfunc VON step, sampled" enters VON.sampled once a step; the other VON row never."""
    from benchmarks import workloads

    calls = []
    real = tb.optim.VON.sampled

    def counted(self, module, key):
        calls.append(module)
        return real(self, module, key)

    monkeypatch.setattr(tb.optim.VON, "sampled", counted)
    model, x, y = workloads.instantiate(workloads.WORKLOADS["W1"], torch.device("cpu"), batch=8)
    training_bench.von_step(model, x, y)()
    assert calls == []
    step = training_bench.von_step(model, x, y, sampled=True)
    step()
    step()
    assert len(calls) == 2 and calls[0] is not model  # a copy: the other rows' model untouched


def test_the_sampled_bbb_rows_run_their_routes(monkeypatch):
    """The tb.optim.sampled row enters it once per sample, with the split keys and the sample
    count; the Adam.sampled row enters Adam.sampled once a step; both on a copy of the model."""
    from benchmarks import workloads

    blocks, steps = [], []
    real_block, real_adam = tb.optim.sampled, tb.optim.Adam.sampled

    def block(module, posterior, key, **kwargs):
        blocks.append((module, kwargs["num_samples"]))
        return real_block(module, posterior, key, **kwargs)

    def adam(self, module, key, **kwargs):
        steps.append(module)
        return real_adam(self, module, key, **kwargs)

    monkeypatch.setattr(tb.optim, "sampled", block)
    monkeypatch.setattr(tb.optim.Adam, "sampled", adam)
    model, x, y = workloads.instantiate(workloads.WORKLOADS["W1"], torch.device("cpu"), batch=8)
    training_bench.sampled_step(model, x, y, 3)()
    assert [count for _, count in blocks] == [3, 3, 3] and blocks[0][0] is not model
    training_bench.sampled_step(model, x, y, 1, one_pass=True)()
    assert len(steps) == 1 and steps[0] is not model


def test_the_von_breakdown_times_each_phase_around_its_own_call(monkeypatch):
    """A VON update made slow shows in "update" only; the other phases stay small."""
    from benchmarks import workloads

    real_step = tb.optim.VON.step

    def slow_step(self, closure=None):
        time.sleep(0.02)
        return real_step(self, closure)

    monkeypatch.setattr(tb.optim.VON, "step", slow_step)
    model, x, y = workloads.instantiate(workloads.WORKLOADS["W1"], torch.device("cpu"), batch=8)
    parts = training_bench.von_breakdown(model, x, y, steps=3)
    assert list(parts) == ["draw into the module", "forward/backward", "restore", "update"]
    assert parts["update"] >= 20
    assert all(0 < parts[p] < 20 for p in ("draw into the module", "forward/backward", "restore"))
    text = training_bench.main(["--workloads", "W1", "--threads", "1", "--steps", "1"])
    assert text.startswith("W1, 1 thread(s), ms per step: draw into the module ")


def test_fit_benchmark_runs_the_recommended_recipes_settings():
    """The benchmark times the recipe the README recommends, not a setting of its own."""
    import sys
    from pathlib import Path

    from benchmarks import fit

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import recipes
    finally:
        sys.path.pop(0)
    recipe = recipes.Recipe()
    assert {
        "lr": recipe.von_lr,
        "hess_init": recipe.von_hess_init,
        "weight_decay": recipe.von_weight_decay,
        "beta2": recipe.von_beta2,
        "clip": recipe.von_clip,
    } == fit.VON_SETTINGS
    assert recipe.batch_size == fit.BATCH
    # and starts it as train_von does: the first draw at the sigma the curvature guess implies
    with torch.random.fork_rng():
        _, posterior, _ = fit.von(1078)
    start = (1078 * (recipe.von_hess_init + recipe.von_weight_decay)) ** -0.5
    for node in posterior.values():
        torch.testing.assert_close(node.sigma, torch.full_like(node.sigma, start))


def test_the_timed_von_step_stays_finite_on_every_workload():
    """A step that diverges is timed until its finiteness check raises, and its row reads
    "error": unclipped, VON's first steps on the W2 CNN reached a loss of 4e19 and an infinite
    rho within four steps. With the recipe's clip every workload's step stays finite."""
    from benchmarks import workloads

    for name in ("W1", "W2", "W4"):
        model, x, y = workloads.instantiate(workloads.WORKLOADS[name], torch.device("cpu"), batch=8)
        step = training_bench.von_step(model, x, y)
        losses = [float(step().detach()) for _ in range(6)]  # type: ignore[attr-defined]
        assert all(torch.isfinite(torch.tensor(losses))), (name, losses)


def test_the_switched_rows_run_the_route_they_name():
    """The pool rows run with the team off and the tensor-op rows with the fused route off (a
    switch misspelt would time the default route twice under two names)."""
    from tbfunc import _fused, _native

    library = _native.kernel()
    if library is None:
        pytest.skip("no kernels built: every route is the tensor-op one")
    assert not training_bench._on_pool(lambda: _native.team(library))()
    assert not training_bench._unfused(lambda: _fused.eager([torch.zeros(3)]))()
    assert _fused.eager([torch.zeros(3)])  # and both switches are back on afterwards
    assert _native.team(library) == _native._shares_openmp(library)
