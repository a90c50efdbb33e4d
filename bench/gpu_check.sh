#!/usr/bin/env bash
# One short GPU check of the Triton BI kernel, for a fresh GPU machine that holds only this repository:
# compiled (not interpreted) Triton tests, then the GPU benchmark against an HBM ceiling measured in the same run.
#
#   bash bench/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
#
# Writes bench/results/bi_reduce_gpu.json (benchmark), bench/results/gpu_tests.log and
# bench/results/gpu_check.json (what ran, on which GPU, and the test outcome). Exits non-zero if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
RESULTS=bench/results
mkdir -p "$RESULTS"
log() { echo "[gpu_check] $*" >&2; }

# 1. torch with CUDA and triton: use what is installed; try pip only when something is missing.
if ! "$PY" -c "import torch, triton; assert torch.cuda.is_available()" 2>/dev/null; then
    log "torch with CUDA or triton missing; trying pip"
    "$PY" -m pip install -q torch triton || { log "cannot install torch/triton (offline?)"; exit 2; }
    "$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'torch sees no GPU'" || exit 2
fi
for pkg in pytest numpy; do
    "$PY" -c "import $pkg" 2>/dev/null || "$PY" -m pip install -q "$pkg" || { log "need $pkg"; exit 2; }
done

# 2. The package. An editable install also builds the C++ core; where that cannot build (no compiler,
#    no pybind11), a plain copy of the Python sources is enough: the Triton path does not need the extension.
if ! "$PY" -c "import shortgpt_fast.ops.bi_reduce.triton_kernel" 2>/dev/null; then
    if ! "$PY" -m pip install -q -e . --no-deps --no-build-isolation; then
        STAGE="$(mktemp -d)"
        cp -r shortgpt_fast "$STAGE/"
        export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
        log "editable install failed; using a source copy in $STAGE"
    fi
fi
"$PY" -c "import shortgpt_fast.ops.bi_reduce.triton_kernel as t; assert t._TRITON_PROBLEM is None, t._TRITON_PROBLEM" \
    || { log "the Triton backend does not import"; exit 2; }

# 3. Compiled Triton tests: TRITON_INTERPRET=0 overrides the interpreter default of tests/conftest.py, so the
#    Triton cases run on CUDA tensors, including the large shapes and the autotuned-vs-fixed bit check.
#    addopts is cleared because it names pytest-benchmark, which this machine may lack.
export TRITON_INTERPRET=0
"$PY" -m pytest tests/test_bi_reduce.py -k "triton" -q -o addopts="" -p no:cacheprovider 2>&1 \
    | tee "$RESULTS/gpu_tests.log"
TEST_STATUS=${PIPESTATUS[0]}

# 4. Benchmark: GB/s of the Triton kernel, fp32-sum read ceiling and a 4 GiB device copy, torch, cosine.
"$PY" bench/bench_bi_reduce.py --device cuda --rounds 20 --out "$RESULTS/bi_reduce_gpu.json"
BENCH_STATUS=$?

"$PY" - "$TEST_STATUS" "$BENCH_STATUS" <<'EOF'
import json, sys, time, torch, triton
tests, bench = int(sys.argv[1]), int(sys.argv[2])
summary = open("bench/results/gpu_tests.log").read().strip().splitlines()
json.dump({
    "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "command": "bash bench/gpu_check.sh",
    "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "triton": triton.__version__,
    "triton_tests_exit_code": tests, "triton_tests_summary": summary[-1] if summary else "",
    "benchmark_exit_code": bench, "benchmark_json": "bench/results/bi_reduce_gpu.json",
}, open("bench/results/gpu_check.json", "w"), indent=2)
print(open("bench/results/gpu_check.json").read())
EOF
[ "$TEST_STATUS" -eq 0 ] && [ "$BENCH_STATUS" -eq 0 ]
