"""refnorm.launch under a real mpiexec: what counts as a data-parallel launch, each rank's
local rank, and the cores each rank's thread pools get."""

from __future__ import annotations

import json
import os
import sys

import pytest

from refnorm import launch
from tests.sync.mpi import run_mpi

_THREADS = (
    "import json, os, sys\n"
    "from refnorm.launch import THREAD_VARIABLES, local_rank, mpi_launch, share_cores\n"
    "for name in THREAD_VARIABLES:\n"
    "    os.environ.pop(name, None)\n"
    "os.environ['OMP_NUM_THREADS'] = str(os.cpu_count() + 1)  # the user's own choice\n"
    "share_cores()\n"
    "rank = mpi_launch()[0]\n"
    "with open(os.path.join(sys.argv[1], f'{rank}.json'), 'w') as f:\n"
    "    json.dump({'launch': mpi_launch(), 'local': local_rank(default=99),\n"
    "               'threads': {n: os.environ[n] for n in THREAD_VARIABLES}}, f)\n")


def _ranks(job, folder):
    """What each rank wrote (a file each: the ranks' stdout lines interleave)."""
    assert job.returncode == 0, job.stderr
    return [json.loads((folder / f"{rank}.json").read_text()) for rank in range(2)]


def test_a_one_process_job_is_not_a_data_parallel_launch():
    """``mpiexec -n 1`` counted as a data-parallel launch (so ``mpiexec -n 1 refnorm train --devices
    2`` was refused)."""
    job = run_mpi(1, "-c", "from refnorm.launch import mpi_launch; print(mpi_launch())")
    assert job.returncode == 0 and job.stdout.split() == ["None"], job.stdout + job.stderr


@pytest.mark.parametrize("machines", [1, 2])
def test_each_rank_gets_its_machine_share_of_the_cores(machines, tmp_path):
    """Each rank's thread variables get the cores of its machine divided by the ranks on that
    machine (not by the job's size), local rank 0 is read as 0 (not as "not found"), and a
    thread count the user set is kept. Two machines are simulated by Hydra's fork launcher
    with two host names: one rank on each, MPI_LOCALNRANKS=1, MPI_LOCALRANKID=0."""
    hosts = ("-launcher", "fork", "-hosts", "localhost,127.0.0.1") if machines == 2 else ()
    ranks = _ranks(run_mpi(2, "-c", _THREADS, str(tmp_path), mpiexec_args=hosts), tmp_path)
    per_machine = 2 // machines
    share = str(max(1, (os.cpu_count() or 1) // per_machine))
    assert [r["launch"] for r in ranks] == [[0, 2], [1, 2]]
    assert sorted(r["local"] for r in ranks) == ([0, 1] if machines == 1 else [0, 0])
    for r in ranks:
        user = r["threads"].pop("OMP_NUM_THREADS")
        assert user == str((os.cpu_count() or 1) + 1)  # the user's setting is kept
        assert set(r["threads"].values()) == {share}, r


def _no_launcher(monkeypatch):
    for names in (launch.MPI_SIZE_VARIABLES, launch.MPI_RANK_VARIABLES,
                  launch.LOCAL_SIZE_VARIABLES, launch.LOCAL_RANK_VARIABLES):
        for name in names:
            monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("size", "rank", "local"), [
    ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"),                      # MPICH's Hydra
    ("PMIX_SIZE", "PMIX_RANK", "PMIX_LOCAL_RANK"),                    # PMIx
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK"),     # MVAPICH
])
def test_every_launchers_variables_give_the_rank_size_and_local_rank(size, rank, local,
                                                                      monkeypatch):
    """Only MPICH's mpiexec runs in the suite: the other launchers' variables are set by
    hand."""
    _no_launcher(monkeypatch)
    monkeypatch.setenv(size, "3")
    monkeypatch.setenv(rank, "2")
    monkeypatch.setenv(local, "1")
    assert launch.mpi_launch() == (2, 3)
    assert launch.local_rank(default=99) == 1


def test_the_mpiexec_beside_this_python_comes_before_the_one_on_path(monkeypatch, tmp_path):
    """The mpi extra's mpiexec (beside the interpreter) matches its mpi4py; another MPI's
    mpiexec on PATH would start processes that do not form one job with it."""
    ours, other = tmp_path / "venv" / "bin", tmp_path / "system" / "bin"
    for folder in (ours, other):
        folder.mkdir(parents=True)
        (folder / "mpiexec").write_text("#!/bin/sh\n")
        (folder / "mpiexec").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(ours / "python"))
    monkeypatch.setenv("PATH", str(other))
    assert launch.find_mpiexec() == str(ours / "mpiexec")
    (ours / "mpiexec").unlink()
    assert launch.find_mpiexec() == str(other / "mpiexec")


def test_a_launchers_variable_that_is_not_a_number_is_not_read(monkeypatch):
    """'²' passes str.isdigit but not int(): it is skipped as any other non-number is, not a
    ValueError from every refnorm command's start (share_cores runs first)."""
    _no_launcher(monkeypatch)
    monkeypatch.setenv("PMI_SIZE", "²")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("MPI_LOCALRANKID", "³")
    assert launch.mpi_launch() == (0, 2)
    assert launch.local_rank(default=7) == 7
