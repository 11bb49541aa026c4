"""Communicators: the one operation synchronized normalization needs, a sum-all-reduce.

A communicator has a ``rank``, a ``size`` and :meth:`~Communicator.allreduce_sum`, which
takes a few arrays and returns, on every rank, their elementwise sums over all ranks. Three
implementations:

- :class:`SingleProcess` — size 1, returns its input (a synchronized layer on one device);
- :class:`InProcessGroup` — P simulated devices in one process, one thread each, running in
  lockstep at every all-reduce; for lessons and tests;
- :class:`MPICommunicator` — real processes (and machines) through ``mpi4py``, with the
  ``mpich`` wheel (the ``mpi`` extra); start with ``mpiexec -n P python script.py``.

These are all the communicators refnorm has; another transport would implement the same
members. refnorm has no transport of its own.

What is guaranteed: a synchronized step never hangs.

1. Every all-reduce is self-describing (:mod:`refnorm.sync.headers`): each rank first
   contributes a header — operation, layer, step, shapes and dtypes — and the payload moves
   only when all headers agree. Otherwise every rank raises the same ``ValueError`` naming
   every rank's call (ranks in different layers or modes, different shapes).
2. A rank that makes no more collectives leaves with a *leave* header (:meth:`finish`, the
   end of a ``with comm:`` block, the end of an :meth:`InProcessGroup.run` function, or, for
   MPI, interpreter exit). A peer inside a collective then fails at once with a message
   naming where each rank was ("rank 1 left ... after collective #8 ..., step 2; rank 0
   entered collective #9 ..., step 3"), and under MPI the job is aborted. A synchronized
   layer in eval mode makes no collective; it records its call so that the leave message
   names it.
3. A rank that raises ends the group: in-process, the others stop with an error at their
   next all-reduce; under MPI an uncaught exception, and an exception or non-zero
   ``sys.exit`` that leaves a ``with comm:`` block, abort the job (``MPI_Abort``) at once.
4. A watchdog: a rank that waits longer than ``timeout`` for the others (in a collective, or
   in :meth:`~MPICommunicator.finish` for the others to finish) gives up — in-process with a
   ``TimeoutError``, under MPI by aborting the job with a message saying which rank waited
   where, as NCCL's watchdog does. This is what ends a job whose rank is stuck outside any
   collective (a deadlock of its own, a lost file system).
"""

from __future__ import annotations

import atexit
import math
import numbers
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from refnorm.backend import Array, array_namespace, device_of, on_device, to_numpy
from refnorm.core.checks import is_int
from refnorm.sync.headers import (
    HEADER_BYTES,
    LEAVE,
    CallHeader,
    CallLog,
    array_list,
    check_headers,
)

TIMEOUT_ENV = "REFNORM_SYNC_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds; as NCCL's watchdog, long enough for any real step's compute


class Communicator:
    """The interface: ``rank``, ``size``, ``allreduce_sum(arrays, *, op, layer)``, ``note``,
    ``finish``; usable as a context manager whose end is :meth:`finish`."""

    rank: int
    size: int
    describes_calls = True  # allreduce_sum takes op= and layer= (refnorm.sync.headers)

    def allreduce_sum(self, arrays: Sequence[Array], *, op: str = "allreduce_sum",
                      layer: str = "") -> list[Array]:
        """Elementwise sums over all ranks of each array, returned on every rank.

        ``op`` and ``layer`` describe the call in the header every rank checks first.
        """
        raise NotImplementedError

    def note(self, what: str, layer: str = "") -> None:
        """Record a call that makes no collective (named if this rank leaves early)."""

    def finish(self, status: str = "called finish()") -> None:
        """This rank makes no more collectives; a peer that enters one fails at once."""

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.finish("its with-block ended")


def check_comm(comm: object) -> None:
    """Check that ``comm`` is a communicator (``size``, ``rank`` and ``allreduce_sum``); a
    ``TypeError`` naming :class:`SingleProcess` for ``None`` or anything else, a class too."""
    if isinstance(comm, type):  # SingleProcess has its rank and size as class attributes
        raise TypeError(f"comm must be a communicator, an instance; got the class "
                        f"{comm.__name__} (call it: {comm.__name__}())")
    if not all(hasattr(comm, a) for a in ("size", "rank", "allreduce_sum")):
        raise TypeError(f"comm must be a communicator (refnorm.sync.comm: SingleProcess() for "
                        f"one device, InProcessGroup, MPICommunicator, NCCLCommunicator); got "
                        f"{type(comm).__name__}")


class SingleProcess(Communicator):
    """One device: ``allreduce_sum`` returns its arguments unchanged."""

    rank, size = 0, 1

    def __init__(self) -> None:
        self._finished = False

    def allreduce_sum(self, arrays: Sequence[Array], *, op: str = "allreduce_sum",
                      layer: str = "") -> list[Array]:
        if self._finished:  # as every other communicator: a finished rank makes no collective
            raise RuntimeError(f"rank 0 called finish() and then an all-reduce "
                               f"({op}{' of layer ' + layer if layer else ''})")
        return array_list(arrays)

    def finish(self, status: str = "called finish()") -> None:
        self._finished = True


def _itemsize(a: Array) -> int:
    """Bytes per value of ``a``, from the Array API's ``finfo``/``iinfo`` (``dtype.itemsize``
    is numpy's and CuPy's, not every namespace's)."""
    xp = array_namespace(a)
    info = xp.finfo(a.dtype) if xp.isdtype(a.dtype, "real floating") else xp.iinfo(a.dtype)
    return int(info.bits) // 8


class MeteredCommunicator(Communicator):
    """Another communicator, with what its all-reduces cost counted: the bytes this device
    contributes (the arrays as given, in their own dtypes) and the wall time spent inside
    the calls (moving data and waiting for the other devices).

    Attributes
    ----------
    inner : the communicator that does the work
    calls, bytes : int
    seconds : float
    """

    def __init__(self, inner: Any) -> None:
        check_comm(inner)
        self.inner = inner
        self.rank, self.size = inner.rank, inner.size
        self.clear()

    def clear(self) -> None:
        """Start counting again from zero."""
        self.calls, self.bytes, self.seconds = 0, 0, 0.0

    def allreduce_sum(self, arrays: Sequence[Array], *, op: str = "allreduce_sum",
                      layer: str = "") -> list[Array]:
        from refnorm.sync.headers import allreduce

        arrays = array_list(arrays)
        started = time.perf_counter()
        try:
            return allreduce(self.inner, arrays, op=op, layer=layer)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1
            self.bytes += sum(int(a.size) * _itemsize(a) for a in arrays)

    def report(self, *, seconds: float, steps: int) -> dict[str, float]:
        """The cost per optimizer step since :meth:`clear`, over ``steps`` steps that took
        ``seconds``: all-reduces, bytes, and the share of the time spent inside them."""
        per = max(steps, 1)
        return {"allreduce_calls_per_step": self.calls / per,
                "allreduce_bytes_per_step": self.bytes / per,
                "step_ms": 1e3 * seconds / per,
                "collective_seconds": self.seconds,
                "collective_share": self.seconds / seconds if seconds > 0 else 0.0}

    def note(self, what: str, layer: str = "") -> None:
        from refnorm.sync.headers import note_local_call

        note_local_call(self.inner, what, layer)

    def finish(self, status: str = "called finish()") -> None:
        self.inner.finish(status)


def timeout_seconds(timeout: float | None) -> float:
    """``timeout``, else ``$REFNORM_SYNC_TIMEOUT``, else 60 s; must be positive and finite."""
    source = "timeout"
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV)
        if text is None:
            return DEFAULT_TIMEOUT
        source = f"${TIMEOUT_ENV}"
        try:
            timeout = float(text)
        except ValueError:
            raise ValueError(f"{source} must be a number of seconds; got {text!r}") from None
    if isinstance(timeout, (bool, np.bool_)) or not isinstance(timeout, numbers.Real) or not (
            math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"{source} must be a positive, finite number of seconds; "
                         f"got {timeout!r}")
    return float(timeout)


# -- in-process group ----------------------------------------------------------------------------


class _PeerFailed(RuntimeError):
    """Raised on a device because another device raised or timed out (not the cause)."""


class _Rendezvous:
    """Where one group's devices meet: one round per collective.

    Each device deposits (header, arrays) in its slot; the device that fills the last slot
    checks the headers, sums in rank order (so every device gets bitwise the same result,
    and the same result on every run), publishes the outcome and starts the next round.
    A device that leaves keeps a leave header in its slot for good, so any later round
    completes at once with the error. A device that raises or times out sets ``failure``:
    every waiting and later call fails.
    """

    def __init__(self, size: int, timeout: float) -> None:
        self.size, self.timeout = size, timeout
        self.cond = threading.Condition()
        self.slots: list[tuple[CallHeader, list[Array]] | None] = [None] * size
        self.seen: list[str] = [f"rank {r} has not made a collective yet" for r in range(size)]
        self.left: set[int] = set()
        self.round = 0
        self.outcome: list[Array] | str | None = None
        self.failure: str | None = None
        self.failed_at: float | None = None
        self.closed = False

    def exchange(self, header: CallHeader, arrays: list[Array]) -> list[Array] | str | None:
        with self.cond:
            if self.failure is not None:
                raise _PeerFailed(self.failure)
            self.slots[header.rank] = (header, arrays)
            self.seen[header.rank] = header.describe()
            if all(s is not None for s in self.slots):
                self._complete()
                return self.outcome
            this_round = self.round
            arrived = self.cond.wait_for(
                lambda: self.round != this_round or self.failure is not None, self.timeout)
            if self.round != this_round:
                return self.outcome
            if not arrived:
                self.fail(f"refnorm.sync watchdog: rank {header.rank} waited {self.timeout:g} "
                          f"s in {header.where()}; the others were: "
                          + "; ".join(self.seen[r] for r in range(self.size)
                                      if r != header.rank))
                raise TimeoutError(self.failure)
            raise _PeerFailed(self.failure)

    def leave(self, header: CallHeader) -> None:
        with self.cond:
            if self.failure is not None or header.rank in self.left:
                return
            self.left.add(header.rank)
            self.slots[header.rank] = (header, [])
            self.seen[header.rank] = header.describe()
            if all(s is not None for s in self.slots):
                self._complete()

    def fail(self, reason: str) -> None:
        with self.cond:
            if self.failure is None:
                self.failure, self.failed_at = reason, time.monotonic()
            self.cond.notify_all()

    def _complete(self) -> None:
        headers = [s[0] for s in self.slots if s is not None]
        problem = check_headers(headers)
        if problem is not None:
            self.outcome = problem
        elif headers[0].kind == LEAVE:
            self.outcome = None
        else:
            parts = [s[1] for s in self.slots if s is not None]
            self.outcome = [_sum_in_rank_order([p[i] for p in parts])
                            for i in range(len(parts[0]))]
        self.round += 1
        self.slots = [s if r in self.left else None for r, s in enumerate(self.slots)]
        self.cond.notify_all()


class InProcessGroup(Communicator):
    """One simulated device of a group of ``size``; build the group with :meth:`run`.

    Each device runs in its own thread. At an all-reduce every device deposits its header
    and arrays and waits for the others; the headers are checked, the sum is taken once, in
    rank order (so every device gets bitwise the same result, and the same result on every
    run), and handed back to all. A device whose function returns leaves the group (see the
    module docstring): a device still calling all-reduces then gets a ``ValueError`` at once.
    """

    def __init__(self, rank: int, shared: _Rendezvous) -> None:
        self.rank, self.size, self._shared = rank, shared.size, shared
        self._log = CallLog(rank)
        self._finished = False

    @staticmethod
    def run(size: int, fn: Callable[..., Any], *per_rank: Sequence[Any],
            timeout: float = 60.0) -> list[Any]:
        """Run ``fn(comm, *args)`` on ``size`` simulated devices; return the results by rank.

        Parameters
        ----------
        size : int
            P, the number of devices.
        fn : callable
            ``fn(comm, *args_of_this_rank)``.
        per_rank : sequences of length ``size``
            The r-th entries go to rank r.
        timeout : float
            Seconds any device may wait at an all-reduce before the group gives up.

        Raises
        ------
        The first exception a device raised of its own (a mismatch, a device's own error, a
        ``TimeoutError`` of the watchdog); the others stop at their next all-reduce.
        """
        if not is_int(size) or size < 1:  # a numpy integer too, never a bool
            raise ValueError(f"size must be a positive int; got {size!r}")
        size = int(size)
        for seq in per_rank:
            if len(seq) != size:
                raise ValueError(f"each per-rank argument needs {size} entries; got {len(seq)}")
        shared = _Rendezvous(size, timeout_seconds(timeout))
        results: list[Any] = [None] * size
        errors: list[BaseException | None] = [None] * size

        def device(rank: int) -> None:
            comm = InProcessGroup(rank, shared)
            try:
                results[rank] = fn(comm, *(seq[rank] for seq in per_rank))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
                errors[rank] = exc
                shared.fail(f"rank {rank} raised {type(exc).__name__}: {exc}")
            else:
                comm.finish(f"its function returned, after {comm._log.seq} collectives")

        threads = [threading.Thread(target=device, args=(r,), daemon=True) for r in range(size)]
        for t in threads:
            t.start()
        _join(threads, shared)
        shared.closed = True
        own = [e for e in errors if e is not None and not isinstance(e, _PeerFailed)]
        first = own[0] if own else next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results

    def allreduce_sum(self, arrays: Sequence[Array], *, op: str = "allreduce_sum",
                      layer: str = "") -> list[Array]:
        arrays = array_list(arrays)
        if self._shared.closed:
            raise RuntimeError(
                "this InProcessGroup's run() has returned: its devices are gone, so an "
                "all-reduce (e.g. a synchronized backward) must happen inside the function "
                "given to run()")
        if self._finished:
            raise RuntimeError(f"rank {self.rank} called finish() and then an all-reduce "
                               f"({op}{' of layer ' + layer if layer else ''})")
        header = self._log.enter(arrays, op, layer)
        outcome = self._shared.exchange(header, list(arrays))
        if isinstance(outcome, str):
            raise ValueError(outcome)
        if not arrays or outcome is None:
            return []
        xp = array_namespace(*arrays)
        return [xp.asarray(r, copy=True) for r in outcome]

    def note(self, what: str, layer: str = "") -> None:
        self._log.note(what, layer)

    def finish(self, status: str = "called finish()") -> None:
        if not self._finished:
            self._finished = True
            self._shared.leave(self._log.leave(status))


def _join(threads: list[threading.Thread], shared: _Rendezvous) -> None:
    # A device stuck outside any collective never returns; once the group has failed, give
    # the others a second (ample for a thread to see the failure and unwind) and go on.
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.05)
        if shared.failed_at is not None and time.monotonic() - shared.failed_at > 1.0:
            return


def _sum_in_rank_order(parts: Sequence[Array]) -> Array:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


# -- MPI -----------------------------------------------------------------------------------------

_POLL_S = 1e-3  # sleep between MPI_Test calls after the first spins: 1 ms of latency at most
_YIELDS = 5000  # polls that only yield the core before the sleeps start


class MPICommunicator(Communicator):
    """All-reduce across MPI processes through ``mpi4py`` (the ``mpi`` extra), with a watchdog.

    Parameters
    ----------
    comm : mpi4py communicator, default ``MPI.COMM_WORLD``
        Kept as :attr:`comm` for the caller's own messages; refnorm's collectives run on a
        duplicate of it, so the caller's traffic cannot be mistaken for theirs.
    timeout : float, optional
        Seconds a rank waits for the others in a collective (or in :meth:`finish`) before the
        watchdog aborts the job; default ``$REFNORM_SYNC_TIMEOUT``, else 60.
    abort_on_error : bool, default True
        Install an exception hook that calls ``MPI_Abort`` on an uncaught exception, so that
        a failing rank ends the job instead of leaving the others blocked in a collective
        (what ``python -m mpi4py`` does).

    Use it as ``with MPICommunicator() as comm: ...``: the block's end is :meth:`finish`,
    and an exception or a non-zero ``sys.exit`` leaving the block aborts the job at once.
    Without the block, interpreter exit calls :meth:`finish` (through ``atexit``), which
    still fails a peer's pending collective at once, but cannot see the exit status:
    Python runs ``atexit`` handlers after ``SystemExit`` has been consumed, and
    ``sys.excepthook`` never sees ``SystemExit``.

    Collectives are non-blocking (``Iallgather`` of the headers, ``Ireduce`` + ``Ibcast`` of
    the payload) and polled with ``MPI_Test``, so that a rank can give up. Arrays are copied
    to host memory for the reduction and returned in their namespace.
    """

    def __init__(self, comm: Any = None, *, timeout: float | None = None,
                 abort_on_error: bool = True) -> None:
        from mpi4py import MPI  # imported here: MPI is optional

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = timeout_seconds(timeout)
        self._log = CallLog(self.rank)
        self._finished = False
        self._abort_on_error = abort_on_error
        if abort_on_error:
            _install_abort_hook(self.comm)
        wire, request = self.comm.Idup()
        self._wait(request, "the duplication of the communicator (MPI_Comm_idup)")
        self._wire = wire
        atexit.register(self._at_exit)

    def allreduce_sum(self, arrays: Sequence[Array], *, op: str = "allreduce_sum",
                      layer: str = "") -> list[Array]:
        arrays = array_list(arrays)
        if self._finished:
            raise RuntimeError(f"rank {self.rank} called finish() and then an all-reduce "
                               f"({op}{' of layer ' + layer if layer else ''})")
        header = self._log.enter(arrays, op, layer)
        problem = check_headers(self._exchange(header))
        if problem is not None:
            raise ValueError(problem)  # the same on every rank: the same headers
        if not arrays:
            return []
        xp = array_namespace(*arrays)
        host = [np.ascontiguousarray(to_numpy(a), dtype=np.float64).ravel() for a in arrays]
        send = np.concatenate(host)
        recv = np.empty_like(send)
        # Reduce to rank 0, then broadcast: every rank gets bitwise the same sums (an
        # Allreduce may add in a different order on each rank).
        self._wait(self._wire.Ireduce(send, recv, op=self._MPI.SUM, root=0), header.where())
        self._wait(self._wire.Ibcast(recv, root=0), header.where())
        out, start = [], 0
        for a, h in zip(arrays, host, strict=True):
            total = recv[start:start + h.size].reshape(a.shape)  # back onto a's device
            out.append(xp.astype(xp.asarray(total, **on_device(device_of(a))), a.dtype))
            start += h.size
        return out

    def note(self, what: str, layer: str = "") -> None:
        self._log.note(what, layer)

    def finish(self, status: str = "called finish()") -> None:
        """Leave: wait until every rank leaves or enters a collective (at most ``timeout``).

        If every rank leaves, return. If a rank entered a collective, it fails at once with
        a message naming where each rank was, and this rank aborts the job with the same
        message (so the job ends even if that rank catches the error).
        """
        if self._finished:
            return
        self._finished = True
        header = self._log.leave(status)
        problem = check_headers(self._exchange(header))
        if problem is not None:
            _abort(self.comm, f"[rank {self.rank}] {problem}\n")

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.finish("its with-block ended")
            return
        report = ""
        if isinstance(value, SystemExit):
            if value.code in (None, 0):
                self.finish(f"sys.exit({value.code!r})")
                return
            status = f"sys.exit({value.code!r})"
        else:
            status = f"raised {type(value).__name__}"  # its message is in the report below
            if not self._abort_on_error and isinstance(value, Exception):
                self.finish(status)
                return
            report = "".join(traceback.format_exception(kind, value, tb))
        self._finished = True
        report = f"[rank {self.rank}] {report}" if report else ""  # a traceback, to prefix
        _abort(self.comm, f"{report}[rank {self.rank}] refnorm.sync: rank {self.rank} "
                          f"{self._log.leave(status).detail}; aborting the job so that no "
                          "rank waits for it\n")

    def _at_exit(self) -> None:
        if not self._finished and not self._MPI.Is_finalized():
            self.finish("the interpreter exited; without `with MPICommunicator() as comm` "
                        "refnorm cannot see the exit status")

    def _exchange(self, header: CallHeader) -> list[CallHeader]:
        data = header.to_bytes()
        send = np.zeros(HEADER_BYTES, dtype=np.uint8)
        send[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        recv = np.empty(self.size * HEADER_BYTES, dtype=np.uint8)
        where = header.where() if header.kind != LEAVE else (
            f"finish() ({header.detail}), waiting for every rank to finish or enter a "
            "collective")
        self._wait(self._wire.Iallgather(send, recv), where)
        return [CallHeader.from_bytes(recv[r * HEADER_BYTES:(r + 1) * HEADER_BYTES].tobytes())
                for r in range(self.size)]

    def _wait(self, request: Any, where: str) -> None:
        deadline = time.monotonic() + self.timeout
        spins = 0
        while not request.Test():
            if time.monotonic() > deadline:
                _abort(self.comm, (
                    f"[rank {self.rank}] refnorm.sync watchdog: rank {self.rank} waited "
                    f"{self.timeout:g} s for the other ranks in {where}; not all of them came "
                    "(a rank stuck outside any collective, or one that took another path). "
                    "Aborting the job. The limit is MPICommunicator(timeout=...) or "
                    f"${TIMEOUT_ENV}.\n"))
            spins += 1
            # Yield for the first polls (a collective usually completes within
            # microseconds to a millisecond: MPICH makes progress only inside MPI_Test), then
            # sleep between polls so that a rank waiting for a slow peer leaves the core free.
            time.sleep(0 if spins < _YIELDS else _POLL_S)


def _abort(comm: Any, message: str) -> None:
    # One write of the whole message, then a moment for mpiexec to forward it before
    # MPI_Abort takes every rank down (output still buffered in a pipe would be lost).
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(2, message.encode())
    time.sleep(0.5)
    comm.Abort(1)


def _install_abort_hook(comm: Any) -> None:
    previous = sys.excepthook
    if getattr(previous, "_refnorm_mpi_abort", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        text = "".join(traceback.format_exception(kind, value, tb))
        _abort(comm, f"[rank {comm.Get_rank()}] {text}")

    hook._refnorm_mpi_abort = True  # type: ignore[attr-defined]
    sys.excepthook = hook
