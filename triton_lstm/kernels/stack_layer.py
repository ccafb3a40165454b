"""One layer of a stack in the persistent forward's launch (``lstm_fwd_stack.py``): its T steps on this
program's tiles, a wavefront across layers — layer l runs step t while the layer below runs step t + 1."""

import triton
import triton.language as tl

from triton_lstm.kernels.common import barrier_arrive, grid_barrier, load_gate_inputs, load_own_state, wait_for
from triton_lstm.kernels.persistent_tiles import (
    layer_product,
    one_tile,
    resident_slices,
    stack_products_streamed,
    update_and_store_h,
)


@triton.jit
def stack_layer(layer, projected_ptr, w_ih_ptr, bias_ptr, w_hh_ptr, h_ptr, c_ptr, gates_ptr, lengths_ptr, counters_ptr,
                 T, B, grid_b, pid_h, pid_b, failed, H: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr, GRID_H: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, SPIN_LIMIT: tl.constexpr, LAYERS: tl.constexpr,
                 RESIDENT: tl.constexpr, cell_params_ptr, PEEPHOLE: tl.constexpr, CELL: tl.constexpr,
                 GATE_BIT: tl.constexpr, INPUT_AHEAD: tl.constexpr, FUSED_INPUT: tl.constexpr, IN_K: tl.constexpr,
                 IN_BLOCK_K: tl.constexpr, dropout_mask_ptr, dropped_ptr, dropout_scale, DROPOUT: tl.constexpr,
                 initial_ptr, HAS_INITIAL: tl.constexpr, ONE_TILE: tl.constexpr):
    """All T steps of one layer of a stack, this program's tiles (a wavefront across layers). W streamed
    in BLOCK_K chunks, or ``RESIDENT``: one hidden block per program (GRID_H == NUM_H_BLOCKS), whose
    slices of W_ih and W_hh are loaded once per layer, before its time loop (BLOCK_K is the whole K).

    Layer 0 reads its input projection from ``projected``; layer l > 0 forms it here, from the layer
    below's h_t (in that layer's h_all) and its own W_ih, next to the recurrent product. With
    ``FUSED_INPUT`` layer 0 forms its own the same way, from x (``projected_ptr`` then holds x, (T, B, I):
    read as the rows of a layer below, whose h_all would hold x_t at step t + 1), and ``w_ih_ptr`` and
    ``bias_ptr`` hold every layer's, layer 0's first: no projection GEMM before the launch, and with
    ``INPUT_AHEAD`` layer 0's product too runs while its barrier completes. ``IN_K``: the width of every
    input this program's products read, I for a single layer's x, H in a stack (whose x must then have
    I == H); ``IN_BLOCK_K`` its resident padding (the resident W_ih slice's K). Before step t,
    layer l > 0 waits (without arriving) until the layer below's batch group has passed its barrier of
    step t; within the layer the per-step barrier is the single-layer kernel's. So layer l runs step t
    while the layer below runs step t + 1: T + L - 1 step latencies for the stack instead of L·T. Each
    layer's buffers (h_all, c_all, gates) are its slice of the stacked ones, indexed as one layer's.
    Returns the program's failure state (a barrier or wait that gave up).

    ``INPUT_AHEAD`` (each program owns one tile): after arriving at its barrier of step t, a program
    waits for the layer below's h_{t+1} and forms step t + 1's input product, and only then waits for
    the rest of its layer — the input product runs while the barrier completes, leaving the recurrent
    product and the cell update on the critical path. No deadlock: a layer never waits on the one above.

    ``DROPOUT`` (training): dropout between layers with masks drawn by torch before the launch
    (``dropout_mask_ptr``, (L - 1, T, B, H), nonzero where a unit is kept). Layer l < L - 1 stores its h_t
    a second time, masked and scaled by ``dropout_scale`` (1 / (1 - p)), into its slice of ``dropped_ptr``,
    before it arrives at its barrier; the layer above reads that copy as its input. Its own recurrence
    reads the undropped h_t, as nn.LSTM's does.

    A GRU stack (CELL "gru"): three gates per weight, b_hn per layer in ``cell_params_ptr``, and the n
    gate's input and recurrent products kept apart (the reset gate multiplies only the second): the
    input side accumulates into (acc_i, acc_f, acc_g) = (r, z, x_n); x_n then moves aside and the
    recurrent side adds (r, z, h_n) into the same three — still four tiles (``_stack_step``).

    ``ONE_TILE`` (streamed W, each program owns one tile; not with INPUT_AHEAD): the one-tile schedule of a
    single layer, for a stack's layer. h_{t-1} and c_{t-1} stay in registers across steps (the other
    schedules reload them after the products: one more round trip to L2 per step), and with the gate dot
    the two products run as one K loop over [h^{l-1}_t, h_{t-1}] and [W_ih, W_hh]
    (``stack_products_streamed``): one pipelined loop, so W_hh's first chunks load while W_ih's last ones
    multiply, where two loops drain between them. A GRU's n gate keeps its two products apart there in
    the interleaved columns' spare fourth gate.

    ``HAS_INITIAL``: a layer l > 0 adds its row of ``initial_ptr`` ((L - 1, B, 4H) fp32) to its gate inputs
    at step 0 — a stack with projections runs in m_t with m_{-1} = 0 and h0·W_hhᵀ enters there
    (``lstm_projection.py``)."""
    GATES: tl.constexpr = 3 if CELL == "gru" else 4
    NUM_H_BLOCKS: tl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    num_b_blocks = tl.cdiv(B, BLOCK_B)
    lay = tl.full((), layer, tl.int64)
    h_layer = h_ptr + lay * (T + 1) * B * H
    h_below = h_layer - (T + 1) * B * H  # read only when layer > 0 (or FUSED_INPUT)
    # w_ih_ptr and bias_ptr start at layer 1, or with FUSED_INPUT at layer 0; ``forms_input``: this layer
    # forms its input product here (else it reads it from ``projected``).
    ih_first_layer = 1
    forms_input = layer > 0
    if FUSED_INPUT:
        ih_first_layer = 0
        forms_input = True
        if layer == 0:
            h_below = projected_ptr - B * IN_K  # x_t at h_below + (t + 1)·B·IN_K, as a layer below's h_t
    mask_layer = dropout_mask_ptr + lay * T * B * H  # DROPOUT: this layer's masks and dropped h_t, (T, B, H)
    dropped_layer = dropped_ptr + lay * T * B * H
    drops = layer < LAYERS - 1
    if DROPOUT:
        if layer > 0:
            h_below = dropped_layer - (T + 1) * B * H  # the layer below's dropped h_t at h_below + (t + 1)·B·H
    # c_all holds T + 1 steps per layer, or the two slots of an inference forward (c_slot); no gates then.
    c_layer = c_ptr + lay * 2 * B * H
    gates_layer = gates_ptr
    if SAVE:
        c_layer = c_ptr + lay * (T + 1) * B * H
        gates_layer = gates_ptr + lay * T * B * 4 * H
    w_hh_layer = w_hh_ptr + lay * GATES * H * H
    cell_params_layer = cell_params_ptr + lay * (H if CELL == "gru" else 3 * H)  # b_hn, or the peephole weights
    w_ih_layer = w_ih_ptr + (lay - ih_first_layer) * GATES * H * IN_K
    bias_layer = bias_ptr + (lay - ih_first_layer) * GATES * H
    initial_layer = initial_ptr + (lay - 1) * B * GATES * H  # HAS_INITIAL, layer > 0: (B, 4H) fp32
    counter_ptr = counters_ptr + layer * grid_b + pid_b
    failed_ptr = counters_ptr + LAYERS * grid_b
    if RESIDENT:
        # The transposed (K × BLOCK_H) right operands of the eight gate products; layer 0 has no W_ih here
        # unless FUSED_INPUT (its input product is in ``projected``): masked off, never read.
        offs_k = tl.arange(0, BLOCK_K)
        offs_k_in = tl.arange(0, IN_BLOCK_K)
        hh_i, hh_f, hh_g, hh_o = resident_slices(w_hh_layer, pid_h * BLOCK_H, offs_k, True, H, H, GATES, BLOCK_H,
                                                  GATE_BIT)
        ih_i, ih_f, ih_g, ih_o = resident_slices(w_ih_layer, pid_h * BLOCK_H, offs_k_in, forms_input, H, IN_K, GATES,
                                                  BLOCK_H, GATE_BIT)
    else:
        offs_k, offs_k_in = 0, 0  # streamed: no resident slices (``layer_product`` reads W at its pointer instead)
        hh_i, hh_f, hh_g, hh_o, ih_i, ih_f, ih_g, ih_o = 0, 0, 0, 0, 0, 0, 0, 0
    if INPUT_AHEAD:
        offs_b, mask_b, rows, offs_h, mask_h = one_tile(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
        first = tl.full((), 0, tl.int64)  # T >= 1 here
        if layer > 0:
            if not failed:
                failed = wait_for(counter_ptr - grid_b, GRID_H, failed_ptr, SPIN_LIMIT)
        acc_i, acc_f, acc_g, acc_o = _stack_input_product(
            forms_input, first, projected_ptr, h_below, w_ih_layer, ih_i, ih_f, ih_g, ih_o, bias_layer, B, rows, mask_b,
            offs_k_in, offs_h, mask_h, H, IN_K, HAS_BIAS, SAVE, DOT_PRECISION, BLOCK_K, RESIDENT, GATES, GATE_BIT,
            initial_layer, HAS_INITIAL,  # step 0's: the only one with the initial terms
        )
        for t in range(T):
            step = tl.full((), t, tl.int64)
            _stack_step(
                acc_i, acc_f, acc_g, acc_o, step, h_layer, c_layer, gates_layer, w_hh_layer, hh_i, hh_f, hh_g, hh_o,
                lengths_ptr, cell_params_layer, B, rows, offs_b, mask_b, offs_k, offs_h, mask_h, failed, H, HAS_LENGTHS,
                SAVE, DOT_PRECISION, BLOCK_K, RESIDENT, GATES, GATE_BIT, PEEPHOLE, CELL, mask_layer, dropped_layer,
                dropout_scale, drops, DROPOUT,
            )
            if not failed:
                barrier_arrive(counter_ptr)
            # (The last step forms its own input product again rather than wait for a step past the end.)
            next_step = tl.minimum(step + 1, T - 1)
            if layer > 0:
                if not failed:
                    failed = wait_for(counter_ptr - grid_b, (next_step + 1) * GRID_H, failed_ptr, SPIN_LIMIT)
            acc_i, acc_f, acc_g, acc_o = _stack_input_product(
                forms_input, next_step, projected_ptr, h_below, w_ih_layer, ih_i, ih_f, ih_g, ih_o, bias_layer, B, rows, mask_b,
                offs_k_in, offs_h, mask_h, H, IN_K, HAS_BIAS, SAVE, DOT_PRECISION, BLOCK_K, RESIDENT, GATES, GATE_BIT,
                initial_layer, False,
            )
            if not failed:
                failed = wait_for(counter_ptr, (t + 1) * GRID_H, failed_ptr, SPIN_LIMIT)
    elif ONE_TILE:
        offs_b, mask_b, rows, offs_h, mask_h = one_tile(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
        mask_bh = mask_b[:, None] & mask_h[None, :]
        h_own, c_own = load_own_state(h_layer, c_layer, 0, B, rows, offs_h, mask_bh, H, H, True, SAVE)
        first_step = 0
        if HAS_INITIAL:  # step 0 on its own, as below
            failed, h_own, c_own = _stack_one_tile_step(
                0, layer, failed, counter_ptr, failed_ptr, grid_b, forms_input, projected_ptr, h_below, w_ih_layer,
                bias_layer, h_layer, c_layer, gates_layer, w_hh_layer, lengths_ptr, cell_params_layer, mask_layer,
                dropped_layer, dropout_scale, drops, initial_layer, h_own, c_own, B, rows, offs_b, mask_b, offs_h, mask_h,
                H, IN_K, HAS_BIAS, HAS_LENGTHS, SAVE, DOT_PRECISION, GRID_H, BLOCK_K, SPIN_LIMIT, GATES, GATE_BIT,
                PEEPHOLE, CELL, DROPOUT, True,
            )
            first_step = 1
        for t in range(first_step, T):
            failed, h_own, c_own = _stack_one_tile_step(
                t, layer, failed, counter_ptr, failed_ptr, grid_b, forms_input, projected_ptr, h_below, w_ih_layer,
                bias_layer, h_layer, c_layer, gates_layer, w_hh_layer, lengths_ptr, cell_params_layer, mask_layer,
                dropped_layer, dropout_scale, drops, initial_layer, h_own, c_own, B, rows, offs_b, mask_b, offs_h, mask_h,
                H, IN_K, HAS_BIAS, HAS_LENGTHS, SAVE, DOT_PRECISION, GRID_H, BLOCK_K, SPIN_LIMIT, GATES, GATE_BIT,
                PEEPHOLE, CELL, DROPOUT, False,
            )
    else:
        # With HAS_INITIAL, step 0 runs on its own, the only one that adds the initial terms: inside the time
        # loop their loads kept registers live across all steps (spills on sm_90).
        first_step = 0
        if HAS_INITIAL:
            failed = _stack_tiles_step(
                0, layer, failed, counter_ptr, failed_ptr, grid_b, pid_b, pid_h, num_b_blocks, B, forms_input,
                projected_ptr, h_below, w_ih_layer, ih_i, ih_f, ih_g, ih_o, bias_layer, offs_k_in, offs_k, h_layer, c_layer,
                gates_layer, w_hh_layer, hh_i, hh_f, hh_g, hh_o, lengths_ptr, cell_params_layer, mask_layer, dropped_layer,
                dropout_scale, drops, initial_layer, H, IN_K, HAS_BIAS, HAS_LENGTHS, SAVE, DOT_PRECISION, GRID_H,
                NUM_H_BLOCKS, BLOCK_B, BLOCK_H, BLOCK_K, SPIN_LIMIT, RESIDENT, GATES, GATE_BIT, PEEPHOLE, CELL, DROPOUT,
                True,
            )
            first_step = 1
        for t in range(first_step, T):
            failed = _stack_tiles_step(
                t, layer, failed, counter_ptr, failed_ptr, grid_b, pid_b, pid_h, num_b_blocks, B, forms_input,
                projected_ptr, h_below, w_ih_layer, ih_i, ih_f, ih_g, ih_o, bias_layer, offs_k_in, offs_k, h_layer, c_layer,
                gates_layer, w_hh_layer, hh_i, hh_f, hh_g, hh_o, lengths_ptr, cell_params_layer, mask_layer, dropped_layer,
                dropout_scale, drops, initial_layer, H, IN_K, HAS_BIAS, HAS_LENGTHS, SAVE, DOT_PRECISION, GRID_H,
                NUM_H_BLOCKS, BLOCK_B, BLOCK_H, BLOCK_K, SPIN_LIMIT, RESIDENT, GATES, GATE_BIT, PEEPHOLE, CELL, DROPOUT,
                False,
            )
    return failed


@triton.jit
def _stack_tiles_step(t, layer, failed, counter_ptr, failed_ptr, grid_b, pid_b, pid_h, num_b_blocks, B, forms_input,
                      projected_ptr, h_below, w_ih_layer, ih_i, ih_f, ih_g, ih_o, bias_layer, offs_k_in, offs_k, h_layer,
                      c_layer, gates_layer, w_hh_layer, hh_i, hh_f, hh_g, hh_o, lengths_ptr, cell_params_layer, mask_layer,
                      dropped_layer, dropout_scale, drops, initial_layer, H: tl.constexpr, IN_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      GRID_H: tl.constexpr, NUM_H_BLOCKS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_K: tl.constexpr, SPIN_LIMIT: tl.constexpr, RESIDENT: tl.constexpr, GATES: tl.constexpr,
                      GATE_BIT: tl.constexpr, PEEPHOLE: tl.constexpr, CELL: tl.constexpr, DROPOUT: tl.constexpr,
                      ADD_INITIAL: tl.constexpr):
    """Step ``t`` of a stack layer on all of this program's tiles (the schedule without INPUT_AHEAD): wait for
    the layer below's h_t, each tile's input product (with ``ADD_INITIAL`` the layer's step-0 terms) and
    step, then this layer's barrier. Returns the program's failure state."""
    step = tl.full((), t, tl.int64)
    if layer > 0:
        # h_t of the layer below (its step t) is complete once its batch group passed that barrier.
        if not failed:
            failed = wait_for(counter_ptr - grid_b, (t + 1) * GRID_H, failed_ptr, SPIN_LIMIT)
    for bb in tl.range(pid_b, num_b_blocks, grid_b, num_stages=1):
        offs_b = bb * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        rows = offs_b.to(tl.int64)
        for hb in range(pid_h, NUM_H_BLOCKS, GRID_H):
            offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            acc_i, acc_f, acc_g, acc_o = _stack_input_product(
                forms_input, step, projected_ptr, h_below, w_ih_layer, ih_i, ih_f, ih_g, ih_o, bias_layer, B, rows,
                mask_b, offs_k_in, offs_h, mask_h, H, IN_K, HAS_BIAS, SAVE, DOT_PRECISION, BLOCK_K, RESIDENT, GATES, GATE_BIT,
                initial_layer, ADD_INITIAL,
            )
            _stack_step(
                acc_i, acc_f, acc_g, acc_o, step, h_layer, c_layer, gates_layer, w_hh_layer, hh_i, hh_f, hh_g,
                hh_o, lengths_ptr, cell_params_layer, B, rows, offs_b, mask_b, offs_k, offs_h, mask_h, failed, H,
                HAS_LENGTHS, SAVE, DOT_PRECISION, BLOCK_K, RESIDENT, GATES, GATE_BIT, PEEPHOLE, CELL, mask_layer,
                dropped_layer, dropout_scale, drops, DROPOUT,
            )
    if not failed:
        failed = grid_barrier(counter_ptr, (t + 1) * GRID_H, failed_ptr, SPIN_LIMIT)
    return failed


@triton.jit
def _stack_one_tile_step(t, layer, failed, counter_ptr, failed_ptr, grid_b, forms_input, projected_ptr, h_below,
                         w_ih_layer, bias_layer, h_layer, c_layer, gates_layer, w_hh_layer, lengths_ptr,
                         cell_params_layer, mask_layer, dropped_layer, dropout_scale, drops, initial_layer, h_own, c_own,
                         B, rows, offs_b, mask_b, offs_h, mask_h, H: tl.constexpr, IN_K: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, GRID_H: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPIN_LIMIT: tl.constexpr, GATES: tl.constexpr, GATE_BIT: tl.constexpr, PEEPHOLE: tl.constexpr,
                         CELL: tl.constexpr, DROPOUT: tl.constexpr, ADD_INITIAL: tl.constexpr):
    """Step ``t`` of a stack layer on the one tile this program owns (``ONE_TILE``), its state ``h_own``,
    ``c_own`` (fp32, h_{t-1} and c_{t-1}) in registers: wait for the layer below's h_t, the products (one K
    loop with the gate dot), the cell update, then this layer's barrier. Returns
    ``(failed, h_t, c_t)``."""
    step = tl.full((), t, tl.int64)
    if layer > 0:
        if not failed:
            failed = wait_for(counter_ptr - grid_b, (t + 1) * GRID_H, failed_ptr, SPIN_LIMIT)
    ONE_LOOP: tl.constexpr = GATE_BIT > 0
    acc_i, acc_f, acc_g, acc_o = _stack_input_product(
        forms_input, step, projected_ptr, h_below, w_ih_layer, 0, 0, 0, 0, bias_layer, B, rows, mask_b, 0, offs_h,
        mask_h, H, IN_K, HAS_BIAS, SAVE, DOT_PRECISION, BLOCK_K, False, GATES, GATE_BIT, initial_layer, ADD_INITIAL,
        ONE_LOOP,
    )
    h_own, c_own = _stack_step(
        acc_i, acc_f, acc_g, acc_o, step, h_layer, c_layer, gates_layer, w_hh_layer, 0, 0, 0, 0, lengths_ptr,
        cell_params_layer, B, rows, offs_b, mask_b, 0, offs_h, mask_h, failed, H, HAS_LENGTHS, SAVE, DOT_PRECISION,
        BLOCK_K, False, GATES, GATE_BIT, PEEPHOLE, CELL, mask_layer, dropped_layer, dropout_scale, drops, DROPOUT,
        h_own, c_own, True, ONE_LOOP, forms_input, h_below, w_ih_layer, IN_K,
    )
    if not failed:
        failed = grid_barrier(counter_ptr, (t + 1) * GRID_H, failed_ptr, SPIN_LIMIT)
    return failed, h_own, c_own


@triton.jit
def _stack_input_product(forms_input, step, projected_ptr, h_below, w_ih_layer, ih_i, ih_f, ih_g, ih_o, bias_layer, B, rows,
                         mask_b, offs_k, offs_h, mask_h, H: tl.constexpr, IN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr, GATES: tl.constexpr,
                         GATE_BIT: tl.constexpr, initial_layer, ADD_INITIAL: tl.constexpr,
                         ONE_LOOP: tl.constexpr = False):
    """A stack layer's gate inputs at ``step`` for one tile, in fp32: unless ``forms_input`` (layer 0)
    read from ``projected``, else the bias plus h^{l-1}_t·W_ihᵀ (the layer below's h_t, which the caller
    waited for, or x_t for layer 0 with FUSED_INPUT; IN_K wide, ``offs_k`` its resident padding), and with
    ADD_INITIAL (step 0 only) the layer's row of the initial terms (``initial_layer``, (B, GATES·H) fp32;
    never with FUSED_INPUT, whose layer 0 forms its input here too).
    The accumulators the recurrent product then adds onto: one set of four live across both products' K
    loops (two sets spilled on sm_90). With ``ONE_LOOP`` the input product is left out: ``_stack_step``
    forms it in the recurrent product's K loop."""
    if forms_input:
        acc_i = tl.zeros((rows.shape[0], offs_h.shape[0]), dtype=tl.float32)
        acc_f = tl.zeros((rows.shape[0], offs_h.shape[0]), dtype=tl.float32)
        acc_g = tl.zeros((rows.shape[0], offs_h.shape[0]), dtype=tl.float32)
        acc_o = tl.zeros((rows.shape[0], offs_h.shape[0]), dtype=tl.float32)
        if HAS_BIAS:
            acc_i += tl.load(bias_layer + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
            acc_f += tl.load(bias_layer + H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(bias_layer + 2 * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
            if GATES == 4:
                acc_o += tl.load(bias_layer + 3 * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        if ADD_INITIAL:
            mask_bh = mask_b[:, None] & mask_h[None, :]
            initial = initial_layer + rows[:, None] * (GATES * H) + offs_h[None, :]
            acc_i += tl.load(initial, mask=mask_bh, other=0.0)
            acc_f += tl.load(initial + H, mask=mask_bh, other=0.0)
            acc_g += tl.load(initial + 2 * H, mask=mask_bh, other=0.0)
            if GATES == 4:
                acc_o += tl.load(initial + 3 * H, mask=mask_bh, other=0.0)
        if not ONE_LOOP:
            acc_i, acc_f, acc_g, acc_o = layer_product(
                acc_i, acc_f, acc_g, acc_o, h_below + (step + 1) * B * IN_K, w_ih_layer, ih_i, ih_f, ih_g, ih_o,
                rows, mask_b, offs_k, offs_h, mask_h, H, IN_K, DOT_PRECISION, BLOCK_K, RESIDENT, GATES, GATE_BIT
            )
    else:
        mask_bh = mask_b[:, None] & mask_h[None, :]
        acc_i, acc_f, acc_g, acc_o = load_gate_inputs(projected_ptr, step, B, rows, offs_h, mask_bh, H, GATES, SAVE)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _stack_step(acc_i, acc_f, acc_g, acc_o, step, h_layer, c_layer, gates_layer, w_hh_layer, hh_i, hh_f, hh_g, hh_o,
                lengths_ptr, cell_params_layer, B, rows, offs_b, mask_b, offs_k, offs_h, mask_h, failed, H: tl.constexpr,
                HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                RESIDENT: tl.constexpr, GATES: tl.constexpr, GATE_BIT: tl.constexpr, PEEPHOLE: tl.constexpr,
                CELL: tl.constexpr, mask_layer, dropped_layer, dropout_scale, drops, DROPOUT: tl.constexpr,
                h_own=0, c_own=0, OWN_STATE: tl.constexpr = False, ONE_LOOP: tl.constexpr = False, forms_input=False,
                h_below=0, w_ih_layer=0, IN_K: tl.constexpr = 0):
    """The rest of a stack layer's step for one tile, on its gate inputs ``acc_*`` (``_stack_input_product``):
    the recurrent product h_{t-1}·W_hhᵀ, the cell update and the h_t store (with ``DROPOUT``, where the
    layer ``drops`` — all but the top — also its masked and scaled copy for the layer above). Returns
    (h_t, c_t) in fp32. ``OWN_STATE``: h_{t-1} and c_{t-1} are ``h_own`` and ``c_own``, else loaded.
    ``ONE_LOOP`` (streamed, gate dot): the input product too, in the same K loop where ``forms_input``
    (``persistent_tiles.stack_products_streamed``; a GRU's x_n comes back in ``acc_o``)."""
    mask_bh = mask_b[:, None] & mask_h[None, :]
    zero = tl.zeros((rows.shape[0], offs_h.shape[0]), dtype=tl.float32)  # the gate inputs are in the accumulators
    if CELL == "gru" and not ONE_LOOP:
        # The n gate's recurrent product accumulates apart from x_n (the reset gate multiplies it alone):
        # the product adds into the third accumulator, so x_n moves out of it first.
        acc_g, x_n = zero, acc_g
    else:
        x_n = zero
    if ONE_LOOP:
        acc_i, acc_f, acc_g, acc_o = stack_products_streamed(
            acc_i, acc_f, acc_g, acc_o, forms_input, h_below + (step + 1) * B * IN_K, w_ih_layer, h_layer + step * B * H,
            w_hh_layer, rows, mask_b, offs_h, H, IN_K, DOT_PRECISION, BLOCK_K, GATES, GATE_BIT
        )
        if CELL == "gru":
            x_n = acc_o  # (the product kept the n gate's input side in the fourth accumulator)
    else:
        acc_i, acc_f, acc_g, acc_o = layer_product(
            acc_i, acc_f, acc_g, acc_o, h_layer + step * B * H, w_hh_layer, hh_i, hh_f, hh_g, hh_o,
            rows, mask_b, offs_k, offs_h, mask_h, H, H, DOT_PRECISION, BLOCK_K, RESIDENT, GATES, GATE_BIT
        )
    if OWN_STATE:
        h_prev, c_prev = h_own, c_own
    else:
        # The state is loaded after the products: live across their K loops it spilled on sm_90.
        h_prev, c_prev = load_own_state(h_layer, c_layer, step, B, rows, offs_h, mask_bh, H, H, True, SAVE)
    h, c = update_and_store_h(
        acc_i, acc_f, acc_g, acc_o, zero, zero, x_n, zero, h_prev, c_prev, h_layer, c_layer,
        gates_layer, lengths_ptr, step, B, rows, offs_b, mask_b, offs_h, mask_h, H, H, HAS_LENGTHS, SAVE,
        failed, h_layer, step, 0, 1, cell_params_layer, PEEPHOLE, CELL,
    )
    if DROPOUT:
        if drops:
            offs = step * B * H + rows[:, None] * H + offs_h[None, :]
            keep = tl.load(mask_layer + offs, mask=mask_bh, other=0)
            dropped = tl.where(keep != 0, h * dropout_scale, 0.0)
            tl.store(dropped_layer + offs, dropped.to(dropped_layer.dtype.element_ty), mask=mask_bh)
    return h, c
