"""refnorm.bench runs end to end and its JSON report has the documented structure.

No timing is asserted (timings are benchmarks, never test outcomes); one repetition keeps it
short.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import refnorm.train.loop
from refnorm import bench, bench_gpu, bench_parallel
from refnorm.backend import gpu_available, gpu_problem
from refnorm.bench_cases import STEP_GROUPS, _train_batch, _train_step_torch
from refnorm.nn import softmax_cross_entropy, softmax_cross_entropy_backward
from refnorm.train.model import ConvNet


@pytest.mark.parametrize("torch_flag", [["--no-torch"], []], ids=["without-torch", "as-installed"])
def test_quick_json_report_structure(capsys, torch_flag):
    assert bench.main(["--json", "--repeats", "1", "--threads", "2"] + torch_flag) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert "[1/" in out.err  # the progress line goes to stderr, never into the JSON
    machine = report["machine"]
    assert machine["numba_threads"] == 2 and "blas_threads" in machine
    assert len(machine["load_average_start"]) == 3
    has_torch = machine["torch"] is not None
    assert not (has_torch and torch_flag)
    assert report["copy_gb_per_s"] > 0
    cases = {(m, tuple(s)) for m in bench.METHODS for s in bench.SHAPES}
    seen = {(t["method"], tuple(t["shape"]), t["impl"]) for t in report["timings"]}
    for method, shape in cases:
        impls = {"reference", "fast", "kernel"} | (
            {"torch"} if has_torch and method != "sn" else set())
        assert {(method, shape, i) for i in impls} <= seen
    for t in report["timings"]:
        assert t["repeats"] == 1
        assert t["min_ms"] <= t["q1_ms"] <= t["median_ms"] <= t["q3_ms"] <= t["max_ms"]
        assert t["gb_per_s"] > 0 and t["bytes_moved"] == 5 * 4 * _size(t["shape"])
        assert t["cpu_ms"] >= 0 and t["faults"] >= 0
    assert {(r["method"], tuple(r["shape"])) for r in report["ratios"]} == cases
    for r in report["ratios"]:
        assert r["fast_over_reference"] > 0 and r["fast_over_kernel"] > 0
        assert r["fast_of_copy"] > 0
        assert (r["fast_over_torch"] is None) == (not has_torch or r["method"] == "sn")
    steps = report["train_steps"]
    impls = {"reference", "fast", "fast 1t"} | ({"torch"} if has_torch else set())
    assert {(t["method"], t["impl"]) for t in steps["timings"]} == {
        (m, i) for m in bench.STEP_MODELS for i in impls}
    assert machine["fast_path"] == "numba kernels"
    # every dispatched call of the fast steps ran the fast path, and WS's are among them
    for model, layers in steps["paths"].items():
        calls = [c for layer in layers for c in layer["calls"]]
        assert calls and all(path == "fast" for _, path in calls), model
    ws = {fn for layer in steps["paths"]["gn+ws"] for fn, _ in layer["calls"]}
    assert {"weight_standardization_forward", "weight_standardization_backward"} <= ws


def test_layer_paths_names_a_reference_call():
    """The path report is not a constant: a layer left on the reference says so."""
    step = bench._train_step("fast", "sn")
    layers = step.model.layers()
    i = next(i for i, layer in enumerate(layers) if type(layer).__name__ == "SwitchableNorm")
    layers[i].path = "reference"
    rows = bench.layer_paths(step)
    assert rows[i]["layer"] == "SwitchableNorm"
    assert {tuple(c) for c in rows[i]["calls"]} == {("switchable_norm_forward", "reference"),
                                                   ("switchable_norm_backward", "reference")}
    later = [tuple(c) for row in rows[i + 1:] if row["layer"] == "SwitchableNorm"
             for c in row["calls"]]
    assert later and all(path == "fast" for _, path in later)
    assert all("forward" not in vars(layer) for layer in layers)  # the wrappers are gone


def _size(shape) -> int:
    return math.prod(shape)


def test_text_report_and_bad_arguments(capsys):
    assert bench.main(["--repeats", "1", "--no-torch"]) == 0
    text = capsys.readouterr().out
    assert "copy bandwidth" in text and "fast/ref" in text and "training steps" in text
    assert "fast/kernel" in text and "of copy" in text and "paths in the fast steps" in text
    # torch may be installed: --no-torch says it was not timed, not that it is missing; the
    # threading layer is the one the loops ran on, not numba's request ("default")
    assert "(not timed: --no-torch)" in text and "(layer default)" not in text
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])


def test_the_refnorm_command_runs_the_bench(capsys):
    from refnorm.cli import main

    assert main(["bench", "--json", "--repeats", "1", "--no-torch"]) == 0
    assert "timings" in json.loads(capsys.readouterr().out)


@pytest.mark.skipif(gpu_available(), reason="a GPU is here: tests/gpu/ runs the GPU bench")
def test_the_gpu_bench_without_a_gpu_says_why_in_one_sentence(capsys):
    from refnorm.cli import main

    assert main(["bench", "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"refnorm bench: error: --device gpu: {gpu_problem()}"
    assert "\n" not in err


def test_the_gpu_bench_refuses_the_cpu_only_options(capsys):
    from refnorm.cli import main

    for flag in (["--threads", "2"], ["--crossover"], ["--data-parallel"]):
        assert main(["bench", "--device", "gpu", *flag]) == 2
        assert f"--device gpu does not take {flag[0]}" in capsys.readouterr().err


def test_data_parallel_bench_counts_the_collectives_of_a_step():
    from refnorm import bench_parallel

    report = bench_parallel.run(subset=96, mpi=False)
    rows = {r["norm"]: r for r in report["rows"]}
    # bn: the status word and the gradients; syncbn: 3 more per BN layer (2 forward, 1
    # backward) for the model's 3 BN layers.
    assert rows["bn"]["allreduce_calls_per_step"] == 2
    assert rows["syncbn"]["allreduce_calls_per_step"] == 2 + 3 * 3
    # the model's float32 gradients and each device's status row (7 float64 values per device)
    from refnorm.train.loop import build_model, prepare_data

    config = bench_parallel._config("bn", 1, subset=96)
    params = sum(int(layer.params[name].size) for _, layer, name in
                 build_model(config, prepare_data(config)).named_params())
    assert rows["bn"]["allreduce_bytes_per_step"] == 4 * params + 8 * 2 * 7
    assert all(0 < r["collective_share"] < 1 and r["step_ms"] > 0 for r in rows.values())
    assert report["mpi_skipped"] == "--no-mpi"
    assert "in-process  syncbn" in bench_parallel.format_report(report)


def test_crossover_reports_one_thread_against_several(capsys):
    assert bench.main(["--crossover", "--repeats", "1", "--threads", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["threads"] == 2
    cases = [r["case"] for r in report["rows"]]
    assert cases[:6] == [f"gn N={n}" for n in (1, 2, 4, 8, 16, 32)]
    assert cases[6:9] == ["conv 3->16", "conv 16->32", "conv 32->32"]
    assert cases[9:] == [f"conv blocks N={n}" for n in (2, 4, 8, 16, 32)]
    for r in report["rows"]:
        assert r["one_thread_ms"] > 0 and r["threads_ms"] > 0
        assert r["threads_over_one"] == pytest.approx(r["threads_ms"] / r["one_thread_ms"])
    assert [r["unit"] for r in report["rows"]] == (
        ["values per loop"] * 6 + ["multiply-adds"] * 3 + ["forward multiply-adds"] * 5)
    assert bench.main(["--crossover", "--repeats", "1", "--threads", "2"]) == 0
    text = capsys.readouterr().out
    assert "1 thread against 2" in text and "forward multiply-adds" in text


def test_more_threads_than_numba_allows_is_an_argument_error(capsys):
    from refnorm.cli import main

    limit = bench._thread_limit()
    for argv in (["--no-torch"], ["--crossover"]):
        with pytest.raises(SystemExit) as exc:
            main(["bench", *argv, "--threads", str(limit + 1), "--repeats", "1"])
        assert exc.value.code == 2
        assert capsys.readouterr().err == (
            f"refnorm bench: error: argument --threads: expected an integer from 1 to {limit} "
            f"(numba's NUMBA_NUM_THREADS: the threads available to this process); got "
            f"'{limit + 1}' (see refnorm bench --help)\n")


@pytest.mark.parametrize(("argv", "message"), [
    (["--quick", "--repeats", "3"], "give --quick (5 repetitions) or --repeats N, not both"),
    (["--crossover", "--threads", "1"], "--crossover compares 1 thread with 2 or more; "
                                        "expected --threads >= 2; got --threads 1"),
    (["--crossover", "--no-torch"], "--crossover does not take --no-torch (it never runs "
                                    "torch)"),
    (["--crossover", "--data-parallel"], "--crossover and --data-parallel are two benches: "
                                         "give one of them"),
    (["--data-parallel", "--repeats", "3", "--threads", "1", "--no-torch"],
     "--data-parallel does not take --repeats, --threads, --no-torch (it trains one run per "
     "row, without torch; only --json applies)"),
    (["--data-parallel", "--quick"], "--data-parallel does not take --quick"),
])
def test_options_a_bench_would_ignore_are_refused(argv, message, capsys):
    from refnorm.cli import main

    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refnorm bench: error: {message}") and err.count("\n") == 1, err


def test_crossover_needs_two_threads_to_compare(capsys, monkeypatch):
    monkeypatch.setattr(bench, "_thread_limit", lambda: 1)
    assert bench.main(["--crossover", "--repeats", "1"]) == 2
    assert capsys.readouterr().err == (
        "refnorm bench: error: --crossover compares 1 thread with 2 or more, but numba allows "
        "this process 1 thread (NUMBA_NUM_THREADS)\n")


def test_data_parallel_report_counts_bytes_in_kib():
    from refnorm import bench_parallel

    row = {"transport": "in-process", "norm": "bn", "allreduce_calls_per_step": 2.0,
           "allreduce_bytes_per_step": 2048, "step_ms": 1.0, "collective_share": 0.5}
    lines = bench_parallel.format_report({"rows": [row], "mpi_skipped": None}).splitlines()
    assert lines[1].split()[3] == "KiB/step" and lines[2].split()[3] == "2.0"


def test_crossover_quick_runs_five_repetitions(monkeypatch, capsys):
    seen = []

    def fake(threads, repeats, progress):
        seen.append(repeats)
        return {}

    monkeypatch.setattr(bench, "crossover", fake)
    monkeypatch.setattr(bench, "format_crossover", lambda result: "")
    assert bench.main(["--crossover", "--quick", "--threads", "2"]) == 0
    assert seen == [5]


# -- the cases: what each implementation computes ----------------------------------------------


@pytest.mark.parametrize("method", ["bn", "in", "ln", "gn", "sn"])
def test_the_kernels_alone_compute_what_the_fast_path_computes(method):
    """``kernel`` times the kernels the fast call runs, with the same arguments: bitwise the
    same gradients (LN's kernels, not IN's; GN with G = 32 on both sides)."""
    from refnorm.bench_cases import _pure

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 64, 2, 3)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    beta = rng.standard_normal(64).astype(np.float32)
    dx, dgamma, dbeta = bench._kernel(method, x, gamma, beta, dy)()[:3]
    want = _pure(method, x, gamma, beta, dy, "fast")()
    np.testing.assert_array_equal(dx.reshape(x.shape), want[0])
    np.testing.assert_array_equal(dgamma, want[1])
    np.testing.assert_array_equal(dbeta, want[2])


def test_group_norm_case_uses_thirty_two_groups():
    """The GN case is G = 32, as PyTorch's (F.group_norm(x, 32)) it is compared with."""
    from refnorm.bench_cases import EPS, _pure
    from refnorm.norms.group_norm import group_norm_backward, group_norm_forward

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 64, 2, 2))
    dy = rng.standard_normal(x.shape)
    gamma, beta = np.ones(64), np.zeros(64)
    got = _pure("gn", x, gamma, beta, dy, "reference")()
    _, cache = group_norm_forward(x, gamma, beta, num_groups=32, eps=EPS)
    for a, b in zip(got, group_norm_backward(dy, cache), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("method", ["bn", "in", "ln", "gn"])
def test_the_torch_case_differentiates_the_same_normalizer(method):
    """torch.nn.functional's counterpart gives refnorm's gradients (LN over (C, H, W):
    F.group_norm with one group; GN: 32 groups)."""
    torch = pytest.importorskip("torch")
    from refnorm.bench_cases import _pure, _torch_case

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64, 2, 3)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    run = _torch_case(torch, method, x, dy)
    assert run is not None
    run()
    tensors = inspect.getclosurevars(run).nonlocals  # the case's input and affine parameters
    dx, dgamma, dbeta = _pure(method, x.astype(np.float64), np.ones(64), np.zeros(64),
                              dy.astype(np.float64), "reference")()
    np.testing.assert_allclose(tensors["xt"].grad.numpy(), dx, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(tensors["gt"].grad.numpy(), dgamma, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(tensors["bt"].grad.numpy(), dbeta, rtol=1e-3, atol=1e-3)


# -- the rounds and the summary of their times ------------------------------------------------


def test_interleaved_rounds_warm_each_implementation_then_time_each_once_per_round(
        monkeypatch):
    """One untimed call of each, then per round one call of each in a shuffled order; the
    wall time, the process CPU time and the minor page faults of every call (a stub clock
    that each call advances by its own amounts)."""
    from refnorm import bench_cases

    clock = {"wall": 0, "cpu": 0, "minor": 0, "major": 0}
    calls: list[str] = []

    def impl(name, wall, cpu, faults):
        def fn():
            calls.append(name)
            clock["wall"] += wall
            clock["cpu"] += cpu
            clock["minor"] += faults
            clock["major"] += 100
        return fn

    monkeypatch.setattr(bench_cases, "time", types.SimpleNamespace(
        perf_counter=lambda: clock["wall"], process_time=lambda: clock["cpu"]))
    monkeypatch.setattr(bench_cases, "resource", types.SimpleNamespace(
        RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(
            ru_minflt=clock["minor"], ru_majflt=clock["major"])))
    impls = {"a": impl("a", 2, 1, 3), "b": impl("b", 5, 4, 0), "c": impl("c", 7, 6, 1)}
    lines: list[str] = []
    out = bench_cases._interleaved(impls, 6, lines.append)
    assert len(calls) == 3 * (1 + 6)
    assert sorted(calls[:3]) == ["a", "b", "c"]  # the untimed warm-up
    rounds = [tuple(calls[3 + 3 * r:6 + 3 * r]) for r in range(6)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len(set(rounds)) > 1  # not one fixed order
    assert lines == [f"round {r}/6" for r in range(1, 7)]
    assert out["a"] == {"wall": [2] * 6, "cpu": [1] * 6, "faults": [3] * 6}
    assert out["b"] == {"wall": [5] * 6, "cpu": [4] * 6, "faults": [0] * 6}


def test_summary_gives_the_median_the_spread_and_the_bandwidth_of_the_median():
    from refnorm.bench_cases import _summary

    measured: dict[str, list[float]] = {"wall": [0.004, 0.001, 0.002, 0.010, 0.003],
                "cpu": [0.001, 0.009, 0.002, 0.003, 0.004], "faults": [0, 10, 2, 0, 3]}
    t = _summary("bn (2, 3)", "bn", [2, 3], "fast", measured, 6_000_000)
    assert (t.case, t.method, t.shape, t.impl) == ("bn (2, 3)", "bn", (2, 3), "fast")
    assert t.median_ms == pytest.approx(3.0)
    assert (t.min_ms, t.q1_ms, t.q3_ms, t.max_ms) == pytest.approx((1.0, 2.0, 4.0, 10.0))
    assert t.cpu_ms == pytest.approx(3.0)  # the median CPU time, not the mean (3.8)
    assert t.faults == pytest.approx(3.0)  # per call
    assert (t.repeats, t.bytes_moved) == (5, 6_000_000)
    assert t.gb_per_s == pytest.approx(6e6 / 3e-3 / 1e9)  # the bytes over the median time


def test_copy_bandwidth_is_a_read_and_a_write_of_64_mib_over_the_median_copy(monkeypatch):
    ticks = iter([0.0, 0.001, 1.0, 1.004, 2.0, 2.002])  # copies of 1, 4 and 2 ms
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert bench.copy_bandwidth(3) == pytest.approx(2 * 64 * 2**20 / 0.002 / 1e9)


# -- the report from given timings ------------------------------------------------------------


WALL_MS = {"reference": 8.0, "fast": 2.0, "kernel": 1.0, "torch": 4.0}
CPU_MS = {"reference": 8.0, "fast": 3.0, "kernel": 1.0, "torch": 6.0}


def _stub_run(monkeypatch):
    """bench.run with stub rounds (WALL_MS, CPU_MS per implementation), copy bandwidth
    (10 GB/s), threads, torch and training steps; what each stub was asked for."""
    seen: dict[str, list] = {"rounds": [], "copy": [], "steps": []}

    def rounds(impls, repeats, progress):
        seen["rounds"].append((sorted(impls), repeats))
        return {name: {"wall": [WALL_MS[name] / 1e3] * repeats,
                       "cpu": [CPU_MS[name] / 1e3] * repeats, "faults": [0] * repeats}
                for name in impls}

    def copy_bandwidth(repeats, mib=64):
        seen["copy"].append((repeats, mib))
        return 10.0

    def steps(torch, threads, repeats, models, say):
        seen["steps"].append((threads, repeats, models))
        return {"model": "stub", "timings": [], "paths": {}}

    fake_torch = types.SimpleNamespace(__version__="stub", get_num_threads=lambda: 1,
                                       set_num_threads=lambda n: None)
    monkeypatch.setattr(bench, "_interleaved", rounds)
    monkeypatch.setattr(bench, "copy_bandwidth", copy_bandwidth)
    monkeypatch.setattr(bench, "_steps", steps)
    monkeypatch.setattr(bench, "_import_torch", lambda enabled: fake_torch if enabled else None)
    monkeypatch.setattr(bench, "_set_threads", lambda threads, torch: {"numba_threads": 3})
    monkeypatch.setattr(bench, "_torch_case",
                        lambda torch, method, x, dy: None if method == "sn" else lambda: None)
    return seen


def test_the_report_takes_its_ratios_and_bandwidths_from_the_medians(monkeypatch):
    seen = _stub_run(monkeypatch)
    report = bench.run()
    shapes = [[32, 64, 32, 32]] * 5 + [[2, 64, 32, 32]] * 5  # the documented cases, float32
    assert [r["shape"] for r in report["ratios"]] == shapes
    assert [r["method"] for r in report["ratios"]] == ["bn", "in", "ln", "gn", "sn"] * 2
    assert [impls for impls, _ in seen["rounds"]] == (
        [["fast", "kernel", "reference", "torch"]] * 4 + [["fast", "kernel", "reference"]]) * 2
    assert {repeats for _, repeats in seen["rounds"]} == {30}
    assert report["repeats"] == 30
    assert seen["copy"] == [(10, 64)]  # 64 MiB, a third as many copies as repetitions
    assert seen["steps"] == [(3, 15, bench.STEP_MODELS)]  # half as many training steps
    for t in report["timings"]:
        n = int(np.prod(t["shape"]))
        assert t["bytes_moved"] == 5 * n * 4  # read x, write y, read dy, read x, write dx
        assert t["median_ms"] == pytest.approx(WALL_MS[t["impl"]])
        assert t["gb_per_s"] == pytest.approx(5 * n * 4 / (WALL_MS[t["impl"]] * 1e-3) / 1e9)
    fast_gb = {tuple(t["shape"]): t["gb_per_s"] for t in report["timings"] if t["impl"] == "fast"}
    for r in report["ratios"]:
        assert r["fast_over_reference"] == pytest.approx(2.0 / 8.0)
        assert r["fast_over_kernel"] == pytest.approx(2.0 / 1.0)
        if r["method"] == "sn":
            assert r["fast_over_torch"] is None and r["fast_over_torch_cpu"] is None
        else:
            assert r["fast_over_torch"] == pytest.approx(2.0 / 4.0)
            assert r["fast_over_torch_cpu"] == pytest.approx(3.0 / 6.0)
        assert r["fast_of_copy"] == pytest.approx(fast_gb[tuple(r["shape"])] / 10.0)


def test_quick_runs_five_repetitions(monkeypatch):
    seen = _stub_run(monkeypatch)
    assert bench.run(quick=True, use_torch=False)["repeats"] == 5
    assert {repeats for _, repeats in seen["rounds"]} == {5}
    assert all("torch" not in impls for impls, _ in seen["rounds"])


# -- threads ------------------------------------------------------------------------------------


class _Threads:
    """A stand-in for torch's or a BLAS library's thread setting."""

    def __init__(self, n: int) -> None:
        self.num_threads = n
        self.__version__ = "stub"

    def set_num_threads(self, n: int) -> None:
        self.num_threads = n

    def get_num_threads(self) -> int:
        return self.num_threads


@pytest.fixture
def numba_threads():
    """numba's thread count, restored after the test."""
    import numba

    before = numba.get_num_threads()
    yield numba
    numba.set_num_threads(before)


def test_set_threads_gives_numba_torch_and_blas_the_same_count(monkeypatch, numba_threads):
    import refnorm.kernels.nn

    libs = [_Threads(7), _Threads(7)]
    monkeypatch.setattr(refnorm.kernels.nn, "_blas", lambda: libs)
    torch = _Threads(7)
    limit = bench._thread_limit()
    info = bench._set_threads(None, torch)  # default: all the threads numba allows
    assert numba_threads.get_num_threads() == limit == info["numba_threads"]
    assert torch.num_threads == limit == info["torch_threads"]
    assert [lib.num_threads for lib in libs] == [limit, limit] and info["blas_threads"] == limit
    info = bench._set_threads(1, torch)
    assert numba_threads.get_num_threads() == 1 == info["numba_threads"]
    assert torch.num_threads == 1 == info["torch_threads"]
    assert [lib.num_threads for lib in libs] == [1, 1] and info["blas_threads"] == 1


def test_one_thread_steps_restore_the_thread_counts_after(monkeypatch, numba_threads):
    import refnorm.kernels.nn

    libs = [_Threads(5)]
    monkeypatch.setattr(refnorm.kernels.nn, "_blas", lambda: libs)
    numba_threads.set_num_threads(bench._thread_limit())
    before = numba_threads.get_num_threads()
    inside = []

    def fn():
        inside.append((numba_threads.get_num_threads(), libs[0].num_threads))
        return "result"
    step = bench._on_threads(1, fn)
    assert step() == "result"
    assert inside == [(1, 1)]
    assert numba_threads.get_num_threads() == before and libs[0].num_threads == 5


@pytest.mark.parametrize("threads", [1, 2])
def test_the_one_thread_step_is_timed_only_when_the_bench_runs_more(monkeypatch, threads):
    names = []

    def rounds(impls, repeats, progress):
        names.extend(impls)
        return {name: {"wall": [0.001], "cpu": [0.001], "faults": [0]} for name in impls}

    monkeypatch.setattr(bench, "_interleaved", rounds)
    steps = bench._steps(None, threads, 1, ("bn",), lambda line: None)
    expected = {"bn reference", "bn fast"} | ({"bn fast 1t"} if threads > 1 else set())
    assert set(names) == expected
    assert {(t["method"], t["impl"]) for t in steps["timings"]} == {
        tuple(name.split(" ", 1)) for name in expected}


def test_crossover_counts_the_work_of_each_size(monkeypatch):
    """GN: the values the forward and backward loops move (3 per value of x), what
    SERIAL_BELOW is set against; the products: multiply-adds; 1 thread against n from the
    given medians."""
    wall = {1: 0.004, 2: 0.001}

    def rounds(impls, repeats, progress):
        return {name: {"wall": [wall[int(name.split()[-1][:-1])]] * repeats} for name in impls}

    monkeypatch.setattr(bench, "_interleaved", rounds)
    rows = {r["case"]: r for r in bench.crossover(2, 3)["rows"]}
    assert rows["gn N=4"]["work"] == 3 * 4 * 64 * 32 * 32
    assert rows["conv 16->32"]["work"] == 32 * (9 * 16) * 32 * 256
    assert rows["conv blocks N=8"]["work"] == 32 * 16 * 9 * 256 * 8
    for r in rows.values():
        assert (r["one_thread_ms"], r["threads_ms"]) == pytest.approx((4.0, 1.0))
        assert r["threads_over_one"] == pytest.approx(0.25)


# -- the text report ----------------------------------------------------------------------------


def _report():
    machine = {"platform": "stub", "cpu_count": 2, "numba_threads": 2,
               "numba_threading_layer": "default", "numba_threading_layer_in_use": "omp",
               "torch_threads": 2, "torch": "2.0", "torch_requested": True, "blas_threads": 2,
               "fast_path": "numba kernels", "openmp_env": {"OMP_WAIT_POLICY": "PASSIVE"},
               "load_average_start": [1.0, 2.0, 3.0], "load_average_end": [4.0, 5.0, 6.0]}
    timing = {"case": "bn (2, 64, 32, 32)", "method": "bn", "shape": [2, 64, 32, 32],
              "impl": "fast", "median_ms": 2.0, "min_ms": 1.0, "max_ms": 4.0, "cpu_ms": 3.0,
              "gb_per_s": 5.0, "faults": 7.0}
    step = {"method": "bn", "median_ms": 10.0, "min_ms": 9.0, "max_ms": 11.0, "cpu_ms": 12.0}
    return {"machine": machine, "repeats": 30, "bytes_model": "5 n b", "copy_gb_per_s": 20.0,
            "timings": [timing, dict(timing, impl="reference", median_ms=8.0, gb_per_s=1.25)],
            "ratios": [{"case": "bn (2, 64, 32, 32)", "fast_over_reference": 0.25,
                        "fast_over_kernel": 2.0, "fast_over_torch": 0.5,
                        "fast_over_torch_cpu": 0.75, "fast_of_copy": 0.25}],
            "train_steps": {"model": "stub", "timings": [
                dict(step, impl="fast"), dict(step, impl="reference", median_ms=40.0)],
                "paths": {"bn": [{"layer": "Conv2d", "calls": []},
                                 {"layer": "BatchNorm", "calls": [["batch_norm_forward", "fast"],
                                                                  ["batch_norm_backward",
                                                                   "fast"]]}]}}}


def test_the_text_report_shows_each_figure_in_its_column():
    lines = bench.format_report(_report()).splitlines()
    assert "1.00 2.00 3.00 / 4.00 5.00 6.00" in lines[1]  # load average at start / end
    assert "30 interleaved repetitions" in lines[2]
    assert "(15 of each training step, 10 copies)" in lines[2]
    header = lines.index(next(line for line in lines if "median ms" in line))
    assert lines[header].split()[2:] == ["median", "ms", "min-max", "ms", "cpu", "ms", "GB/s",
                                         "of", "copy", "faults"]
    fast, reference = lines[header + 1], lines[header + 2]
    # median, min-max, cpu ms, GB/s, of the copy's 20 GB/s, faults
    assert fast.split()[-6:] == ["2.000", "1.00-4.00", "3.000", "5.0", "25%", "7"]
    assert reference.split()[-6:] == ["8.000", "1.00-4.00", "3.000", "1.2", "6%", "7"]
    ratios = lines[lines.index(next(line for line in lines if "fast/ref" in line)) + 1]
    # fast/ref, fast/kernel, fast/torch, (cpu), fast of copy
    assert ratios.split()[-5:] == ["0.250", "2.00", "0.50", "0.75", "25%"]
    steps = lines.index(next(line for line in lines if "fast/this" in line))
    assert lines[steps + 1].split()[1:] == ["fast", "10.00", "9.00-11.00", "12.00"]
    assert lines[steps + 2].split()[1:] == ["reference", "40.00", "9.00-11.00", "12.00", "0.25"]
    assert lines[-1] == ("  bn: Conv2d: numpy; BatchNorm: batch_norm_forward fast, "
                         "batch_norm_backward fast")


def test_the_json_report_is_what_run_returns(monkeypatch, capsys):
    report = _report()
    monkeypatch.setattr(bench, "run", lambda **kwargs: report)
    assert bench.main(["--json", "--repeats", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == report
    assert bench.main(["--repeats", "3"]) == 0
    assert capsys.readouterr().out == bench.format_report(report) + "\n"


# -- the data-parallel bench ------------------------------------------------------------------


def test_data_parallel_row_is_the_last_epoch_and_its_share_is_in_percent():
    from refnorm import bench_parallel

    def epoch(ms):
        return {"allreduce_calls_per_step": 2.0, "allreduce_bytes_per_step": 2048,
                "step_ms": ms, "collective_share": 0.25}
    row = bench_parallel._row("in-process", "bn", [epoch(9.0), epoch(3.0)])
    assert row["step_ms"] == 3.0 and row["devices"] == 2
    line = bench_parallel.format_report({"rows": [row], "mpi_skipped": None}).splitlines()[2]
    assert line.split()[-2:] == ["3.00", "25%"]


def test_run_puts_the_thread_counts_back(monkeypatch, numba_threads):
    """A library caller keeps its own numba and BLAS thread counts after bench.run, which
    sets them for its cases (the cases stubbed: only the settings around them are tested)."""
    from refnorm.kernels.nn import _blas

    most = bench._thread_limit()
    if most < 2:
        pytest.skip("numba has one thread here: the bench's count could not differ")
    set_threads = bench._set_threads
    _stub_run(monkeypatch)
    monkeypatch.setattr(bench, "_set_threads", set_threads)
    numba_threads.set_num_threads(most)
    blas_before = [lib.num_threads for lib in _blas()]
    report = bench.run(quick=True, threads=1, use_torch=False, step_models=())
    assert report["machine"]["numba_threads"] == 1
    assert numba_threads.get_num_threads() == most
    assert [lib.num_threads for lib in _blas()] == blas_before


# -- what the CLI hands the benches, and what they print ------------------------------------


def test_run_puts_torchs_thread_count_back(monkeypatch, numba_threads):
    """torch's thread count, set for the bench as numba's and BLAS's are, is put back after."""
    set_threads = bench._set_threads
    _stub_run(monkeypatch)
    torch = _Threads(5)
    monkeypatch.setattr(bench, "_set_threads", set_threads)
    monkeypatch.setattr(bench, "_import_torch", lambda enabled: torch if enabled else None)
    report = bench.run(quick=True, threads=1, step_models=())
    assert report["machine"]["torch_threads"] == 1 and report["machine"]["torch"] == "stub"
    assert torch.num_threads == 5


def test_a_torch_that_does_not_import_leaves_its_rows_out(monkeypatch):
    """torch is never a dependency: where ``import torch`` fails the bench runs without its
    rows and says it is not installed (not that --no-torch was given)."""
    import_torch = bench._import_torch
    seen = _stub_run(monkeypatch)
    monkeypatch.setattr(bench, "_import_torch", import_torch)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    report = bench.run(quick=True, step_models=())
    assert report["machine"]["torch"] is None and report["machine"]["torch_requested"]
    assert all("torch" not in impls for impls, _ in seen["rounds"])
    assert all(r["fast_over_torch"] is None for r in report["ratios"])


@pytest.mark.parametrize(("requested", "why"), [(True, "not installed"),
                                                (False, "not timed: --no-torch")])
def test_the_text_report_says_why_torch_has_no_figures(requested, why):
    report = _report()
    report["machine"].update(torch=None, torch_requested=requested)
    del report["machine"]["torch_threads"]
    report["ratios"].append({"case": "sn (2, 64, 32, 32)", "fast_over_reference": 0.5,
                             "fast_over_kernel": 1.25, "fast_over_torch": None,
                             "fast_over_torch_cpu": None, "fast_of_copy": 0.1})
    lines = bench.format_report(report).splitlines()
    assert f"torch - threads ({why})" in lines[0]
    sn = next(line for line in lines if line.startswith("sn (2, 64, 32, 32)"))
    # fast/ref, fast/kernel, no fast/torch and no (cpu) without torch, fast of copy
    assert sn.split()[-5:] == ["0.500", "1.25", "-", "-", "10%"]


def test_crossover_defaults_to_every_thread_numba_allows_and_thirty_repetitions(
        monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(bench, "crossover",
                        lambda threads, repeats, progress: seen.append((threads, repeats)) or {})
    monkeypatch.setattr(bench, "format_crossover", lambda result: "")
    for limit in (2, 3):
        monkeypatch.setattr(bench, "_thread_limit", lambda limit=limit: limit)
        assert bench.main(["--crossover"]) == 0
    assert bench.main(["--crossover", "--threads", "2", "--repeats", "4"]) == 0
    assert seen == [(2, 30), (3, 30), (2, 4)]


def test_the_crossover_text_shows_each_figure_in_its_column():
    rows = [{"case": "gn N=4", "work": 786_432, "unit": "values per loop",
             "one_thread_ms": 0.5, "threads_ms": 0.25, "threads_over_one": 0.5},
            {"case": "conv blocks N=8", "work": 9_437_184, "unit": "forward multiply-adds",
             "one_thread_ms": 1.2, "threads_ms": 1.5, "threads_over_one": 1.25}]
    lines = bench.format_crossover({"threads": 2, "rows": rows,
                                    "load_average": [0.5, 1.0, 1.5]}).splitlines()
    assert lines[0] == "1 thread against 2 (medians, interleaved; load average 0.50 1.00 1.50):"
    assert lines[1].split() == ["case", "work", "1", "thread", "ms", "2", "threads", "ms",
                                "2t/1t"]
    # the work in millions with its unit, the two medians, 2 threads over 1
    assert lines[2].split() == ["gn", "N=4", "0.79M", "values", "per", "loop", "0.500",
                                "0.250", "0.50"]
    assert lines[3].split() == ["conv", "blocks", "N=8", "9.44M", "forward", "multiply-adds",
                                "1.200", "1.500", "1.25"]
    # where the system gives no load average (os.getloadavg fails), a dash, as the bench's
    lines = bench.format_crossover({"threads": 2, "rows": rows,
                                    "load_average": None}).splitlines()
    assert lines[0] == "1 thread against 2 (medians, interleaved; load average -):"


def test_progress_off_a_terminal_is_one_line_per_case(monkeypatch, capsys):
    """On a pipe or a file each case's progress is its first round's line, not one a round."""
    def run(*, progress, **kwargs):
        for case in ("[1/2] bn (2, 64, 32, 32)", "[2/2] training steps"):
            for r in (1, 2, 3):
                progress(f"{case}: round {r}/3")
        return _report()

    monkeypatch.setattr(bench, "run", run)
    assert bench.main(["--repeats", "3"]) == 0
    assert capsys.readouterr().err == ("[1/2] bn (2, 64, 32, 32): round 1/3\n"
                                       "[2/2] training steps: round 1/3\n")


def test_the_gpu_bench_gets_the_repetitions_and_the_torch_choice_given(monkeypatch, capsys):
    """``--device gpu``'s --quick, --repeats, --no-torch and --json reach the GPU bench (a
    stub device and a stub bench: no GPU needed)."""
    from refnorm.cli import main

    runs = []

    def run(*, device, repeats, progress, use_torch):
        runs.append((device.torch_device, use_torch, repeats))
        return {"device": device.name}

    monkeypatch.setattr(bench_gpu, "gpu_device",
                        lambda: bench_gpu.Device(np, "stub", lambda: None, "cuda"))
    monkeypatch.setattr(bench_gpu, "run", run)
    monkeypatch.setattr(bench_gpu, "format_report", lambda report: f"text of {report['device']}")
    assert main(["bench", "--device", "gpu"]) == 0
    assert capsys.readouterr().out == "text of stub\n"
    assert main(["bench", "--device", "gpu", "--quick", "--no-torch", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"device": "stub"}
    assert main(["bench", "--device", "gpu", "--repeats", "2"]) == 0
    assert runs == [("cuda", True, 30), ("cuda", False, 5), ("cuda", True, 2)]


def test_data_parallel_bench_without_mpiexec_says_what_to_install(monkeypatch):
    epoch = {"allreduce_calls_per_step": 2.0, "allreduce_bytes_per_step": 2048,
             "step_ms": 3.0, "collective_share": 0.25}
    monkeypatch.setattr(refnorm.train.loop, "train",
                        lambda config, progress: types.SimpleNamespace(history=[epoch]))
    monkeypatch.setattr(bench_parallel, "find_mpiexec", lambda: None)
    report = bench_parallel.run()
    assert [(r["transport"], r["norm"]) for r in report["rows"]] == [("in-process", "bn"),
                                                                     ("in-process", "syncbn")]
    assert report["mpi_skipped"] == "no mpiexec (install the mpi extra)"
    assert bench_parallel.format_report(report).splitlines()[-1] == (
        "  (MPI not run: no mpiexec (install the mpi extra))")


def test_data_parallel_bench_says_in_one_line_which_mpi_job_failed(monkeypatch, tmp_path,
                                                                    capsys):
    """An mpiexec that fails (here a launcher script that exits 3 with the last words of a
    failing job) ends the bench with status 1 and one line naming the job, its status and the
    last line of its standard error: no traceback."""
    epoch = {"allreduce_calls_per_step": 2.0, "allreduce_bytes_per_step": 2048,
             "step_ms": 3.0, "collective_share": 0.25}
    monkeypatch.setattr(refnorm.train.loop, "train",
                        lambda config, progress: types.SimpleNamespace(history=[epoch]))
    launcher = tmp_path / "mpiexec"
    launcher.write_text("#!/bin/sh\necho 'rank 1: starting' >&2\n"
                        "echo 'Fatal error in PMPI_Init: Other MPI error' >&2\nexit 3\n")
    launcher.chmod(0o755)
    monkeypatch.setattr(bench_parallel, "find_mpiexec", lambda: str(launcher))
    assert bench.main(["--data-parallel"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1] == (
        "refnorm bench: error: --data-parallel: mpiexec -n 2 failed for bn (exit 3): Fatal "
        "error in PMPI_Init: Other MPI error")
    assert "Traceback" not in captured.err


# -- the training steps: the same network on every side ---------------------------------------


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_the_training_step_skips_the_images_gradient(path):
    """As the trainer does, and as PyTorch does for an input that does not require one."""
    assert bench._train_step(path, "bn", batch=(2, 3, 8, 8))() is None


@pytest.mark.parametrize("model", ["bn", "gn", "sn", "gn+ws"])
def test_the_pytorch_step_trains_the_study_model(model):
    """The PyTorch network of the step is the study's model (3x3 convolutions without bias,
    weight-standardized for GN+WS with biased sigma and eps added to sigma (Qiao et al. 2019,
    Eq. 2); the normalizer, GN with G = 4, SN with separate mean and variance ratios (Luo et
    al., Eq. 1-5); ReLU; 2x2 max pools after the first two blocks; global average pool;
    linear): given refnorm's parameters, drawn, in float64, the same loss and the same
    gradient of every parameter as refnorm's step on the same batch."""
    torch = pytest.importorskip("torch")
    batch = (4, 3, 8, 8)
    norm, _, weight = model.partition("+")
    net = ConvNet(in_channels=3, num_classes=10, norm=norm, weight=weight or None,
                  widths=(16, 32, 32), num_groups=STEP_GROUPS, dtype=np.float64)
    rng = np.random.default_rng(6)
    params = [(layer, name) for layer in net.layers() for name in layer.params]
    for layer, name in params:
        if name in ("gamma", "beta", "mean_logits", "var_logits"):
            low, high = (0.5, 1.5) if name == "gamma" else (-1.0, 1.0)
            layer.params[name] = rng.uniform(low, high, layer.params[name].shape)
    step = _train_step_torch(torch, model, batch=batch)
    tnet = inspect.getclosurevars(step).nonlocals["net"].double()
    tparams = list(tnet.parameters())
    assert len(tparams) == len(params)
    with torch.no_grad():
        for p, (layer, name) in zip(tparams, params, strict=True):
            assert p.numel() == layer.params[name].size, name
            p.copy_(torch.from_numpy(layer.params[name]).reshape(p.shape))
    x, labels = _train_batch(shape=batch)
    x = x.astype(np.float64)
    loss, cache = softmax_cross_entropy(net.forward(x, training=True), labels)
    net.backward(softmax_cross_entropy_backward(cache))
    tloss = torch.nn.functional.cross_entropy(tnet(torch.from_numpy(x)),
                                              torch.from_numpy(labels))
    tloss.backward()
    assert tloss.item() == pytest.approx(float(loss), rel=1e-12)
    for p, (layer, name) in zip(tparams, params, strict=True):
        want = layer.grads[name]
        got = p.grad.numpy().reshape(want.shape)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max(),
                                   err_msg=f"{type(layer).__name__} {name}")


def test_python_m_refnorm_bench_says_an_argument_error_in_one_line(capsys):
    """``python -m refnorm.bench`` is ``refnorm bench``: the same one-line error, exit 2."""
    with pytest.raises(SystemExit) as exc:
        bench.main(["--repeats", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("refnorm bench: error: argument --repeats: expected an "
                                       "integer >= 1; got '0' (see refnorm bench --help)\n")


def test_idle_threads_sleep_before_the_bench_can_import_torch():
    """refnorm.bench: OMP_WAIT_POLICY=PASSIVE (refnorm.kernels' setting) is in force before
    torch is imported, so that neither OpenMP pool spins on a core the other needs; importing
    the bench sets it and imports no torch (the bench imports torch itself, later)."""
    code = ("import os, sys, refnorm.bench; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    assert done.stdout.split() == ["PASSIVE", "False"]
