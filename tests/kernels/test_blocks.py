"""The convolution by sample blocks on helper threads (refnorm.kernels.blocks): bitwise the
one-thread result, whatever the blocks; every block once; a block's exception reaches the
caller."""

from __future__ import annotations

import subprocess
import sys
import threading
from unittest import mock

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refnorm import kernels
from refnorm.kernels import blocks
from tests.nn.strategies import as_pair, conv_configs

TWO_THREADS = numba.config.NUMBA_NUM_THREADS >= 2  # type: ignore[attr-defined]


@pytest.fixture
def two_threads():
    """Skip where blocks cannot run on two threads: one core, or numba's workqueue layer."""
    if not TWO_THREADS:
        pytest.skip("numba has one thread on this machine")
    if not blocks.layer_is_thread_safe():
        pytest.skip("numba's threading layer cannot run loops on two threads at once")


class _Recorded(blocks._Job):
    """A job that notes which thread ran which block."""

    runs: list[tuple[str, int, int]] = []

    def __init__(self, fn, bounds):
        def noted(lo, hi):
            _Recorded.runs.append((threading.current_thread().name, lo, hi))
            return fn(lo, hi)
        super().__init__(noted, bounds)


def _conv(x, w, b, window, dy, *, threads: int, smallest: int):
    """Forward and backward with numba on ``threads`` threads and blocks of at least
    ``smallest`` multiply-adds."""
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        with mock.patch.object(blocks, "MIN_BLOCK_WORK", smallest):
            y, cols, w_mat = kernels.conv_forward(x, w, b, window[1], window[2])
            grads = kernels.conv_backward(dy, cols, w_mat, x.shape, window, bias=b is not None)
    finally:
        numba.set_num_threads(before)
    return (y, cols, w_mat, *grads)


@pytest.mark.usefixtures("two_threads")
@given(data=st.data())
def test_conv_by_blocks_is_bitwise_the_one_thread_conv(data):
    (_, C_in, H, W), w_shape, stride, padding, bias = data.draw(conv_configs(max_extra=4))
    N = data.draw(st.integers(2, 9))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(N * 7 + H * W)
    x = rng.standard_normal((N, C_in, H, W)).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    window = (tuple(w_shape[2:]), as_pair(stride), as_pair(padding))
    y1 = kernels.conv_forward(x, w, b, window[1], window[2]).y
    dy = np.random.default_rng(N).standard_normal(y1.shape).astype(dtype)
    one = _conv(x, w, b, window, dy, threads=1, smallest=1)
    _Recorded.runs = []
    with mock.patch.object(blocks, "_Job", _Recorded):
        split = _conv(x, w, b, window, dy, threads=2, smallest=1)
    # a forward and a backward, each in min(N, 8) blocks covering every sample once
    blocks_seen = sorted((lo, hi) for _, lo, hi in _Recorded.runs)
    edges = [N * k // min(N, 8) for k in range(min(N, 8) + 1)]
    assert blocks_seen == sorted(2 * list(zip(edges[:-1], edges[1:], strict=True)))
    for name, a, c in zip(("y", "cols", "w_mat", "dx", "dw", "db"), one, split, strict=True):
        if a is None:
            assert c is None, name
        else:
            np.testing.assert_array_equal(a, c, err_msg=name)


class _WithHelper(_Recorded):
    """A recorded job whose caller starts its first block only once a helper has started one
    (so that a helper runs blocks of every job, however late it wakes)."""

    def __init__(self, fn, bounds):
        helper_started = threading.Event()
        caller = threading.current_thread()

        def first_helper_block(lo, hi):
            if threading.current_thread() is caller:
                assert helper_started.wait(timeout=120), "no helper started a block"
            else:
                helper_started.set()
            return fn(lo, hi)
        super().__init__(first_helper_block, bounds)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize(("c_in", "c_out", "size", "count"),
                         [(3, 16, 32, 3), (16, 32, 16, 8), (32, 32, 8, 4)],
                         ids=["14M-3-blocks", "38M-8-blocks", "19M-4-blocks"])
def test_the_study_models_convolutions_run_their_blocks_with_a_helper(c_in, c_out, size, count):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, c_in, size, size)).astype(np.float32)
    w = rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((32, c_out, size, size)).astype(np.float32)
    window = ((3, 3), (1, 1), (1, 1))
    one = _conv(x, w, None, window, dy, threads=1, smallest=blocks.MIN_BLOCK_WORK)
    _Recorded.runs = []
    with mock.patch.object(blocks, "_Job", _WithHelper):
        split = _conv(x, w, None, window, dy, threads=2, smallest=blocks.MIN_BLOCK_WORK)
    assert any(name.startswith("refnorm-blocks") for name, _, _ in _Recorded.runs)
    # 14, 38 and 19 M multiply-adds at 2 threads (docs/performance.md), forward and backward
    edges = [32 * k // count for k in range(count + 1)]
    want = list(zip(edges[:-1], edges[1:], strict=True))
    assert sorted((lo, hi) for _, lo, hi in _Recorded.runs) == sorted(2 * want)
    for a, c in zip(one, split, strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, c)


def test_one_thread_or_little_work_is_one_block_on_the_calling_thread():
    calls = []
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        blocks.by_samples(lambda lo, hi: calls.append((lo, hi)), 32, 1 << 40)
        if TWO_THREADS:
            numba.set_num_threads(2)
            blocks.by_samples(lambda lo, hi: calls.append((lo, hi)), 32,
                              2 * blocks.MIN_BLOCK_WORK - 1)
            blocks.by_samples(lambda lo, hi: calls.append((lo, hi)), 1, 1 << 40)
            # numba's workqueue layer aborts the process on a concurrent launch
            with mock.patch.object(blocks, "layer_is_thread_safe", lambda: False):
                blocks.by_samples(lambda lo, hi: calls.append((lo, hi)), 32, 1 << 40)
    finally:
        numba.set_num_threads(before)
    assert calls == [(0, 32)] + ([(0, 32), (0, 1), (0, 32)] if TWO_THREADS else [])


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("failing", [0, 3, 7])
def test_a_blocks_exception_reaches_the_caller_and_no_block_runs_twice(failing):
    ran = []
    lock = threading.Lock()

    def fn(lo, hi):
        with lock:
            ran.append(lo)
        if lo == failing:
            raise ValueError(f"block {lo}")

    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match=f"block {failing}"):
            blocks.by_samples(fn, 8, 8 * blocks.MIN_BLOCK_WORK)
    finally:
        numba.set_num_threads(before)
    assert failing in ran and len(ran) == len(set(ran))
    # the failure did not leave the caller's numba thread count at 1
    assert numba.get_num_threads() == before


@pytest.mark.usefixtures("two_threads")
def test_without_a_new_thread_the_caller_runs_every_block(monkeypatch):
    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(blocks, "_helpers", blocks._Helpers())  # none started yet
    monkeypatch.setattr(threading.Thread, "start", refuse)
    ran = []
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        blocks.by_samples(lambda lo, hi: ran.append((threading.current_thread().name, lo)),
                          8, 8 * blocks.MIN_BLOCK_WORK)
    finally:
        numba.set_num_threads(before)
    assert ran == [(threading.current_thread().name, lo) for lo in range(8)]


class _InterruptedOnce(threading.Condition):
    """A condition whose first wait lets the helper's block go on, then raises as a signal
    handler would (KeyboardInterrupt) in the waiting caller."""

    def __init__(self, release: threading.Event):
        super().__init__(threading.Lock())
        self.release = release
        self.raised = False

    def wait(self, timeout=None):
        if not self.raised:
            self.raised = True
            self.release.set()
            raise KeyboardInterrupt
        return super().wait(timeout)


@pytest.mark.usefixtures("two_threads")
def test_an_interrupted_caller_waits_for_the_started_block_before_it_raises(monkeypatch):
    helper_started, release = threading.Event(), threading.Event()
    finished = []
    caller = threading.current_thread()

    def fn(lo, hi):
        if threading.current_thread() is caller:
            assert helper_started.wait(timeout=120), "the helper never started a block"
            return
        helper_started.set()
        assert release.wait(timeout=120)
        finished.append(lo)

    class Job(blocks._Job):
        def __init__(self, fn, bounds):
            super().__init__(fn, bounds)
            self.lock = _InterruptedOnce(release)

    monkeypatch.setattr(blocks, "_Job", Job)
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            blocks.by_samples(fn, 2, 2 * blocks.MIN_BLOCK_WORK)
    finally:
        numba.set_num_threads(before)
    assert len(finished) == 1  # the helper's block had ended when the caller raised


FORKED = r"""
import os, sys, threading
import numba
from refnorm.kernels import blocks

def run_blocks():
    caller, helper_started, names = threading.current_thread(), threading.Event(), []
    def fn(lo, hi):
        if threading.current_thread() is caller:
            assert helper_started.wait(timeout=120), "no helper started a block"
        else:
            helper_started.set()
        names.append(threading.current_thread().name)
    blocks.by_samples(fn, 4, 4 * blocks.MIN_BLOCK_WORK)
    return names

numba.set_num_threads(2)
assert any(n.startswith("refnorm-blocks") for n in run_blocks())
parent_helpers = blocks._helpers
pid = os.fork()
if pid == 0:  # the child: the parent's helper threads do not exist here
    ok = any(n.startswith("refnorm-blocks") for n in run_blocks())
    ok = ok and blocks._helpers is not parent_helpers and blocks._helpers.pid == os.getpid()
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.usefixtures("two_threads")
def test_a_forked_child_starts_helpers_of_its_own():
    done = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("model", ["bn", "gn", "sn", "gn+ws"])
def test_the_training_step_is_bitwise_the_same_at_one_and_two_threads(model):
    """docs/performance.md: the study's step (its convolutions cut by samples, its
    normalizers cut alike at either thread count) gives the same bits at 1 and 2 threads."""
    from refnorm.bench_cases import _train_step
    from refnorm.layer import iter_layers

    def run(threads):
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            step = _train_step("fast", model)
            step()
        finally:
            numba.set_num_threads(previous)
        return [a.copy() for layer in iter_layers(step.model)
                for a in (*layer.grads.values(), *layer.state.values())]

    if numba.config.NUMBA_NUM_THREADS < 2:  # type: ignore[attr-defined]
        pytest.skip("numba allows this process one thread")
    one, two = run(1), run(2)
    assert len(one) == len(two) and all(np.array_equal(a, b) for a, b in zip(one, two, strict=True))


def test_a_failed_block_stops_the_claiming():
    """After a block raises, the thread that ran it claims no further block and wait()
    re-raises."""
    from refnorm.kernels import blocks

    ran = []

    def fn(lo, hi):
        ran.append(lo)
        if lo == 1:
            raise ValueError("block 1")

    job = blocks._Job(fn, [(0, 1), (1, 2), (2, 3), (3, 4)])
    job.work()
    assert ran == [0, 1]
    with pytest.raises(ValueError, match="block 1"):
        job.wait()


@pytest.mark.usefixtures("two_threads")
def test_blocks_start_one_helper_fewer_than_the_threads(monkeypatch):
    """The helpers are one fewer than refnorm's thread count: the calling thread runs blocks
    too, so a helper more would hold a core that the caller needs."""
    monkeypatch.setattr(blocks, "_helpers", blocks._Helpers())  # none started yet
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    ran = []
    try:
        blocks.by_samples(lambda lo, hi: ran.append(lo), 8, 8 * blocks.MIN_BLOCK_WORK)
    finally:
        numba.set_num_threads(before)
    assert sorted(ran) == list(range(8))
    assert blocks._helpers.count == 1


@pytest.mark.usefixtures("two_threads")
def test_numba_loops_a_block_starts_run_on_its_thread_alone_and_the_count_comes_back():
    """by_samples(): numba loops that a block starts run on the block's thread alone, on the
    calling thread as on a helper (a block must not open a parallel region of its own), and
    the caller's thread count is as it was after the call."""
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    seen = []
    try:
        with mock.patch.object(blocks, "_Job", _WithHelper):
            blocks.by_samples(lambda lo, hi: seen.append(
                (threading.current_thread() is threading.main_thread(),
                 numba.get_num_threads())), 8, 8 * blocks.MIN_BLOCK_WORK)
        after = numba.get_num_threads()
    finally:
        numba.set_num_threads(before)
    assert len(seen) == 8 and {on_caller for on_caller, _ in seen} == {True, False}
    assert {count for _, count in seen} == {1}
    assert after == 2


def test_the_loops_a_block_runs_release_the_gil():
    """The blocks run at the same time because numpy's products and the convolution's loops,
    im2col and col2im, release the GIL (``nogil``): without it a helper's loop would wait
    for the caller's Python."""
    compiled = blocks.loops()
    for name in ("im2col", "col2im"):
        assert getattr(compiled, name).targetoptions.get("nogil"), name
