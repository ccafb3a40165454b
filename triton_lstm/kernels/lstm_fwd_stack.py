"""Forward of a stack of unidirectional layers in one persistent launch (a wavefront across layers).

Why: run layer by layer, an L-layer LSTM pays L·T step latencies, each step latency-bound, with most SMs
idle. In one launch, layer l runs time step t while layer l - 1 runs step t + 1, so the stack costs
T + L - 1 step latencies, and the layers' programs share the SMs.

The kernel is the persistent forward's (``lstm_fwd_persistent.py``), with ``LAYERS > 1``: its grid has
a third axis, the layer, and each layer's programs run ``stack_layer.stack_layer`` there. Layer 0 reads the input
projection x·W_ih⁰ᵀ + b⁰ computed for all steps beforehand (one GEMM, as for a single layer; or forms it
from x in the kernel where the plan has ``fused_input``: ``lstm_fwd_fused_input.py``); a layer
above forms its input product h^{l-1}_t·W_ihˡᵀ in the kernel, since h^{l-1}_t does not exist before the
launch. The planner streams W from L2 (both products); a resident variant (each program's W_ih and W_hh
slices loaded once per layer) is there for ``benchmarks/tune.py --layers``, and was no faster on an H200
(run 8 in benchmarks/NOTES.md). The outputs are every layer's
``(h_all, c_all, gates)`` stacked, each layer's exactly as the single-layer forward lays it out, so the
backward runs layer by layer on them (``triton_lstm/ops.py``).

Dropout between layers (training) runs in the same launch: masks drawn by torch before it, applied in
the kernel to a copy of each layer's h_t that the layer above reads (``stack_layer``).

Projections (proj_size > 0) run here in m_t on merged weights (``lstm_projection.lstmp_fwd_stack``).
Falls back (``plan_stack_fwd`` says why) to the layer-by-layer path for: one layer; bidirectional stacks
(not handled in the kernel); fp32 on a GPU (two
streamed fp32 products spill on sm_90); shapes whose grid of L layers does not fit the SMs;
``TRITON_LSTM_STACK=0``. Layer 0's input size may differ from H (its projection is a GEMM).
"""

from __future__ import annotations

import torch

from triton_lstm.kernels.forward_plans import (
    INTERPRETER_SHARED_MEMORY,
    ForwardPlan,
    _device_limits,
    plan_stack_fwd,
    stack_disabled,
)
from triton_lstm.kernels.lstm_fwd import allocate_forward_outputs, finished_outputs, fp32_tensor_cores, in_gate_layout
from triton_lstm.kernels.lstm_fwd_persistent import launch_persistent
from triton_lstm.reference import input_projection


def plan_stack_for(x: torch.Tensor, H: int, layers: int, peephole: bool = False, dropout: bool = False,
                   projection: bool = False) -> ForwardPlan:
    """The stack plan for an input on its device (the interpreter when it is on the CPU)."""
    if stack_disabled():
        return ForwardPlan(False, "TRITON_LSTM_STACK=0 (or TRITON_LSTM_PERSISTENT=0): layer by layer")
    T, B = x.shape[0], x.shape[1]
    if x.device.type == "cuda":
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        num_sms, shared = _device_limits(index)
        return plan_stack_fwd(T, B, H, layers, x.element_size(), num_sms, shared, False, fp32_tensor_cores(x.device),
                              peephole, dropout, projection)
    return plan_stack_fwd(T, B, H, layers, x.element_size(), 1, INTERPRETER_SHARED_MEMORY, True, False, peephole,
                          dropout, projection)


def projection_in_gates(x: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor | None, h0: torch.Tensor,
                        c0: torch.Tensor, save: bool = True):
    """``(projected, outputs)`` for ``lstm_fwd_stack``: the stack's buffers (``allocate_forward_outputs``),
    and layer 0's input projection x·W_ihᵀ + ``bias`` written where layer 0's gates go (``in_gate_layout``;
    a GRU stack's 3H-wide one in their first 3H columns). Layer 0's programs read their own tile of step t's
    projection before they write the same tile of its gates, as a single layer's do
    (``allocate_forward_outputs``'s ``reuse_projected``): the forward holds no projection of its own.
    Without ``save`` (no gates kept) the projection is a dense buffer of its own."""
    outputs = allocate_forward_outputs(x, h0, c0, h0.shape[-1], save)  # (K = H: no projection)
    into = outputs[2][0] if save else None
    return input_projection(x, w_ih, bias, None, out=into).contiguous(), outputs


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
    w_ch: torch.Tensor | None = None,
    b_hn: torch.Tensor | None = None,
    dropout: tuple[torch.Tensor, float] | None = None,
    initial: torch.Tensor | None = None,
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs ``plan`` (from ``plan_stack_fwd``, persistent) over a stack of L layers; ``w_ch`` (L, 3H): the
    layers' peephole weights; ``b_hn`` (L, H): a GRU stack's (``projected`` 3H wide, ``w_hh``, ``w_ih_above``
    (·, 3H, H), ``bias_above`` (L - 1, 3H: b_ih + (b_hr, b_hz, 0)), ``c0`` its h0, c_all its fp32 h).

    ``projected`` (T, B, 4H): layer 0's input projection with its biases (laid out by ``in_gate_layout``
    unless it is given with ``outputs``); ``h0``, ``c0`` (L, B, H);
    ``w_hh`` (L, 4H, H); ``w_ih_above`` (L - 1, 4H, H) and ``bias_above`` (L - 1, 4H, b_ih + b_hh, or None):
    the layers above 0. All contiguous, on one device, in the input dtype; ``lengths`` int32 or None.
    Returns ``(h_all, c_all, gates)`` of shapes (L, T + 1, B, H), (L, T + 1, B, H) fp32 and (L, T, B, 4H);
    without ``save`` (an inference forward) c_all is (L, 1, B, H), c_T of each layer, and gates (L, 0, B, 4H).
    ``dropout``: dropout between layers, ``(mask, scale)``: the (L - 1, T, B, H) uint8 masks (nonzero: kept)
    and 1 / (1 - p); layer l > 0 reads the layer below's h_t masked and scaled (``stack_layer``).
    ``initial`` (L - 1, B, 4H) fp32: terms added to the gate inputs of layers 1, 2, … at step 0 (a stack
    with projections, ``lstm_projection.lstmp_fwd_stack``). ``outputs``: the buffers to fill, from
    ``projection_in_gates`` (``projected`` then in layer 0's gates), else new ones.

    Raises ``OutOfResources`` or the driver's RuntimeError for a refused cooperative launch before
    anything ran (the caller then runs layer by layer).
    """
    if projected.device.type != "cuda" and plan.num_programs != 1:
        raise ValueError(f"under the interpreter a stack plan must have one program, got {plan.num_programs}")
    if outputs is None:
        projected, ours = in_gate_layout(projected, c0.shape[-1], w_hh.shape[-2] // c0.shape[-1], save)
        outputs = allocate_forward_outputs(projected, h0, c0, w_hh.shape[-1], save, ours)
    if dropout is not None:  # the dropped copies the layers above read, (L - 1, T, B, H): dropped after the launch
        mask, scale = dropout
        dropout = (mask, torch.empty(mask.shape, dtype=projected.dtype, device=projected.device), scale)
    launch_persistent(plan, projected, w_hh, *outputs, lengths, save, layers=w_hh.shape[0], w_ih=w_ih_above,
                      bias=bias_above, w_ch=w_ch, b_hn=b_hn, dropout=dropout, initial=initial,
                      what="the stacked forward kernel")
    return finished_outputs(outputs, save)

