"""``python -m refnorm.sync.mpi_check`` under ``mpiexec -n 2``: real processes give what one
device gives, and a failing or disagreeing rank ends the job instead of hanging."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# -- real processes ------------------------------------------------------------------------------


def _mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def _require_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        if os.environ.get("REFNORM_REQUIRE_MPI"):
            pytest.fail("REFNORM_REQUIRE_MPI is set but mpi4py is not installed (the mpi extra)")
        pytest.skip("mpi4py not installed (pip install -e '.[mpi]')")
    exe = _mpiexec()
    if exe is None:
        pytest.fail("mpi4py is installed but no mpiexec was found")
    return exe


def _run_mpi(*args, timeout=120):
    exe = _require_mpi()
    return subprocess.run([exe, "-n", "2", sys.executable, "-m", "refnorm.sync.mpi_check", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_mpi_two_processes_equal_one_device():
    proc = _run_mpi()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "OK"
    assert proc.stdout.count("max abs diff") == 10


def test_mpi_failing_rank_ends_the_job():
    proc = _run_mpi("--fail-rank", "1", timeout=60)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr


def test_mpi_disagreeing_shapes_end_the_job():
    proc = _run_mpi("--mismatch", timeout=60)
    assert proc.returncode != 0
    assert "ranks passed different arrays" in proc.stderr
