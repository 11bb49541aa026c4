"""An all-reduce across GPUs through NCCL (``cupy.cuda.nccl``), with the MPI communicator's
members and guarantees.

:class:`NCCLCommunicator` implements :class:`~refnorm.sync.comm.Communicator` — ``rank``,
``size``, ``allreduce_sum(arrays, *, op, layer)``, ``note``, ``finish`` and ``with comm:`` —
as :class:`~refnorm.sync.comm.MPICommunicator` does, with the payload kept on the GPU:

1. each call first all-gathers every rank's header (:mod:`refnorm.sync.headers`: operation,
   layer, step, shapes, dtypes) into a fixed-size byte buffer; the payload moves only when
   all headers agree, else every rank raises the same ``ValueError`` naming every rank's call;
2. the payload is the arrays, widened to float64 and concatenated on the device, reduced to
   rank 0 and broadcast from it (so that every rank gets bitwise the same sums, as under
   MPI), then split and cast back to each array's dtype;
3. a watchdog: a rank that waits longer than ``timeout`` for a collective to complete aborts
   the NCCL communicator (``ncclCommAbort``) and raises ``TimeoutError`` saying where it
   waited; NCCL's own asynchronous errors are checked while waiting;
4. :meth:`finish` (the end of a ``with comm:`` block) sends a *leave* header: a peer inside a
   collective then fails at once with a message naming where each rank was.

Headers are read on the host, so each collective synchronizes the host with its stream once.

Two ways to build the communicators: :meth:`NCCLCommunicator.group` for one process driving
several GPUs (one thread per GPU, as :class:`~refnorm.sync.comm.InProcessGroup` runs its
simulated devices); :meth:`NCCLCommunicator.from_unique_id` for one process per GPU, the id
from :meth:`NCCLCommunicator.unique_id` on one rank handed to the others (e.g. by MPI).

CuPy is imported when a communicator is built, never when this module is imported. Not yet
run on GPUs: tests/sync/test_nccl.py holds the equivalence tests, skipped without two GPUs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np

from refnorm.backend import Array
from refnorm.sync.comm import Communicator, timeout_seconds
from refnorm.sync.headers import (
    HEADER_BYTES,
    LEAVE,
    CallHeader,
    CallLog,
    array_list,
    check_headers,
)

_POLL_S = 1e-4  # seconds between polls of a stream after the first spins


class NCCLCommunicator(Communicator):
    """A sum-all-reduce across GPUs through ``cupy.cuda.nccl``.

    Parameters
    ----------
    nccl_comm : ``cupy.cuda.nccl.NcclCommunicator``
        This rank's NCCL communicator (see :meth:`group` and :meth:`from_unique_id`).
    timeout : float, optional
        Seconds a rank waits for a collective before the watchdog aborts the communicator;
        default ``$REFNORM_SYNC_TIMEOUT``, else 60.

    Arrays may be CuPy arrays (on this rank's device) or numpy arrays (copied to the device
    and back); the sums come back in the arrays' namespace and dtypes.
    """

    def __init__(self, nccl_comm: Any, *, timeout: float | None = None) -> None:
        import cupy

        self._cupy = cupy
        self._nccl_module = cupy.cuda.nccl
        self.nccl = nccl_comm
        self.rank, self.size = int(nccl_comm.rank_id()), int(nccl_comm.size())
        self.device = int(nccl_comm.device_id())
        self.timeout = timeout_seconds(timeout)
        self._log = CallLog(self.rank)
        self._finished = False

    @classmethod
    def group(cls, devices: Sequence[int], *, timeout: float | None = None
              ) -> list[NCCLCommunicator]:
        """One communicator per GPU in ``devices``, for one process (``ncclCommInitAll``).

        Drive each from its own thread (a collective blocks until every rank has entered it).
        """
        from cupy.cuda import nccl

        return [cls(c, timeout=timeout) for c in nccl.NcclCommunicator.initAll(list(devices))]

    @classmethod
    def from_unique_id(cls, size: int, unique_id: bytes, rank: int, *,
                       timeout: float | None = None) -> NCCLCommunicator:
        """This process's communicator of ``size``, on the current CuPy device
        (``ncclCommInitRank``); every rank passes the same ``unique_id``."""
        from cupy.cuda import nccl

        return cls(nccl.NcclCommunicator(size, unique_id, rank), timeout=timeout)

    @staticmethod
    def unique_id() -> bytes:
        """A new NCCL unique id (``ncclGetUniqueId``), to hand to every rank: bytes, as CuPy
        (>= 14) returns it and its communicator takes it."""
        from cupy.cuda import nccl

        return nccl.get_unique_id()

    # -- the interface ------------------------------------------------------------------------

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
        cupy, nccl = self._cupy, self._nccl_module
        with cupy.cuda.Device(self.device):
            send = cupy.concatenate([cupy.asarray(a, dtype=cupy.float64).ravel()
                                     for a in arrays])
            recv = cupy.empty_like(send)
            stream = cupy.cuda.get_current_stream().ptr
            self.nccl.reduce(send.data.ptr, recv.data.ptr, send.size, nccl.NCCL_FLOAT64,
                             nccl.NCCL_SUM, 0, stream)
            self.nccl.bcast(recv.data.ptr, recv.size, nccl.NCCL_FLOAT64, 0, stream)
            self._wait(header.where())
            out, start = [], 0
            for a in arrays:
                n = int(np.prod(a.shape))
                part = recv[start:start + n].reshape(a.shape).astype(a.dtype)
                out.append(part if isinstance(a, cupy.ndarray) else part.get())
                start += n
        return out

    def note(self, what: str, layer: str = "") -> None:
        self._log.note(what, layer)

    def finish(self, status: str = "called finish()") -> None:
        """Leave: every rank that is still in a collective fails at once with a message
        naming where each rank was; so does this one (``RuntimeError``), after aborting the
        communicator."""
        if self._finished:
            return
        self._finished = True
        problem = check_headers(self._exchange(self._log.leave(status)))
        if problem is not None:
            self.nccl.abort()
            raise RuntimeError(f"[rank {self.rank}] {problem}")

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.finish("its with-block ended")
        else:
            # A rank that raised makes no more collectives; its peers' next collective
            # would wait for it, so end the communicator: their watchdogs or NCCL's errors
            # then stop them instead of a hang.
            self._finished = True
            self.nccl.abort()

    # -- the wire -----------------------------------------------------------------------------

    def _exchange(self, header: CallHeader) -> list[CallHeader]:
        cupy, nccl = self._cupy, self._nccl_module
        data = header.to_bytes()
        host = np.zeros(HEADER_BYTES, dtype=np.uint8)
        host[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        where = header.where() if header.kind != LEAVE else (
            f"finish() ({header.detail}), waiting for every rank to finish or enter a "
            "collective")
        with cupy.cuda.Device(self.device):
            send = cupy.asarray(host)
            recv = cupy.empty(self.size * HEADER_BYTES, dtype=cupy.uint8)
            self.nccl.allGather(send.data.ptr, recv.data.ptr, HEADER_BYTES, nccl.NCCL_UINT8,
                                cupy.cuda.get_current_stream().ptr)
            self._wait(where)
            gathered = recv.get()
        return [CallHeader.from_bytes(gathered[r * HEADER_BYTES:(r + 1) * HEADER_BYTES]
                                      .tobytes()) for r in range(self.size)]

    def _wait(self, where: str) -> None:
        """Poll the current stream until its work is done; the watchdog past ``timeout``."""
        stream = self._cupy.cuda.get_current_stream()
        deadline = time.monotonic() + self.timeout
        spins = 0
        while not stream.done:
            self.nccl.check_async_error()
            if time.monotonic() > deadline:
                self.nccl.abort()
                self._finished = True
                raise TimeoutError(
                    f"refnorm.sync watchdog: rank {self.rank} (GPU {self.device}) waited "
                    f"{self.timeout:g} s for the other ranks in {where}; not all of them "
                    "came (a rank stuck outside any collective, or one that took another "
                    "path). The NCCL communicator is aborted. The limit is "
                    "NCCLCommunicator(..., timeout=...) or $REFNORM_SYNC_TIMEOUT.")
            spins += 1
            if spins > 100:
                time.sleep(_POLL_S)


__all__ = ["NCCLCommunicator"]
