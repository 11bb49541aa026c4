"""Check synchronized BN and SN across real MPI processes.

Run ``mpiexec -n P python -m refnorm.sync.mpi_check``.

Every rank draws the same global batch from a seed, keeps its own unequal shard (with four or
more processes the first rank gets none), runs synchronized BN and SN forward and backward through
:class:`~refnorm.sync.comm.MPICommunicator`, and rank 0 compares the concatenated outputs and
input gradients, and the summed parameter gradients, with one process holding the whole
batch. Prints one line per check and exits non-zero if any differs by more than 1e-10.

``--fail-rank R`` makes rank R raise before the first all-reduce, and ``--mismatch`` gives the
ranks different channel counts: both must end the job with an error, never hang. The
communicator is used as ``with MPICommunicator() as comm``, so that any way a rank ends is
seen (see :mod:`refnorm.sync.comm`); ``$REFNORM_SYNC_TIMEOUT`` sets its watchdog.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import numpy as np


def shard_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """Unequal shards: rank r gets about (r + 1) parts of n (rank 0 may get none)."""
    weights = np.arange(1, size + 1, dtype=float)
    edges = np.floor(np.cumsum(weights) / weights.sum() * (n - 1)).astype(int)
    edges = np.concatenate([[0], edges[:-1], [n]])
    return [(int(edges[r]), int(edges[r + 1])) for r in range(size)]


def main(argv: list[str] | None = None) -> int:
    try:
        from mpi4py import MPI  # noqa: F401  (the mpi extra)
    except ImportError as exc:
        print(f"python -m refnorm.sync.mpi_check: error: needs mpi4py ({exc}): install the mpi "
              "extra (pip install 'refnorm[mpi]')", file=sys.stderr)
        return 2

    from refnorm.sync import MPICommunicator

    parser = argparse.ArgumentParser(prog="python -m refnorm.sync.mpi_check")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--mismatch", action="store_true")
    args = parser.parse_args(argv)
    with MPICommunicator() as comm:
        return _check(comm, args)


def _check(comm: Any, args: argparse.Namespace) -> int:
    from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward
    from refnorm.norms.switchable_norm import switchable_norm_backward, switchable_norm_forward
    from refnorm.sync import (
        sync_batch_norm_backward,
        sync_batch_norm_forward,
        sync_switchable_norm_backward,
        sync_switchable_norm_forward,
    )

    rng = np.random.default_rng(0)
    C = 3 + (comm.rank if args.mismatch else 0)
    x = 5 * rng.standard_normal((9, C, 4, 4)) + 12
    dy = rng.standard_normal(x.shape)
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    logits = rng.standard_normal(3), rng.standard_normal(3)
    lo, hi = shard_bounds(x.shape[0], comm.size)[comm.rank]
    if args.fail_rank == comm.rank:
        raise RuntimeError(f"rank {comm.rank} fails on purpose (--fail-rank)")

    y, cache = sync_batch_norm_forward(x[lo:hi], gamma, beta, comm=comm)
    bn = (y, *sync_batch_norm_backward(dy[lo:hi], cache))
    y, sync_cache = sync_switchable_norm_forward(x[lo:hi], gamma, beta, *logits, comm=comm)
    sn = (y, *sync_switchable_norm_backward(dy[lo:hi], sync_cache))

    gathered = comm.comm.gather((bn, sn), root=0)
    if comm.rank != 0:
        return 0
    assert gathered is not None  # rank 0 receives every rank's results
    y1, bn_cache = batch_norm_forward(x, gamma, beta)
    ref_bn = (y1, *batch_norm_backward(dy, bn_cache))
    y1, sn_cache = switchable_norm_forward(x, gamma, beta, *logits)
    ref_sn = (y1, *switchable_norm_backward(dy, sn_cache))
    worst = 0.0
    for label, k, ref in (("syncbn", 0, ref_bn), ("syncsn", 1, ref_sn)):
        parts = [g[k] for g in gathered]
        names = ("y", "dx", "dgamma", "dbeta", "dmean_logits", "dvar_logits")[:len(ref)]
        for i, name in enumerate(names):
            got = (np.concatenate([p[i] for p in parts]) if i < 2 else sum(p[i] for p in parts))
            err = float(np.max(np.abs(got - ref[i])))
            worst = max(worst, err if not math.isnan(err) else math.inf)  # NaN: no match
            shards = [b - a for a, b in shard_bounds(9, comm.size)]
            print(f"{label} {name:<13} P={comm.size} shards={shards} "
                  f"max abs diff vs one device: {err:.1e}")
    print("OK" if worst < 1e-10 else "MISMATCH")
    return 0 if worst < 1e-10 else 1


if __name__ == "__main__":
    sys.exit(main())
