"""Sweep the planner's choices for one shape on this GPU and print the fastest.

    python benchmarks/tune.py --shape 512 64 256 256 --dtype bf16            # forward and backward
    python benchmarks/tune.py --anchors --mode fwd --budget-s 20 --csv out.csv
    python benchmarks/tune.py --shape 512 64 512 512 --layers 4          # a stack in one launch
    python benchmarks/tune.py --shape 128 256 512 512 --mode fwd --cell gru   # the GRU's forward plans
    python benchmarks/tune.py --anchors --mode fwd --variants gate_dot streamed_one_tile   # each plan with and without
    python benchmarks/tune.py --shape 256 64 512 512 --bidirectional --mode fwd --variants gate_dot   # both directions

Forward: resident vs streamed W_hh, BLOCK_B, BLOCK_H, BLOCK_K, warps and the batch split (grid_b), each
candidate run through ``lstm_fwd_persistent`` with an explicit ``ForwardPlan`` and checked against the
per-step kernel's result before it is timed. Backward: the gate-gradient kernel's tile (BLOCK_B, BLOCK_H,
BLOCK_K, warps), persistent schedule, checked against the planner's own tiling. Both sides time the
recurrence alone (the input projection and the weight-gradient GEMMs are the same for every candidate),
with ``triton.testing.do_bench`` medians; cuDNN's whole ``nn.LSTM`` forward is printed beside them as the
yardstick, and (one layer) our module's whole ``no_grad`` call and the planner's plan as that call runs it
(an inference forward, SAVE = 0), so that what lies outside the recurrence kernel shows. A candidate that
does not fit (OutOfResources), is refused as a cooperative grid, or gives a wrong result is listed as
such, never timed. ``--layers L`` sweeps the stacked kernels instead (all L
layers in one launch: resident or streamed W, tiles, chunks, warps for the forward, checked against the
planner's tiles with no variant on; the backward chain's tile, checked against the planner's). ``--budget-s`` bounds the seconds spent per shape and mode
(compiles dominate); candidates run in order of the planner's preference, so the default comes first.
Without ``--variants`` every candidate runs the planner's gate dot where its plan has it (16-bit; since run
13). ``--variants`` runs each forward candidate plain and with kernel variants
(``ForwardPlan.gate_dot``: one dot for the four gates, 16-bit only; ``input_ahead``: a stack layer's next
input product before its barrier wait; ``streamed_one_tile``: a streamed program owning one tile keeps its
state in registers; ``fused_input``: layer 0's input product formed in the kernel from x, 16-bit, in a
stack where I == H), every combination in a row, and prints each one's time over the plain plan's. A plan
with ``fused_input`` does the input projection's work in the kernel, so its time is set against the plain
plan's plus the projection GEMM's (timed alone and printed), and the plain kernels then run on that GEMM's
output rather than on random gate inputs. With ``gate_dot``, a planned streamed plan that
``forward_plans.resident_gate_dot`` can hold resident (16-bit, K up to 1024) is also timed that way, third
in line, and set against the planned plan.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import triton_lstm  # noqa: E402
from triton_lstm.benchmark import exit_on_sigterm  # noqa: E402
from triton_lstm.benchmark_cases import ANCHOR_CASES, DTYPES  # noqa: E402
from triton_lstm.kernels import backward_plans, common, forward_plans  # noqa: E402
from triton_lstm.kernels import lstm_fwd_persistent as fwd  # noqa: E402
from triton_lstm.kernels.backward_plans import bwd_launch_options, plan_bwd  # noqa: E402
from triton_lstm.kernels import lstm_bwd  # noqa: E402
from triton_lstm.kernels.lstm_bwd import lstm_bwd_gate_grads  # noqa: E402
from triton_lstm.kernels.lstm_fwd import lstm_fwd, projection_for_forward  # noqa: E402
from triton_lstm.kernels.lstm_fwd_fused_input import lstm_fwd_fused_input  # noqa: E402
from triton_lstm.kernels.lstm_fwd_stack import lstm_fwd_stack  # noqa: E402
from triton_lstm.reference import input_projection  # noqa: E402


def _device_limits(device: str, programs_per_group: int = 1) -> tuple[int, int]:
    """(SMs, opt-in shared memory) of the GPU; on the CPU (the interpreter, for the tests) one program per
    layer and the interpreter's assumed shared memory."""
    if device == "cuda":
        return forward_plans._device_limits(0)
    return programs_per_group, forward_plans.INTERPRETER_SHARED_MEMORY


def _forward_candidates(B: int, H: int, element_size: int, num_sms: int, gates: int = 4,
                        shared: int | None = None) -> list[forward_plans.ForwardPlan]:
    """Plans around the planner's own: resident and streamed W_hh, tile sizes, warps, the batch split;
    in fp32 also tensor-core dots in three TF32 passes ("tf32x3", fp32-level accuracy). ``gates`` 3: a
    GRU's plans (the planner's for three gates, and resident tiles its three-gate W_hh slice may fit)."""
    shared = forward_plans._device_limits(0)[1] if shared is None else shared
    default = forward_plans.plan_persistent_fwd(128, B, H, H, element_size, num_sms, shared, gates=gates)
    plans = [default] if default.persistent else []
    if default.persistent and not default.resident:
        # Deeper pipelining of the streamed K chunks (Nsight Compute, run 4: the H = 1024 step waits on L2
        # round trips with two chunks in flight, at 22% of L2 throughput).
        plans += [dataclasses.replace(default, num_stages=stages) for stages in (4, 5, 6)]
    k_pad = max(16, 1 << (H - 1).bit_length())
    widest_b = max(16, min(64, 1 << (B - 1).bit_length()))
    fma = element_size >= 4
    precisions = ("ieee", "tf32x3") if fma else ("ieee",)
    for block_b in (16, 32, 64):
        if block_b > widest_b:
            continue
        for block_h in (16, 32, 64):
            num_h = -(-H // block_h)
            grid_h = min(num_h, num_sms)
            most_b = max(1, min(-(-B // block_b), num_sms // grid_h))
            for precision in precisions:
                # fp32 resident W_hh is left out: compiled for sm_90 it spills kilobytes (tf32x3 at H = 256).
                if not fma and num_h <= num_sms and block_h <= 32:
                    for warps in (4, 8):
                        plans.append(forward_plans.ForwardPlan(True, "resident", True, block_b, block_h, k_pad, num_h, most_b, warps,
                                                     exact_fp32_dot=precision))
                for block_k in ((32, 64) if fma else (64, 128, 256)):
                    # 2 warps: a 32-row tile with 4 warps computes each row twice (warps [4, 1] in mma.sync).
                    for warps in ((4, 8) if fma or block_b * block_h > 512 else (2, 4, 8)):
                        plans.append(forward_plans.ForwardPlan(True, "streamed", False, block_b, block_h, min(block_k, k_pad), grid_h,
                                                     most_b, warps, exact_fp32_dot=precision))
    # A GRU's W_hh slice is 3/4 of the LSTM's: its resident candidates are kept up to 4/3 of the budget.
    budget = shared * 4 // gates
    plans = [p for p in plans if not p.resident or forward_plans.resident_bytes(p.block_b, p.block_h, H, element_size) <= budget]
    knobs = lambda p: (p.resident, p.block_b, p.block_h, p.block_k, p.num_warps, p.grid_h, p.grid_b, p.exact_fp32_dot,  # noqa: E731
                       p.num_stages)
    unique = list({knobs(p): dataclasses.replace(p, reason="default" if knobs(p) == knobs(default) else p.reason)
                   for p in reversed(plans)}.values())[::-1]
    if not default.persistent:
        return unique
    if fma:
        # The planner's fp32 plans are all "ieee": try the tensor-core variants first.
        tensor_core = [p for p in unique if p.exact_fp32_dot != "ieee"]
        pivot = max(tensor_core, key=lambda p: (p.resident, p.block_b == default.block_b, p.num_warps == 4), default=default)
        first = [p for p in unique if p.reason == "default"]
        rest = [p for p in unique if p.exact_fp32_dot == "ieee" and p.reason != "default"]
        return first + _nearest_first(tensor_core, pivot, knobs) + _nearest_first(rest, default, knobs)
    return _nearest_first(unique, default, knobs)


# The kernel variants (ForwardPlan fields) by their command-line names: the planner picks some of them
# where run 13 timed them faster (forward_plans.with_measured_variants).
VARIANTS = {"gate_dot": "gate dot", "input_ahead": "input ahead", "streamed_one_tile": "streamed one tile",
            "fused_input": "fused input"}


def _with_variants(plans, dtype, variants, single_layer=False, shape=None):
    """``plans``, each followed by the same plan with every combination of ``variants`` (ForwardPlan
    fields) that applies to it switched on: fp32 keeps four dots, the plain streamed schedule and the
    projection GEMM (all spill there, or fall back), resident plans run the one-tile schedule anyway (no
    ``streamed_one_tile``), and so does every plan with the input product in the kernel. For one layer
    (``single_layer``) the input product ahead exists only with ``fused_input``. With ``shape`` (B, H), the
    one-tile schedule and the input product ahead only where each program owns one tile: elsewhere the
    launch runs the plain schedule, and the "variant" timed would be the plain plan again."""
    result = []
    for plan in plans:
        one_tile = shape is None or forward_plans.one_tile_each(plan, *shape)
        names = [name for name in variants
                 if not (name in ("gate_dot", "streamed_one_tile", "fused_input") and dtype == torch.float32)
                 and not (name == "streamed_one_tile" and plan.resident)
                 and not (name in ("streamed_one_tile", "input_ahead") and not one_tile)]
        combinations = [combo for size in range(1, len(names) + 1) for combo in itertools.combinations(names, size)
                        if not ("fused_input" in combo and "streamed_one_tile" in combo)
                        and not (single_layer and "input_ahead" in combo and "fused_input" not in combo)]
        result += [plan, *(dataclasses.replace(plan, **dict.fromkeys(combo, True)) for combo in combinations)]
    return result


def _plain(plan):
    """``plan`` with no variant on."""
    return dataclasses.replace(plan, **dict.fromkeys(VARIANTS, False))


def _unique(plans):
    """``plans`` without the repeats that differ in their reason alone (the planner's plan among the
    candidates), in order."""
    seen, result = set(), []
    for plan in plans:
        key = dataclasses.replace(plan, reason="")
        if key not in seen:
            seen.add(key)
            result.append(plan)
    return result


def _as_planned(candidates, variants):
    """The candidates as the sweep runs them: with ``variants`` each one plain (no variant on), for
    ``_with_variants`` to add every combination; else each with the gate dot where the planner's plan among
    them has it (16-bit; the other candidates are built plain), as the planned plans run."""
    if variants:
        return [_plain(plan) for plan in candidates]
    gate_dot = any(plan.gate_dot for plan in candidates)
    return [dataclasses.replace(plan, gate_dot=gate_dot) for plan in candidates]


def _print_variant_ratios(timed: dict, projection_us: float = 0.0) -> None:
    """For each plan timed with variants (``timed``: plan -> µs per step), variant / plain; a variant with
    the input product in the kernel against the plain plan plus the projection GEMM (``projection_us``)."""
    for plan, us in timed.items():
        if any(getattr(plan, name) for name in VARIANTS) or us != us:
            continue
        for variant, variant_us in timed.items():
            on = [name for name in VARIANTS if getattr(variant, name)]
            if not on or variant_us != variant_us or dataclasses.replace(variant, **dict.fromkeys(on, False)) != plan:
                continue
            plain, against = (us + projection_us, "plain + projection GEMM") if variant.fused_input else (us, "plain")
            print(f"  {' + '.join(VARIANTS[name] for name in on)} / {against}: {variant_us:.2f} / {plain:.2f} us/step = "
                  f"{variant_us / plain:.3f}  ({'resident' if plan.resident else 'streamed'} bb{plan.block_b} "
                  f"bh{plan.block_h} bk{plan.block_k} w{plan.num_warps})", flush=True)


def _plan_label(plan, detail: str, grid: str, is_default: bool) -> str:
    """How every forward sweep names a candidate: storage, tiles, warps, ``detail`` (e.g. the pipelining
    depth), the ``grid`` as given, the variants on, and whether it is the planner's plan."""
    return (f"{'resident' if plan.resident else 'streamed'} bb{plan.block_b} bh{plan.block_h} bk{plan.block_k} "
            f"w{plan.num_warps}{detail} grid {grid}{_label_variants(plan)}{' (default)' if is_default else ''}")


def _label_variants(plan) -> str:
    return "".join(f" {VARIANTS[name].replace(' ', '-')}" for name in VARIANTS if getattr(plan, name))


def _nearest_first(candidates, default, knobs):
    """The default, then candidates that change one knob of it, then two, …: a short budget still sees
    the effect of every single knob."""
    def distance(candidate):
        return sum(a != b for a, b in zip(knobs(candidate), knobs(default)))

    return sorted(candidates, key=distance)


def _bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def tune_forward(T, B, I, H, dtype, budget_s, rows, cell="lstm", variants=(), device="cuda"):
    num_sms, shared = _device_limits(device)
    torch.manual_seed(0)
    gates = 3 if cell == "gru" else 4
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    projected, w_ih, bias, projection_us, variants = _gate_inputs(x, gates, H, dtype, variants, stack=False)
    w_hh = (torch.randn(gates * H, H, device=device) * H**-0.5).to(dtype)
    h0 = torch.randn(B, H, device=device, dtype=dtype)
    c0 = torch.randn(B, H, device=device, dtype=dtype) if cell == "lstm" else h0  # a GRU's state is h alone
    b_hn = (torch.randn(H, device=device) * 0.1).to(dtype) if cell == "gru" else None

    per_step = lambda: lstm_fwd(projected, h0, c0, w_hh, None, b_hn=b_hn)  # noqa: E731 (the yardstick)
    expected = per_step()[0].float()
    tol = 3e-2 if dtype != torch.float32 else 1e-4

    reference = (torch.nn.GRU if cell == "gru" else torch.nn.LSTM)(I, H, device=device, dtype=dtype)
    ours = (triton_lstm.GRU if cell == "gru" else triton_lstm.LSTM)(I, H, device=device, dtype=dtype)
    with torch.no_grad():
        cudnn_us = _bench(lambda: reference(x)) * 1e3 / T
        # The whole no_grad call (projection, planning, launches), against which the kernel-only figures
        # below show what lies outside the recurrence kernel.
        module_us = _bench(lambda: ours(x)) * 1e3 / T
    per_step_us = _bench(per_step) * 1e3 / T
    print(f"fwd {cell} T{T} B{B} I{I} H{H} {dtype}: cuDNN nn.{cell.upper()} {cudnn_us:.2f} us/step, our module's whole "
          f"no_grad call {module_us:.2f} us/step, per-step kernel {per_step_us:.2f} us/step", flush=True)
    start = time.monotonic()
    results, timed = [], {}
    candidates = _forward_candidates(B, H, projected.element_size(), num_sms, gates, shared)
    plans = _with_variants(_as_planned(candidates, variants), dtype, variants, single_layer=True, shape=(B, H))
    twin = _resident_twin(plans, H, projected.element_size(), shared) if "gate_dot" in variants else None
    for plan in plans:
        if time.monotonic() - start > budget_s:
            print(f"  budget of {budget_s} s spent; remaining candidates skipped")
            break
        label = _plan_label(plan, f" s{plan.num_stages}",
                            f"{plan.grid_h}x{plan.grid_b}{' ' + plan.exact_fp32_dot if dtype == torch.float32 else ''}",
                            plan.reason == "default")
        if plan.fused_input:
            run = lambda: lstm_fwd_fused_input(x, h0[None], c0[None], w_hh[None], w_ih[None], bias[None], None, plan,  # noqa: E731
                                               b_hn=None if b_hn is None else b_hn[None])
        else:
            run = lambda: fwd.lstm_fwd_persistent_strict(projected, h0, c0, w_hh, plan, b_hn=b_hn)  # noqa: E731
        us, status = _timed_if_right(run, expected, tol, T)
        results.append((us, label, status))
        timed[plan] = us
        _report(rows, "fwd" if cell == "lstm" else "fwd gru", dtype, T, B, I, H, label, status, us, f"{cudnn_us:.4g}")
        if plan is plans[0] and plan.reason == "default":
            # The same kernel as a no_grad call runs it (SAVE = 0: no per-step gates or c); the sweep times
            # the training forward's.
            dense = projected[..., :gates * H].contiguous()  # (an inference forward reads it dense)
            inference = lambda: fwd.lstm_fwd_persistent_strict(dense, h0, c0, w_hh, plan, save=False, b_hn=b_hn)  # noqa: E731
            inference_us, inference_status = _timed_if_right(inference, expected, tol, T)
            _report(rows, "fwd" if cell == "lstm" else "fwd gru", dtype, T, B, I, H, label + " inference",
                    inference_status, inference_us, f"{cudnn_us:.4g}")
    ranked = sorted(r for r in results if r[0] == r[0])
    if ranked:
        print(f"  best: {ranked[0][1]} {ranked[0][0]:.2f} us/step = {cudnn_us / ranked[0][0]:.2f}x cuDNN", flush=True)
    _print_variant_ratios(timed, projection_us)
    if twin is not None and timed.get(twin, float("nan")) / timed.get(plans[0], float("nan")) > 0:  # both timed
        print(f"  W_hh resident + gate dot / plain (streamed): {timed[twin]:.2f} / {timed[plans[0]]:.2f} us/step = "
              f"{timed[twin] / timed[plans[0]]:.3f}", flush=True)


def _resident_twin(plans, H, element_size, shared):
    """The planned (first) plan with W_hh resident and the gate dot where ``forward_plans.resident_gate_dot``
    applies (a 16-bit streamed plan past K = 512), moved into ``plans`` right after the planned plan and its
    gate-dot twin, so that a short budget reaches it; the same plan further down is dropped. Returns it, or
    None."""
    if not plans or plans[0].reason != "default":
        return None
    twin = forward_plans.resident_gate_dot(plans[0], H, H, element_size, shared)
    if twin is not None:
        same = lambda plan: dataclasses.replace(plan, reason="") == dataclasses.replace(twin, reason="")  # noqa: E731
        plans[:] = [plan for plan in plans if not same(plan)]
        plans.insert(min(2, len(plans)), twin)
    return twin


def _gate_inputs(x, gates, H, dtype, variants, stack: bool):
    """Layer 0's gate inputs for the candidates to run on, and what a plan with ``fused_input`` needs:
    ``(projected, w_ih, bias, projection_us, variants)``, with layer 0's W_ih (gates·H, I) and bias.
    ``projected`` is laid out for a training forward (``lstm_fwd.in_gate_layout``: rows 4H wide, a GRU's
    in the first 3H columns). Where ``variants`` asks for ``fused_input`` and it applies (16-bit; I == H in
    a ``stack``), ``projected`` is x·W_ih⁰ᵀ + b⁰, that projection GEMM's µs per step is timed and printed;
    else ``projected`` is random, the GEMM is not timed (0.0) and ``fused_input`` is dropped from the
    returned ``variants``."""
    T, B, I = x.shape
    w_ih = (torch.randn(gates * H, I, device=x.device) * I**-0.5).to(dtype)
    bias = (torch.randn(gates * H, device=x.device) * 0.1).to(dtype)
    if "fused_input" not in variants:
        return torch.randn(T, B, 4 * H, device=x.device, dtype=dtype), w_ih, bias, 0.0, variants
    if (stack and I != H) or dtype == torch.float32:
        print(f"  fused input left out: it runs in 16-bit, in a stack where I == H (here I = {I}, H = {H}, {dtype})",
              flush=True)
        return (torch.randn(T, B, 4 * H, device=x.device, dtype=dtype), w_ih, bias, 0.0,
                [name for name in variants if name != "fused_input"])
    projection = lambda: input_projection(x, w_ih, bias, None)  # noqa: E731
    projection_us = _bench(projection) * 1e3 / T
    print(f"  projection GEMM x·W_ihᵀ + b (what fused input does in the kernel): {projection_us:.2f} us/step", flush=True)
    return projection_for_forward(x, w_ih, bias, H, True), w_ih, bias, projection_us, variants


@contextlib.contextmanager
def _chain_variant(name: str, on: bool):
    """The backward chain with its variant ``backward_plans.<name>`` on or off: ``PREFETCH`` (its saved
    operands loaded a step ahead) or ``STACK_ONE_LOOP`` (a stack layer's two products in one K loop)."""
    previous = getattr(backward_plans, name)
    setattr(backward_plans, name, on)
    try:
        yield
    finally:
        setattr(backward_plans, name, previous)


def _timed_chain(run, expected, tol, T, dtype, layers, device, prefetch, one_loop=False):
    """``_timed_if_right`` of a chain ``run`` with its variants switched as asked — unless the launchers'
    rules (``backward_plans.chain_variants``: Triton, dtype, a GRU stack's loops) leave one of them off
    here: then (nan, a status that says so), rather than the plain chain's time under the variant's name."""
    with _chain_variant("STACK_ONE_LOOP", one_loop), _chain_variant("PREFETCH", prefetch):
        taken = backward_plans.chain_variants(dtype.itemsize, layers, "lstm", False, device != "cuda")
        if taken != (prefetch, one_loop and layers > 1):
            return float("nan"), "left off here by backward_plans.chain_variants"
        return _timed_if_right(run, expected, tol, T)


def _print_prefetch_ratios(timed: dict) -> None:
    """For each tile timed both ways (``timed``: (label, prefetch) -> µs per step), prefetch / plain."""
    for (label, prefetch), us in timed.items():
        plain = timed.get((label, False), float("nan"))
        if prefetch and us == us and plain == plain:
            print(f"  prefetch / plain: {us:.2f} / {plain:.2f} us/step = {us / plain:.3f}  ({label})", flush=True)


def tune_backward(T, B, I, H, dtype, budget_s, rows, variants=(), device="cuda"):
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else None
    torch.manual_seed(0)
    gates = torch.rand(T, B, 4 * H, device=device).to(dtype)
    gates[:, :, 2 * H:3 * H] = gates[:, :, 2 * H:3 * H] * 2 - 1  # g in (-1, 1)
    c_all = torch.randn(T + 1, B, H, device=device)
    w_hh = (torch.randn(4 * H, H, device=device) * H**-0.5).to(dtype)
    grad_out = torch.randn(T, B, H, device=device, dtype=dtype)
    grad_h = torch.randn(B, H, device=device, dtype=dtype)
    grad_c = torch.randn(B, H, device=device, dtype=dtype)

    def run(tiling=None, schedule="auto"):
        return lstm_bwd_gate_grads(grad_out, grad_h, grad_c, w_hh, None, [(0, gates, c_all)], schedule, tiling)

    expected = run()[0].float()
    schedule, block_b, block_h = plan_bwd(B, H, num_sms, "auto")
    default = (block_b, block_h, *bwd_launch_options(H, block_b, block_h, w_hh.element_size()).values())
    default_us = _bench(run) * 1e3 / T
    print(f"bwd T{T} B{B} H{H} {dtype}: planner {schedule} tile {default} {default_us:.2f} us/step", flush=True)
    candidates = [default]
    for bb in (16, 32, 64):
        for bh in (16, 32, 64, 128):
            for bk in (64, 128):
                for warps in (4, 8):
                    if bb <= max(16, 1 << (B - 1).bit_length()) and -(-B // bb) * -(-H // bh) <= (num_sms or 1):
                        candidates.append((bb, bh, bk, warps))  # (under the interpreter: one program)
    start, timed = time.monotonic(), {}
    for tiling in _nearest_first(list(dict.fromkeys(candidates)), default, lambda tiling: tiling):
        if time.monotonic() - start > budget_s:
            print(f"  budget of {budget_s} s spent; remaining candidates skipped")
            break
        label = f"bb{tiling[0]} bh{tiling[1]} bk{tiling[2]} w{tiling[3]}{' (default)' if tiling == default else ''}"
        for prefetch in (False, True) if "prefetch" in variants else (False,):
            fell_back = len(lstm_bwd._per_step_after_failure)
            us, status = _timed_chain(lambda: run(tiling, "persistent"), expected,  # noqa: B023
                                      3e-2 if dtype != torch.float32 else 1e-4, T, dtype, 1, device, prefetch)
            if len(lstm_bwd._per_step_after_failure) > fell_back:  # its time would be the per-step kernel's
                us, status = float("nan"), "did not fit or was refused (ran per step)"
            _report(rows, "bwd", dtype, T, B, I, H, label + (" prefetch" if prefetch else ""), status, us)
            timed[(label, prefetch)] = us
    _print_prefetch_ratios(timed)


def _report(rows, mode, dtype, T, B, I, H, label, status, us, cudnn_us=""):
    rows.append(dict(mode=mode, dtype=str(dtype).removeprefix("torch."), T=T, B=B, I=I, H=H, candidate=label,
                     status=status, us_per_step=f"{us:.4g}", cudnn_us_per_step=cudnn_us))
    print(f"  {label:55} {us:8.2f} us/step  {status}", flush=True)


def _timed_if_right(run, expected, tol, T):
    """(µs per step, status) of ``run``: timed only if its first result is within ``tol`` (relative)."""
    try:
        got = run()[0].float()
        if got.is_cuda:  # a grid barrier that gave up is this candidate's, not the next one's to report
            torch.cuda.synchronize()
            common.barrier_watch.check()
        error = (got - expected).abs().max().item() / max(1.0, expected.abs().max().item())
        if not error <= tol:
            return float("nan"), f"WRONG (rel error {error:.3g})"
        return _bench(run) * 1e3 / T, "ok"
    except Exception as exc:  # noqa: BLE001 (a sweep reports every failure and goes on)
        return float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def tune_stack_forward(T, B, I, H, layers, dtype, budget_s, rows, variants=(), device="cuda"):
    L = layers
    num_sms, shared = _device_limits(device, layers)
    budget = num_sms // L
    torch.manual_seed(0)
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    projected, w_ih_0, bias_0, projection_us, variants = _gate_inputs(x, 4, H, dtype, variants, stack=True)
    w_hh = (torch.randn(L, 4 * H, H, device=device) * H**-0.5).to(dtype)
    w_ih = (torch.randn(L - 1, 4 * H, H, device=device) * H**-0.5).to(dtype)
    bias = torch.randn(L - 1, 4 * H, device=device, dtype=dtype) * 0.1
    if "fused_input" in variants:  # (I == H then) every layer's input weights, for the kernel to form them all
        w_ih_all, bias_all = torch.cat((w_ih_0[None], w_ih)), torch.cat((bias_0[None], bias))
    h0 = torch.zeros(L, B, H, device=device, dtype=dtype)
    c0 = torch.zeros(L, B, H, device=device, dtype=dtype)
    default = forward_plans.plan_stack_fwd(T, B, H, L, projected.element_size(), num_sms, shared)
    run_layers = lambda: fwd.lstm_fwd_persistent(projected, h0[0], c0[0], w_hh[0], None)  # noqa: E731
    single_us = _bench(run_layers) * 1e3 / T
    reference = torch.nn.LSTM(I, H, num_layers=L, device=device, dtype=dtype)
    with torch.no_grad():
        cudnn_us = _bench(lambda: reference(x)) * 1e3 / T
    print(f"stack fwd T{T} B{B} H{H} L{L} {dtype}: cuDNN nn.LSTM {cudnn_us:.2f} us/step, one layer alone (its own "
          f"plan) {single_us:.2f} us/step; planner: {default}", flush=True)
    # The reference: the planner's tiles with no variant on (four dots, the plain schedule), a build apart from
    # every variant timed (the GPU tests hold the planned plans against nn).
    expected = (lstm_fwd_stack(projected, h0, c0, w_hh, w_ih, bias, None, _plain(default))[0].float()
                if default.persistent else None)
    candidates = [default] if default.persistent else []
    k_pad = max(16, 1 << (H - 1).bit_length())
    # Resident W_ih and W_hh slices. 64 × 16 on 8 warps first: the slices in shared memory beside wgmma,
    # which fits (192 KiB at H = 512, sm_90) only with the next input product ahead of the barrier wait
    # (one tile per program); the plain schedule asks for 384 KiB (tests/test_compile.py).
    for bb, bh, warps in ((64, 16, 8), (16, 16, 4), (32, 16, 4), (16, 32, 4)):
        if -(-H // bh) <= budget:
            candidates.append(forward_plans.ForwardPlan(True, "resident", True, bb, bh, k_pad, -(-H // bh), 1, warps))
    for bb, bh, bk, warps in ((64, 16, 32, 8), (64, 16, 64, 8), (64, 16, 128, 8), (32, 32, 64, 4), (32, 32, 64, 8),
                              (32, 16, 64, 4), (16, 32, 64, 8), (64, 32, 64, 8)):
        grid_h = min(-(-H // bh), budget)
        if bb <= max(16, 1 << (B - 1).bit_length()):
            grid_b = max(1, min(-(-B // bb), budget // grid_h))
            candidates.append(forward_plans.ForwardPlan(True, "streamed", False, bb, bh, min(bk, k_pad), grid_h, grid_b, warps))
    planned = _unique(_as_planned(candidates, variants))
    if "streamed_one_tile" in variants:  # the plans it applies to first (resident tiles run their own schedule)
        planned = planned[:1] + sorted(planned[1:], key=lambda plan: plan.resident)
    start = time.monotonic()
    timed = {}
    for plan in _with_variants(planned, dtype, variants, shape=(B, H)):
        if time.monotonic() - start > budget_s:
            print(f"  budget of {budget_s} s spent; remaining candidates skipped")
            break
        label = _plan_label(plan, "", f"{plan.grid_h}x{plan.grid_b}x{L}", _plain(plan) == _plain(default))
        if plan.fused_input:
            run = lambda: lstm_fwd_fused_input(x, h0, c0, w_hh, w_ih_all, bias_all, None, plan)  # noqa: E731
        else:
            run = lambda: lstm_fwd_stack(projected, h0, c0, w_hh, w_ih, bias, None, plan)  # noqa: E731
        us, status = _timed_if_right(run, expected, 3e-2, T) if expected is not None else (float("nan"), "no default")
        _report(rows, f"stack{L} fwd", dtype, T, B, I, H, label, status, us, f"{cudnn_us:.4g}")
        timed[plan] = us
    _print_variant_ratios(timed, projection_us)


def tune_bidirectional_forward(T, B, I, H, dtype, budget_s, rows, cell="lstm", variants=(), device="cuda"):
    """Both directions of one layer in one launch (``lstm_fwd_bidirectional``): the planner's plan (four
    dots: ``plan_bidirectional_fwd``), the same with 16-unit hidden blocks where it has 16-row resident
    tiles of 32 (what the gate dot won with on one direction, run 13), each with ``variants`` as
    ``tune_forward``'s; every candidate checked against the planned plan's output, each variant set
    against its plain plan. cuDNN's bidirectional layer beside them."""
    from triton_lstm.kernels.lstm_fwd_bidirectional import lstm_fwd_bidirectional

    variants = [name for name in variants if name in ("gate_dot", "streamed_one_tile")]  # what this kernel runs
    num_sms, shared = _device_limits(device, 2)
    torch.manual_seed(0)
    gates = 3 if cell == "gru" else 4
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    projected = torch.randn(2, T, B, 4 * H, device=device, dtype=dtype)  # step-ordered, in gate layout
    w_hh = (torch.randn(2, gates * H, H, device=device) * H**-0.5).to(dtype)
    h0 = torch.randn(2, B, H, device=device, dtype=dtype)
    c0 = torch.randn(2, B, H, device=device, dtype=dtype) if cell == "lstm" else h0
    b_hn = (torch.randn(2, H, device=device) * 0.1).to(dtype) if cell == "gru" else None
    default = forward_plans.plan_bidirectional_fwd(T, B, H, projected.element_size(), num_sms, shared,
                                                   device != "cuda", gates=gates)
    reference = (torch.nn.GRU if cell == "gru" else torch.nn.LSTM)(I, H, bidirectional=True, device=device, dtype=dtype)
    with torch.no_grad():
        cudnn_us = _bench(lambda: reference(x)) * 1e3 / T
    print(f"bidirectional fwd {cell} T{T} B{B} I{I} H{H} {dtype}: cuDNN nn.{cell.upper()} {cudnn_us:.2f} us/step; "
          f"planner: {default}", flush=True)
    if not default.persistent:
        return
    run = lambda plan: lstm_fwd_bidirectional(projected, h0, c0, w_hh, None, plan, b_hn=b_hn)  # noqa: E731
    expected = run(default)[0].float()
    candidates = [dataclasses.replace(default, reason="default")]
    if default.resident and default.block_b == 16 and default.block_h == 32 and -(-H // 16) <= max(1, num_sms // 2):
        grid_h = -(-H // 16)
        candidates.append(dataclasses.replace(default, reason="16-unit hidden blocks", block_h=16, grid_h=grid_h,
                                              grid_b=max(1, min(-(-B // 16), max(1, num_sms // 2) // grid_h))))
    start, timed = time.monotonic(), {}
    for plan in _with_variants(candidates, dtype, variants, shape=(B, H)):
        if time.monotonic() - start > budget_s:
            print(f"  budget of {budget_s} s spent; remaining candidates skipped")
            break
        label = _plan_label(plan, "", f"{plan.grid_h}x{plan.grid_b}x2", plan.reason == "default")
        us, status = _timed_if_right(lambda: run(plan), expected, 3e-2 if dtype != torch.float32 else 1e-4, T)
        _report(rows, f"bidir fwd{' gru' if cell == 'gru' else ''}", dtype, T, B, I, H, label, status, us,
                f"{cudnn_us:.4g}")
        timed[plan] = us
    _print_variant_ratios(timed)


def tune_stack_backward(T, B, I, H, layers, dtype, budget_s, rows, variants=(), device="cuda"):
    from triton_lstm.kernels.lstm_bwd_whole_module import lstm_bwd_stack_gate_grads

    L = layers
    num_sms = _device_limits(device, layers)[0]
    start = time.monotonic()  # the budget counts the planner's rows too: --budget-s 1 leaves the tile sweep out
    torch.manual_seed(0)
    gates = torch.rand(L, T, B, 4 * H, device=device).to(dtype)
    gates[..., 2 * H:3 * H] = gates[..., 2 * H:3 * H] * 2 - 1  # g in (-1, 1)
    c_all = torch.randn(L, T + 1, B, H, device=device)
    w_hh = (torch.randn(L, 4 * H, H, device=device) * H**-0.5).to(dtype)
    w_ih = (torch.randn(L - 1, 4 * H, H, device=device) * H**-0.5).to(dtype)
    grad_out = torch.randn(T, B, H, device=device, dtype=dtype)
    grad_h = torch.randn(L, B, H, device=device, dtype=dtype)
    grad_c = torch.randn(L, B, H, device=device, dtype=dtype)

    def run(tiling=None):
        return lstm_bwd_stack_gate_grads(grad_out, grad_h, grad_c, w_hh, w_ih, None, gates, c_all, tiling)

    planned = run()
    if planned is None:
        print(f"stack bwd T{T} B{B} H{H} L{L}: the planner's stacked backward does not run here")
        return
    expected = planned[0].float()
    planned_us = _bench(run) * 1e3 / T
    print(f"stack bwd T{T} B{B} H{H} L{L} {dtype}: planner {planned_us:.2f} us/step", flush=True)
    _report(rows, f"stack{L} bwd", dtype, T, B, I, H, "planner", "ok", planned_us)
    # The planner's tiles with the chain's variants: the prefetch, the one loop, both.
    for one_loop, prefetch in ((False, True), (True, False), (True, True)):
        if ("one_loop" in variants or not one_loop) and ("prefetch" in variants or not prefetch):
            us, status = _timed_chain(run, expected, 3e-2, T, dtype, L, device, prefetch, one_loop)
            what = " + ".join(name for name, on in (("one loop", one_loop), ("prefetch", prefetch)) if on)
            _report(rows, f"stack{L} bwd", dtype, T, B, I, H, f"planner {what}", status, us)
            print(f"  {what} / plain: {us / planned_us:.3f}", flush=True)
    budget = num_sms // L
    timed = {}
    for bb in (16, 32, 64):
        for bh in (16, 32, 64):
            for bk in (32, 64, 128):
                for warps in (4, 8):
                    if bb > max(16, 1 << (B - 1).bit_length()) or -(-B // bb) * -(-H // bh) > budget:
                        continue
                    if time.monotonic() - start > budget_s:
                        print(f"  budget of {budget_s} s spent; remaining candidates skipped")
                        _print_prefetch_ratios(timed)
                        return
                    tiling = (bb, bh, bk, warps)
                    for prefetch in (False, True) if "prefetch" in variants else (False,):
                        us, status = _timed_chain(lambda: run(tiling) or (None,), expected, 3e-2, T,  # noqa: B023
                                                  dtype, L, device, prefetch)
                        label = f"bb{bb} bh{bh} bk{bk} w{warps}"
                        _report(rows, f"stack{L} bwd", dtype, T, B, I, H, label + (" prefetch" if prefetch else ""),
                                status, us)
                        timed[(label, prefetch)] = us
    _print_prefetch_ratios(timed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs=4, type=int, metavar=("T", "B", "I", "H"), action="append", default=[])
    parser.add_argument("--anchors", action="store_true", help="the benchmark's five anchor shapes")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    parser.add_argument("--mode", nargs="+", choices=["fwd", "bwd"], default=["fwd", "bwd"])
    parser.add_argument("--layers", type=int, default=1, help="> 1: sweep the stacked kernels of this many layers")
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm",
                        help="gru: the GRU's forward plans against nn.GRU (one layer, forward only)")
    parser.add_argument("--bidirectional", action="store_true",
                        help="both directions of one layer in one launch (forward only)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS) + ["prefetch", "one_loop"], default=[],
                        help="time each forward candidate plain and with these kernel variants (ForwardPlan fields), "
                             "every combination, and print variant / plain; prefetch: each backward tile with the "
                             "chain's saved operands loaded a step ahead (backward_plans.PREFETCH); one_loop: a stack's "
                             "chain with each layer's two products in one K loop (backward_plans.STACK_ONE_LOOP)")
    parser.add_argument("--max-T", type=int, default=256, help="cap T (the per-step figure hardly depends on it)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="seconds per shape and mode")
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.cell == "gru" and (args.layers > 1 or args.mode != ["fwd"]):
        parser.error("--cell gru sweeps one layer's forward: give --mode fwd and no --layers")
    if args.bidirectional and (args.layers > 1 or args.mode != ["fwd"]):
        parser.error("--bidirectional sweeps one layer's forward: give --mode fwd and no --layers")
    if not torch.cuda.is_available():
        parser.exit(2, "tune.py needs a CUDA GPU\n")
    shapes = [tuple(s) for s in args.shape] + ([(c.T, c.B, c.I, c.H) for c in ANCHOR_CASES] if args.anchors else [])
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    with exit_on_sigterm():  # a stage cut at its limit still writes its CSV (the finally below)
        rows = []
        try:
            for dtype in args.dtype:
                for T, B, I, H in shapes:
                    T = min(T, args.max_T)
                    for mode in args.mode:
                        forward_variants = [name for name in args.variants if name in VARIANTS]
                        if args.layers > 1:
                            if mode == "fwd":
                                tune_stack_forward(T, B, I, H, args.layers, DTYPES[dtype], args.budget_s, rows,
                                                   forward_variants)
                            else:
                                tune_stack_backward(T, B, I, H, args.layers, DTYPES[dtype], args.budget_s, rows,
                                                    args.variants)
                        elif args.bidirectional:
                            tune_bidirectional_forward(T, B, I, H, DTYPES[dtype], args.budget_s, rows, args.cell,
                                                       forward_variants)
                        elif mode == "fwd":
                            tune_forward(T, B, I, H, DTYPES[dtype], args.budget_s, rows, args.cell, forward_variants)
                        else:
                            tune_backward(T, B, I, H, DTYPES[dtype], args.budget_s, rows, args.variants)
        finally:
            if args.csv and rows:
                with open(args.csv, "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
