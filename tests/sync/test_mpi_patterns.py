"""Synchronized jobs that went wrong end, non-zero and with a message saying where each rank
was, in seconds (tests/sync/mpi_patterns.py under ``mpiexec -n 2``). Before the headers,
the leave protocol and the watchdog, all but ``mixed-modes-dp`` ran until killed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.sync.mpi import run_mpi, run_two

# The watchdog's limit in these jobs: ample for a step of a (4, 3, 2, 2) batch on a loaded
# 2-core machine (milliseconds), short enough that the one pattern only it can end (a stuck
# rank) ends well inside ENDS_WITHIN_S.
WATCHDOG_S = "3"
WATCHDOG = {"REFNORM_SYNC_TIMEOUT": "20"}  # jobs that end on their own, far below it
# "Does not hang": these jobs end in about a second (start-up, 0.5 s for the last message to
# reach mpiexec), the stuck one in about WATCHDOG_S + 1 s. 50 s leaves a loaded machine's
# start-up its time and stays below the 60 s default watchdog, so that a pass cannot come from
# the default limit (and the messages say which limit ended a job).
ENDS_WITHIN_S = 50

PATTERNS = {
    "uneven": [
        "rank 1 left while rank 0 entered a collective that can never complete",
        "rank 0 entered collective #13: syncbn forward (count, sum) of layer syncbn#0, step 3",
        "rank 1 left (the interpreter exited; without `with MPICommunicator() as comm` refnorm "
        "cannot see the exit status) after collective #12 (syncbn backward (two sums) of layer "
        "syncbn#0, step 2)",
    ],
    "mixed-modes": [
        "rank 0 entered collective #1: syncbn forward (count, sum) of layer syncbn#0, step 1",
        "rank 1 left (the interpreter exited;",
        "before any collective; its last call without a collective: forward in eval mode (no "
        "collective) of layer syncsn#0, call 3",
    ],
    "mixed-modes-dp": [
        "ranks entered different collectives (a mismatch of training/eval modes, layers or "
        "steps)",
        "rank 0 entered collective #1: syncbn forward (count, sum) of layer syncbn#0, step 1",
        "rank 1 entered collective #1: allreduce_gradients, step 1",
    ],
    "exit": [
        "rank 1: bad batch; exiting with status 1",
        "rank 1 left while rank 0 entered a collective that can never complete",
        "rank 0 entered collective #7: syncbn forward (count, sum) of layer syncbn#0, step 2",
        "after collective #6 (syncbn backward (two sums) of layer syncbn#0, step 1)",
    ],
    "stall": [
        "refnorm.sync watchdog: rank 0 waited 3 s for the other ranks in collective #7: syncbn "
        "forward (count, sum) of layer syncbn#0, step 2",
        "The limit is MPICommunicator(timeout=...) or $REFNORM_SYNC_TIMEOUT",
    ],
    "exit-guarded": [
        "rank 1 left (sys.exit(1)) after collective #6 (syncbn backward (two sums) of layer "
        "syncbn#0, step 1); aborting the job so that no rank waits for it",
    ],
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_pattern_ends_the_job_with_where_each_rank_was(pattern):
    job = run_two("tests/sync/mpi_patterns.py", pattern, env={"REFNORM_SYNC_TIMEOUT": WATCHDOG_S})
    assert job.returncode != 0, job.stdout + job.stderr
    for line in PATTERNS[pattern]:
        assert line in job.stderr, job.stderr
    assert job.seconds < ENDS_WITHIN_S, f"{pattern} took {job.seconds:.1f} s"
    if pattern != "stall":  # ended by the headers or the exit handling, not by the watchdog
        assert "watchdog" not in job.stderr


def test_matched_ranks_finish_cleanly():
    job = run_two("-c", "from refnorm.sync import MPICommunicator\n"
                  "with MPICommunicator() as comm:\n"
                  "    comm.allreduce_sum([])\n"
                  "print('done', comm.rank)", env={"REFNORM_SYNC_TIMEOUT": WATCHDOG_S})
    assert job.returncode == 0, job.stderr
    assert job.stdout.count("done") == 2, job.stdout  # ranks' lines may interleave


def test_mpi_sums_come_back_in_each_array_own_dtype(tmp_path):
    """Float32 arrays come back float32 under MPI, as in-process (they came back float64).
    (Each rank writes a file of its own: the ranks' stdout lines interleave.)"""
    job = run_two("-c", "import json, sys\nimport numpy as np\n"
                  "from refnorm.sync import MPICommunicator\n"
                  "with MPICommunicator() as comm:\n"
                  "    a, b = comm.allreduce_sum([np.full(3, comm.rank + 0.5, np.float32),\n"
                  "                               np.arange(2.0)])\n"
                  "with open(f'{sys.argv[1]}/{comm.rank}.json', 'w') as f:\n"
                  "    json.dump([str(a.dtype), str(b.dtype), a.tolist(), b.tolist()], f)\n",
                  str(tmp_path), env=WATCHDOG)
    assert job.returncode == 0, job.stderr
    a = sum(np.full(3, r + 0.5, np.float32) for r in range(2))
    b = 2 * np.arange(2.0)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == [str(a.dtype), str(b.dtype), a.tolist(), b.tolist()], (rank, got)


def test_sys_exit_0_inside_the_with_block_is_a_clean_end():
    """A script that ends with ``sys.exit(0)`` inside ``with MPICommunicator()`` aborted the job."""
    job = run_two("-c", "import sys\nimport numpy as np\n"
                  "from refnorm.sync import MPICommunicator\n"
                  "with MPICommunicator() as comm:\n"
                  "    comm.allreduce_sum([np.ones(1)])\n"
                  "    print('summed', flush=True)\n"
                  "    sys.exit(0)\n", env=WATCHDOG)
    assert job.returncode == 0, job.stderr
    assert job.stdout.count("summed") == 2 and "aborting" not in job.stderr


def test_a_rank_that_catches_the_error_is_still_ended_by_the_one_that_left():
    """The rank that left exited cleanly, and the rank that caught the ValueError and went on (here:
    work of its own that never ends) kept the job alive until it was killed."""
    job = run_two("-c", "import threading\nimport numpy as np\n"
                  "from refnorm.sync import MPICommunicator\n"
                  "with MPICommunicator() as comm:\n"
                  "    if comm.rank == 0:\n"
                  "        try:\n"
                  "            comm.allreduce_sum([np.ones(1)], op='probe')\n"
                  "        except ValueError:\n"
                  "            pass\n"
                  "        threading.Event().wait()\n", env={"REFNORM_SYNC_TIMEOUT": "60"})
    assert job.returncode != 0
    assert ("[rank 1] refnorm.sync: rank 1 left while rank 0 entered a collective that can "
            "never complete") in job.stderr, job.stderr
    assert "rank 0 entered collective #1: probe, step 1" in job.stderr


def test_a_rank_that_exits_with_a_status_ends_the_job_with_one_line():
    """sys.exit(3) inside the with-block: the job ends, and the rank says why once, with its
    rank label once (the label was doubled: "[rank 1] [rank 1] refnorm.sync: ...")."""
    job = run_two("-c", "import sys\nimport numpy as np\n"
                  "from refnorm.sync import MPICommunicator\n"
                  "with MPICommunicator() as comm:\n"
                  "    if comm.rank == 1:\n"
                  "        sys.exit(3)\n"
                  "    comm.allreduce_sum([np.ones(1)], op='probe')\n", env=WATCHDOG)
    assert job.returncode != 0
    lines = [line for line in job.stderr.splitlines() if "refnorm.sync: rank 1" in line]
    assert lines and lines[0].startswith("[rank 1] refnorm.sync: rank 1 left (sys.exit(3))"), (
        job.stderr)


def test_mpi_sums_of_float32_arrays_are_added_in_float64(tmp_path):
    """Three ranks add float32 values 1e8, 1 and -1e8 (and the same with the first two
    swapped): whichever two float32 values are added first, one of the two sums loses the 1;
    added in float64 and rounded once, both are exactly 1 on every rank."""
    job = run_mpi(3, "-c", "import json, sys\nimport numpy as np\n"
                  "from refnorm.sync import MPICommunicator\n"
                  "values = {0: [1e8, 1.0], 1: [1.0, 1e8], 2: [-1e8, -1e8]}\n"
                  "with MPICommunicator() as comm:\n"
                  "    (a,) = comm.allreduce_sum([np.array(values[comm.rank], np.float32)])\n"
                  "with open(f'{sys.argv[1]}/{comm.rank}.json', 'w') as f:\n"
                  "    json.dump([str(a.dtype), a.tolist()], f)\n",
                  str(tmp_path), env=WATCHDOG)
    assert job.returncode == 0, job.stderr
    for rank in range(3):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == ["float32", [1.0, 1.0]], (rank, got)


def test_an_uncaught_exception_outside_a_with_block_aborts_the_job_at_once():
    """MPICommunicator() installs an exception hook (abort_on_error=True): rank 1's uncaught
    exception ends the job while rank 0 is busy outside any collective, rather than when rank
    0 comes back or the watchdog (60 s here) gives up on it."""
    job = run_two("-c", "import time\nimport numpy as np\n"
                  "from refnorm.sync import MPICommunicator\n"
                  "comm = MPICommunicator()\n"
                  "comm.allreduce_sum([np.ones(1)], op='probe')\n"
                  "if comm.rank == 1:\n"
                  "    raise RuntimeError('rank 1 breaks')\n"
                  "time.sleep(600)\n", env={"REFNORM_SYNC_TIMEOUT": "60"})
    assert job.returncode != 0
    assert "[rank 1] Traceback" in job.stderr and "RuntimeError: rank 1 breaks" in job.stderr
    assert job.seconds < ENDS_WITHIN_S
