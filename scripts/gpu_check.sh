#!/usr/bin/env bash
# One run of every GPU check refnorm has, for a machine with an NVIDIA GPU (docs/gpu.md).
#
#   scripts/gpu_check.sh [OUT]     (OUT: where logs go, default runs/gpu_check)
#
# 1. installs the CuPy wheel matching the driver's CUDA major version into the Python
#    environment, unless CuPy imports already (REFNORM_CUPY overrides the wheel's name: e.g.
#    REFNORM_CUPY=cupy-cuda12x; on a machine without an index, install it beforehand);
# 2. runs the gpu-marked tests (pytest -m gpu) but the study's and the bench's, which steps 4
#    and 5 run themselves: the step fails if no GPU test ran (all skipped is not a pass);
# 3. runs the kernel tests without a GPU too: PTX compilation and the CUDA simulator;
# 4. runs the quick study on the GPU;
# 5. runs the GPU bench (refnorm bench --device gpu, 10 repetitions): $OUT/bench.json and
#    $OUT/bench.txt.
# Every step runs even if an earlier one failed, each under a time limit (STEP_SECONDS,
# default 600); the exit status is 1 if any failed. PYTHON names the interpreter (default:
# .venv/bin/python where it exists, else python3). numba compiles its CUDA kernels with the
# CUDA toolkit's NVVM: CUDA_HOME, /usr/local/cuda, or a conda environment.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
LIMIT=${STEP_SECONDS:-600}
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, report
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    if timeout "$LIMIT" "$@" >"$OUT/$name.log" 2>&1; then
        echo "   ok ($((SECONDS - start)) s)"
    else
        echo "   FAILED after $((SECONDS - start)) s (see $OUT/$name.log)"
        tail -n 20 "$OUT/$name.log"; status=1
    fi
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || { echo "nvidia-smi failed: no usable GPU here"; exit 1; }
cat "$OUT/nvidia-smi.txt"
if ! "$PY" -c "import cupy" >/dev/null 2>&1; then
    if [ -z "${REFNORM_CUPY:-}" ]; then
        major=$(sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' "$OUT/nvidia-smi.txt" | head -n 1)
        case "$major" in
            12) REFNORM_CUPY=cupy-cuda12x ;;
            13) REFNORM_CUPY=cupy-cuda13x ;;
            *) echo "driver CUDA version '$major': set REFNORM_CUPY to the CuPy wheel to use"
               exit 1 ;;
        esac
    fi
    step install "$PY" -m pip install "$REFNORM_CUPY>=14.1"
fi
step probe "$PY" -c "import cupy, numba, refnorm.backend as b; print('CuPy', cupy.__version__, 'numba', numba.__version__, cupy.cuda.runtime.getDeviceCount(), 'GPU(s)'); assert b.gpu_available(), b.gpu_problem()"
step gpu_tests "$PY" -m pytest -m gpu -rs -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
    --ignore=tests/gpu/test_study.py --ignore=tests/gpu/test_bench.py tests
step gpu_tests_ran "$PY" -c "
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
n, skipped = int(suite.get('tests')), int(suite.get('skipped'))
print(n - skipped, 'GPU tests ran,', skipped, 'skipped')
sys.exit(0 if n > skipped else 'no GPU test ran: every one was skipped')" "$OUT/gpu_tests.xml"
step kernel_tests "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_cuda.py
step study "$PY" -m refnorm study --quick --device gpu --out "$OUT/study"
# the report on stdout into bench.json, the progress lines into bench.log
step bench bash -c '"$0" -m refnorm bench --device gpu --repeats 10 --json > "$1"' "$PY" "$OUT/bench.json"
step bench_text bash -c '"$0" -c "import json, sys; from refnorm.bench_gpu import format_report; print(format_report(json.load(open(sys.argv[1]))))" "$1" > "$2"' "$PY" "$OUT/bench.json" "$OUT/bench.txt"
exit $status
