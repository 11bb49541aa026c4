"""refnorm.bench runs end to end and its JSON report has the documented structure.

No timing is asserted (timings are benchmarks, never test outcomes); one repetition keeps it
short.
"""

from __future__ import annotations

import json
import math

import pytest

from refnorm import bench
from refnorm.backend import gpu_available, gpu_problem


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
