"""The persistent forward's work on one tile (batch block × hidden block) of one step, shared by its
schedules — one layer, both directions of a layer (``lstm_fwd_persistent.py``) and a stack's layers
(``stack_layer.py``): a layer's product onto the gate accumulators, the resident weight slices, the gate
inputs at each row's time, and the cell update with its h_t store."""

import triton
import triton.language as tl

from triton_lstm.kernels.cells import cell_update
from triton_lstm.kernels.common import (
    accumulate_product_resident,
    accumulate_product_streamed,
    interleaved_gate_rows,
    load_gate_inputs,
    load_gates,
    load_own_state,
    split_interleaved_gates,
)



@triton.jit
def one_tile(pid_b, pid_h, B, H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The batch rows and hidden units of the tile a program owns for the whole sequence (batch block
    ``pid_b``, hidden block ``pid_h``): ``(offs_b, mask_b, rows, offs_h, mask_h)``, rows as int64 offsets."""
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    return offs_b, offs_b < B, offs_b.to(tl.int64), offs_h, offs_h < H

@triton.jit
def layer_product(acc_i, acc_f, acc_g, acc_o, h_prev_ptr, w_ptr, res_i, res_f, res_g, res_o, rows, mask_b, offs_k, offs_h,
                   mask_h, H: tl.constexpr, K: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                   RESIDENT: tl.constexpr, GATES: tl.constexpr, GATE_BIT: tl.constexpr):
    """A stack layer's h·Wᵀ (K × H per gate: K = H, or x's width for a layer 0 that forms its input product)
    added onto the accumulators: from the resident slices ``res_*`` (RESIDENT) or streaming W at ``w_ptr``
    in BLOCK_K chunks. With GATES = 3 ``acc_o`` is untouched."""
    if RESIDENT:
        return accumulate_product_resident(acc_i, acc_f, acc_g, acc_o, h_prev_ptr, rows, mask_b, offs_k, res_i, res_f,
                                           res_g, res_o, K, DOT_PRECISION, GATES, GATE_BIT)
    else:
        return accumulate_product_streamed(acc_i, acc_f, acc_g, acc_o, h_prev_ptr, w_ptr, rows, mask_b, offs_h, mask_h,
                                           H, K, DOT_PRECISION, BLOCK_K, GATES, GATE_BIT)


@triton.jit
def stack_products_streamed(acc_i, acc_f, acc_g, acc_o, forms_input, x_ptr, w_ih_ptr, h_prev_ptr, w_hh_ptr, rows, mask_b,
                            offs_h, H: tl.constexpr, IN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK_K: tl.constexpr, GATES: tl.constexpr, GATE_BIT: tl.constexpr):
    """A stack layer's x·W_ihᵀ (where ``forms_input``; x (B, IN_K) at ``x_ptr``: the layer below's h_t) and
    h_{t-1}·W_hhᵀ added onto the accumulators, as one gate-interleaved dot per K chunk in one loop over both
    products' chunks, W streamed. One loop is one software pipeline: W_hh's first chunks are in flight while
    W_ih's last ones multiply, where two loops drain between them (a round trip to L2 per step on the
    critical path). A GRU (``GATES`` = 3) keeps its n gate's two products apart in the interleaved columns'
    spare fourth gate: returns (r, z, h_n, x_n) with h_n = h·W_hnᵀ alone in the third accumulator (the reset
    gate multiplies it alone) and the input side, ``acc_g`` + x·W_inᵀ, in the fourth."""
    BLOCK_B: tl.constexpr = rows.shape[0]
    BLOCK_H: tl.constexpr = offs_h.shape[0]
    IN_CHUNKS: tl.constexpr = (IN_K + BLOCK_K - 1) // BLOCK_K
    CHUNKS: tl.constexpr = (H + BLOCK_K - 1) // BLOCK_K
    gate, unit = interleaved_gate_rows(tl.min(offs_h, axis=0), BLOCK_H, GATE_BIT)
    w_rows = (gate * H + unit).to(tl.int64)[None, :]
    mask_n = unit < H
    if GATES == 3:
        # W_ih's rows (r, z, n) in the columns of gates 0, 1 and 3; W_hh's in 0, 1 and 2.
        in_rows = (tl.where(gate == 3, 2, gate) * H + unit).to(tl.int64)[None, :]
        in_mask = (unit < H) & (gate != 2)
        hh_mask = (unit < H) & (gate < 3)
    acc = tl.zeros((BLOCK_B, 4 * BLOCK_H), dtype=tl.float32)
    first = tl.where(forms_input, 0, IN_CHUNKS)  # a layer that reads its input projection: W_hh's chunks only
    for j in range(first, IN_CHUNKS + CHUNKS):
        is_input = j < IN_CHUNKS
        k0 = tl.where(is_input, j, j - IN_CHUNKS) * BLOCK_K
        a_ptr = tl.where(is_input, x_ptr, h_prev_ptr)
        w_ptr = tl.where(is_input, w_ih_ptr, w_hh_ptr)
        if IN_K == H:
            width = H
        else:  # x of another width (a layer 0 that forms its input product from x)
            width = tl.where(is_input, IN_K, H)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < width
        a_blk = tl.load(a_ptr + rows[:, None] * width + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :],
                        other=0.0, cache_modifier=".cg")
        chunk_rows, chunk_mask = w_rows, mask_n
        if GATES == 3:
            chunk_rows = tl.where(is_input, in_rows, w_rows)
            chunk_mask = tl.where(is_input, in_mask, hh_mask)
        w_blk = tl.load(w_ptr + chunk_rows * width + offs_k[:, None], mask=mask_k[:, None] & chunk_mask[None, :],
                        other=0.0)
        acc = tl.dot(a_blk, w_blk, acc, input_precision=DOT_PRECISION)
    p_i, p_f, p_g, p_o = split_interleaved_gates(acc, BLOCK_B, BLOCK_H, GATE_BIT)
    if GATES == 3:
        return acc_i + p_i, acc_f + p_f, p_g, acc_g + p_o
    return acc_i + p_i, acc_f + p_f, acc_g + p_g, acc_o + p_o


@triton.jit
def resident_slices(w_ptr, h_start, offs_k, use, H: tl.constexpr, K: tl.constexpr, GATES: tl.constexpr,
                     BLOCK_H: tl.constexpr, GATE_BIT: tl.constexpr):
    """A program's resident slices of a (GATES·H, K) weight for hidden units h_start … h_start + BLOCK_H − 1,
    as the transposed right operands of the products (``offs_k`` the whole K padded; all zeros unless
    ``use``): the four gates' K × BLOCK_H slices, or with ``GATE_BIT`` > 0 the one interleaved
    K × 4·BLOCK_H slice (``common.interleaved_gate_rows``), returned in all four places. ``GATES`` = 3: a
    GRU's (3H, K) weight; the fourth slice is the third again (or a zero gate), never used."""
    if GATE_BIT > 0:
        gate, unit = interleaved_gate_rows(h_start, BLOCK_H, GATE_BIT)
        mask = use & (offs_k < K)[:, None] & ((unit < H) & (gate < GATES))[None, :]
        w_i = tl.load(w_ptr + (gate * H + unit).to(tl.int64)[None, :] * K + offs_k[:, None], mask=mask, other=0.0)
        w_f, w_g, w_o = w_i, w_i, w_i
    else:
        offs_h = h_start + tl.arange(0, BLOCK_H)
        ptrs = w_ptr + offs_h.to(tl.int64)[None, :] * K + offs_k[:, None]
        mask = use & (offs_k < K)[:, None] & (offs_h < H)[None, :]
        w_i = tl.load(ptrs, mask=mask, other=0.0)
        w_f = tl.load(ptrs + H * K, mask=mask, other=0.0)
        w_g = tl.load(ptrs + 2 * H * K, mask=mask, other=0.0)
        if GATES == 4:
            w_o = tl.load(ptrs + 3 * H * K, mask=mask, other=0.0)
        else:
            w_o = w_g
    return w_i, w_f, w_g, w_o


@triton.jit
def cell_step(acc_i, acc_f, acc_g, acc_o, projected_ptr, h_ptr, c_ptr, gates_ptr, lengths_ptr,
               step, B, rows, offs_b, mask_b, offs_h, mask_h, H: tl.constexpr, K: tl.constexpr, HAS_LENGTHS: tl.constexpr,
               SAVE: tl.constexpr, failed, out_ptr, T, direction, DIRECTIONS: tl.constexpr, cell_params_ptr,
               PEEPHOLE: tl.constexpr, CELL: tl.constexpr):
    """The cell update of one tile with its inputs and state read from memory, and its h_t store."""
    GATES: tl.constexpr = 3 if CELL == "gru" else 4
    mask_bh = mask_b[:, None] & mask_h[None, :]
    times = time_rows(step, direction, T, lengths_ptr, offs_b, mask_b, HAS_LENGTHS, DIRECTIONS)
    x_i, x_f, x_g, x_o = gate_inputs(projected_ptr, step, times, direction, T, B, rows, offs_h, mask_bh, H, DIRECTIONS,
                                      GATES, SAVE)
    h_prev, c_prev = load_own_state(h_ptr, c_ptr, step, B, rows, offs_h, mask_bh, H, K, HAS_LENGTHS, SAVE)
    update_and_store_h(
        acc_i, acc_f, acc_g, acc_o, x_i, x_f, x_g, x_o, h_prev, c_prev, h_ptr, c_ptr, gates_ptr, lengths_ptr,
        step, B, rows, offs_b, mask_b, offs_h, mask_h, H, K, HAS_LENGTHS, SAVE, failed, out_ptr, times, direction,
        DIRECTIONS, cell_params_ptr, PEEPHOLE, CELL,
    )


@triton.jit
def time_rows(step, direction, T, lengths_ptr, offs_b, mask_b, HAS_LENGTHS: tl.constexpr, DIRECTIONS: tl.constexpr):
    """The time index each row of the tile is at in ``step`` (int64): the step itself, except for the
    reverse direction of a bidirectional layer, which walks each sequence backwards from its own last
    element (negative once a row is past its length). A scalar for one-direction layers."""
    if DIRECTIONS == 1:
        return step
    else:
        if HAS_LENGTHS:
            last = tl.load(lengths_ptr + offs_b, mask=mask_b, other=0).to(tl.int64) - 1
        else:
            last = tl.zeros_like(offs_b).to(tl.int64) + (T - 1)
        return tl.where(direction == 1, last - step, tl.zeros_like(last) + step)


@triton.jit
def gate_inputs(projected_ptr, step, times, direction, T, B, rows, offs_h, mask_bh, H: tl.constexpr,
                DIRECTIONS: tl.constexpr, GATES: tl.constexpr, SAVE: tl.constexpr):
    """This tile's input projection at ``step``, per gate, in fp32 (``load_gate_inputs``, rows as there).
    A bidirectional layer's holds each direction's in the order its recurrence runs, (2, T, B, ·) like its
    gates (``bidirectional.projections_in_step_order``): the reverse direction's step s is time
    ``times`` = len_b - 1 - s of its sequence, and nothing is read once a row is past its length."""
    if DIRECTIONS == 1:
        return load_gate_inputs(projected_ptr, step, B, rows, offs_h, mask_bh, H, GATES, SAVE)
    else:
        width: tl.constexpr = 4 * H if SAVE else GATES * H
        x_ptrs = (projected_ptr + direction.to(tl.int64) * T * B * width + (step * B + rows[:, None]) * width
                  + offs_h[None, :])
        return load_gates(x_ptrs, mask_bh & (times >= 0)[:, None], H, GATES)


@triton.jit
def update_and_store_h(acc_i, acc_f, acc_g, acc_o, x_i, x_f, x_g, x_o, h_prev, c_prev, h_ptr, c_ptr, gates_ptr,
                        lengths_ptr, step, B, rows, offs_b, mask_b, offs_h, mask_h, H: tl.constexpr, K: tl.constexpr,
                        HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr, failed, out_ptr, times, direction,
                        DIRECTIONS: tl.constexpr, cell_params_ptr, PEEPHOLE: tl.constexpr, CELL: tl.constexpr):
    """The cell update of one tile (gates and c stored by ``cells.cell_update``) and its h_t store, NaN
    once the program's barrier gave up; returns (h_t, c_t) in fp32 (a GRU's c is its fp32 h). A
    bidirectional layer also stores h_t into its output at ``times`` (rows that ran this step only: the
    rest stays zero)."""
    h, c = cell_update(
        acc_i, acc_f, acc_g, acc_o, x_i, x_f, x_g, x_o, h_prev, c_prev, c_ptr, gates_ptr, lengths_ptr,
        step, B, rows, offs_b, mask_b, offs_h, mask_h, H, HAS_LENGTHS, SAVE, cell_params_ptr, PEEPHOLE, CELL,
    )
    h = tl.where(failed, float("nan"), h)
    h_offs = (step + 1) * B * K + rows[:, None] * K + offs_h[None, :]
    tl.store(h_ptr + h_offs, h.to(h_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_h[None, :])
    if DIRECTIONS == 2:
        ran = mask_b
        if HAS_LENGTHS:
            ran = ran & (step < tl.load(lengths_ptr + offs_b, mask=mask_b, other=0))
        out_offs = (times[:, None] * B + rows[:, None]) * (2 * H) + direction.to(tl.int64) * H + offs_h[None, :]
        tl.store(out_ptr + out_offs, h.to(out_ptr.dtype.element_ty), mask=ran[:, None] & mask_h[None, :])
    return h, c
