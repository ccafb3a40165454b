#!/usr/bin/env bash
# One call on a GPU machine (each stage prints its seconds when it ends): a smoke check of every anchor
# shape's plan (stops here if it fails or hangs), the GPU tests, the --quick benchmark; optionally a
# tuning sweep (TUNE=1), a per-kernel profile with one Nsight Compute report (PROFILE=1) and char_lm's
# tokens/s against cuDNN (EXAMPLES=1).
#
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/<gpu-name>/, logs in benchmarks/results/logs/
#   OUT=/some/dir bash benchmarks/gpu_check.sh   # everything packed into $OUT: gpu_check.tgz (results, plots,
#                                                # logs), summary.md and gpu_check.log: three files
#
# Each stage has its own time limit (`timeout -k 5`: a grid-barrier bug shows up as a stage that timed
# out, exit 124, and the barrier's own bound raises after tens of seconds). Limits, in seconds:
# SMOKE_LIMIT / BENCH_LIMIT / TUNE_LIMIT / PROFILE_LIMIT / TEST_LIMIT / EXAMPLES_LIMIT / SUITE_LIMIT, and
# TOTAL_LIMIT for the whole script (a stage gets no more than what is left of it, less 20 s to pack the
# results; a stage with under 30 s left is skipped): set it under the device call's own limit, so that
# whatever ran comes back. BENCH=0 leaves out the --quick benchmark; LAYER_BY_LAYER=0 leaves out the stacks'
# layer-by-layer A/B (it runs only with the benchmark's stage anyway);
# TUNE=1 adds the sweep (TUNE_SHAPES, e.g. "--shape 256 64 1024 1024", else the anchors; TUNE_MODE,
# TUNE_DTYPES, TUNE_BUDGET choose what it sweeps); VARIANTS=1 times the kernels plain and with each variant
# (VARIANTS_LIMIT per stage, VARIANTS_BUDGET per shape); FUSED=1 times the input
# product formed in the kernel at B = 256 (the LSTM's and the GRU's plans with and without it); DROPOUT=1
# times a 4-layer training step with dropout between layers (gpu_smoke.py --dropout-timing); PROJECTION=1
# times an LSTM with projections against cuDNN's and our per-step path, and projected stacks in one launch
# against layer by layer (gpu_smoke.py --projection-timing);
# STACK_VARIANTS=1 times the stack's one-tile schedule against its planned schedule, and its backward chain
# in one K loop (tune.py --layers 4);
# BIDIR_VARIANTS=1 times bidirectional layers with the gate dot (tune.py --bidirectional); BWD_VARIANTS=1 the
# backward chain with its operands prefetched (tune.py --mode bwd --variants prefetch); TESTS=0 leaves out
# the GPU tests (a second call of a session that ran them in its first), SMOKE=0 the smoke stages (the
# same); SUITE=1 also
# runs the whole suite. DRY_RUN=1 prints each stage's command instead of running it (no GPU needed: the
# tests check that every script accepts what this file passes it).
# Copy results/<gpu-name>/ into benchmarks/results/ and commit it: only measured figures go there.
set -u
cd "$(dirname "$0")/.."

if [ -n "${OUT:-}" ]; then
  WORK="$(mktemp -d)/gpu_check"; RESULTS="$WORK/results"; LOGS="$WORK"
else
  RESULTS="benchmarks/results"; LOGS="benchmarks/results/logs"
fi
mkdir -p "$RESULTS" "$LOGS"
PY=${PYTHON:-python3}
status=0
exec > >(tee "$LOGS/gpu_check.log") 2>&1

DRY_RUN=${DRY_RUN:-0}
echo "== device"
[ "$DRY_RUN" = "1" ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$LOGS/nvidia-smi.txt"
[ "$DRY_RUN" = "1" ] || "$PY" - <<'PYEOF' 2>&1 | tee "$LOGS/versions.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
assert torch.cuda.is_available(), "no CUDA device"
p = torch.cuda.get_device_properties(0)
print(p.name, "SMs", p.multi_processor_count, "shared optin", getattr(p, "shared_memory_per_block_optin", "n/a"))
PYEOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "no usable CUDA device"; exit 2; }

DEADLINE=$(( $(date +%s) + ${TOTAL_LIMIT:-100000} ))
stage() {  # stage NAME LIMIT LOG command...: returns the command's status (124: timed out, 125: skipped)
  local name=$1 limit=$2 log=$3; shift 3
  local left=$(( DEADLINE - $(date +%s) - 20 ))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped, ${left} s left of TOTAL_LIMIT"; status=1; return 125; fi
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$DRY_RUN" = "1" ]; then printf '== dry-run %s =>' "$name"; printf ' %q' "$@"; echo; return 0; fi
  echo "== $name (limit $limit s)"
  local started=$(date +%s)
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$LOGS/$log"
  local rc=${PIPESTATUS[0]}
  # Each stage's seconds, for planning the next session's device minutes.
  echo "== $name: $(( $(date +%s) - started )) s"
  [ "$rc" -eq 0 ] || { echo "$name: exit $rc (124 = timed out: a hang?)"; status=1; }
  return "$rc"
}

finish() {
  echo "== done (status $status); results under $RESULTS, logs under $LOGS"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    find "$RESULTS" -name summary.md -exec cp {} "$OUT/summary.md" \; 2>/dev/null
    cp "$LOGS/gpu_check.log" "$OUT/gpu_check.log"
    tar czf "$OUT/gpu_check.tgz" -C "$(dirname "$WORK")" gpu_check
  fi
  exit "$status"
}
export PYTHONUNBUFFERED=1

# Does each anchor shape's plan fit, launch and agree with cuDNN (and it warms Triton's cache). If not,
# nothing after it would mean much.
# Exit 3: a check FAILED (a plan that did not run or disagrees, an error past gpu_smoke.py's bounds, the GRU's):
# reported, and the later stages still run; any other failure stops here.
# SMOKE=0 leaves both smoke stages out: only for a later call on the same warm machine whose first call
# passed them.
if [ "${SMOKE:-1}" = "1" ]; then
  stage "smoke" "${SMOKE_LIMIT:-90}" smoke.log "$PY" benchmarks/gpu_smoke.py
  rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] || finish
  # The stacked kernels' cross-layer waits: if they disagree or hang, the stages after this run the stacks
  # layer by layer, and the run reports it (status 1).
  if ! stage "stack smoke" "${STACK_SMOKE_LIMIT:-120}" stack_smoke.log "$PY" benchmarks/gpu_smoke.py --stack; then
    echo "stack smoke failed: TRITON_LSTM_STACK=0 and TRITON_LSTM_BIDIRECTIONAL=0 for the remaining stages"
    export TRITON_LSTM_STACK=0 TRITON_LSTM_BIDIRECTIONAL=0
  fi
fi

# The GPU tests right after the smoke checks (correct first: their results stand even where a later
# stage runs out of the call's time). Parallel workers and a per-test limit where the plugins are installed
# (the GPU test host has both); -v prints each test's outcome as it ends, so a stage cut at its limit still
# says which tests passed and failed (pytest killed by `timeout` prints no summary).
PYTEST_EXTRA=()
"$PY" -c "import xdist" 2>/dev/null && PYTEST_EXTRA+=(-n "${WORKERS:-8}")
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_EXTRA+=(--timeout "${PER_TEST_LIMIT:-120}")
# TRITON_LSTM_ERROR_LOG: every comparison's errors, ours and PyTorch's (tests/helpers.py), to set the
# tests' error floor from bf16 figures.
[ "${TESTS:-1}" = "1" ] && stage "GPU tests" "${TEST_LIMIT:-300}" test_gpu.log env TRITON_LSTM_ERROR_LOG="$LOGS/test_errors.jsonl" \
  "$PY" -m pytest -v "${PYTEST_EXTRA[@]}" tests/test_gpu.py \
  tests/test_persistent_fwd.py tests/test_fused_bwd.py tests/test_modules.py tests/test_integrations.py \
  tests/test_stack.py tests/test_bidirectional.py tests/test_peephole.py tests/test_gru.py tests/test_variants.py \
  tests/test_projection.py \
  tests/test_examples.py::test_examples_run_on_cuda \
  --durations=10

if [ "${DROPOUT:-0}" = "1" ] && [ "${TRITON_LSTM_STACK:-1}" = "1" ]; then
  # A 4-layer training step with dropout between layers: in the stacked launches, layer by layer with
  # F.dropout, without dropout, and cuDNN's (benchmarks/NOTES.md, "Dropout between layers").
  stage "dropout timing" "${DROPOUT_LIMIT:-90}" dropout_timing.log "$PY" benchmarks/gpu_smoke.py --dropout-timing
fi

if [ "${PROJECTION:-0}" = "1" ]; then
  # proj_size > 0 on the plain LSTM's kernels (benchmarks/NOTES.md, "proj_size > 0").
  stage "projection timing" "${PROJECTION_LIMIT:-180}" projection_timing.log "$PY" benchmarks/gpu_smoke.py --projection-timing
fi

if [ "${BENCH:-1}" = "1" ]; then
  stage "benchmark --quick" "${BENCH_LIMIT:-210}" bench_quick.log "$PY" benchmarks/bench.py --quick --plan --out "$RESULTS" \
    --provider triton_lstm cudnn cell_loop triton_peephole triton_gru cudnn_gru
fi
# The stacks again with every layer and direction launched on its own (TRITON_LSTM_STACK=0,
# TRITON_LSTM_BIDIRECTIONAL=0): what one launch per stack / per bidirectional layer gains, same run.
if [ "${BENCH:-1}" = "1" ] && [ "${LAYER_BY_LAYER:-1}" = "1" ]; then
  stage "stacks layer by layer" "${BENCH_LIMIT:-210}" bench_layer_by_layer.log \
    env TRITON_LSTM_STACK=0 TRITON_LSTM_BIDIRECTIONAL=0 "$PY" \
    benchmarks/bench.py --cases stacked --dtype bf16 --provider triton_lstm --plan --no-plots --out "$LOGS/layer_by_layer"
fi

if [ "${TUNE:-0}" = "1" ]; then
  # shellcheck disable=SC2086 (the lists are meant to split)
  stage "tune" "${TUNE_LIMIT:-120}" tune.log "$PY" benchmarks/tune.py ${TUNE_SHAPES:---anchors} --max-T 128 \
    --mode ${TUNE_MODE:-fwd bwd} --dtype ${TUNE_DTYPES:-bf16} --budget-s "${TUNE_BUDGET:-6}" --csv "$LOGS/tune.csv"
fi

if [ "${VARIANTS:-0}" = "1" ]; then
  # The kernel variants against the plain kernels, kernel-only, each plan timed with every combination in
  # a row (benchmarks/NOTES.md, "Since run 12"; run 13 measured them and the planner took some): one dot for the four
  # gates and the streamed one-tile schedule at the anchors and for the GRU at B = 256 and H = 1024 (where
  # the planned plan streams past K = 512, third in line: W_hh resident with the gate dot); the
  # 4-layer stack with the gate dot and its next input product ahead of the barrier wait, on the planned
  # streamed tiles and on resident 64 × 16 ones (twice the budget: two plans of four combinations).
  stage "variants: anchors" "${VARIANTS_LIMIT:-150}" variants.log "$PY" benchmarks/tune.py --anchors --mode fwd \
    --variants gate_dot streamed_one_tile --max-T 128 --budget-s "${VARIANTS_BUDGET:-20}" --csv "$LOGS/variants.csv"
  stage "variants: stack" "${VARIANTS_LIMIT:-150}" variants_stack.log "$PY" benchmarks/tune.py --shape 512 64 512 512 \
    --layers 4 --mode fwd --variants gate_dot input_ahead --max-T 128 --budget-s "$(( ${VARIANTS_BUDGET:-20} * 2 ))" \
    --csv "$LOGS/variants_stack.csv"
  stage "variants: GRU" "${VARIANTS_LIMIT:-150}" variants_gru.log "$PY" benchmarks/tune.py --shape 128 256 512 512 \
    --shape 256 64 1024 1024 --cell gru --mode fwd --variants gate_dot streamed_one_tile --max-T 128 \
    --budget-s "${VARIANTS_BUDGET:-20}" --csv "$LOGS/variants_gru.csv"
fi

if [ "${STACK_VARIANTS:-0}" = "1" ]; then
  # The stack's one-tile schedule (stack_layer's ONE_TILE: h and c in registers across steps, an LSTM's two
  # products with the gate dot in one K loop) against the planned stack, each with and without the gate dot,
  # on the 4-layer anchor, the planner's plan first (benchmarks/NOTES.md, "The stack's one-tile schedule").
  stage "variants: stack one tile" "${VARIANTS_LIMIT:-150}" variants_stack_one_tile.log "$PY" benchmarks/tune.py \
    --shape 512 64 512 512 --layers 4 --mode fwd --variants gate_dot streamed_one_tile --max-T 128 \
    --budget-s "${VARIANTS_BUDGET:-20}" --csv "$LOGS/variants_stack_one_tile.csv"
  # Its backward chain with a layer's two products in one K loop (backward_plans.STACK_ONE_LOOP), with and
  # without the prefetch, on the planner's tiles only (a 1-s budget leaves the tile sweep out).
  stage "variants: stack chain in one loop" "${VARIANTS_LIMIT:-150}" bwd_variants_stack_one_loop.log "$PY" \
    benchmarks/tune.py --shape 512 64 512 512 --layers 4 --mode bwd --variants prefetch one_loop --max-T 128 \
    --budget-s 1 --csv "$LOGS/bwd_variants_stack_one_loop.csv"
fi

if [ "${BWD_VARIANTS:-0}" = "1" ]; then
  # The backward chain with each step's saved operands loaded a step ahead (backward_plans.PREFETCH), against
  # the planned chain, at the anchors and for the 4-layer stack (benchmarks/NOTES.md, "The backward chain's
  # prefetch").
  stage "bwd variants: anchors" "${VARIANTS_LIMIT:-150}" bwd_variants.log "$PY" benchmarks/tune.py --anchors --mode bwd \
    --variants prefetch --max-T 128 --budget-s "${VARIANTS_BUDGET:-20}" --csv "$LOGS/bwd_variants.csv"
  stage "bwd variants: stack" "${VARIANTS_LIMIT:-150}" bwd_variants_stack.log "$PY" benchmarks/tune.py \
    --shape 512 64 512 512 --layers 4 --mode bwd --variants prefetch --max-T 128 --budget-s "${VARIANTS_BUDGET:-20}" \
    --csv "$LOGS/bwd_variants_stack.csv"
fi

if [ "${BIDIR_VARIANTS:-0}" = "1" ]; then
  # Bidirectional layers, which still run four dots (run 13 timed the gate dot on one direction only): the
  # planner's plan, with 16-unit hidden blocks, each with the gate dot and the one-tile schedule, at the
  # benchmark's bidirectional shape and at H = 1024 (benchmarks/NOTES.md, "Run 13").
  for cell in lstm gru; do
    stage "variants: bidirectional $cell" "${VARIANTS_LIMIT:-150}" "variants_bidir_$cell.log" "$PY" benchmarks/tune.py \
      --shape 256 64 512 512 --shape 256 32 1024 1024 --bidirectional --cell "$cell" --mode fwd \
      --variants gate_dot streamed_one_tile --max-T 128 --budget-s "${VARIANTS_BUDGET:-20}" \
      --csv "$LOGS/variants_bidir_$cell.csv"
  done
fi

if [ "${FUSED:-0}" = "1" ]; then
  # Layer 0's input product formed in the kernel (ForwardPlan.fused_input: no projection GEMM before the
  # launch) at B = 256, I = H = 512, where the LSTM's whole call spends 0.8 and the GRU's 1.9 us per step
  # outside the recurrence kernel: each plan alone, with it (and the input product ahead, which the resident
  # tile needs to fit) and with the gate dot, against the plain plan plus the GEMM (NOTES, "Since run 12").
  for cell in lstm gru; do
    stage "variants: fused input, $cell" "${VARIANTS_LIMIT:-150}" "variants_fused_$cell.log" "$PY" benchmarks/tune.py \
      --shape 128 256 512 512 --cell "$cell" --mode fwd --variants fused_input input_ahead gate_dot --max-T 128 \
      --budget-s "$(( ${VARIANTS_BUDGET:-20} * 2 ))" --csv "$LOGS/variants_fused_$cell.csv"
  done
fi

if [ "${PROFILE:-0}" = "1" ]; then
  # Per-kernel device time of a training step at the shapes that miss a target, ours and cuDNN's; then
  # Nsight Compute on one persistent-forward launch at H = 1024 (throughputs, stall reasons).
  # PROFILE_ARGS / NCU_ARGS choose the shapes (e.g. "--shape 512 64 512 512 --layers 4": a stack).
  # shellcheck disable=SC2086 (the arguments are meant to split)
  stage "profile" "${PROFILE_LIMIT:-60}" profile.log "$PY" benchmarks/profile_step.py ${PROFILE_ARGS:-}
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -n "$NCU" ]; then
    # shellcheck disable=SC2086
    stage "ncu" "${PROFILE_LIMIT:-60}" ncu.log "$NCU" --clock-control none -k regex:persistent --launch-skip 3 \
      --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section LaunchStats "$PY" benchmarks/profile_step.py --ncu ${NCU_ARGS:---shape 256 64 1024 1024}
  fi
fi

if [ "${EXAMPLES:-0}" = "1" ]; then
  # char_lm's GPU preset (2 layers of 512, bf16 autocast), shortened: tokens/s of both modules side by side.
  stage "char_lm --impl both" "${EXAMPLES_LIMIT:-90}" char_lm.log env PYTHONPATH=".:${PYTHONPATH:-}" "$PY" examples/char_lm.py --device cuda \
    --impl both --steps "${EXAMPLE_STEPS:-300}" --no-progress --log-every 100 --out-dir "$LOGS/char_lm_out"
  # The same model with GRUs: triton_lstm.GRU (its stack in one launch) against cuDNN's nn.GRU.
  stage "char_lm --impl both --cell gru" "${EXAMPLES_LIMIT:-90}" char_lm_gru.log env PYTHONPATH=".:${PYTHONPATH:-}" "$PY" \
    examples/char_lm.py --device cuda --impl both --cell gru --steps "${EXAMPLE_STEPS:-300}" --no-progress --log-every 100 \
    --out-dir "$LOGS/char_lm_gru_out"
fi

if [ "${SUITE:-0}" = "1" ]; then
  stage "whole test suite" "${SUITE_LIMIT:-400}" test_suite.log "$PY" -m pytest -q "${PYTEST_EXTRA[@]}" tests/
fi

finish
