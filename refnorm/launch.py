"""How this process was launched: by ``mpiexec`` (one rank of a job), and how many threads
each rank may use. Reads the environment only (nothing heavy is imported), so that the
``refnorm`` command can size its thread pools before numpy, OpenBLAS and numba start them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# The environment variables by which MPI launchers tell a process its rank and the size of
# its job (MPICH's Hydra and most PMI launchers, PMIx, Open MPI, MVAPICH), and the ranks on
# this machine.
MPI_SIZE_VARIABLES = ("PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
MPI_RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                        "MV2_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE")
LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                        "MV2_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS")


def _first_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdecimal():
            return int(value)
    return None


def mpi_launch() -> tuple[int, int] | None:
    """(rank, size) when this process was started by an MPI launcher (``mpiexec -n P``) in a
    job of more than one process; None otherwise."""
    size = _first_int(MPI_SIZE_VARIABLES)
    if size is None or size < 2:
        return None
    return _first_int(MPI_RANK_VARIABLES) or 0, size


def local_rank(default: int = 0) -> int:
    """This rank's number among the ranks on this machine (its GPU, with one per rank)."""
    found = _first_int(LOCAL_RANK_VARIABLES)
    return default if found is None else found


def share_cores() -> None:
    """Under ``mpiexec``, give each rank on this machine its share of the cores: set the
    thread counts of OpenMP, OpenBLAS and numba (unless already set) to cores / local ranks,
    so that P ranks do not start P x cores threads. Must run before those libraries load."""
    if mpi_launch() is None:
        return
    ranks = max(_first_int(LOCAL_SIZE_VARIABLES) or 1, 1)
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, threads)


def find_mpiexec() -> str | None:
    """The ``mpiexec`` beside this Python (the mpich wheel of the ``mpi`` extra), else the one
    on PATH, else None."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")
