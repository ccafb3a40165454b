"""Fused backward: a reverse-time persistent kernel for the gate gradients, then GEMMs over all steps.
(Written for the LSTM below; the GRU runs the same chain with its own step, ``cells.gru_step_grads``,
and dG row, ``gru.py``.)

Backpropagation through one layer and direction splits in two:

1. The sequential chain. At step t (from T-1 down to 0) each program owns a tile of (batch rows × hidden
   units). It forms the gradient reaching h_t from step t+1, ``dG_{t+1}·W_hh`` restricted to its units
   (a ``tl.dot`` over all 4H gate columns), adds ``grad_out[t]``, pushes it with the dc it carries in
   registers through the cell (gates and c from the forward's saved ``gates`` / ``c_all``) and writes its
   part of the pre-activation gate gradients dG_t. The next step needs all of dG_t, written by every
   program: a grid-wide barrier separates the steps. That makes one launch per layer and direction
   (``schedule="persistent"``). When the tiles cannot all be resident at once (more tiles than SMs),
   programs that spin on the barrier could wait for programs that never get an SM, so the same kernel
   is launched once per step instead (``schedule="per_step"``): the launch boundary is the barrier.
2. Everything else is parallel over time: grad_x = dG·W_ih, grad_W_ih = dGᵀ·x, grad_W_hh = dGᵀ·h_{t-1} and
   the bias gradient (the sum of dG) are single GEMMs / a reduction over all T·B rows, as in
   ``triton_lstm.reference.lstm_recurrence_backward_reference`` (``weight_grads.py``).

The chain's schedule and tiles are planned in ``backward_plans.py``; the launches that run a stack's
layers or a bidirectional layer's directions in one go are in ``lstm_bwd_whole_module.py``.

dG is stored in the input dtype (fp32 for fp32 inputs). Why not fp32 always: dG feeds two products, the
recurrent ``dG_{t+1}·W_hh`` in the kernel and the three big GEMMs. In the input dtype both run on tensor
cores with fp32 accumulation (an fp32 dG would need either an fp32 copy of W_hh / x / h for slow fp32
GEMMs or a second cast pass), dG takes half the memory, and the one rounding per step is the same one
the forward applies to h_t before its own recurrent product (and PyTorch's autograd in that dtype
applies to dh). The state carried along the chain, dh and dc, stays fp32 in registers.

Deterministic: every element of dG, dh and dc is written by exactly one program, every reduction is a
``tl.dot`` / GEMM / ``sum`` with an order fixed by the shapes; the only atomic is the barrier counter,
which orders steps and never touches a value.

W_hh is streamed, not held on chip: each program re-reads its (4H × BLOCK_H) column slice every step in
BLOCK_K chunks. Unlike the forward's slice (4 × K × BLOCK_H rows of the hidden units a program owns),
this one spans all 4H gate rows, and its dot's other operand (a BLOCK_B × 4H row block of dG) must be
chunked along the same 4H axis; Triton cannot slice a register-resident tensor, so residency would
mean one dot over the whole 4H, which only fits registers for small H. The whole W_hh of a layer (at most
32 MiB in bf16 at H = 2048) stays in the 50 MiB L2 of an H100 across steps. Whether a resident variant
for small H pays off is a measurement still to make on a GPU.

Co-residency: the persistent grid never exceeds the SM count (one program per SM always fits when the
kernel compiled at all) and is launched cooperatively, so the driver refuses it rather than start part
of it; under Triton's interpreter it is one program (programs run one after another there, so a second
would deadlock the first one's barrier). A compile that runs out of resources or a refused cooperative
launch falls back to per-step launches. ``TRITON_LSTM_PERSISTENT_BWD=0`` forces per-step launches (for
A/B timing).

A projection (``proj_size > 0``, W_hr) runs the same chain on the merged weight W_hh·W_hr
(``lstm_projection.lstmp_bwd``, which ``lstm_bwd`` hands it to). The chain's products (a row block of dG
times a weight's columns) are in ``chain_products.py``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from triton_lstm.kernels import backward_plans, common
from triton_lstm.kernels.backward_plans import bwd_launch_options, plan_bwd, tile_count
from triton_lstm.kernels.cells import gru_step_grads, load_step_operands, lstm_step_grads
from triton_lstm.kernels.chain_products import gate_product, stacked_gate_products
from triton_lstm.kernels.common import barrier_watch, dot_precision, grid_barrier, refused_cooperative_launch, wait_for
from triton_lstm.kernels.weight_grads import peephole_weight_grads, weight_and_input_grads
from triton_lstm.reference import accumulate_dtype, lstm_recurrence_backward_reference

@triton.jit(do_not_specialize=["T", "B", "t_start", "n_steps", "seg_start"])
def _lstm_bwd_kernel(
    grad_out_ptr,  # (T, B, H): gradient of h_1 … h_T (the top layer's for a stack; (T, B, 2H) in time order, both directions' outputs, for DIRECTIONS = 2)
    gates_ptr,  # (L, B, 4H): activations i, f, g, o of steps seg_start … seg_start+L-1 (per layer for a stack)
    c_ptr,  # (L+1, B, H) fp32: c of steps seg_start … seg_start+L (per layer for a stack)
    w_hh_ptr,  # (4H, H) (LAYERS, 4H, H) for a stack
    lengths_ptr,  # (B,) int32, read when HAS_LENGTHS
    grad_gates_ptr,  # (T, B, 4H) out: pre-activation gate gradients dG, input dtype (per layer for a stack); may be gates_ptr
    dh_ptr,  # (B, H) fp32 in/out: gradient reaching h_{t_start} from later steps / h_{t_end} from this step
    dc_ptr,  # (B, H) fp32 in/out: the same for c (both per layer for a stack)
    counter_ptr,  # (LAYERS + 1,) int32 zeros at launch: a barrier counter per layer, then the failure flag
    w_ih_above_ptr,  # LAYERS > 1: (LAYERS - 1, 4H, H), the input weights of layers 1, 2, …
    w_ch_ptr,  # PEEPHOLE: (3H,) the peephole weights (w_ci, w_cf, w_co); stacked per layer or direction
    dropout_mask_ptr,  # DROPOUT: (LAYERS - 1, T, B, H) uint8, the stacked forward's dropout masks between layers
    dropout_scale,  # DROPOUT: 1 / (1 - p), or 0 for p = 1
    T,
    B,
    t_start,  # first (latest) step this launch runs; it runs t_start, t_start-1, … for n_steps steps
    n_steps,
    seg_start,  # first step held by gates / c (0 unless a recompute segment)
    H: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    USE_BARRIER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPIN_LIMIT: tl.constexpr,  # polls before a barrier gives up (grid_barrier)
    LAYERS: tl.constexpr = 1,  # > 1: a stack of unidirectional layers, the grid's second axis (a reverse wavefront)
    DIRECTIONS: tl.constexpr = 1,  # 2: both directions of a bidirectional layer, the grid's second axis
    PEEPHOLE: tl.constexpr = False,
    CELL: tl.constexpr = "lstm",  # "gru": w_hh (3H, H) (and w_ih_above), gates (r, z, n, W_hn·h + b_hn), c its fp32 h
    DROPOUT: tl.constexpr = False,  # LAYERS > 1: the forward dropped h between layers (training)
    PREFETCH: tl.constexpr = False,  # load each step's saved operands during the step before (backward_plans.PREFETCH)
    ONE_LOOP: tl.constexpr = False,  # LAYERS > 1, no DROPOUT: a layer's two products in one K loop (backward_plans.STACK_ONE_LOOP)
):
    if DIRECTIONS > 1:
        # Each direction's chain on its own buffers (stacked per direction, step-indexed) with its own
        # barrier counter; the reverse direction reads its output gradient walking time backwards.
        direction = tl.program_id(1)
        d = direction.to(tl.int64)
        GATES: tl.constexpr = 3 if CELL == "gru" else 4
        _chain(grad_out_ptr, gates_ptr + d * T * B * 4 * H, c_ptr + d * (T + 1) * B * H, w_hh_ptr + d * GATES * H * H,
               lengths_ptr, grad_gates_ptr + d * T * B * 4 * H, dh_ptr + d * B * H, dc_ptr + d * B * H,
               counter_ptr + direction, counter_ptr + 2, grad_gates_ptr, w_hh_ptr, counter_ptr, False, T, B, t_start,
               n_steps, seg_start, H, HAS_LENGTHS, USE_BARRIER, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, SPIN_LIMIT,
               False, direction, 2, w_ch_ptr + d * 3 * H, PEEPHOLE, CELL, dropout_mask_ptr, dropout_scale, False,
               PREFETCH, False)
    elif LAYERS > 1:
        # The top layer leads: layer l's gradient of h_t is dG^{l+1}_t·W_ih^{l+1}, from the layer above's
        # step for the same t. Under the interpreter one program runs the layers top to bottom.
        GATES: tl.constexpr = 3 if CELL == "gru" else 4
        for index in range(tl.program_id(1), LAYERS, tl.num_programs(1)):
            layer = LAYERS - 1 - index
            lay = tl.full((), layer, tl.int64)
            _chain(grad_out_ptr, gates_ptr + lay * T * B * 4 * H, c_ptr + lay * (T + 1) * B * H,
                   w_hh_ptr + lay * GATES * H * H, lengths_ptr, grad_gates_ptr + lay * T * B * 4 * H, dh_ptr + lay * B * H,
                   dc_ptr + lay * B * H, counter_ptr + layer, counter_ptr + LAYERS,
                   grad_gates_ptr + (lay + 1) * T * B * 4 * H, w_ih_above_ptr + lay * GATES * H * H,
                   counter_ptr + layer + 1, layer < LAYERS - 1, T, B, t_start, n_steps, seg_start, H, HAS_LENGTHS,
                   USE_BARRIER, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, SPIN_LIMIT, True, 0, 1, w_ch_ptr + lay * 3 * H,
                   PEEPHOLE, CELL, dropout_mask_ptr + lay * T * B * H, dropout_scale, DROPOUT, PREFETCH,
                   ONE_LOOP and not DROPOUT)
    else:
        _chain(grad_out_ptr, gates_ptr, c_ptr, w_hh_ptr, lengths_ptr, grad_gates_ptr, dh_ptr, dc_ptr, counter_ptr,
               counter_ptr + 1, grad_gates_ptr, w_hh_ptr, counter_ptr, False, T, B, t_start, n_steps, seg_start, H,
               HAS_LENGTHS, USE_BARRIER, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, SPIN_LIMIT, False, 0, 1, w_ch_ptr,
               PEEPHOLE, CELL, dropout_mask_ptr, dropout_scale, False, PREFETCH, False)


@triton.jit
def _output_grad(grad_out_ptr, step, T, B, rows, offs_h, state_offs, lengths, mask, H: tl.constexpr,
                 HAS_LENGTHS: tl.constexpr, DIRECTIONS: tl.constexpr, direction):
    """The gradient reaching h_t from the layer's output at ``step``, as stored (zeros where ``mask`` is
    off): ``grad_out``'s (T, B, H) row, or with DIRECTIONS = 2 this direction's columns of the (T, B, 2H)
    one, the reverse direction's at time len_b − 1 − t."""
    if DIRECTIONS == 2:
        if HAS_LENGTHS:
            last = lengths.to(tl.int64) - 1  # (BLOCK_B, 1)
        else:
            last = tl.zeros_like(lengths).to(tl.int64) + (T - 1)
        times = tl.where(direction == 1, last - step, tl.zeros_like(last) + step)
        out_ptrs = grad_out_ptr + (times * B + rows[:, None]) * (2 * H) + direction.to(tl.int64) * H + offs_h[None, :]
        return tl.load(out_ptrs, mask=mask & (times >= 0), other=0.0)
    else:
        return tl.load(grad_out_ptr + step * B * H + state_offs, mask=mask, other=0.0)


@triton.jit
def _chain(grad_out_ptr, gates_ptr, c_ptr, w_hh_ptr, lengths_ptr, grad_gates_ptr, dh_ptr, dc_ptr, counter_ptr, failed_ptr,
           above_grad_gates_ptr, w_ih_above_ptr, above_counter_ptr, from_above, T, B, t_start, n_steps, seg_start,
           H: tl.constexpr, HAS_LENGTHS: tl.constexpr, USE_BARRIER: tl.constexpr, DOT_PRECISION: tl.constexpr,
           BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, SPIN_LIMIT: tl.constexpr,
           STACKED: tl.constexpr, direction, DIRECTIONS: tl.constexpr, w_ch_ptr, PEEPHOLE: tl.constexpr,
           CELL: tl.constexpr, dropout_mask_ptr, dropout_scale, DROPOUT: tl.constexpr, PREFETCH: tl.constexpr,
           ONE_LOOP: tl.constexpr):
    """The reverse-time chain of one layer on this program's tile. With STACKED and ``from_above`` (a
    layer under the top of a stack) the gradient of h_t is dG^{l+1}_t·W_ih^{l+1}, formed here once the
    layer above has passed its barrier of the same step, instead of read from ``grad_out``. With
    DIRECTIONS = 2 ``grad_out`` is the bidirectional layer's (T, B, 2H), read at this direction's columns
    and, for the reverse direction, at time len_b − 1 − t in step t. With PEEPHOLE the cell gradient also
    flows through the peepholes (``w_ch_ptr``: w_ci, w_cf, w_co): dc_t gets dO·w_co, dc_{t-1} dI·w_ci +
    dF·w_cf. With CELL "gru" the register ``dc`` carries the gradient reaching h_{t-1} directly, z ⊙ dh
    (``gru_step_grads``), and the four dG columns are (dR, dZ, dN, dN ⊙ r). With DROPOUT (a stack's layer
    under the top, whose h_t the layer above read masked and scaled) the product from above is masked and
    scaled the same way (``dropout_mask_ptr``: this layer's (T, B, H) masks). With PREFETCH a step's saved
    gates and state and its output gradient (what does not depend on dG_{t+1}) are loaded during the step
    before, ahead of its barrier wait, instead of after the recurrent product (``backward_plans.PREFETCH``).
    With ONE_LOOP (STACKED, not DROPOUT) a layer under the top waits for the layer above first and forms
    both products in one K loop (``chain_products.stacked_gate_products``); the recurrent one then reads
    zeros where step t+1 did not run (its dG rows there are stored as zeros), and the carried gradient is
    added there."""
    num_h_tiles = tl.cdiv(H, BLOCK_H)
    pid = tl.program_id(0)
    offs_b = (pid // num_h_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = (pid % num_h_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_bh = mask_b[:, None] & mask_h[None, :]
    # int64 offsets: T·B·4H can pass 2³¹ elements.
    rows = offs_b.to(tl.int64)
    state_offs = rows[:, None] * H + offs_h[None, :]
    gate_row_offs = rows[:, None] * (4 * H)
    if HAS_LENGTHS:
        lengths = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0)[:, None]
    else:
        lengths = tl.zeros((BLOCK_B, 1), dtype=tl.int32)  # (only its shape is used without HAS_LENGTHS)
    out_dtype = grad_gates_ptr.dtype.element_ty
    # Where the output gradient is read: the top layer of a stack, every layer not in a stack.
    if STACKED:
        out_mask = mask_bh & ((tl.zeros((BLOCK_B, 1), dtype=tl.int32) + from_above) == 0)  # (tile-shaped, as ``more``)
    else:
        out_mask = mask_bh
    if PREFETCH:
        first_local = (t_start - seg_start).to(tl.int64)
        x_a, x_b, x_c, x_d, state_prev, state_now = load_step_operands(
            gates_ptr + first_local * B * 4 * H + gate_row_offs + offs_h[None, :], c_ptr + first_local * B * H + state_offs,
            mask_bh, B, H, CELL)
        out_grad = _output_grad(grad_out_ptr, t_start.to(tl.int64), T, B, rows, offs_h, state_offs, lengths,
                                out_mask, H, HAS_LENGTHS, DIRECTIONS, direction)

    dh_carry = tl.load(dh_ptr + state_offs, mask=mask_bh, other=0.0)
    # Set once a barrier gave up: from then on this program stops waiting and writes NaN.
    failed = tl.program_id(0) < 0  # False (built this way: older interpreters lack tl.full of int1)
    dc = tl.load(dc_ptr + state_offs, mask=mask_bh, other=0.0)
    for s in range(n_steps):
        t = t_start - s
        step = t.to(tl.int64)
        later = step + 1

        # Gradient reaching h_t through step t+1's gates: dG_{t+1}·W_hh on this tile's units. Rows past B,
        # gate columns past 4H and the step past the end (t = T-1) load as zeros.
        later_ok = later < T
        if ONE_LOOP:
            # (Where step t+1 did not run its dG rows are zeros: the carried gradient is added below.)
            if from_above:
                # dG^{l+1}_t is complete once the layer above has passed its barrier of this same step.
                if not failed:
                    failed = wait_for(above_counter_ptr, (s + 1) * tl.num_programs(0), failed_ptr, SPIN_LIMIT)
            dh = stacked_gate_products(grad_gates_ptr + later * B * 4 * H, w_hh_ptr, tl.where(later_ok, 4 * H, 0),
                                       above_grad_gates_ptr + step * B * 4 * H, w_ih_above_ptr, from_above,
                                       gate_row_offs, mask_b, offs_h, mask_h, H, DOT_PRECISION, BLOCK_K, CELL)
        else:
            recurrent = gate_product(tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32),
                                     grad_gates_ptr + later * B * 4 * H + gate_row_offs, mask_b, w_hh_ptr, offs_h,
                                     mask_h, H, DOT_PRECISION, BLOCK_K, tl.where(later_ok, 4 * H, 0),
                                     "gru_hidden" if CELL == "gru" else "lstm")
        # Where step t+1 did not run (past a sequence's end, or t = T-1) h_t was carried into h_{t+1}
        # unchanged: its gradient passes straight through.
        if HAS_LENGTHS:
            later_ran = later < lengths
        else:
            later_ran = later_ok
        if ONE_LOOP:
            dh += tl.where(later_ran, 0.0, dh_carry)
        else:
            dh = tl.where(later_ran, recurrent, dh_carry)
        if not PREFETCH:
            out_grad = _output_grad(grad_out_ptr, step, T, B, rows, offs_h, state_offs, lengths, out_mask, H,
                                    HAS_LENGTHS, DIRECTIONS, direction)
        if ONE_LOOP:
            if not from_above:
                dh += out_grad.to(tl.float32)
        elif STACKED:
            if from_above:
                # dG^{l+1}_t is complete once the layer above has passed its barrier of this same step.
                if not failed:
                    failed = wait_for(above_counter_ptr, (s + 1) * tl.num_programs(0), failed_ptr, SPIN_LIMIT)
                if DROPOUT:
                    above = gate_product(tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32),
                                         above_grad_gates_ptr + step * B * 4 * H + gate_row_offs, mask_b,
                                         w_ih_above_ptr, offs_h, mask_h, H, DOT_PRECISION, BLOCK_K, 4 * H,
                                         "gru_input" if CELL == "gru" else "lstm")
                    keep = tl.load(dropout_mask_ptr + step * B * H + state_offs, mask=mask_bh, other=0)
                    dh += tl.where(keep != 0, above * dropout_scale, 0.0)
                else:
                    dh = gate_product(dh, above_grad_gates_ptr + step * B * 4 * H + gate_row_offs, mask_b,
                                      w_ih_above_ptr, offs_h, mask_h, H, DOT_PRECISION, BLOCK_K, 4 * H,
                                      "gru_input" if CELL == "gru" else "lstm")
            else:
                dh += out_grad.to(tl.float32)
        else:
            dh += out_grad.to(tl.float32)

        local = step - seg_start
        gate_ptrs = gates_ptr + local * B * 4 * H + gate_row_offs + offs_h[None, :]
        state_ptrs = c_ptr + local * B * H + state_offs  # c_{t-1} (a GRU's fp32 h_{t-1}); c_t one step on
        if not PREFETCH:
            x_a, x_b, x_c, x_d, state_prev, state_now = load_step_operands(gate_ptrs, state_ptrs, mask_bh, B, H, CELL)
        if CELL == "gru":
            # The direct path from step t+1, z_{t+1} ⊙ dh_{t+1}. Zero where step t+1 did not run: the steps
            # that run are a prefix, so after one that did not (or at the start: grad_c_n is zero for a GRU)
            # the carried dc stays zero, and the whole gradient of h passes through in dh (dh_carry).
            dh += dc
            d_i, d_f, d_g, d_o, dc_prev = gru_step_grads(dh, x_a, x_b, x_c, x_d, state_prev)
        else:
            d_i, d_f, d_g, d_o, dc_prev = lstm_step_grads(dh, dc, x_a, x_b, x_c, x_d, state_prev, state_now, w_ch_ptr,
                                                           offs_h, mask_h, H, PEEPHOLE)
        if HAS_LENGTHS:
            ran = step < lengths
            d_i = tl.where(ran, d_i, 0.0)
            d_f = tl.where(ran, d_f, 0.0)
            d_g = tl.where(ran, d_g, 0.0)
            d_o = tl.where(ran, d_o, 0.0)
            dc = tl.where(ran, dc_prev, dc)
        else:
            dc = dc_prev
        d_i = tl.where(failed, float("nan"), d_i)
        d_f = tl.where(failed, float("nan"), d_f)
        d_g = tl.where(failed, float("nan"), d_g)
        d_o = tl.where(failed, float("nan"), d_o)
        dg_out = grad_gates_ptr + step * B * 4 * H + gate_row_offs + offs_h[None, :]
        tl.store(dg_out, d_i.to(out_dtype), mask=mask_bh)
        tl.store(dg_out + H, d_f.to(out_dtype), mask=mask_bh)
        tl.store(dg_out + 2 * H, d_g.to(out_dtype), mask=mask_bh)
        tl.store(dg_out + 3 * H, d_o.to(out_dtype), mask=mask_bh)
        dh_carry = dh
        if PREFETCH:
            # The next (earlier) step's operands, while this step's dG reaches the other programs.
            more = (tl.zeros((BLOCK_B, 1), dtype=tl.int32) + s + 1) < n_steps  # (a tile-shaped mask for the interpreter)
            x_a, x_b, x_c, x_d, state_prev, state_now = load_step_operands(gate_ptrs - B * 4 * H, state_ptrs - B * H,
                                                                            mask_bh & more, B, H, CELL)
            out_grad = _output_grad(grad_out_ptr, step - 1, T, B, rows, offs_h, state_offs, lengths,
                                    out_mask & more, H, HAS_LENGTHS, DIRECTIONS, direction)
        if USE_BARRIER:
            if not failed:
                failed = grid_barrier(counter_ptr, (s + 1) * tl.num_programs(0), failed_ptr, SPIN_LIMIT)

    # Per-step launches hand the chain to the next launch through these buffers; after the last step
    # they hold the gradient at step 0 (for h still to be pushed through dG_0·W_hh by the launcher).
    tl.store(dh_ptr + state_offs, dh_carry, mask=mask_bh)
    tl.store(dc_ptr + state_offs, dc, mask=mask_bh)


# Persistent launches that did not fit the device (OutOfResources) or were refused as a cooperative grid,
# keyed by (H, tile, programs, dtype, device): they run per step from then on without trying again.
_per_step_after_failure: set[tuple] = set()


def lstm_bwd_gate_grads(
    grad_out: torch.Tensor,
    grad_h_n: torch.Tensor,
    grad_c_n: torch.Tensor,
    w_hh: torch.Tensor,
    lengths: torch.Tensor | None,
    segments: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
    schedule: str = "auto",
    tiling: tuple[int, int, int, int] | None = None,
    w_ch: torch.Tensor | None = None,
    cell: str = "lstm",
    into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequential part of the backward (no projection): returns ``(grad_gates, grad_h0, grad_c0)``.

    ``segments`` yields ``(t0, gates, c)`` from the last segment of the sequence to the first: the
    activations of steps t0 … t0+L-1 (``gates`` (L, B, 4H), ``c`` (L+1, B, H) fp32 from step t0). The
    whole sequence is one segment, ``[(0, gates, c_all)]``; a recompute backward yields segments it
    recomputes one at a time. The chain crosses segment boundaries exactly as it crosses steps (dG of
    the later segment is read from ``grad_gates``, dh and dc stay fp32), so the result does not depend
    on the segmentation.

    ``grad_gates`` (T, B, 4H) holds the pre-activation gate gradients in the input dtype (zero past a
    sequence's end); ``grad_h0`` / ``grad_c0`` are fp32. ``lengths`` is int32 on the device or None.
    ``tiling`` = (BLOCK_B, BLOCK_H, BLOCK_K, num_warps) overrides the planner's tile (``benchmarks/tune.py``);
    a persistent schedule with it must keep the tiles within the SM count. ``w_ch`` (3H,): the layer's
    peephole weights. ``cell`` "gru": a GRU layer (``kernels/gru.py``): ``w_hh`` (3H, H), ``gates`` its
    saved (r, z, n, hn), ``c`` its fp32 h, ``grad_c_n`` zeros; grad_gates holds (dR, dZ, dN, dN ⊙ r)
    and grad_c0 is None (grad_h0 includes the direct path).

    ``into``: the buffer that receives grad_gates, else a new one. It may be the saved gates of a single
    contiguous segment (``overwrite_gates`` of the callers): each program reads its own tile of step t's
    gates before it writes the same tile of dG_t, and no program reads another's gates, so dG can take the
    place of the gates that nothing needs after the chain — T·B·4H elements fewer at the backward's peak.
    """
    T, B, H = grad_out.shape
    dtype, device = w_hh.dtype, w_hh.device
    grad_out = grad_out.contiguous()
    w_hh = w_hh.contiguous()
    grad_gates = into if into is not None else torch.empty(T, B, 4 * H, dtype=dtype, device=device)
    dh = grad_h_n.to(torch.float32, copy=True).contiguous()
    dc = grad_c_n.to(torch.float32, copy=True).contiguous()
    counter = torch.zeros(2, dtype=torch.int32, device=device)  # the barrier counter, the failure flag
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    if tiling is None:
        schedule, block_b, block_h = plan_bwd(B, H, num_sms, schedule)
        options = bwd_launch_options(H, block_b, block_h, w_hh.element_size())
    else:
        block_b, block_h, block_k, num_warps = tiling
        schedule = "per_step" if schedule == "per_step" else "persistent"
        options = dict(BLOCK_K=block_k, num_warps=num_warps)
    grid = (tile_count(B, H, block_b, block_h),)
    launch = dict(
        H=H,
        HAS_LENGTHS=lengths is not None,
        DOT_PRECISION=dot_precision(dtype),
        BLOCK_B=block_b,
        BLOCK_H=block_h,
        SPIN_LIMIT=common.BARRIER_SPIN_LIMIT,
        PEEPHOLE=w_ch is not None,
        CELL=cell,
        PREFETCH=backward_plans.chain_variants(dtype.itemsize, 1, cell, False, device.type != "cuda")[0],
        **options,
    )
    # A build that did not fit or was refused runs per step from then on; the key is the whole build (its
    # grid and every constexpr), so that another build of the same tile (chunks, warps, PREFETCH) still tries.
    downgrade_key = (grid[0], dtype, device, tuple(sorted(launch.items())))
    if schedule == "persistent" and downgrade_key in _per_step_after_failure:
        schedule = "per_step"
    lengths_arg = lengths if lengths is not None else counter
    for t0, gates, c in segments:
        L = gates.shape[0]
        args = (grad_out, gates.contiguous(), c.contiguous(), w_hh, lengths_arg, grad_gates, dh, dc, counter, w_hh,
                w_ch if w_ch is not None else w_hh, counter, 1.0, T, B)
        if schedule == "persistent":
            barrier_watch.check()  # an earlier launch whose barrier gave up raises here
            counter.zero_()  # the barrier's targets count from zero in every launch
            try:
                # Cooperative: the driver starts the grid only if all of it can be resident at once, so
                # a kernel sharing the GPU (another stream, NCCL) cannot leave programs spinning on the
                # barrier for programs that never get an SM. The interpreter ignores the option.
                _lstm_bwd_kernel[grid](
                    *args, t0 + L - 1, L, t0, USE_BARRIER=True, launch_cooperative_grid=True, **launch
                )
                barrier_watch.watch(counter[1:], f"the persistent backward kernel (tile {block_b}×{block_h}, {grid[0]} programs)")
                continue
            except OutOfResources:
                # Raised while compiling, before any program ran: the buffers are untouched.
                schedule = "per_step"
            except RuntimeError as error:
                if not refused_cooperative_launch(error):
                    raise
                schedule = "per_step"
            _per_step_after_failure.add(downgrade_key)
        for t in reversed(range(t0, t0 + L)):
            _lstm_bwd_kernel[grid](*args, t, 1, t0, USE_BARRIER=False, **launch)

    return chain_results(grad_gates, w_hh, dh, dc, lengths, cell)


def gates_as_dg(gates: torch.Tensor, overwrite_gates: bool) -> torch.Tensor | None:
    """The chains' ``into`` for a caller's ``overwrite_gates``: the saved gates themselves where the caller
    allows it and they are contiguous (the kernel reads and writes them in place), else None (a new
    buffer)."""
    return gates if overwrite_gates and gates.is_contiguous() else None


def chain_results(grad_gates, w_hh, dh, dc, lengths, cell: str):
    """(grad_gates, grad_h0, grad_c0) from the chain's buffers: the LSTM's grad_c0 is dc; a GRU has none
    (None), and its grad_h0 adds the direct path z_0 ⊙ dh_0 that the chain left in dc (zero where step 0
    did not run) to the path through step 0's gates — the hidden side of dG (dR, dZ, dN ⊙ r) against
    W_hh's (r, z, n) rows. A leading axis of layers or directions on everything but ``lengths``."""
    if cell != "gru":
        return grad_gates, _grad_h0(grad_gates, w_hh, dh, lengths), dc
    H = dh.shape[-1]
    first = grad_gates[..., :1, :, :]  # step 0 only
    hidden_side = torch.cat((first[..., :2 * H], first[..., 3 * H:]), dim=-1)
    return grad_gates, _grad_h0(hidden_side, w_hh, dh, lengths) + dc, None


def _grad_h0(grad_gates: torch.Tensor, w_hh: torch.Tensor, dh: torch.Tensor, lengths: torch.Tensor | None):
    """The gradient of h0 from the chain's result: through step 0's gates where step 0 ran, straight
    through (``dh``, what reached h0 from later steps) where it did not. In fp32, as the kernel's own
    recurrent products accumulate. ``grad_gates`` (T, B, 4H) with ``w_hh`` (4H, H), or with a leading axis
    of layers or directions on both (and on ``dh``)."""
    acc = accumulate_dtype(w_hh.dtype)
    first = grad_gates[..., 0, :, :].to(acc)
    if w_hh.dim() == 2:
        recurrent0 = torch.matmul(first, w_hh.to(acc))
    else:
        # One plain product per layer or direction: on an H200 the batched fp32 one, (2, 17, 4096)·(2, 4096,
        # 1024), was 7× less accurate than two plain ones (2.6e-6 against 3.5e-7, past PyTorch's own error).
        recurrent0 = torch.stack([torch.matmul(g, w.to(acc)) for g, w in zip(first, w_hh)])
    recurrent0 = recurrent0.to(torch.float32)
    if lengths is None:
        return recurrent0
    return torch.where((lengths > 0).unsqueeze(1), recurrent0, dh)


def lstm_bwd(
    grad_out: torch.Tensor,
    grad_h_n: torch.Tensor,
    grad_c_n: torch.Tensor,
    x: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    w_hr: torch.Tensor | None,
    gates: torch.Tensor,
    h_all: torch.Tensor,
    c_all: torch.Tensor,
    lengths: torch.Tensor | None,
    w_ch: torch.Tensor | None = None,
    schedule: str = "auto",
    overwrite_gates: bool = False,
):
    """Fused backward of one layer and direction; same arguments and outputs as
    ``lstm_recurrence_backward_reference``: gradients of x, h0, c0, W_ih, W_hh, the bias, W_hr and the
    peephole weights w_ch.

    With a projection (``w_hr`` not None): the same chain on the merged weight W_hh·W_hr
    (``lstm_projection.lstmp_bwd``).
    ``schedule``: "auto" (persistent where the tiles fit the SMs, else one launch per step),
    "persistent" or "per_step" (for tests and timing). ``overwrite_gates``: the gate gradients may take
    the saved gates' place (``lstm_bwd_gate_grads``'s ``into``), which then hold dG.
    """
    if gates.numel() == 0:
        # An empty batch or hidden size leaves nothing to launch over.
        return lstm_recurrence_backward_reference(
            grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, gates, h_all, c_all, lengths, w_ch
        )
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int32)
    if w_hr is not None:
        from triton_lstm.kernels.lstm_projection import lstmp_bwd  # it runs this module's chain

        return (*lstmp_bwd(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, gates, h_all, c_all, lengths, schedule,
                           overwrite_gates), None)  # no peepholes with a projection
    grad_gates, grad_h0, grad_c0 = lstm_bwd_gate_grads(
        grad_out, grad_h_n, grad_c_n, w_hh, lengths, [(0, gates, c_all)], schedule, w_ch=w_ch,
        into=gates_as_dg(gates, overwrite_gates),
    )
    grad_x, grad_w_ih, grad_w_hh, grad_bias = weight_and_input_grads(grad_gates, x, h_all[:-1], w_ih)
    grad_w_ch = None if w_ch is None else peephole_weight_grads(grad_gates[None], c_all[None])[0].to(w_ch.dtype)
    dtype = x.dtype
    return (grad_x, grad_h0.to(dtype), grad_c0.to(dtype), grad_w_ih, grad_w_hh.to(w_hh.dtype), grad_bias, None,
            grad_w_ch)
