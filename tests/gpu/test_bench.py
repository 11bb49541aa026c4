"""``refnorm bench --device gpu`` end to end on a GPU: every normalizer at both shapes on the
reference and the fused kernels, PyTorch's CUDA rows when it sees the GPU, the copy bandwidth
and the training steps. Structure only: a benchmark's figures are never test outcomes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import gpu_skip

pytestmark = [pytest.mark.gpu, gpu_skip()]


def test_the_gpu_bench_runs_on_the_gpu():
    proc = subprocess.run(
        [sys.executable, "-m", "refnorm", "bench", "--device", "gpu", "--json", "--repeats",
         "1"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["device"]["array_module"] == "cupy" and report["copy_gb_per_s"] > 0
    shapes = ("(32, 64, 32, 32)", "(256, 64, 56, 56)")
    cases = [f"{m} {s}" for s in shapes for m in ("bn", "in", "ln", "gn", "sn")]
    assert [r["case"] for r in report["ratios"]] == cases
    impls = {(t["case"], t["impl"]) for t in report["timings"]}
    assert {(c, i) for c in cases for i in ("reference", "fused")} <= impls
    models = {t["method"] for t in report["train_steps"]["timings"]}
    assert models == {"bn", "gn", "sn", "gn+ws"}
