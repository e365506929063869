"""Servers and workers: many threads on one module and posterior give the serial results and
leave the module as it was; a forked child (and a DataLoader's workers) draw in parallel."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch
from torch import nn

import tbfunc as tb
from helpers import data, mlp, seeded

CALLS = 60


def _hammer(work, threads=2):
    """Run ``work(i)`` for i in range(CALLS) from every thread; return each thread's results."""
    results = [[None] * CALLS for _ in range(threads)]
    errors = []
    start = threading.Barrier(threads)

    def body(t):
        start.wait()
        try:
            for i in range(CALLS):
                results[t][i] = work(i)
        except Exception as error:  # surfaced below with the thread's traceback lost
            errors.append(error)

    pool = [threading.Thread(target=body, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("strategy", ["loop", "vmap", "auto"])
def test_threads_predicting_on_one_module_get_the_serial_results(strategy):
    net = mlp((6, 32, 32, 3))
    post = tb.from_module(net, sigma_scale=0.2)
    x = data(16, 6)
    keys = [tb.random.key(i) for i in range(CALLS)]
    serial = [tb.predict(net, post, k, x, num_samples=4, strategy=strategy) for k in keys]
    own = {name: p for name, p in net.named_parameters()}
    results = _hammer(lambda i: tb.predict(net, post, keys[i], x, num_samples=4, strategy=strategy))
    for per_thread in results:
        for got, expected in zip(per_thread, serial, strict=True):
            assert torch.equal(got, expected)
    # the module holds its own parameters again, and runs as a plain module
    assert all(p is own[name] for name, p in net.named_parameters())
    assert all(type(p) is nn.Parameter for p in net.parameters())
    net(x)


def test_threads_mixing_entry_points_and_dropout_get_the_serial_results():
    net = seeded(
        lambda: nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    ).eval()
    post = tb.from_module(net, sigma_scale=0.2)
    x, y = data(16, 6), (data(16, seed=1).abs() * 5).long() % 3

    def work(i):
        key = tb.random.key(i)
        if i % 3 == 0:
            return tb.predict(net, post, key, x, num_samples=3, dropout=True)
        if i % 3 == 1:
            return tb.functional_call(net, post, key, x)
        with torch.no_grad():
            return tb.nelbo(net, post, key, x, y, num_data=100, loss_fn=nn.functional.cross_entropy)

    serial = [work(i) for i in range(CALLS)]
    for per_thread in _hammer(work):
        for got, expected in zip(per_thread, serial, strict=True):
            assert torch.equal(got, expected)
    assert not net.training and not net[2].training  # dropout's switches were put back


def test_threads_in_vmapped_attention_leave_the_global_switches_as_they_were():
    layer = seeded(lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    layer.eval()
    post = tb.from_module(layer, include="linear1.weight", sigma_scale=0.2)
    x = data(2, 5, 8)
    serial = [
        tb.predict(layer, post, tb.random.key(i), x, num_samples=2, strategy="vmap")
        for i in range(CALLS)
    ]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    flash = torch.backends.cuda.flash_sdp_enabled()
    math = torch.backends.cuda.math_sdp_enabled()
    results = _hammer(
        lambda i: tb.predict(layer, post, tb.random.key(i), x, num_samples=2, strategy="vmap")
    )
    for per_thread in results:
        for got, expected in zip(per_thread, serial, strict=True):
            torch.testing.assert_close(got, expected)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    assert torch.backends.cuda.flash_sdp_enabled() == flash
    assert torch.backends.cuda.math_sdp_enabled() == math


# ----------------------------------------------------------------------------------------------
# fork: a child inherits the parent's thread pool object, not its threads.

_BIG = (1 << 17) + 3  # past the size at which a draw is split over threads


def _bits(values):
    # numpy, not torch: torch's own OpenMP ops hang in a forked child given 2 threads
    # (libgomp is not fork-safe); tbfunc's draw does not use them
    return values.numpy().tobytes()


def _draw_in_child(queue):
    torch.set_num_threads(2)
    queue.put(_bits(tb.random.normal(tb.random.key(4), (_BIG,))))


@pytest.mark.parametrize("route", ["team", "pool"])
def test_a_forked_child_draws_in_parallel_after_the_parent_did(monkeypatch, route):
    """On torch's OpenMP team (libgomp makes a new team in the child) and on tbfunc's pool
    (the child makes a new pool): neither may hang on the parent's threads."""
    monkeypatch.setenv("TBFUNC_OPENMP", "1" if route == "team" else "0")  # the child inherits it
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = _bits(tb.random.normal(tb.random.key(4), (_BIG,)))  # the pool exists now
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_draw_in_child, args=(queue,))
        child.start()
        try:  # read before joining: the child's queue feeder waits until the bits are taken
            got = queue.get(timeout=60)
        except Exception as error:
            raise AssertionError("the forked child hung in its parallel draw") from error
        finally:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
        assert child.exitcode == 0
        assert got == expected  # the same bits in the child
    finally:
        torch.set_num_threads(threads)


class _Noisy(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return _bits(tb.random.normal(tb.random.fold_in(tb.random.key(6), i), (_BIG,)))


def _two_threads(worker_id):
    torch.set_num_threads(2)


def test_a_dataloader_with_two_workers_draws_with_two_threads_each():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dataset = _Noisy()
        expected = [dataset[i] for i in range(4)]  # the parent's pool exists now
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=2,
            multiprocessing_context="fork",
            worker_init_fn=_two_threads,
            timeout=60,
            generator=torch.Generator().manual_seed(0),
        )
        assert list(loader) == expected
    finally:
        torch.set_num_threads(threads)


def test_a_shared_switch_is_restored_by_its_last_holder_only():
    """Planted: restoring on every release (no count), which turns the setting back while
    another thread's vmapped attention still needs it."""
    from tbfunc._concurrency import SharedSwitch

    state = {"on": True}
    switch = SharedSwitch(
        lambda: state["on"], lambda: state.update(on=False), lambda v: state.update(on=v)
    )
    switch.turn()
    switch.turn()  # a second thread
    assert state["on"] is False
    switch.release()
    assert state["on"] is False  # still held
    switch.release()
    assert state["on"] is True  # the last holder put it back
    state["on"] = False  # set by the user between holds: the next hold saves and restores it
    switch.turn()
    switch.release()
    assert state["on"] is False
