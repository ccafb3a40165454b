#!/usr/bin/env bash
# One call on a GPU machine: a smoke check of every anchor shape's plan, the --quick benchmark, a tuning
# sweep of the anchor shapes (tune.py), then the GPU tests (kernels, large shapes, integrations).
#
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/<gpu-name>/, logs beside them
#   OUT=/some/dir bash benchmarks/gpu_check.sh   # results in $OUT/results/<gpu-name>/, logs in $OUT
#
# Each stage has its own time limit (a grid-barrier bug shows up as a hang, not an error), so the whole
# script ends within about 8 minutes and leaves its logs whatever happens. Stage limits can be changed
# with SMOKE_LIMIT / BENCH_LIMIT / TUNE_LIMIT / TEST_LIMIT / SUITE_LIMIT (seconds); TUNE=0 skips the
# sweep, TUNE_MODE / TUNE_DTYPES / TUNE_BUDGET choose what it sweeps; SUITE=1 also runs the whole suite.
# Copy $OUT/results/<gpu-name>/ into benchmarks/results/ and commit it: only measured figures go there.
set -u
cd "$(dirname "$0")/.."

if [ -n "${OUT:-}" ]; then
  RESULTS="$OUT/results"; LOGS="$OUT"
else
  RESULTS="benchmarks/results"; LOGS="benchmarks/results/logs"
fi
mkdir -p "$RESULTS" "$LOGS"
PY=${PYTHON:-python3}
status=0

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$LOGS/nvidia-smi.txt"
"$PY" - <<'EOF' 2>&1 | tee "$LOGS/versions.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
assert torch.cuda.is_available(), "no CUDA device"
p = torch.cuda.get_device_properties(0)
print(p.name, "SMs", p.multi_processor_count, "shared optin", getattr(p, "shared_memory_per_block_optin", "n/a"))
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "no usable CUDA device"; exit 2; }

stage() {  # stage NAME LIMIT LOG command...: a hang shows up as exit 124 and the next stage still runs
  local name=$1 limit=$2 log=$3; shift 3
  echo "== $name (limit $limit s)"
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "$name: exit $rc (124 = timed out: a hang?)"; status=1; }
}
export PYTHONUNBUFFERED=1

# Seconds: does each anchor shape's plan fit, launch and agree with cuDNN (and it warms Triton's cache).
stage "smoke" "${SMOKE_LIMIT:-90}" smoke.log "$PY" benchmarks/gpu_smoke.py

stage "benchmark --quick" "${BENCH_LIMIT:-130}" bench_quick.log "$PY" benchmarks/bench.py --quick --out "$RESULTS"

if [ "${TUNE:-1}" = "1" ]; then
  # shellcheck disable=SC2086 (the lists are meant to split)
  stage "tune (anchor shapes)" "${TUNE_LIMIT:-90}" tune.log "$PY" benchmarks/tune.py --anchors --max-T 128 \
    --mode ${TUNE_MODE:-fwd bwd} --dtype ${TUNE_DTYPES:-bf16} --budget-s "${TUNE_BUDGET:-6}" --csv "$LOGS/tune.csv"
fi

# Parallel workers and a per-test limit where the plugins are installed (the GPU test host has both).
PYTEST_EXTRA=()
"$PY" -c "import xdist" 2>/dev/null && PYTEST_EXTRA+=(-n "${WORKERS:-8}")
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_EXTRA+=(--timeout "${PER_TEST_LIMIT:-120}")
stage "GPU tests" "${TEST_LIMIT:-150}" test_gpu.log "$PY" -m pytest -q "${PYTEST_EXTRA[@]}" tests/test_gpu.py \
  tests/test_persistent_fwd.py tests/test_fused_bwd.py tests/test_modules.py tests/test_integrations.py --durations=10

if [ "${SUITE:-0}" = "1" ]; then
  stage "whole test suite" "${SUITE_LIMIT:-400}" test_suite.log "$PY" -m pytest -q "${PYTEST_EXTRA[@]}" tests/
fi

echo "== done (status $status); results under $RESULTS, logs under $LOGS"
exit $status
