"""Forward of a stack of unidirectional layers in one persistent launch (a wavefront across layers).

Why: run layer by layer, an L-layer LSTM pays L·T step latencies, each step latency-bound, with most SMs
idle. In one launch, layer l runs time step t while layer l - 1 runs step t + 1, so the stack costs
T + L - 1 step latencies, and the layers' programs share the SMs.

The kernel is the persistent forward's (``lstm_fwd_persistent.py``), with ``LAYERS > 1``: its grid has
a third axis, the layer, and each layer's programs run ``_stack_layer`` there. Layer 0 reads the input
projection x·W_ih⁰ᵀ + b⁰ computed for all steps beforehand (one GEMM, as for a single layer); a layer
above forms its input product h^{l-1}_t·W_ihˡᵀ in the kernel, since h^{l-1}_t does not exist before the
launch. W is streamed from L2 (both products), never resident: each program runs one layer on the GPU,
but under Triton's interpreter the single program runs every layer. The outputs are every layer's
``(h_all, c_all, gates)`` stacked, each layer's exactly as the single-layer forward lays it out, so the
backward runs layer by layer on them (``triton_lstm/ops.py``).

Falls back (``plan_stack_fwd`` says why) to the layer-by-layer path for: one layer; bidirectional or
projected stacks and inter-layer dropout in training (not handled in the kernel); fp32 on a GPU (two
streamed fp32 products spill on sm_90); shapes whose grid of L layers does not fit the SMs;
``TRITON_LSTM_STACK=0``. Layer 0's input size may differ from H (its projection is a GEMM).
"""

from __future__ import annotations

import torch

from triton_lstm.kernels import common
from triton_lstm.kernels.common import barrier_watch, dot_precision
from triton_lstm.kernels.forward_plans import (
    INTERPRETER_SHARED_MEMORY,
    ForwardPlan,
    _device_limits,
    plan_stack_fwd,
    stack_disabled,
)
from triton_lstm.kernels.lstm_fwd import fp32_tensor_cores
from triton_lstm.kernels.lstm_fwd_persistent import _lstm_persistent_fwd_kernel


def plan_stack_for(x: torch.Tensor, H: int, layers: int) -> ForwardPlan:
    """The stack plan for an input on its device (the interpreter when it is on the CPU)."""
    if stack_disabled():
        return ForwardPlan(False, "TRITON_LSTM_STACK=0 (or TRITON_LSTM_PERSISTENT=0): layer by layer")
    T, B = x.shape[0], x.shape[1]
    if x.device.type == "cuda":
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        num_sms, shared = _device_limits(index)
        return plan_stack_fwd(T, B, H, layers, x.element_size(), num_sms, shared, False, fp32_tensor_cores(x.device))
    return plan_stack_fwd(T, B, H, layers, x.element_size(), 1, INTERPRETER_SHARED_MEMORY, True, False)


def lstm_fwd_stack(
    projected: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    w_ih_above: torch.Tensor,
    bias_above: torch.Tensor | None,
    lengths: torch.Tensor | None,
    plan: ForwardPlan,
    save: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs ``plan`` (from ``plan_stack_fwd``, persistent) over a stack of L layers.

    ``projected`` (T, B, 4H): layer 0's input projection with its biases; ``h0``, ``c0`` (L, B, H);
    ``w_hh`` (L, 4H, H); ``w_ih_above`` (L - 1, 4H, H) and ``bias_above`` (L - 1, 4H, b_ih + b_hh, or None):
    the layers above 0. All contiguous, on one device, in the input dtype; ``lengths`` int32 or None.
    Returns ``(h_all, c_all, gates)`` of shapes (L, T + 1, B, H), (L, T + 1, B, H) fp32 and (L, T, B, 4H);
    without ``save`` (an inference forward) c_all is (L, 1, B, H), c_T of each layer, and gates (L, 0, B, 4H).

    Raises ``OutOfResources`` or the driver's RuntimeError for a refused cooperative launch before
    anything ran (the caller then runs layer by layer).
    """
    T, B, four_h = projected.shape
    layers, H = w_hh.shape[0], four_h // 4
    on_gpu = projected.device.type == "cuda"
    if not on_gpu and plan.num_programs != 1:
        raise ValueError(f"under the interpreter a stack plan must have one program, got {plan.num_programs}")
    h_all = torch.empty(layers, T + 1, B, H, dtype=projected.dtype, device=projected.device)
    c_all = torch.empty(layers, T + 1 if save else 2, B, H, dtype=torch.float32, device=projected.device)
    gates = torch.empty(layers, T if save else 0, B, four_h, dtype=projected.dtype, device=projected.device)
    h_all[:, 0] = h0
    c_all[:, 0] = c0
    barrier_watch.check()
    counters = torch.zeros(layers * plan.grid_b + 1, dtype=torch.int32, device=projected.device)
    grid_l = layers if on_gpu else 1
    _lstm_persistent_fwd_kernel[(plan.grid_h, plan.grid_b, grid_l)](
        projected,
        w_hh,
        h_all,
        c_all,
        gates,
        lengths if lengths is not None else counters,
        counters,
        w_ih_above,
        bias_above if bias_above is not None else w_ih_above,
        h_all,  # out_ptr: read by bidirectional layers only
        T,
        B,
        plan.grid_b,
        H=H,
        K=H,
        HAS_LENGTHS=lengths is not None,
        RESIDENT=False,
        ONE_TILE=False,
        SAVE=save,
        DOT_PRECISION=dot_precision(projected.dtype, plan.exact_fp32_dot),
        GRID_H=plan.grid_h,
        BLOCK_B=plan.block_b,
        BLOCK_H=plan.block_h,
        BLOCK_K=plan.block_k,
        SPIN_LIMIT=common.BARRIER_SPIN_LIMIT,
        LAYERS=layers,
        HAS_BIAS=bias_above is not None,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        launch_cooperative_grid=True,
    )
    barrier_watch.watch(counters[layers * plan.grid_b:], f"the stacked forward kernel ({plan})")
    if not save:
        last = T % 2  # c_slot: c after T steps
        c_all = c_all[:, last:last + 1]
    return h_all, c_all, gates

