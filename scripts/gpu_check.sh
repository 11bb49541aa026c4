#!/usr/bin/env bash
# One run of every GPU check refnorm has, for a machine with an NVIDIA GPU (docs/gpu.md).
#
#   scripts/gpu_check.sh [OUT]     (OUT: where logs go, default runs/gpu_check)
#
# 1. installs the CuPy wheel matching the driver's CUDA major version into the current
#    Python environment (REFNORM_CUPY overrides: e.g. REFNORM_CUPY=cupy-cuda12x);
# 2. runs the gpu-marked tests (pytest -m gpu), the kernel tests under the simulator too;
# 3. runs the quick study on the GPU (needs `refnorm study --device`);
# 4. runs the GPU bench (refnorm bench --device gpu, 10 repetitions): $OUT/bench.json and
#    $OUT/bench.txt.
# Every step runs even if an earlier one failed; the exit status is 1 if any failed.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, report
    local name=$1; shift
    echo "== $name: $*"
    if "$@" >"$OUT/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $OUT/$name.log)"; tail -n 20 "$OUT/$name.log"; status=1; fi
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || { echo "nvidia-smi failed: no usable GPU here"; exit 1; }
cat "$OUT/nvidia-smi.txt"
if [ -z "${REFNORM_CUPY:-}" ]; then
    major=$(sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' "$OUT/nvidia-smi.txt" | head -n 1)
    case "$major" in
        12) REFNORM_CUPY=cupy-cuda12x ;;
        13) REFNORM_CUPY=cupy-cuda13x ;;
        *) echo "driver CUDA version '$major': set REFNORM_CUPY to the CuPy wheel to use"; exit 1 ;;
    esac
fi
step install "$PY" -m pip install "$REFNORM_CUPY"
step probe "$PY" -c "import cupy, refnorm.backend as b; print(cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'GPU(s)'); assert b.gpu_available(), b.gpu_problem()"
step gpu_tests "$PY" -m pytest -m gpu -rs -p no:cacheprovider tests
step simulator_tests "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_cuda.py
step study "$PY" -m refnorm study --quick --device gpu --out "$OUT/study"
# the report on stdout into bench.json, the progress lines into bench.log
step bench bash -c '"$0" -m refnorm bench --device gpu --repeats 10 --json > "$1"' "$PY" "$OUT/bench.json"
step bench_text bash -c '"$0" -c "import json, sys; from refnorm.bench_gpu import format_report; print(format_report(json.load(open(sys.argv[1]))))" "$1" > "$2"' "$PY" "$OUT/bench.json" "$OUT/bench.txt"
exit $status
