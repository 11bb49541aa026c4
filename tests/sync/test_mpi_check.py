"""``python -m refnorm.sync.mpi_check`` under ``mpiexec -n 2``: real processes give what one
device gives, and a failing or disagreeing rank ends the job instead of hanging."""

from __future__ import annotations

import argparse
import subprocess
import sys
from types import SimpleNamespace

import refnorm.sync
from refnorm.sync import SingleProcess, mpi_check
from tests.sync.mpi import run_two

# A job that ends on its own takes about a second here (start-up, then 0.5 s for the last
# message to reach mpiexec before MPI_Abort); 50 s is the "does not hang" bound, far above
# that (a loaded machine's start-up included) and below the 60 s default watchdog that would
# otherwise be what ends it.
ENDS_WITHIN_S = 50


def _check(*args):
    return run_two("-m", "refnorm.sync.mpi_check", *args)


def test_mpi_two_processes_equal_one_device():
    job = _check()
    assert job.returncode == 0, job.stdout + job.stderr
    assert job.stdout.strip().splitlines()[-1] == "OK"
    assert job.stdout.count("max abs diff") == 10


def test_mpi_failing_rank_ends_the_job():
    job = _check("--fail-rank", "1")
    assert job.returncode != 0
    assert "rank 1 fails on purpose" in job.stderr
    assert "rank 1 left (raised RuntimeError) before any collective" in job.stderr
    assert job.seconds < ENDS_WITHIN_S


def test_mpi_disagreeing_shapes_end_the_job():
    job = _check("--mismatch")
    assert job.returncode != 0
    assert "ranks passed different arrays" in job.stderr
    assert ("rank 0 entered collective #1: syncbn forward (count, sum) of layer syncbn, step 1, "
            "arrays [(1,) float64, (3,) float64]; rank 1 entered collective #1: syncbn forward "
            "(count, sum) of layer syncbn, step 1, arrays [(1,) float64, (4,) float64]"
            ) in job.stderr
    assert job.seconds < ENDS_WITHIN_S


def test_mpi_check_without_mpi4py_names_the_extra():
    """Without mpi4py (the mpi extra) the check says so in one line, exit 2, no traceback."""
    code = ("import sys; sys.modules['mpi4py'] = None; "  # `from mpi4py import MPI` now fails
            "from refnorm.sync.mpi_check import main; sys.exit(main([]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "pip install 'refnorm[mpi]'" in done.stderr


class _OneRank(SingleProcess):
    """What _check needs of an MPICommunicator, for one process: rank, size, the
    synchronized all-reduce, and ``comm.gather``."""

    comm = SimpleNamespace(gather=lambda obj, root: [obj])


def test_the_check_reports_a_difference_of_either_sign(monkeypatch, capsys):
    """The check compares |synchronized - one device|: an output 1 too low is a MISMATCH
    (exit 1), as one 1 too high would be."""
    args = argparse.Namespace(fail_rank=None, mismatch=False)
    assert mpi_check._check(_OneRank(), args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK"
    forward = refnorm.sync.sync_batch_norm_forward

    def one_too_low(*args, **kwargs):
        y, cache = forward(*args, **kwargs)
        return y - 1.0, cache

    monkeypatch.setattr(refnorm.sync, "sync_batch_norm_forward", one_too_low)
    assert mpi_check._check(_OneRank(), args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "MISMATCH"
    assert lines[0].startswith("syncbn y ") and lines[0].endswith("one device: 1.0e+00")


def test_the_check_reports_a_nan_as_a_mismatch(monkeypatch, capsys):
    """A NaN anywhere in a synchronized output makes its difference NaN, which is no
    difference within 1e-10: the check must say MISMATCH (exit 1), not OK."""
    args = argparse.Namespace(fail_rank=None, mismatch=False)
    forward = refnorm.sync.sync_batch_norm_forward

    def one_nan(*args, **kwargs):
        y, cache = forward(*args, **kwargs)
        y = y.copy()
        y[0, 0, 0, 0] = float("nan")
        return y, cache

    monkeypatch.setattr(refnorm.sync, "sync_batch_norm_forward", one_nan)
    assert mpi_check._check(_OneRank(), args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("syncbn y ") and lines[0].endswith("one device: nan")
    assert lines[-1] == "MISMATCH"
