"""Data-parallel training on GPUs (docs/data-parallel.md): ``refnorm train --devices 2 --device
gpu`` (two simulated devices on one GPU) and ``mpiexec -n 2 refnorm train --device gpu`` (one
GPU per rank, NCCL) equal the CPU run in float64. Marked ``gpu``; skipped without CuPy and the
GPUs (and, for MPI, without mpi4py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import gpu_skip
from tests.sync.mpi import run_mpi

pytestmark = pytest.mark.gpu
ARGS = ["train", "--norm", "syncbn", "--dtype", "float64", "--epochs", "1", "--batch-size",
        "16"]


def _arrays(path):
    with np.load(path / "checkpoint.npz") as z:
        return {k: z[k].astype(np.float64) for k in z.files if k != "meta"}


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        scale = max(float(np.max(np.abs(b[key]))), 1e-300)
        assert float(np.max(np.abs(a[key] - b[key]))) <= 1e-10 * scale, key


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu")
    proc = subprocess.run([sys.executable, "-m", "refnorm", *ARGS, "--devices", "2", "--out",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return _arrays(out)


@gpu_skip()
def test_simulated_devices_on_one_gpu_equal_the_cpu(tmp_path, cpu_run):
    proc = subprocess.run([sys.executable, "-m", "refnorm", *ARGS, "--devices", "2",
                           "--device", "gpu", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _assert_close(_arrays(tmp_path), cpu_run)


@gpu_skip(devices=2)
def test_one_gpu_per_rank_over_nccl_equals_the_cpu(tmp_path, cpu_run):
    job = run_mpi(2, "-m", "refnorm", *ARGS, "--device", "gpu", "--out", str(tmp_path),
                  timeout=600)
    assert job.returncode == 0, job.stderr
    _assert_close(_arrays(tmp_path), cpu_run)
