"""Forward of a bidirectional layer: both directions in one persistent launch.

Why: run one after the other, the two directions of a layer cost two sequences of T step latencies, each
on the SMs one direction's grid occupies, and the reverse direction's output needs flipping back (a
gather within each sequence's length) and concatenating. Here the grid's third axis is the direction:
both recurrences run at once, each on its half of the SMs with its own barrier counters, and the reverse
direction walks time backwards in the kernel — step s is time len_b - 1 - s: it writes its h there, into
its half of the layer's (T, B, 2H) output. Its input projection comes in step order (formed from x
reversed within each sequence), so that its gates, step-indexed too, can take the projection's place as a
one-direction layer's do.

The kernel is the persistent forward's (``lstm_fwd_persistent.py``) with ``DIRECTIONS = 2``; each
direction runs the single-layer plan for half the SMs (resident or streamed, one tile per program or
not). Its other outputs, per direction and step-indexed (step s of the reverse direction is time
len_b - 1 - s), are what the backward of a one-direction layer takes for the reversed sequence, so the
backward runs per direction on reversed views (``triton_lstm/bidirectional.py``).
"""

from __future__ import annotations

import os

import torch

from triton_lstm.kernels.forward_plans import (
    INTERPRETER_SHARED_MEMORY,
    ForwardPlan,
    _device_limits,
    persistent_disabled,
    plan_bidirectional_fwd,
)
from triton_lstm.kernels.lstm_fwd import allocate_forward_outputs, finished_outputs, fp32_tensor_cores, in_gate_layout
from triton_lstm.kernels.lstm_fwd_persistent import launch_persistent


def plan_bidirectional_for(x: torch.Tensor, H: int, gates: int = 4) -> ForwardPlan:
    """The plan for an input on its device (the interpreter when it is on the CPU); ``gates`` 3: a GRU.
    ``TRITON_LSTM_BIDIRECTIONAL=0`` (or ``TRITON_LSTM_PERSISTENT=0``) runs one direction after the other."""
    if persistent_disabled() or os.environ.get("TRITON_LSTM_BIDIRECTIONAL", "1") == "0":
        return ForwardPlan(False, "TRITON_LSTM_BIDIRECTIONAL=0 or TRITON_LSTM_PERSISTENT=0: one direction after the other")
    T, B = x.shape[0], x.shape[1]
    if x.device.type == "cuda":
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        num_sms, shared = _device_limits(index)
        return plan_bidirectional_fwd(T, B, H, x.element_size(), num_sms, shared, False, fp32_tensor_cores(x.device),
                                      gates)
    return plan_bidirectional_fwd(T, B, H, x.element_size(), 1, INTERPRETER_SHARED_MEMORY, True, False, gates)


def lstm_fwd_bidirectional(
    projected: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    lengths: torch.Tensor | None,
    plan: ForwardPlan,
    save: bool = True,
    w_ch: torch.Tensor | None = None,
    b_hn: torch.Tensor | None = None,
    reuse_projected: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs ``plan`` (persistent) over both directions of a layer; ``w_ch`` (2, 3H): the directions'
    peephole weights; ``b_hn`` (2, H): a GRU layer's (``kernels/gru.py``: ``w_hh`` (2, 3H, H), ``c0`` its h0,
    c_all its fp32 h).

    ``projected`` (2, T, B, ·): each direction's x·W_ihᵀ + biases in the order its recurrence runs (the
    reverse direction's step s at time len_b - 1 - s of its sequence) and laid out as ``in_gate_layout``
    says (``bidirectional.projections_in_step_order``); ``reuse_projected``: the gates may take its place
    (``allocate_forward_outputs``). ``h0``, ``c0`` (2, B, H); ``w_hh`` (2, 4H, H); all contiguous, on one
    device; ``lengths`` int32 or None. Returns ``(out, h_all, c_all, gates)``: the layer's output
    (T, B, 2H) in time order (zero past each sequence's length), and per direction, step-indexed,
    (2, T + 1, B, H), (2, T + 1, B, H) fp32 and (2, T, B, 4H); without ``save`` c_all is (2, 1, B, H),
    c_T of each direction, and gates (2, 0, B, 4H).

    Raises ``OutOfResources`` or the driver's RuntimeError for a refused cooperative launch before
    anything ran (the caller then runs the directions one after the other).
    """
    T, B = projected.shape[1:3]
    H = c0.shape[-1]
    projected, reuse_projected = in_gate_layout(projected, H, w_hh.shape[-2] // H, save, reuse_projected)
    outputs = allocate_forward_outputs(projected, h0, c0, H, save, reuse_projected)
    # Zeros: with lengths, the positions past a sequence's end are never written (pad_packed_sequence's 0).
    out = (torch.zeros if lengths is not None else torch.empty)(T, B, 2 * H, dtype=projected.dtype,
                                                                 device=projected.device)
    launch_persistent(plan, projected, w_hh, *outputs, lengths, save, directions=2, out=out, w_ch=w_ch, b_hn=b_hn,
                      what="the bidirectional forward kernel")
    return (out, *finished_outputs(outputs, save))
