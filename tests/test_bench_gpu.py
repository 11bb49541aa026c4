"""``refnorm bench --device gpu`` (refnorm.bench_gpu) runs end to end under numba's CUDA
simulator, on numpy arrays with tiny shapes: the bench's code, never a GPU's speed (no timing
is asserted). numba reads ``NUMBA_ENABLE_CUDASIM`` when it is imported, so the checks run in a
subprocess, as tests/kernels/test_cuda.py's do. On a GPU, tests/gpu/test_bench.py runs the
command itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CODE = r"""
import json
from refnorm import bench_gpu
from refnorm.kernels import cuda
cuda.THREADS = 4  # the simulator runs each CUDA thread as a Python thread
device = bench_gpu.simulated_device()
report = bench_gpu.run(device=device, repeats=1, shapes=((2, 3, 1, 2),), methods=("bn", "sn"),
                       step_models=("bn", "sn"), step_batch=(2, 3, 8, 8))
text = bench_gpu.format_report(report)
print(json.dumps({"report": report, "text": text}))
"""


def test_the_gpu_bench_runs_under_the_cuda_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    report, text = out["report"], out["text"]
    assert report["device"]["name"] == "numba CUDA simulator (numpy arrays)"
    assert report["device"]["torch"] is None and report["copy_gb_per_s"] > 0
    cases = [f"{m} (2, 3, 1, 2)" for m in ("bn", "sn")]  # the generic kernels, and SN's
    assert [r["case"] for r in report["ratios"]] == cases
    impls = {(t["case"], t["impl"]) for t in report["timings"]}
    assert impls == {(c, i) for c in cases for i in ("reference", "fused")}
    for t in report["timings"]:  # 5 n b: read x, write y, read dy, read x, write dx (float32)
        assert t["bytes_moved"] == 5 * (2 * 3 * 1 * 2) * 4, t
        assert t["gb_per_s"] == pytest.approx(t["bytes_moved"] / (t["median_ms"] * 1e-3) / 1e9)
    for r in report["ratios"]:
        assert r["fused_over_torch"] is None and r["fused_over_reference"] > 0
    steps = {(t["method"], t["impl"]) for t in report["train_steps"]["timings"]}
    assert steps == {("bn", "refnorm"), ("sn", "refnorm")}
    assert "batch 2 of 3x8x8" in report["train_steps"]["model"]
    for case in cases:
        assert case in text
    assert "no CUDA build or no GPU: no comparison" in text
