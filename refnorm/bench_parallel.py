"""``refnorm bench --data-parallel``: what communication costs a data-parallel step.

For P = 2 devices, in-process (:class:`~refnorm.sync.comm.InProcessGroup`, two threads) and
under ``mpiexec -n 2`` (:class:`~refnorm.sync.comm.MPICommunicator`, two processes) when the
``mpi`` extra is installed: one epoch of the study's model (widths 16/32/32) on the embedded
digits, per-device batch 16, with per-device BN (``bn``: the status and gradient all-reduces
only) and with synchronized BN (``syncbn``: three more per BN layer and step). Read from the
run's metrics (:class:`~refnorm.sync.comm.MeteredCommunicator`): all-reduces and bytes per
step (this device's contributions, in the arrays' dtypes), the wall time of a step, and the
share of the steps' time spent inside collectives (moving data and waiting for the other
device). One run per row: a benchmark, not a test; the figures depend on the machine's load.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from refnorm.launch import find_mpiexec

NORMS = ("bn", "syncbn")
DEVICES = 2


class MPIJobFailed(RuntimeError):
    """An ``mpiexec`` job of the bench ended with a nonzero status; the message says which
    and ends with the last line of its standard error."""


def _config(norm: str, epochs: int, subset: int | None = None) -> Any:
    from refnorm.train.config import TrainConfig

    return TrainConfig(norm=norm, devices=DEVICES, batch_size=16, epochs=epochs,
                       train_subset=subset)


def _row(transport: str, norm: str, history: list[dict]) -> dict[str, Any]:
    last = history[-1]
    keys = ("allreduce_calls_per_step", "allreduce_bytes_per_step", "step_ms",
            "collective_share")
    return {"transport": transport, "norm": norm, "devices": DEVICES,
            **{k: last[k] for k in keys}}


def run(*, epochs: int = 1, subset: int | None = None, mpi: bool = True,
        progress=lambda line: None) -> dict[str, Any]:
    """The rows of the report (in-process, then MPI if available); ``subset`` trains on that
    many samples only (for a quick look)."""
    from refnorm.train.loop import train

    for norm in NORMS:  # untimed: compile the kernels, warm the caches
        train(_config(norm, 1, subset=64), progress=False)
    rows = []
    for norm in NORMS:
        progress(f"in-process, {norm}")
        history = train(_config(norm, epochs, subset), progress=False).history
        rows.append(_row("in-process", norm, history))
    exe = find_mpiexec() if mpi else None
    skipped = None
    if exe is None:
        skipped = "no mpiexec (install the mpi extra)" if mpi else "--no-mpi"
    else:
        for norm in NORMS:
            progress(f"mpiexec -n {DEVICES}, {norm}")
            with tempfile.TemporaryDirectory(prefix="refnorm-bench-") as out:
                job = subprocess.run(
                    [exe, "-n", str(DEVICES), sys.executable, "-m", "refnorm.train.mpi_run",
                     json.dumps(dataclasses.asdict(_config(norm, epochs, subset))), out],
                    capture_output=True, text=True)
                if job.returncode != 0:
                    last = (job.stderr.strip().splitlines() or ["(no output on stderr)"])[-1]
                    raise MPIJobFailed(f"mpiexec -n {DEVICES} failed for {norm} (exit "
                                       f"{job.returncode}): {last.strip()[-500:]}")
                history = json.loads(Path(out, "metrics.json").read_text())
            rows.append(_row("mpi", norm, history))
    return {"rows": rows, "mpi_skipped": skipped}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"data-parallel step, {DEVICES} devices x batch 16 (study model, digits):",
             f"  {'transport':<11} {'norm':<7} {'all-reduces':>11} {'KiB/step':>8} "
             f"{'ms/step':>8} {'in collectives':>15}"]
    for r in report["rows"]:
        lines.append(f"  {r['transport']:<11} {r['norm']:<7} "
                     f"{r['allreduce_calls_per_step']:>11.1f} "
                     f"{r['allreduce_bytes_per_step'] / 1024:>8.1f} {r['step_ms']:>8.2f} "
                     f"{100 * r['collective_share']:>14.0f}%")
    if report["mpi_skipped"]:
        lines.append(f"  (MPI not run: {report['mpi_skipped']})")
    return "\n".join(lines)
