"""``refnorm study --quick --device gpu`` end to end on a GPU (needs the CLI's ``--device``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import gpu_skip

pytestmark = [pytest.mark.gpu, gpu_skip()]


def test_quick_study_completes_on_the_gpu(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, "-m", "refnorm", "study", "--quick", "--device", "gpu",
         "--out", str(out)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "report.md").is_file()
