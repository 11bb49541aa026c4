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
three members. refnorm has no transport of its own.

Safety: a collective where ranks disagree must not hang. Every all-reduce first checks that
all ranks passed the same number of arrays with the same shapes and dtypes, and raises the
same ``ValueError`` on every rank if not. In the in-process group a rank that raises breaks
the barrier, so the others stop with an error instead of waiting; under MPI an uncaught
exception on any rank aborts the whole job (``MPI_Abort``), as ``python -m mpi4py`` does.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from refnorm.backend import Array, array_namespace, to_numpy


class Communicator:
    """The interface: ``rank``, ``size``, ``allreduce_sum(arrays)``."""

    rank: int
    size: int

    def allreduce_sum(self, arrays: Sequence[Array]) -> list[Array]:
        """Elementwise sums over all ranks of each array, returned on every rank."""
        raise NotImplementedError


def _signature(arrays: Sequence[Array]) -> tuple:
    return tuple((tuple(a.shape), str(a.dtype)) for a in arrays)


def _mismatch(signatures: Sequence[tuple]) -> str | None:
    if all(s == signatures[0] for s in signatures):
        return None
    listed = "; ".join(f"rank {r}: {s}" for r, s in enumerate(signatures))
    return ("allreduce_sum: ranks passed different arrays (shapes, dtypes) and would "
            f"deadlock or mix data; {listed}")


class SingleProcess(Communicator):
    """One device: ``allreduce_sum`` returns its arguments unchanged."""

    rank, size = 0, 1

    def allreduce_sum(self, arrays: Sequence[Array]) -> list[Array]:
        return list(arrays)


class _Shared:
    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list[Any] = [None] * size
        self.result: Any = None
        self.closed = False


class InProcessGroup(Communicator):
    """One simulated device of a group of ``size``; build the group with :meth:`run`.

    Each device runs in its own thread. At an all-reduce every device deposits its arrays and
    waits at a barrier; the sum is taken once, in rank order (so every device gets bitwise
    the same result, and the same result on every run), and handed back to all.
    """

    def __init__(self, rank: int, shared: _Shared) -> None:
        self.rank, self.size, self._shared = rank, shared.size, shared

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
        The first exception any device raised (the others stop at their next all-reduce).
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int; got {size!r}")
        for seq in per_rank:
            if len(seq) != size:
                raise ValueError(f"each per-rank argument needs {size} entries; got {len(seq)}")
        shared = _Shared(size, timeout)
        results: list[Any] = [None] * size
        errors: list[BaseException | None] = [None] * size

        def device(rank: int) -> None:
            try:
                results[rank] = fn(InProcessGroup(rank, shared), *(seq[rank] for seq in per_rank))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
                errors[rank] = exc
                shared.barrier.abort()

        threads = [threading.Thread(target=device, args=(r,), daemon=True) for r in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        shared.closed = True
        first = next((e for e in errors if e is not None
                      and not isinstance(e, threading.BrokenBarrierError)), None)
        if first is None:
            first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results

    def allreduce_sum(self, arrays: Sequence[Array]) -> list[Array]:
        shared = self._shared
        if shared.closed:
            raise RuntimeError(
                "this InProcessGroup's run() has returned: its devices are gone, so an "
                "all-reduce (e.g. a synchronized backward) must happen inside the function "
                "given to run()")
        shared.slots[self.rank] = list(arrays)
        if shared.barrier.wait() == 0:  # one thread combines
            problem = _mismatch([_signature(s) for s in shared.slots])
            if problem is None:
                shared.result = [_sum_in_rank_order([s[i] for s in shared.slots])
                                 for i in range(len(arrays))]
            else:
                shared.result = ValueError(problem)
        shared.barrier.wait()
        result = shared.result
        shared.barrier.wait()  # nobody overwrites slots or result before all have read them
        if isinstance(result, Exception):
            raise ValueError(str(result))
        if not arrays:
            return []
        xp = array_namespace(*arrays)
        return [xp.asarray(r, copy=True) for r in result]


def _sum_in_rank_order(parts: Sequence[Array]) -> Array:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


class MPICommunicator(Communicator):
    """All-reduce across MPI processes through ``mpi4py`` (the ``mpi`` extra).

    Parameters
    ----------
    comm : mpi4py communicator, default ``MPI.COMM_WORLD``
    abort_on_error : bool, default True
        Install an exception hook that calls ``MPI_Abort`` on an uncaught exception, so that
        a failing rank ends the job instead of leaving the others blocked in a collective
        (what ``python -m mpi4py`` does).

    Arrays are copied to host memory for the reduction and returned in their namespace.
    """

    def __init__(self, comm: Any = None, *, abort_on_error: bool = True) -> None:
        from mpi4py import MPI  # imported here: MPI is optional

        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        if abort_on_error:
            _install_abort_hook(self.comm)

    def allreduce_sum(self, arrays: Sequence[Array]) -> list[Array]:
        problem = _mismatch(self.comm.allgather(_signature(arrays)))
        if problem is not None:
            raise ValueError(problem)
        if not arrays:
            return []
        xp = array_namespace(*arrays)
        host = [np.ascontiguousarray(to_numpy(a), dtype=np.float64).ravel() for a in arrays]
        send = np.concatenate(host)
        recv = np.empty_like(send)
        # Reduce to rank 0, then broadcast: every rank gets bitwise the same sums (an
        # Allreduce may add in a different order on each rank).
        self.comm.Reduce(send, recv, op=self._MPI.SUM, root=0)
        self.comm.Bcast(recv, root=0)
        out, start = [], 0
        for a, h in zip(arrays, host, strict=True):
            out.append(xp.astype(xp.asarray(recv[start:start + h.size].reshape(a.shape)),
                                 a.dtype))
            start += h.size
        return out


def _install_abort_hook(comm: Any) -> None:
    previous = sys.excepthook
    if getattr(previous, "_refnorm_mpi_abort", False):
        return

    def hook(kind, value, tb):
        # One write of the whole report, then a moment for mpiexec to forward it before
        # MPI_Abort takes every rank down (output still buffered in a pipe would be lost).
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.flush()
        os.write(2, f"[rank {comm.Get_rank()}] {text}".encode())
        time.sleep(0.5)
        comm.Abort(1)

    hook._refnorm_mpi_abort = True  # type: ignore[attr-defined]
    sys.excepthook = hook
