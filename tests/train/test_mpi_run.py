"""One rank of a run under mpiexec (refnorm.train.mpi_run), without mpiexec: its exit status
and who leaves the error for the launcher."""

from __future__ import annotations

import dataclasses
import json
import math
import signal

import pytest

from refnorm.train.config import TrainConfig
from refnorm.train.finite import NonFinite


def _one_rank(rank):
    """A stand-in for MPICommunicator: one of 2 processes, seen from ``rank``."""
    class OneRank:
        def __init__(self):
            self.rank, self.size = rank, 2

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    return OneRank


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize(("error", "status"), [
    (NonFinite("the training loss", math.inf, where="in step 1 of epoch 1"), 3),
    (ValueError("the data set holds no samples"), 2),
])
def test_a_rank_exits_with_its_errors_status_and_rank_0_records_the_error(
        monkeypatch, tmp_path, rank, error, status):
    """As the module documents: exit 3 for a non-finite value, 2 for a refusal, on every rank;
    only rank 0 writes error.json, where the launcher (on rank 0's machine) reads it."""
    from refnorm.sync import comm
    from refnorm.train import loop, mpi_run

    def refused(config, **options):
        raise error

    monkeypatch.setattr(comm, "MPICommunicator", _one_rank(rank))
    monkeypatch.setattr(loop, "train", refused)
    config = TrainConfig(devices=2, epochs=1, train_subset=32, widths=(4, 4))
    assert mpi_run.main(json.dumps(dataclasses.asdict(config)), str(tmp_path)) == status
    written = tmp_path / mpi_run.ERROR
    if rank == 0:
        assert json.loads(written.read_text()) == loop.error_record(error)
    else:
        assert not written.exists()


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("before_the_first_step", [False, True])
def test_a_rank_of_a_run_stopped_by_a_signal_exits_with_the_signals_status(
        monkeypatch, tmp_path, rank, signum, status, before_the_first_step):
    """A run every rank stopped on SIGINT or SIGTERM is not a finished run: each rank exits
    128 + the signal number, as ``refnorm train`` does, whether train() returned at a step
    boundary or raised Interrupted before the first step (it exited 0, and the study's
    launcher took the epochs written so far for the whole run's history; or 1 with a
    traceback)."""
    from refnorm.sync import comm
    from refnorm.train import loop, mpi_run
    from refnorm.train.interrupt import Interrupted

    def stopped(config, **options):
        if before_the_first_step:
            raise Interrupted(signum)
        return loop.Result(config, history=[], interrupted=True, signal=int(signum))

    monkeypatch.setattr(comm, "MPICommunicator", _one_rank(rank))
    monkeypatch.setattr(loop, "train", stopped)
    config = TrainConfig(devices=2, epochs=1, train_subset=32, widths=(4, 4))
    assert mpi_run.main(json.dumps(dataclasses.asdict(config)), str(tmp_path)) == status
    assert not (tmp_path / mpi_run.ERROR).exists()
