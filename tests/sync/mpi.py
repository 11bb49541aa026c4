"""Running a script under ``mpiexec -n 2`` for the tests: found in the virtual environment
(the mpich wheel) or on PATH; skipped without mpi4py unless ``REFNORM_REQUIRE_MPI`` is set,
which turns the skip into a failure (CI sets it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def require_mpi() -> str:
    """The mpiexec to use, or skip (fail under ``REFNORM_REQUIRE_MPI``)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        if os.environ.get("REFNORM_REQUIRE_MPI"):
            pytest.fail("REFNORM_REQUIRE_MPI is set but mpi4py is not installed (the mpi extra)")
        pytest.skip("mpi4py not installed (pip install -e '.[mpi]')")
    exe = mpiexec()
    if exe is None:
        pytest.fail("mpi4py is installed but no mpiexec was found")
    return exe


@dataclass(frozen=True)
class Job:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_two(*python_args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Job:
    """``mpiexec -n 2 python *python_args``: see :func:`run_mpi`."""
    return run_mpi(2, *python_args, env=env, timeout=timeout)


def run_mpi(n: int, *python_args: str, env: dict[str, str] | None = None,
            timeout: float = 300, mpiexec_args: tuple[str, ...] = ()) -> Job:
    """``mpiexec -n n python *python_args`` from the repository root, importing this tree's
    refnorm; its status, output and wall time. A job still running after ``timeout`` is a
    hang: the test fails saying so (the default leaves a loaded machine's start-up its time,
    and ends before the 600 s that the harness's stuck ranks sleep)."""
    exe = require_mpi()
    start = time.monotonic()
    # A session of its own, so that a hung job's mpiexec and ranks can all be killed.
    proc = subprocess.Popen([exe, *mpiexec_args, "-n", str(n), sys.executable, *python_args],
                            cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"mpiexec -n {n} python {' '.join(python_args)} hung: still running after "
                    f"{timeout} s; its stderr: {stderr[-2000:]!r}")
    return Job(proc.returncode, stdout, stderr, time.monotonic() - start)
