"""Small synchronized jobs that went wrong, run by tests/sync/test_mpi_patterns.py as
``mpiexec -n 2 python tests/sync/mpi_patterns.py PATTERN``.

Each rank trains a two-layer model (syncbn, then syncsn) on its own shard; the pattern makes
the ranks disagree the way real jobs do:

- ``uneven``: rank 0 has 3 batches, rank 1 has 2 and ends normally;
- ``mixed-modes``: rank 0 runs the layers in training, rank 1 in eval (no collective at all);
- ``mixed-modes-dp``: the same, with the gradients reduced after each step, so rank 1 enters
  the gradient all-reduce while rank 0 is in the layer's;
- ``exit``: rank 1 catches an exception in its second step and calls ``sys.exit(1)``;
- ``stall``: rank 1 gets stuck (a long sleep) before its second step: only the watchdog can
  end this one;
- ``exit-guarded``: the script runs inside ``with MPICommunicator() as comm``; rank 1 calls
  ``sys.exit(1)`` while rank 0 is busy outside any collective: the exit status is known, so
  the job ends at once instead of at rank 0's next collective.

Every pattern must end the job with a non-zero status and a message, in seconds.
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np

import refnorm
from refnorm.sync import MPICommunicator, allreduce_gradients

PATTERNS = ("uneven", "mixed-modes", "mixed-modes-dp", "exit", "stall", "exit-guarded")


def train(comm, pattern: str) -> None:
    rank = comm.rank
    layers = [refnorm.build("syncbn", 3, dtype=np.float64, comm=comm),
              refnorm.build("syncsn", 3, dtype=np.float64, comm=comm)]
    rng = np.random.default_rng(rank)
    steps = 2 if pattern == "uneven" and rank == 1 else 3
    training = not (pattern.startswith("mixed-modes") and rank == 1)
    for step in range(1, steps + 1):
        if pattern == "stall" and rank == 1 and step == 2:
            time.sleep(600)  # a rank stuck outside any collective (I/O, a deadlock of its own)
        if pattern == "exit-guarded" and rank == 0 and step == 2:
            time.sleep(600)  # busy outside any collective while rank 1 exits
        try:
            if pattern in ("exit", "exit-guarded") and rank == 1 and step == 2:
                raise RuntimeError("rank 1: bad batch")
            h = 5 * rng.standard_normal((4, 3, 2, 2)) + 12
            for layer in layers:
                h = layer.forward(h, training=training)
            g = rng.standard_normal(h.shape)
            for layer in reversed(layers):
                g = layer.backward(g)
        except RuntimeError as exc:
            print(f"rank {rank}: {exc}; exiting with status 1", file=sys.stderr, flush=True)
            sys.exit(1)
        if pattern == "mixed-modes-dp":
            allreduce_gradients(layers, comm)
    print(f"rank {rank}: done after {steps} steps", flush=True)


def main() -> None:
    pattern = sys.argv[1]
    if pattern not in PATTERNS:
        raise SystemExit(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    comm = MPICommunicator()
    guard = comm if pattern == "exit-guarded" else contextlib.nullcontext(comm)
    with guard:
        train(comm, pattern)


if __name__ == "__main__":
    main()
