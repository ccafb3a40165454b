"""The forward with layer 0's input product formed in the kernel (``ForwardPlan.fused_input``): one layer,
or a stack whose every layer then forms its own.

Why: the plain forward first runs the input projection x·W_ihᵀ + b for all steps as one GEMM, writes it
(T·B·4H elements) and has the recurrence read it back. Where the recurrence's step is bound by the barrier
rather than by its product (B = 256, H = 512: resident 64 × 16 tiles), the same product can be formed in
the kernel instead, for step t + 1 while step t's barrier completes (``INPUT_AHEAD``), so the GEMM, its
output's round trip through memory and its launch leave the call. The kernel is the stack's
(``stack_layer.py``): layer 0 reads x as if it were a layer below's h — of its own width I for a single
layer; a stack's layers share one K for their input products, so there I must be H.

A variant the planner does not pick: run 13 timed it slower than the projection GEMM and the plain kernel
(benchmarks/NOTES.md, "Run 13"); the ops run it wherever a plan asks for it and fall back to the projection
otherwise, or when the launch does not fit.
"""

from __future__ import annotations

import dataclasses

import torch

from triton_lstm.kernels import lstm_fwd_persistent as persistent
from triton_lstm.kernels.common import unless_refused
from triton_lstm.kernels.forward_plans import ForwardPlan
from triton_lstm.kernels.lstm_fwd import allocate_forward_outputs, finished_outputs, projection_for_forward


# Fused launches that did not fit the device (OutOfResources when loaded, or a cooperative grid the driver
# refused), keyed by (plan, dtype, device, x's width, layers): found out once per process, after which the
# projection runs straight away (as the persistent forward's downgrades, lstm_fwd_persistent.py).
_refused: set[tuple] = set()


def fused_input_or_none(plan: ForwardPlan, x: torch.Tensor, layers: int, launch):
    """``launch()``'s outputs (a launch of ``lstm_fwd_fused_input``), or None where such a launch did not
    fit, now or before in this process: the caller then projects x first."""
    key = (plan, x.dtype, x.device, x.shape[-1], layers)
    if key in _refused:
        return None
    outputs = unless_refused(launch)
    if outputs is None:
        _refused.add(key)
    return outputs


def lstm_fwd_fused_input(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    w_ih: torch.Tensor,
    bias: torch.Tensor | None,
    lengths: torch.Tensor | None,
    plan: ForwardPlan,
    save: bool = True,
    w_ch: torch.Tensor | None = None,
    b_hn: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs ``plan`` (persistent, with ``fused_input``) over L ≥ 1 layers whose every input product,
    layer 0's included, is formed in the kernel: from ``x`` (T, B, I) itself (a stack's I must be H).
    ``w_ih`` (L, 4H, I) and ``bias`` (L, 4H, b_ih + b_hh, or None) of every layer; ``h0``, ``c0`` (L, B, H),
    ``w_hh`` (L, 4H, H), ``w_ch`` (L, 3H) and the outputs as ``lstm_fwd_stack``'s (a GRU's: (L, 3H, ·),
    b_ih + (b_hr, b_hz, 0) and ``b_hn`` (L, H)). Contiguous, on one device; ``lengths`` int32 or None.

    Raises ``OutOfResources`` or the driver's RuntimeError for a refused cooperative launch before
    anything ran, ValueError where the variant does not apply."""
    if not plan.fused_input:
        raise ValueError("lstm_fwd_fused_input runs plans with fused_input")
    if x.shape[-1] != w_hh.shape[-1] and w_hh.shape[0] > 1:
        raise ValueError(f"a stack forms layer 0's input product in the kernel only where input_size == hidden_size, "
                         f"got {x.shape[-1]} and {w_hh.shape[-1]}")
    if x.device.type != "cuda" and plan.num_programs != 1:
        raise ValueError(f"under the interpreter a persistent plan must have one program, got {plan.num_programs}")
    outputs = allocate_forward_outputs(x, h0, c0, w_hh.shape[-1], save)
    persistent.launch_persistent(plan, x, w_hh, *outputs, lengths, save, layers=w_hh.shape[0], w_ih=w_ih, bias=bias,
                                 w_ch=w_ch, b_hn=b_hn, what="the forward kernel with its input product")
    return finished_outputs(outputs, save)


def lstm_fwd_from_input(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    bias: torch.Tensor | None,
    lengths: torch.Tensor | None,
    save: bool = True,
    w_ch: torch.Tensor | None = None,
    b_hn: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer and direction from its input ``x`` (T, B, I): ``(h_all, c_all, gates)`` as
    ``lstm_fwd_persistent`` returns them. Where the plan (``plan_for``) has ``fused_input``, the kernel forms
    the input product itself; else — or where that launch does not fit — the projection
    x·W_ihᵀ + ``bias`` (b_ih + b_hh; a GRU's b_ih + (b_hr, b_hz, 0)) runs as one GEMM first, then the
    recurrence on it. ``x`` and ``w_ih`` of any strides (the GEMM reads them so; the fused kernel gets
    contiguous copies where needed), the rest contiguous; ``lengths`` int32 or None; ``w_ch``, ``b_hn`` as
    there."""
    plan = persistent.plan_for(x, w_hh)
    if plan.persistent and plan.fused_input:
        outputs = fused_input_or_none(plan, x, 1, lambda: lstm_fwd_fused_input(
            x.contiguous(), h0[None], c0[None], w_hh[None], w_ih.contiguous()[None],
            None if bias is None else bias.contiguous()[None], lengths, plan, save,
            None if w_ch is None else w_ch[None], None if b_hn is None else b_hn[None]))
        if outputs is not None:
            return tuple(output[0] for output in outputs)
        plan = dataclasses.replace(plan, fused_input=False)
    projected = projection_for_forward(x, w_ih, bias, c0.shape[-1], save)
    # The projection is ours alone: the gates can take its place.
    return persistent.lstm_fwd_persistent(projected, h0, c0, w_hh, lengths, plan, save, w_ch, b_hn,
                                          reuse_projected=True)
