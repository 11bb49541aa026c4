"""scripts/gpu_check.sh, the GPU suite's one command, as far as a machine without a GPU
can check it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parents[1]


def test_gpu_check_fails_when_every_gpu_test_skipped_and_logs_each_step(tmp_path):
    """docs/gpu.md: scripts/gpu_check.sh runs `pytest -m gpu`, "failing if every test
    skipped", with a log per step in OUT, and exits non-zero when a step failed. Run on a
    machine without a GPU behind a stand-in `nvidia-smi`, and an interpreter that reports
    CuPy importable (so nothing is installed) and leaves the simulator's kernel tests out."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '| Driver Version: 550.00   CUDA Version: 12.4 |'\n")
    python = bin_dir / "python"
    python.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = "-c" ] && [ "$2" = "import cupy" ]; then exit 0; fi\n'
        'for a in "$@"; do [ "$a" = tests/kernels/test_cuda.py ] && exit 0; done\n'
        f'exec {sys.executable} "$@"\n')
    smi.chmod(0o755)
    python.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python),
           "STEP_SECONDS": "300", "PYTHONPATH": str(ROOT_DIR)}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=ROOT_DIR, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout
    assert "no GPU test ran: every one was skipped" in (out / "gpu_tests_ran.log").read_text()
    assert "   FAILED" in done.stdout.split("== gpu_tests_ran:")[1].split("\n== ")[0]
    for step in ("probe", "gpu_tests", "kernel_tests", "study", "bench"):
        assert (out / f"{step}.log").exists(), step
