"""tb.distributed with two real processes (gloo, CPU, loopback; issue 12)."""

from __future__ import annotations

import multiprocessing
import re
import time

import distributed_jobs
import pytest
import torch

import tbfunc as tb

WORLD = 2


def spawn(target, tmp_path, *extra, limit=90.0) -> dict[int, dict]:
    """Run ``target(rank, WORLD, store, out, *extra)`` in two spawned processes; wait at most
    ``limit`` seconds; return what each rank saved."""
    context = multiprocessing.get_context("spawn")
    store = tmp_path / "store"
    procs = [
        context.Process(target=target, args=(rank, WORLD, str(store), str(tmp_path), *extra))
        for rank in range(WORLD)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + limit
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for proc in alive:
        proc.kill()
    assert not alive, f"ranks still running after {limit} s: the job hangs"
    return {
        rank: torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for rank in range(WORLD)
        if (tmp_path / f"rank{rank}.pt").exists()
    }


def test_sharded_prediction_and_ddp_training(tmp_path):
    seen = spawn(distributed_jobs.predict_and_train, tmp_path)
    assert set(seen) == {0, 1}
    for rank in (0, 1):
        for name, value in seen[rank].items():
            if name.endswith(" single") or not name.startswith("S="):
                continue
            # auto is rank 0's timed pick, broadcast: compare with rank 0's single-process run
            single = seen[0 if "auto" in name else rank][name + " single"]
            assert value["hidden"] is None and value["tag"] == "pair"
            for leaf in ("logits", "probs"):
                assert torch.equal(value[leaf], single[leaf]), (rank, name, leaf)
    assert not torch.equal(seen[0]["rank_key"], seen[1]["rank_key"])
    assert torch.equal(seen[0]["rank_key"], tb.random.fold_in(distributed_jobs.KEY, 0))
    # DDP over PosteriorModule: both ranks agree, and equal the one-process average of losses
    reference = seen[0]["reference"]
    for name, value in reference.items():
        assert torch.equal(seen[0]["ddp"][name], seen[1]["ddp"][name]), name
        torch.testing.assert_close(seen[0]["ddp"][name], value, rtol=1e-5, atol=1e-6)
    start = tb.from_module(distributed_jobs.model(), sigma_scale=0.1)
    assert not torch.allclose(reference["net.0.weight.mu"], start["net.0.weight"].mu)


@pytest.mark.parametrize("how", ["raises", "dies"])
def test_a_failing_rank_makes_the_others_fail_fast(tmp_path, how):
    began = time.monotonic()
    seen = spawn(distributed_jobs.failing, tmp_path, how, limit=60.0)
    assert time.monotonic() - began < 60
    if how == "raises":
        assert seen[1]["message"].startswith("ValueError: distributed.predict failed in")
        assert "rank 1's data is corrupt" in seen[1]["message"]
        assert seen[0]["message"] == (
            "RuntimeError: distributed.predict: rank(s) [1] failed (their own error says why); "
            "rank 0 stops too."
        )
    else:
        assert 1 not in seen  # it died without a word
        assert seen[0]["message"].startswith("_CollectiveError: distributed.predict: the ")
        assert "another rank probably died or timed out." in seen[0]["message"]
        assert seen[0]["seconds"] < 30


def test_shard_covers_the_range_in_order():
    for count in range(1, 12):
        for world in range(1, 5):
            parts = [tb.distributed.shard(count, rank=r, world_size=world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got int 2"):
        tb.distributed.shard(4, rank=2, world_size=2)
    with pytest.raises(
        RuntimeError,
        match=r"shard needs torch.distributed: call torch.distributed.init_process_group",
    ):
        tb.distributed.shard(4)


def test_the_readme_torchrun_example_runs(tmp_path):
    """examples/distributed_train.py under torchrun --standalone (a free loopback port)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(root / "examples" / "distributed_train.py"),
            "--steps",
            "30",
            "--samples",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    # torch 2.13's gloo sometimes aborts a rank in interpreter shutdown, after the job is done
    # ("terminate called without an active exception"): a pure-torch DDP script with
    # destroy_process_group() did so in 4 of 40 runs here. That abort, after the result line,
    # is torch's, not the example's; any other failure fails the test.
    shutdown_abort = "terminate called without an active exception" in done.stderr
    assert done.returncode == 0 or shutdown_abort, done.stderr[-2000:]
    found = re.search(r"world size 2: test accuracy (\d\.\d+) with 8 samples", done.stdout)
    assert found is not None, (done.stdout, done.stderr[-2000:])
    assert float(found.group(1)) > 0.8  # it trained
