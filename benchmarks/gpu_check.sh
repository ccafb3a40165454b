#!/usr/bin/env bash
# One call on a GPU machine: the GPU tests (kernels, large shapes, integrations), then the --quick benchmark.
#
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/<gpu-name>/, logs beside them
#   OUT=/some/dir bash benchmarks/gpu_check.sh   # results in $OUT/results/<gpu-name>/, logs in $OUT
#
# Each stage has its own time limit (a grid-barrier bug shows up as a hang, not an error), so the whole
# script ends within about 9.5 minutes and leaves its logs whatever happens. Stage limits can be changed
# with TEST_LIMIT / BENCH_LIMIT / SUITE_LIMIT (seconds); SUITE=1 also runs the whole test suite.
# Copy $OUT/results/<gpu-name>/ into benchmarks/results/ and commit it: only measured figures go there.
set -u
cd "$(dirname "$0")/.."

if [ -n "${OUT:-}" ]; then
  RESULTS="$OUT/results"; LOGS="$OUT"
else
  RESULTS="benchmarks/results"; LOGS="benchmarks/results/logs"
fi
mkdir -p "$RESULTS" "$LOGS"
status=0

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$LOGS/nvidia-smi.txt"
python - <<'EOF' 2>&1 | tee "$LOGS/versions.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
assert torch.cuda.is_available(), "no CUDA device"
p = torch.cuda.get_device_properties(0)
print(p.name, "SMs", p.multi_processor_count, "shared optin", getattr(p, "shared_memory_per_block_optin", "n/a"))
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "no usable CUDA device"; exit 2; }

echo "== GPU tests (limit ${TEST_LIMIT:-270} s)"
timeout "${TEST_LIMIT:-270}" python -m pytest -q tests/test_gpu.py tests/test_persistent_fwd.py tests/test_fused_bwd.py \
  tests/test_modules.py tests/test_integrations.py --durations=10 2>&1 | tee "$LOGS/test_gpu.log"
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || { echo "GPU tests: exit $rc (124 = timed out: a hang?)"; status=1; }

echo "== benchmark --quick (limit ${BENCH_LIMIT:-240} s)"
timeout "${BENCH_LIMIT:-240}" python benchmarks/bench.py --quick --out "$RESULTS" 2>&1 | tee "$LOGS/bench_quick.log"
rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || { echo "benchmark: exit $rc (124 = timed out)"; status=1; }

if [ "${SUITE:-0}" = "1" ]; then
  echo "== whole test suite (limit ${SUITE_LIMIT:-400} s)"
  timeout "${SUITE_LIMIT:-400}" python -m pytest -q tests/ 2>&1 | tee "$LOGS/test_suite.log"
  rc=${PIPESTATUS[0]}; [ "$rc" -eq 0 ] || { echo "test suite: exit $rc"; status=1; }
fi

echo "== done (status $status); results under $RESULTS, logs under $LOGS"
exit $status
