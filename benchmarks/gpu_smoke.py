"""First look on a GPU, in seconds: does each anchor shape's planned kernel fit, run and agree with cuDNN?

    python benchmarks/gpu_smoke.py
    python benchmarks/gpu_smoke.py --stack    # the stacked kernels against the same model layer by layer
    python benchmarks/gpu_smoke.py --dropout-timing   # a 4-layer training step with dropout between layers
    python benchmarks/gpu_smoke.py --projection-timing   # an LSTM with projections (proj_size > 0)
    python benchmarks/gpu_smoke.py --single-step    # the single-step timing alone

For each anchor shape (bf16, fp32): the forward plan, whether that exact plan compiles within the device's
resources and is accepted as a cooperative grid (no silent fallback), the recurrence's agreement with the
per-step kernel, and triton_lstm.LSTM against cuDNN nn.LSTM on the same weights (output and, in bf16, the
weight gradient; triton_lstm.GRU against nn.GRU likewise). Then the single-step call (T = 1, B = 8, H = 512: an RL rollout) timed as wall clock
per call against nn.LSTM, host overhead included. Also warms Triton's cache for the benchmark that follows.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import triton_lstm  # noqa: E402
from triton_lstm.benchmark_cases import ANCHOR_CASES  # noqa: E402
from triton_lstm.kernels import common  # noqa: E402
from triton_lstm.kernels import forward_plans  # noqa: E402
from triton_lstm.kernels import lstm_fwd_persistent as fwd  # noqa: E402
from triton_lstm.kernels.lstm_fwd import lstm_fwd  # noqa: E402


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).norm() / theirs.double().norm().clamp_min(1e-30)).item()


# Relative errors past which the smoke flags a check FAILED (status 3: reported, the later stages still run;
# the GPU tests hold the tight bounds). Run 13 (H200, bf16): 3.0e-3 against cuDNN's output, 4.8-5.1e-3 on
# dW_hh.
AGAINST_PER_STEP = {torch.bfloat16: 2e-2, torch.float32: 1e-3}
AGAINST_CUDNN = 3e-2


def check_plan(T, B, H, dtype):
    """(line, ok): the planned persistent forward against the per-step kernel on random gate inputs."""
    projected = torch.randn(T, B, 4 * H, device="cuda", dtype=dtype)
    w_hh = (torch.randn(4 * H, H, device="cuda") * H**-0.5).to(dtype)
    h0, c0 = torch.randn(2, B, H, device="cuda", dtype=dtype)
    plan = fwd.plan_for(projected, w_hh)
    line = f"plan {plan.reason}: bb{plan.block_b} bh{plan.block_h} bk{plan.block_k} w{plan.num_warps} grid {plan.grid_h}x{plan.grid_b}"
    if not plan.persistent:
        return line, True
    try:
        ours = fwd.lstm_fwd_persistent_strict(projected, h0, c0, w_hh, plan)[0]
    except Exception as error:  # noqa: BLE001 (report and go on)
        return f"{line} -> {type(error).__name__}: {str(error).splitlines()[0][:100]} FAILED", False
    steps = lstm_fwd(projected, h0, c0, w_hh, None)[0]
    error = relative_error(ours, steps)
    ok = error <= AGAINST_PER_STEP[dtype]
    return f"{line} -> runs; vs per-step kernel rel err {error:.2e}{'' if ok else ' FAILED'}", ok


def against_cudnn(case, dtype, cell="lstm"):
    """triton_lstm.LSTM (or GRU) against cuDNN's nn.LSTM (or nn.GRU) on the same weights."""
    torch.manual_seed(0)
    theirs_class, ours_class = (nn.GRU, triton_lstm.GRU) if cell == "gru" else (nn.LSTM, triton_lstm.LSTM)
    theirs = theirs_class(case.I, case.H, device="cuda", dtype=dtype)
    ours = ours_class(case.I, case.H, device="cuda", dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    T = min(case.T, 128)
    x = torch.randn(T, case.B, case.I, device="cuda", dtype=dtype)
    out_theirs, _ = theirs(x)
    out_ours, _ = ours(x)
    grad = torch.randn_like(out_ours)
    out_theirs.backward(grad)
    out_ours.backward(grad)
    errors = relative_error(out_ours, out_theirs), relative_error(ours.weight_hh_l0.grad, theirs.weight_hh_l0.grad)
    ok = max(errors) <= AGAINST_CUDNN
    return (f"{cell} vs cuDNN (T={T}): out rel err {errors[0]:.2e}, dW_hh rel err {errors[1]:.2e}"
            f"{'' if ok else ' FAILED'}"), ok


def single_step(calls=300):
    """Wall clock per call, host overhead included: nn.LSTM, ours, and ours on the per-step kernel
    (TRITON_LSTM_PERSISTENT=0: no cooperative launch, no barrier counters or failure watch), which
    separates what the persistent launch itself costs the host. Then ours at T = 2, which one step does
    not take: the persistent launch (its GPU work is microseconds, so this is its host time per call, to
    set against a whole call's GPU time: where the host takes longer, the call is host-bound)."""
    torch.manual_seed(0)
    theirs = nn.LSTM(512, 512, device="cuda", dtype=torch.bfloat16)
    ours = triton_lstm.LSTM(512, 512, device="cuda", dtype=torch.bfloat16)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 8, 512, device="cuda", dtype=torch.bfloat16)
    two_steps = torch.randn(2, 8, 512, device="cuda", dtype=torch.bfloat16)
    state = (torch.zeros(1, 8, 512, device="cuda", dtype=torch.bfloat16),) * 2
    results = {}
    for name, model, persistent, inputs in (("nn.LSTM", theirs, "1", x), ("triton_lstm", ours, "1", x),
                                            ("per-step kernel", ours, "0", x),
                                            ("triton_lstm T=2 (persistent launch)", ours, "1", two_steps)):
        os.environ["TRITON_LSTM_PERSISTENT"] = persistent
        with torch.no_grad():
            for _ in range(20):
                model(inputs, state)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                model(inputs, state)
            torch.cuda.synchronize()
        results[name] = (time.perf_counter() - start) / calls * 1e6
    os.environ.pop("TRITON_LSTM_PERSISTENT")
    base = results["nn.LSTM"]
    return "single step T=1 B=8 H=512 bf16 no_grad, us/call: " + ", ".join(
        f"{name} {us:.1f} ({us / base:.2f}x)" for name, us in results.items())


def stack_check() -> int:
    """The whole-module kernels (a stack's layers in one launch, forward and backward; both directions of
    a bidirectional layer in one launch), LSTM and GRU, against the same model run layer by layer and
    direction by direction (TRITON_LSTM_STACK=0, TRITON_LSTM_BIDIRECTIONAL=0), bf16: their cross-layer
    waits and reversed time. Returns 1 (and says so) when they disagree or fail; a wait that never ends
    gives up within seconds here (gpu_check.sh then turns these kernels off for the stages after)."""
    common.BARRIER_SPIN_LIMIT = 1 << 22  # a wait that never ends gives up in seconds, not tens of seconds
    status = 0
    cases = [(64, 16, 256, 512, 4, False, False, 0), (48, 64, 128, 1024, 2, False, False, 0),
             (64, 64, 256, 512, 2, True, False, 0), (40, 9, 64, 256, 1, True, True, 0)]
    # A stack with projections (the LSTM's: the same launches in m_t, layer l > 0's h0 term at its step 0).
    runs = [(case, cell) for cell in ("LSTM", "GRU") for case in cases] + [((48, 24, 128, 1024, 3, False, True, 256), "LSTM")]
    for (T, B, I, H, layers, bidirectional, packed, proj_size), cell in runs:
        label = (f"{cell} T{T} B{B} I{I} H{H}{f' P{proj_size}' if proj_size else ''} L{layers}"
                 f"{' bidirectional' if bidirectional else ''}{' packed' if packed else ''}")
        try:
            status |= compare_whole_module(cell, T, B, I, H, layers, bidirectional, packed, label, proj_size)
        except Exception as error:  # noqa: BLE001 (report, count as a failure, go on)
            print(f"{label}: {type(error).__name__}: {str(error).splitlines()[0][:160]} WRONG", flush=True)
            status = 1
    return status


def dropout_timing(T=512, B=64, H=512, layers=4, p=0.2):
    """A training step (forward and backward) of a 4-layer LSTM with dropout between layers, µs per time
    step (do_bench medians, bf16): ours in the stacked launches (the masks applied in the kernels), ours layer
    by layer (TRITON_LSTM_STACK=0: F.dropout between one-layer launches), ours without dropout, and cuDNN's
    nn.LSTM with the same dropout."""
    import triton.testing

    torch.manual_seed(0)
    theirs = nn.LSTM(H, H, num_layers=layers, dropout=p, device="cuda", dtype=torch.bfloat16).train()
    ours = triton_lstm.LSTM(H, H, num_layers=layers, dropout=p, device="cuda", dtype=torch.bfloat16).train()
    ours.load_state_dict(theirs.state_dict())
    plain = triton_lstm.LSTM(H, H, num_layers=layers, device="cuda", dtype=torch.bfloat16).train()
    x = torch.randn(T, B, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(T, B, H, device="cuda", dtype=torch.bfloat16)
    results = {}
    for name, model, stack in (("stacked", ours, "1"), ("layer by layer", ours, "0"), ("no dropout", plain, "1"),
                               ("nn.LSTM", theirs, "1")):
        os.environ["TRITON_LSTM_STACK"] = stack
        step = lambda: torch.autograd.backward(model(x)[0], grad)  # noqa: E731
        results[name] = triton.testing.do_bench(step, grad_to_none=[x, *model.parameters()], return_mode="median") * 1e3 / T
    os.environ.pop("TRITON_LSTM_STACK")
    return (f"fwd+bwd T{T} B{B} H{H} L{layers} dropout {p} bf16, us/step: "
            + ", ".join(f"{name} {us:.1f}" for name, us in results.items()))


def projection_timing(cases=((256, 64, 512, 1024, 256, False, 2), (256, 64, 512, 1024, 256, False, 3),
                             (512, 64, 512, 1024, 256, False, 1), (1024, 8, 512, 512, 128, False, 1),
                             (256, 32, 512, 1024, 256, True, 1))):
    """An LSTM with projections (proj_size P, bf16; stacks of two and three, one layer, a bidirectional one),
    µs per time step (do_bench medians), forward and forward+backward: ours (the recurrence in m on the
    merged weight W_hh·W_hr, kernels/lstm_projection.py); for one layer ours on the paths it took before (one
    launch per step and direction, TRITON_LSTM_PERSISTENT=0, and backward="reference"), for a stack ours
    layer by layer (TRITON_LSTM_STACK=0, what a projected stack ran before its one launch); cuDNN's nn.LSTM
    with the same weights; and the largest relative difference of ours from cuDNN's output. Yields a line per
    case as it is measured (the stacks, never timed yet, first), or the error that stopped the case: a stage
    cut at its limit keeps the lines printed before."""
    for case in cases:
        try:
            yield _projection_case(*case)
        except Exception as exc:  # noqa: BLE001 (report the case and go on to the next)
            yield f"proj {case}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _projection_case(T, B, I, H, P, bidirectional, layers) -> str:
    """``projection_timing``'s line for one case."""
    import triton.testing

    torch.manual_seed(0)
    options = dict(proj_size=P, bidirectional=bidirectional, num_layers=layers, device="cuda", dtype=torch.bfloat16)
    theirs = nn.LSTM(I, H, **options)
    ours = triton_lstm.LSTM(I, H, **options)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(T, B, I, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(T, B, P * (2 if bidirectional else 1), device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        error = relative_error(ours(x)[0], theirs(x)[0])
    if layers > 1:
        runs = (("ours", ours, {}), ("ours layer by layer", ours, {"TRITON_LSTM_STACK": "0"}),
                ("nn.LSTM", theirs, {}))
    else:
        before = triton_lstm.LSTM(I, H, backward="reference", **options)
        before.load_state_dict(theirs.state_dict())
        runs = (("ours", ours, {}), ("per-step forward, reference backward", before, {"TRITON_LSTM_PERSISTENT": "0"}),
                ("nn.LSTM", theirs, {}))
    figures = []
    for name, model, env in runs:
        os.environ.update(env)
        try:
            fwd = triton.testing.do_bench(lambda: model(x), return_mode="median") * 1e3 / T  # noqa: B023
            step = lambda: torch.autograd.backward(model(x)[0], grad)  # noqa: E731, B023
            both = triton.testing.do_bench(step, grad_to_none=[x, *model.parameters()], return_mode="median") * 1e3 / T
        finally:
            for key in env:
                os.environ.pop(key)
        figures.append(f"{name} {fwd:.1f} / {both:.1f}")
    shape = f"L{layers} " if layers > 1 else ""
    return (f"proj {shape}T{T} B{B} I{I} H{H} P{P}{' bidirectional' if bidirectional else ''} bf16, us/step "
            f"fwd / fwd+bwd: {', '.join(figures)}; output vs cuDNN max rel err {error:.2e}")


def compare_whole_module(cell, T, B, I, H, layers, bidirectional, packed, label, proj_size=0) -> int:
    """One model (``cell`` "LSTM" or "GRU", an LSTM's ``proj_size``) with its whole-module kernel and layer by
    layer: 1 if they disagree."""
    from triton_lstm.bidirectional import bidirectional_plan
    from triton_lstm.stack import stack_plan

    torch.manual_seed(0)
    options = dict(proj_size=proj_size) if proj_size else {}
    model = getattr(triton_lstm, cell)(I, H, num_layers=layers, bidirectional=bidirectional, device="cuda",
                                       dtype=torch.bfloat16, **options)
    x = torch.randn(T, B, I, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,)) if packed else None
    grad = torch.randn(T, B, (proj_size or H) * (2 if bidirectional else 1), device="cuda", dtype=torch.bfloat16)
    if lengths is not None:
        grad = grad * (torch.arange(T)[:, None] < lengths[None, :]).to(grad)[:, :, None]
    env = "TRITON_LSTM_BIDIRECTIONAL" if bidirectional else "TRITON_LSTM_STACK"
    gates = 3 if cell == "GRU" else 4
    plan = bidirectional_plan(x, H, gates) if bidirectional else stack_plan(x, H, layers, projection=proj_size > 0)
    results = []
    try:
        for enabled in ("1", "0"):
            os.environ[env] = enabled
            inputs = x if lengths is None else nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
            out, state = model(inputs)
            if lengths is not None:
                out = nn.utils.rnn.pad_packed_sequence(out, total_length=T)[0]
            grads = torch.autograd.grad(out, [x, *model.parameters()], grad)
            results.append([out, *(state if isinstance(state, tuple) else (state,)), *grads])
    finally:
        os.environ.pop(env)
    errors = [relative_error(a, b) for a, b in zip(*results)]
    ok = max(errors) < 2e-2
    print(f"{label} ({plan.reason if plan else 'no plan'}): against one launch per layer and direction, max rel "
          f"err {max(errors):.2e} {'ok' if ok else 'WRONG'}", flush=True)
    return int(not ok)


def main() -> int:
    if sys.argv[1:] == ["--stack"]:
        return stack_check()
    if sys.argv[1:] == ["--single-step"]:
        print(single_step(), flush=True)
        return 0
    if sys.argv[1:] == ["--dropout-timing"]:
        print(dropout_timing(), flush=True)
        return 0
    if sys.argv[1:] == ["--projection-timing"]:
        for line in projection_timing():
            print(line, flush=True)
        return 0
    print(torch.cuda.get_device_name(), "SMs, shared opt-in:", forward_plans._device_limits(0), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    status = 0
    for dtype in (torch.bfloat16, torch.float32):
        for case in ANCHOR_CASES:
            start = time.monotonic()
            label = f"{str(dtype)[6:]:8} T{case.T} B{case.B} I{case.I} H{case.H}"
            line, ok = check_plan(min(case.T, 64), case.B, case.H, dtype)
            print(f"{label}: {line}", flush=True)
            status = status if ok else 3
            if dtype == torch.bfloat16:
                line, ok = against_cudnn(case, dtype)
                print(f"{label}: {line} ({time.monotonic() - start:.1f} s)", flush=True)
                status = status if ok else 3
                try:  # a GRU failure is reported, and does not stop the LSTM's checks
                    line, ok = against_cudnn(case, dtype, "gru")
                    print(f"{label}: {line}", flush=True)
                    status = status if ok else 3
                except Exception as error:  # noqa: BLE001
                    print(f"{label}: GRU {type(error).__name__}: {str(error).splitlines()[0][:160]} FAILED", flush=True)
                    status = 3
    print(single_step(), flush=True)
    # 3: a check FAILED (a plan that did not run or disagrees, an error past the bounds above, the GRU): the
    # run reports it and gpu_check.sh goes on; an exception in the LSTM's own path stops it (exit 1).
    return status


if __name__ == "__main__":
    sys.exit(main())
