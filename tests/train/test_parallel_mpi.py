"""Data-parallel training under ``mpiexec -n 2`` and ``-n 3`` (tests/train/mpi_train.py): the
MPI transport gives what the in-process one gives, the command equals one device with the
whole batch, and every rank stops the same way, whatever happened on one of them."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from refnorm.train.checkpoint import CHECKPOINT
from refnorm.train.config import TrainConfig
from refnorm.train.finite import NonFinite
from refnorm.train.loop import train
from tests.sync.mpi import ROOT, run_mpi

HARNESS = "tests/train/mpi_train.py"
SMALL = {"dtype": "float64", "epochs": 2, "widths": (4, 4), "average_samples": 48,
         "batch_size": 4}
# The MPI transport sums in the same rank order as the in-process one (reduce to rank 0 in
# float64, then broadcast): the same numbers up to the order MPI's reduction adds in.
MPI_RTOL = 1e-12


def _arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k != "meta"}


def _assert_close(a, b, rtol):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].astype(np.float64), b[key].astype(np.float64)  # flags are bools
        scale = max(float(np.max(np.abs(y))), 1e-300)
        assert float(np.max(np.abs(x - y))) <= rtol * scale, key


@pytest.mark.parametrize(("P", "norm", "subset"), [(2, "syncbn", 85), (3, "syncsn", 127),
                                                   (3, "bn", 127)])
def test_the_mpi_transport_equals_the_in_process_one(tmp_path, P, norm, subset):
    config = TrainConfig(**SMALL, norm=norm, devices=P, train_subset=subset)
    job = run_mpi(P, "-m", "refnorm.train.mpi_run", json.dumps(dataclasses.asdict(config)),
                  str(tmp_path / "mpi"), timeout=300)
    assert job.returncode == 0, job.stderr
    train(config, out=tmp_path / "threads", progress=False)
    _assert_close(_arrays(tmp_path / "mpi" / CHECKPOINT),
                  _arrays(tmp_path / "threads" / CHECKPOINT), MPI_RTOL)


def test_the_command_under_mpiexec_equals_one_device_with_twice_the_batch(tmp_path):
    common = ["--dtype", "float64", "--epochs", "1", "--batch-size"]
    job = run_mpi(2, HARNESS, "cli", "none", "train", "--norm", "syncbn", *common, "16",
                  "--out", str(tmp_path / "mpi"), timeout=300)
    assert job.returncode == 0, job.stderr
    assert job.stderr.count("training syncbn 2 devices x batch 16") == 1  # rank 0 speaks
    single = TrainConfig(norm="bn", dtype="float64", epochs=1, batch_size=32)
    train(single, out=tmp_path / "one", progress=False)
    _assert_close(_arrays(tmp_path / "mpi" / CHECKPOINT), _arrays(tmp_path / "one" / CHECKPOINT),
                  1e-10)


CLI = ["train", "--epochs", "2", "--batch-size", "8", "--norm", "syncbn"]


@pytest.mark.parametrize(("P", "mode", "status", "says"), [
    (2, "sigterm", 143, "stopped by SIGTERM at step 3 of epoch 1: checkpoint saved"),
    (3, "sigterm", 143, "stopped by SIGTERM at step 3 of epoch 1: checkpoint saved"),
    (2, "nan", 3, "layer 1 (SyncBatchNorm) state running_var on device 1 became inf in step 4 "
                  "of epoch 1; the run stopped; no checkpoint was written"),
    (3, "data", 2, "refnorm train: error: device 1: cannot read the data set here (rank 1's "
                   "file system)"),
])
def test_every_rank_stops_the_same_way(tmp_path, P, mode, status, says):
    job = run_mpi(P, HARNESS, "cli", mode, *CLI, "--out", str(tmp_path), timeout=300)
    assert job.returncode == status, job.stderr
    assert says in job.stderr and "Traceback" not in job.stderr
    assert job.stderr.count(says) == 1  # said once, by rank 0, for every rank


@pytest.mark.parametrize(("P", "mode", "says"), [
    (2, "otherdata", "refnorm train: error: rank 1 was given other data than rank 0 (the data "
                     "path holds other arrays there: every machine needs the same files)"),
    (3, "otherlr", "refnorm train: error: rank 1 was given other options than rank 0 (its "
                   "command line differs)"),
])
def test_ranks_given_other_data_or_options_are_refused_before_training(tmp_path, P, mode, says):
    """Each rank would train a model of its own on its own arrays, averaging gradients that
    do not belong together (other data trained silently to the end; other options failed
    after an epoch, when the models were compared)."""
    job = run_mpi(P, HARNESS, "cli", mode, *CLI, "--out", str(tmp_path / "x"), timeout=300)
    assert job.returncode == 2, job.stderr
    assert job.stderr.strip().splitlines() == [says + "; every rank must run the same training"]
    assert not (tmp_path / "x").exists()  # refused before the folder was made


def test_an_exception_on_one_rank_ends_the_job(tmp_path):
    job = run_mpi(2, HARNESS, "cli", "raise", *CLI, "--out", str(tmp_path), timeout=300)
    assert job.returncode == 1, job.stderr
    assert "RuntimeError: rank 1 broke" in job.stderr


def test_devices_other_than_the_processes_are_refused(tmp_path):
    job = run_mpi(2, HARNESS, "cli", "none", *CLI, "--devices", "3", "--out",
                  str(tmp_path / "x"), timeout=300)
    assert job.returncode == 2
    assert job.stderr.strip() == ("refnorm train: error: --devices 3 but mpiexec started 2 "
                                  "processes; give --devices 2 or leave --devices out under "
                                  "mpiexec")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("value", ["abc", "-5", "0"])
def test_a_bad_sync_timeout_under_mpiexec_is_one_line(tmp_path, value):
    """It ended in a traceback from every rank: the communicator read it outside the CLI's
    error handling."""
    job = run_mpi(2, HARNESS, "cli", "none", *CLI, "--norm", "syncbn", "--out",
                  str(tmp_path / "x"), env={"REFNORM_SYNC_TIMEOUT": value}, timeout=300)
    assert job.returncode == 2, job.stderr
    lines = job.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "refnorm train: error: $REFNORM_SYNC_TIMEOUT must be a "), job.stderr
    assert not (tmp_path / "x").exists()


def test_mpiexec_without_mpi4py_is_one_sentence(tmp_path):
    shadow = tmp_path / "shadow" / "mpi4py"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named mpi4py')\n")
    job = run_mpi(2, HARNESS, "cli", "none", *CLI, "--out", str(tmp_path / "x"),
                  env={"PYTHONPATH": f"{shadow.parent}:{ROOT}"}, timeout=300)
    assert job.returncode == 2
    assert job.stderr.strip() == ("refnorm train: error: started by mpiexec with 2 processes, "
                                  "but mpi4py is not installed: install the mpi extra (pip "
                                  "install 'refnorm[mpi]')")


def test_the_study_launches_its_devices_under_mpiexec(tmp_path):
    from refnorm.train.study import StudyConfig, run_study
    from tests.sync.mpi import require_mpi

    require_mpi()
    grid = {"methods": ("syncbn",), "batch_sizes": (4, 8), "update_size": 8, "epochs": 1,
            "train_subset": 48, "seeds": (0,), "dtype": "float64"}
    tables = {}
    for launcher in ("inprocess", "mpi"):
        report = run_study(StudyConfig(**grid, launcher=launcher), tmp_path / launcher, jobs=1,
                           log=lambda line: None)
        runs = json.loads((tmp_path / launcher / "runs.json").read_text())
        tables[launcher] = [run["history"][-1]["test_acc"] for run in runs]
        assert "(#devices, #samples per device)" in report.read_text()
    assert tables["mpi"] == tables["inprocess"]
    assert "one process per device under mpiexec" in (tmp_path / "mpi" / "report.md").read_text()


@pytest.mark.parametrize(("changes", "error"), [
    ({"norm": "syncsn", "widths": (4, 4, 4, 4)}, ValueError),  # 8x8 digits: 1x1 at block 4
    ({"norm": "syncbn", "lr": 1e30}, NonFinite),
])
def test_a_run_under_mpiexec_stops_the_study_as_in_process(changes, error):
    """A run the study launches under mpiexec that is refused, or that diverges, raises the
    in-process run's error (a one-line exit 2 or 3 of the command), not a RuntimeError
    carrying every rank's traceback."""
    from refnorm.train.study import run_under_mpiexec
    from tests.sync.mpi import require_mpi

    require_mpi()
    config = TrainConfig(**{**SMALL, "devices": 2, "train_subset": 48, **changes})
    with pytest.raises(error) as in_process:
        train(config, progress=False)
    with pytest.raises(error) as under_mpiexec:
        run_under_mpiexec(config)
    if error is NonFinite:  # the same finding; what was kept differs (a folder of its own)
        mpi, here = under_mpiexec.value, in_process.value
        assert (mpi.what, mpi.value, mpi.where) == (here.what, here.value, here.where)
    else:
        assert str(under_mpiexec.value) == str(in_process.value)


@pytest.mark.parametrize("P", [2, 3])
def test_a_rank_that_vanishes_ends_the_job_non_zero(tmp_path, P):
    # Rank 1 calls os._exit(0) mid-run: no leave header, no status. With Hydra's default
    # auto-cleanup, Hydra itself SIGKILLs the other ranks at once and returns rank 1's 0
    # (nothing in them can run: docs/data-parallel.md); with -disable-auto-cleanup they stay,
    # and the watchdog of the ranks waiting for it ends the job, non-zero, saying where.
    job = run_mpi(P, HARNESS, "cli", "exit", *CLI, "--out", str(tmp_path), timeout=300,
                  env={"REFNORM_SYNC_TIMEOUT": "3"}, mpiexec_args=("-disable-auto-cleanup",))
    assert job.returncode != 0, job.stderr
    assert re.search(r"refnorm\.sync watchdog: rank [02] waited 3 s for the other ranks in "
                     r"collective #\d+", job.stderr), job.stderr
