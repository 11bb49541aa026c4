"""Synchronized jobs that went wrong end, non-zero and with a message saying where each rank
was, in seconds (tests/sync/mpi_patterns.py under ``mpiexec -n 2``). Before the headers,
the leave protocol and the watchdog, all but ``mixed-modes-dp`` ran until killed."""

from __future__ import annotations

import pytest

from tests.sync.mpi import run_two

# The watchdog's limit in these jobs: ample for a step of a (4, 3, 2, 2) batch on a loaded
# 2-core machine (milliseconds), short enough that the one pattern only it can end (a stuck
# rank) ends well inside ENDS_WITHIN_S.
WATCHDOG_S = "3"
# "Does not hang": these jobs end in about a second (start-up, 0.5 s for the last message to
# reach mpiexec), the stuck one in about WATCHDOG_S + 1 s; 15 s is far above both and far
# below the 60 s default watchdog, so a pass cannot come from the default limit.
ENDS_WITHIN_S = 15

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
