"""Sample blocks on helper threads: the convolution of a training step on more than one core.

The training step's loops and matrix products are each too small for numba's or OpenBLAS's
threads (:data:`refnorm.kernels.norms.SERIAL_BELOW`, :data:`refnorm.kernels.nn.BLAS_PARALLEL_FROM`):
a parallel region waits at its end for every worker, and a worker the system has descheduled
holds it up for a time slice. The convolution's work is separable by sample (im2col, one
product per sample, col2im), so :func:`by_samples` cuts it into blocks of samples and lets
the calling thread and helper threads *claim* blocks one at a time. The caller waits only for
blocks a helper has already started: a helper that is not running when the call begins costs
it nothing, and the call takes about its one-thread time plus one block at worst. numpy's
matrix products and the ``nogil`` loops release the GIL, so the blocks run at the same time.

Every block computes what the one-thread call computes for its samples, with the same
operations in the same order, into disjoint parts of the outputs: the results are bitwise
those of one thread whatever the thread count, the block size or which thread ran which block
(the tests compare them bit for bit).

The helpers are daemon threads started on the first call that uses them, one fewer than
refnorm's thread count (numba's, :func:`refnorm.kernels.norms.threads`), and restarted in a
forked child. Where numba's threading layer cannot run loops on two threads at once
(:func:`layer_is_thread_safe`), every call is one block.
"""
from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable

from refnorm.kernels.norms import loops, threads

# work (multiply-adds of a convolution's products) of the smallest block: a block costs some
# 20-40 us of Python holding the GIL, which the threads take in turn; from the measured
# crossover, `refnorm bench --crossover` (docs/performance.md)
MIN_BLOCK_WORK = 1 << 22
BLOCKS_PER_THREAD = 4  # blocks per thread at most: a late helper leaves at most one block's wait


class _Job:
    """Blocks ``fn(lo, hi)`` claimed one at a time by whichever thread asks next."""

    def __init__(self, fn: Callable[[int, int], object], bounds: list[tuple[int, int]]):
        self.fn = fn
        self.bounds = bounds
        self.lock = threading.Condition(threading.Lock())
        self.claimed = 0
        self.finished = 0
        self.error: BaseException | None = None

    def work(self) -> None:
        """Run blocks until none is left unclaimed (or one has failed)."""
        while True:
            with self.lock:
                if self.claimed == len(self.bounds) or self.error is not None:
                    return
                lo, hi = self.bounds[self.claimed]
                self.claimed += 1
            try:
                self.fn(lo, hi)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, re-raised there
                with self.lock:
                    if self.error is None:
                        self.error = exc
            with self.lock:
                self.finished += 1
                if self.finished == self.claimed:
                    self.lock.notify_all()

    def wait(self) -> None:
        """Return when every claimed block has finished; re-raise a block's exception."""
        try:
            with self.lock:
                while self.finished < self.claimed:
                    self.lock.wait()
        except BaseException:
            # interrupted (a signal handler raised): claim what is left, so that no helper
            # starts a block, and let the started ones finish before the caller moves on
            with self.lock:
                self.bounds = self.bounds[:self.claimed]
                while self.finished < self.claimed:
                    self.lock.wait()
            raise
        if self.error is not None:
            raise self.error


class _Helpers:
    """Daemon threads that each run the jobs put on a shared queue."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.count = 0

    def grow(self, count: int) -> int:
        """Start helpers up to ``count``; return how many run (fewer where the system refuses
        a new thread: the caller then runs more of the blocks itself)."""
        while self.count < count:
            try:
                threading.Thread(target=self._serve, name=f"refnorm-blocks-{self.count}",
                                 daemon=True).start()
            except RuntimeError:  # "can't start new thread"
                break
            self.count += 1
        return min(self.count, count)

    def _serve(self) -> None:
        loops().set_threads(1)  # numba's thread count is per thread: the blocks' loops run here
        while True:
            self.jobs.get().work()


_helpers: _Helpers | None = None


@functools.cache
def layer_is_thread_safe() -> bool:
    """Whether numba's threading layer lets two threads run its loops at once (``omp`` and
    ``tbb`` do; ``workqueue``, numba's fallback where neither library is found, aborts the
    process on a concurrent launch): without it, every call runs as one block."""
    import numba

    threads()  # starts numba's thread pool, which chooses the layer
    return bool(numba.threading_layer() in ("omp", "tbb"))


def _get_helpers() -> _Helpers:
    global _helpers
    if _helpers is None or _helpers.pid != os.getpid():  # none yet, or a forked child's copy
        _helpers = _Helpers()
    return _helpers


def by_samples(fn: Callable[[int, int], object], n: int, work: int) -> None:
    """Call ``fn(lo, hi)`` over the sample range ``[0, n)`` in blocks of samples, on the
    calling thread and ``threads() - 1`` helper threads: ``min(n, work //``
    :data:`MIN_BLOCK_WORK`, :data:`BLOCKS_PER_THREAD` ``* threads())`` blocks, at most one
    helper per block beyond the first. One block, ``fn(0, n)`` on the calling thread as it
    is, when that makes fewer than two or numba's layer is not thread-safe. Numba loops that
    ``fn`` starts while blocks run on several threads run on their thread alone.

    ``fn`` must write only its samples' parts of its outputs, and compute each sample's values
    the same way whatever block it is in: then the result does not depend on the blocks.
    """
    count = threads()
    blocks = min(n, work // MIN_BLOCK_WORK, BLOCKS_PER_THREAD * count) if count > 1 else 1
    if blocks < 2 or not layer_is_thread_safe():
        fn(0, n)
        return
    edges = [n * k // blocks for k in range(blocks + 1)]
    job = _Job(fn, list(zip(edges[:-1], edges[1:], strict=True)))
    helpers = _get_helpers()
    wanted = helpers.grow(min(count, blocks) - 1)
    compiled = loops()
    compiled.set_threads(1)
    try:
        for _ in range(wanted):
            helpers.jobs.put(job)
        job.work()
        job.wait()
    finally:
        compiled.set_threads(count)
