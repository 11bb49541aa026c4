"""refnorm.bench runs end to end and its JSON report has the documented structure.

No timing is asserted (timings are benchmarks, never test outcomes); one repetition keeps it
short.
"""

from __future__ import annotations

import json
import math

import pytest

from refnorm import bench


@pytest.mark.parametrize("torch_flag", [["--no-torch"], []], ids=["without-torch", "as-installed"])
def test_quick_json_report_structure(capsys, torch_flag):
    assert bench.main(["--quick", "--json", "--repeats", "1"] + torch_flag) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert "[1/" in out.err  # the progress line goes to stderr, never into the JSON
    machine = report["machine"]
    assert machine["numba_threads"] >= 1 and "blas_threads" in machine
    has_torch = machine["torch"] is not None
    assert not (has_torch and torch_flag)
    assert report["copy_gb_per_s"] > 0
    cases = {(m, tuple(s)) for m in bench.METHODS for s in bench.SHAPES}
    seen = {(t["method"], tuple(t["shape"]), t["impl"]) for t in report["timings"]}
    for method, shape in cases:
        impls = {"reference", "fast"} | ({"torch"} if has_torch and method != "sn" else set())
        assert {(method, shape, i) for i in impls} <= seen
    for t in report["timings"]:
        assert t["repeats"] == 1
        assert t["min_ms"] <= t["q1_ms"] <= t["median_ms"] <= t["q3_ms"] <= t["max_ms"]
        assert t["gb_per_s"] > 0 and t["bytes_moved"] == 5 * 4 * _size(t["shape"])
    assert {(r["method"], tuple(r["shape"])) for r in report["ratios"]} == cases
    for r in report["ratios"]:
        assert r["fast_over_reference"] > 0
        assert (r["fast_over_torch"] is None) == (not has_torch or r["method"] == "sn")
    step = {t["impl"] for t in report["train_step"]["timings"]}
    assert step == {"reference", "fast"} | ({"torch"} if has_torch else set())
    assert machine["fast_path"] == "numba kernels"


def _size(shape) -> int:
    return math.prod(shape)


def test_text_report_and_bad_arguments(capsys):
    assert bench.main(["--quick", "--repeats", "1", "--no-torch"]) == 0
    text = capsys.readouterr().out
    assert "copy bandwidth" in text and "fast/ref" in text and "training step" in text
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])


def test_the_refnorm_command_runs_the_bench_and_says_the_gpu_bench_is_not_built(capsys):
    from refnorm.cli import main

    assert main(["bench", "--quick", "--json", "--repeats", "1", "--no-torch"]) == 0
    assert "timings" in json.loads(capsys.readouterr().out)
    assert main(["bench", "--device", "gpu"]) == 2  # on any machine: not built (docs/gpu.md)
    err = capsys.readouterr().err.strip()
    assert err.startswith("refnorm bench: error: --device gpu: the GPU bench is not built")
    assert "\n" not in err


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
