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
import types
from pathlib import Path

import numpy as np
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
    assert report["device"]["torch_requested"] is True
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


TWO_SHAPES = r"""
import json
from refnorm import bench_gpu
from refnorm.kernels import cuda
cuda.THREADS = 4
report = bench_gpu.run(device=bench_gpu.simulated_device(), repeats=1,
                       shapes=((1, 2, 1, 2), (2, 3, 1, 2)), methods=("bn",), step_models=())
print(json.dumps(report))
"""


def test_the_gpu_bench_copies_its_largest_input_and_its_ratios_follow_the_timings():
    """The copy bandwidth is measured on the largest shape, wherever it stands in the list;
    fused/reference is the ratio of the medians and 'fused of copy' the fused GB/s over the
    copy's."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", TWO_SHAPES], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["copy_of"] == [2, 3, 1, 2]
    rows = {(t["case"], t["impl"]): t for t in report["timings"]}
    assert len(report["ratios"]) == 2
    for r in report["ratios"]:
        fused, reference = rows[(r["case"], "fused")], rows[(r["case"], "reference")]
        assert r["fused_over_reference"] == pytest.approx(fused["median_ms"]
                                                          / reference["median_ms"])
        assert r["fused_of_copy"] == pytest.approx(fused["gb_per_s"] / report["copy_gb_per_s"])


def test_copy_bandwidth_counts_a_read_and_a_write_over_the_median_copy(monkeypatch):
    """2 x.nbytes per copy over the median of the repeats (a stub device and clock: copies of
    1, 4 and 2 ms of 8000 bytes are 8 MB/s)."""
    from refnorm import bench_gpu

    ticks = iter([0.0, 0.001, 1.0, 1.004, 2.0, 2.002])
    monkeypatch.setattr(bench_gpu, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    device = bench_gpu.Device(np, "stub", lambda: None, None)
    gb_per_s = bench_gpu.copy_bandwidth(device, np.zeros(1000), repeats=3)
    assert gb_per_s == pytest.approx(2 * 8000 / 0.002 / 1e9)


def test_the_text_report_shows_each_figure_in_its_column():
    from refnorm import bench_gpu

    timing = {"case": "bn (2, 3, 1, 2)", "method": "bn", "median_ms": 2.0, "min_ms": 1.0,
              "max_ms": 4.0, "gb_per_s": 5.0}
    report = {"device": {"name": "stub", "array_module": "numpy", "torch": None},
              "copy_gb_per_s": 20.0, "copy_of": [2, 3, 1, 2], "repeats": 1,
              "bytes_model": "5 n b", "ratios": [
                  {"case": "bn (2, 3, 1, 2)", "fused_over_reference": 3.0,
                   "fused_over_torch": None, "fused_of_copy": 0.25}],
              "timings": [dict(timing, impl="fused"), dict(timing, impl="reference",
                                                           median_ms=6.0, gb_per_s=2.0)],
              "train_steps": {"model": "ConvNet", "timings": [
                  {"method": "bn", "impl": "refnorm", "median_ms": 7.0, "min_ms": 6.0,
                   "max_ms": 9.0}]}}
    lines = bench_gpu.format_report(report).splitlines()
    fused, reference = (next(line for line in lines if line.startswith("bn (2, 3, 1, 2)")
                             and impl in line) for impl in ("fused", "reference"))
    assert fused.split()[-2:] == ["5.0", "25%"]      # GB/s, of the copy's 20 GB/s
    assert reference.split()[-2:] == ["2.0", "10%"]
    ratio = lines[lines.index(next(line for line in lines if "fused/reference" in line)) + 1]
    assert ratio.split()[-3:] == ["3.00", "-", "25%"]
    assert "6.00-9.00" in lines[-1]


@pytest.mark.parametrize(("requested", "why"), [
    (True, "no CUDA build or no GPU: no comparison"), (False, "not timed: --no-torch")])
def test_the_text_report_says_why_pytorch_has_no_rows(requested, why):
    """--no-torch is not a PyTorch without CUDA."""
    from refnorm import bench_gpu

    report = {"device": {"name": "stub", "array_module": "cupy", "torch": None,
                         "torch_requested": requested},
              "copy_gb_per_s": 20.0, "copy_of": [2, 3, 1, 2], "repeats": 1,
              "bytes_model": "5 n b", "ratios": [], "timings": [],
              "train_steps": {"model": "ConvNet", "timings": []}}
    assert bench_gpu.format_report(report).splitlines()[0] == (
        f"device: stub (cupy); PyTorch: {why}")


def test_simulated_device_needs_the_simulator(monkeypatch):
    """Without NUMBA_ENABLE_CUDASIM the simulated device says what it needs, instead of a
    bench that fails later on numpy arrays."""
    from refnorm import bench_gpu

    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    with pytest.raises(RuntimeError, match="NUMBA_ENABLE_CUDASIM=1"):
        bench_gpu.simulated_device()


SYNCHRONIZED = r"""
import json
from refnorm import bench_gpu
from refnorm.kernels import cuda
cuda.THREADS = 4
syncs = []
sim = bench_gpu.simulated_device()
device = bench_gpu.Device(sim.xp, sim.name, lambda: syncs.append(1), None)
interleaved = bench_gpu.cases._interleaved
timed = []

def rounds(impls, repeats, progress):
    def counted(name, fn):
        def run():
            before = len(syncs)
            fn()
            timed.append([name, len(syncs) - before])
        return run
    return interleaved({k: counted(k, f) for k, f in impls.items()}, repeats, progress)

bench_gpu.cases._interleaved = rounds
bench_gpu.run(device=device, repeats=2, shapes=((2, 3, 1, 2),), methods=("bn",),
              step_models=("bn",), step_batch=(2, 3, 8, 8))
print(json.dumps(timed))
"""


def test_every_timed_gpu_call_ends_with_a_synchronization():
    """The wall clock times the work, not its launch: each call of each implementation, the
    training step's included, waits for the device (a counting synchronize, under the
    simulator)."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", SYNCHRONIZED], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    timed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {name for name, _ in timed} == {"reference", "fused", "bn refnorm"}
    assert all(syncs == 1 for _, syncs in timed), timed


def test_each_copy_of_the_bandwidth_is_synchronized_before_the_clock_stops(monkeypatch):
    from refnorm import bench_gpu

    events: list[str] = []
    ticks = iter([0.0, 0.001, 1.0, 1.004, 2.0, 2.002])

    def clock():
        events.append("clock")
        return next(ticks)

    monkeypatch.setattr(bench_gpu, "time", types.SimpleNamespace(perf_counter=clock))
    device = bench_gpu.Device(np, "stub", lambda: events.append("sync"), None)
    bench_gpu.copy_bandwidth(device, np.zeros(1000), repeats=3)
    # the untimed copy waited for, then per copy: start, (copy), wait, stop
    assert events == ["sync"] + ["clock", "sync", "clock"] * 3
