"""Forward kernel, persistent: one launch per layer and direction runs all T time steps (the same driver
runs a whole stack of layers, ``LAYERS > 1``, or both directions of a layer, ``DIRECTIONS = 2``, in one
launch: ``lstm_fwd_stack.py``, ``lstm_fwd_bidirectional.py``; and layers that form their input product
from x themselves, ``FUSED_INPUT``: ``lstm_fwd_fused_input.py``). The cell is the ``CELL`` constexpr's
(``cells.py``): the LSTM's, with or without peepholes, or the GRU's (``gru.py``).

Why: the per-step kernel (``lstm_fwd.py``) pays one launch per time step, which at LSTM sizes costs
more than the step's arithmetic. Here the grid stays resident for the whole sequence and the steps are
separated by a grid-wide barrier instead of kernel boundaries.

Work split. Program (ph, pb) owns hidden blocks ph, ph + GRID_H, … (BLOCK_H hidden units each: the
four gate row-blocks of W_hh for those units) and batch blocks pb, pb + grid_b, …. h_t of a batch row
depends only on h_{t-1} of the same row, so only the GRID_H programs sharing a batch group ``pb`` need
to wait for each other: each batch group has its own barrier counter.

Two ways to hold W_hh (chosen by ``plan_persistent_fwd``, ``forward_plans.py``, from a shared-memory budget):

- *resident*: each program owns one hidden block and loads its W_hh slice (4 × K × BLOCK_H) once,
  before the time loop; every step is then one ``tl.dot`` per gate over the whole K.
- *streamed*: the slice is re-read every step in BLOCK_K chunks, which Triton's loop pipeliner may
  overlap with the dots. It stays in L2 while W_hh fits there (H100/H200: 50 MB; bf16 W_hh is 8 MiB at
  H = 1024, 32 MiB at H = 2048; fp32 at H = 2048, 64 MiB, streams from HBM).

h_t is exchanged through global memory (``h_all``, which holds every step anyway, so no buffer is
ever overwritten while a slow program may still read it). One barrier per step:

- arrive: ``tl.debug_barrier()`` (all threads of the program have issued their h_t stores) and then
  one atomic add with *release* semantics at GPU scope. Release is cumulative in the PTX memory model,
  so it publishes the stores of every thread of the program ordered before it by the CTA barrier.
- wait: spin on an atomic read with *acquire* semantics until the counter reaches
  (t + 1) × GRID_H. The counter is monotonic (never reset inside a launch), so a fast program that
  already arrived at step t + 1 cannot make a slow one miss step t.
- h is then loaded with ``cache_modifier=".cg"`` (cache in L2 only): L1 is not coherent across SMs,
  and a line of h_all cached in L1 earlier could be stale.

A spin-wait needs every program of the grid to be resident at once, so the grid never exceeds the SM
count (one program per SM always fits when the kernel compiled at all), and the kernel is launched as a
cooperative grid, which the driver starts only when all of it can be resident. Under ``TRITON_INTERPRET=1``
programs run one after another, so there the grid is a single program, whose barrier passes at once:
CI runs this very code path, barrier included.

A projection (proj_size > 0) runs here too, as a recurrence in m_t with a merged weight
(``lstm_projection.py``). Falls back to the per-step kernel (``lstm_fwd``), never to a deadlock:
- when even streaming would leave a program too many hidden blocks per step (H beyond what
  ``MAX_HIDDEN_BLOCKS_PER_PROGRAM`` × 64 units per SM covers);
- when the compiler reports the kernel does not fit (``OutOfResources``): resident retries streamed,
  streamed falls back to per-step;
- when the driver refuses the cooperative launch (the grid cannot be co-resident);
- when ``TRITON_LSTM_PERSISTENT=0`` is set (for A/B timing and debugging).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from triton_lstm.kernels import common
from triton_lstm.kernels.common import (
    barrier_watch,
    dot_precision,
    grid_barrier,
    load_own_state,
    recurrent_product_resident,
    recurrent_product_streamed,
    refused_cooperative_launch,
)
from triton_lstm.kernels.forward_plans import (
    INTERPRETER_SHARED_MEMORY,
    ForwardPlan,
    _device_limits,
    gate_bit,
    one_tile_each,
    one_tile_schedule,
    persistent_disabled,
    plan_persistent_fwd,
)
from triton_lstm.kernels.lstm_fwd import (
    allocate_forward_outputs,
    finished_outputs,
    fp32_tensor_cores,
    in_gate_layout,
    lstm_fwd,
)
from triton_lstm.kernels.persistent_tiles import (
    cell_step,
    gate_inputs,
    one_tile,
    resident_slices,
    time_rows,
    update_and_store_h,
)
from triton_lstm.kernels.stack_layer import stack_layer


@triton.jit(do_not_specialize=["T", "B", "grid_b"])
def _lstm_persistent_fwd_kernel(
    projected_ptr,  # x·W_ihᵀ + biases (T, B, ·), input dtype, as persistent_tiles.gate_inputs reads it; FUSED_INPUT: x itself, (T, B, I)
    w_hh_ptr,  # (4H, K), K == H (no projection on this path)
    h_ptr,  # (T+1, B, K), h0 already at step 0 (per layer or direction, stacked, for a stack or both directions)
    c_ptr,  # (T+1, B, H) fp32, c0 already at step 0 (two slots without SAVE); stacked likewise
    gates_ptr,  # (T, B, 4H); stacked likewise
    lengths_ptr,  # (B,) int32, read when HAS_LENGTHS
    counters_ptr,  # (LAYERS · DIRECTIONS · grid_b + 1,) int32 zeros: a monotonic barrier counter per layer (or direction) and batch group, then the failure flag
    w_ih_ptr,  # LAYERS > 1: (LAYERS - 1, 4H, H), the input weights of layers 1, 2, … (layer 0's are in ``projected``); FUSED_INPUT: (LAYERS, 4H, IN_K), layer 0's first
    bias_ptr,  # HAS_BIAS: b_ih + b_hh of the layers in w_ih_ptr, (LAYERS - 1, 4H) or with FUSED_INPUT (LAYERS, 4H)
    out_ptr,  # DIRECTIONS == 2: (T, B, 2H), the layer's output, both directions in time order
    cell_params_ptr,  # PEEPHOLE: (3H,) peephole weights (w_ci, w_cf, w_co), stacked per layer or direction; CELL "gru": (H,) b_hn
    dropout_mask_ptr,  # DROPOUT: (LAYERS - 1, T, B, H) uint8, nonzero where layer l's h_t unit reaches layer l + 1
    dropped_ptr,  # DROPOUT: (LAYERS - 1, T, B, H), layer l's h_t as layer l + 1 reads it: masked and scaled
    dropout_scale,  # DROPOUT: 1 / (1 - p), or 0 for p = 1
    T,
    B,
    grid_b,  # batch groups (the grid's second axis); not a constexpr, so a new batch size does not recompile
    # HAS_INITIAL: (LAYERS - 1, B, 4H) fp32, added to the gate inputs of layers 1, 2, … at step 0. Last:
    # inserted before T it renumbered T, B and grid_b, and with nothing else changed in the PTX ptxas 13.4
    # (Triton 3.9's --regAllocOptLevel=2) spilled 40 bytes instead of 16 at a GRU's 32 × 16 streamed tiles.
    initial_ptr,
    H: tl.constexpr,
    K: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    RESIDENT: tl.constexpr,
    ONE_TILE: tl.constexpr,  # one tile per program (resident, or streamed where the plan asks): state stays in registers (stack_layer: streamed only)
    SAVE: tl.constexpr,  # store every step's gates and c for the backward (else an inference forward)
    DOT_PRECISION: tl.constexpr,
    GRID_H: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,  # the whole K padded to a power of two when RESIDENT
    SPIN_LIMIT: tl.constexpr,  # polls before a barrier gives up (grid_barrier)
    LAYERS: tl.constexpr = 1,  # > 1: a stack of unidirectional layers in one launch (a wavefront, see stack_layer)
    HAS_BIAS: tl.constexpr = False,  # LAYERS > 1: bias_ptr holds the biases of layers 1, 2, …
    DIRECTIONS: tl.constexpr = 1,  # 2: both directions of a bidirectional layer, the grid's third axis
    PEEPHOLE: tl.constexpr = False,  # i, f see w_ci ⊙ c_{t-1}, w_cf ⊙ c_{t-1}; o sees w_co ⊙ c_t
    CELL: tl.constexpr = "lstm",  # "gru": projected r, z, n, w_hh (3H, K), c_all its fp32 h (cells.cell_update)
    GATE_BIT: tl.constexpr = 0,  # > 0: one dot for the four gates (common.interleaved_gate_rows)
    INPUT_AHEAD: tl.constexpr = False,  # stack_layer (LAYERS > 1 or FUSED_INPUT), one tile per program: the next input product before the barrier wait
    FUSED_INPUT: tl.constexpr = False,  # layer 0's input product formed in the kernel from x (stack_layer, any LAYERS)
    IN_K: tl.constexpr = 0,  # the input products' K (x's I with FUSED_INPUT, one layer; else H); 0: H
    IN_BLOCK_K: tl.constexpr = 0,  # RESIDENT: IN_K padded to a power of two; 0: BLOCK_K
    DROPOUT: tl.constexpr = False,  # LAYERS > 1: dropout between layers (training), masks drawn before the launch
    HAS_INITIAL: tl.constexpr = False,  # LAYERS > 1: initial_ptr holds a step-0 term per layer above 0 (projections)
):
    GATES: tl.constexpr = 3 if CELL == "gru" else 4
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    NUM_H_BLOCKS: tl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    num_b_blocks = tl.cdiv(B, BLOCK_B)
    if DIRECTIONS > 1:
        # A bidirectional layer: direction d's programs run its recurrence on its own buffers (stacked
        # per direction, step-indexed as a one-direction layer's) with its own barrier counters; the reverse
        # direction reads its inputs and writes its outputs walking time backwards (time_rows).
        direction = tl.program_id(2)
        d = direction.to(tl.int64)
        w_hh_ptr += d * GATES * H * K
        cell_params_ptr += d * (H if CELL == "gru" else 3 * H)  # b_hn, or the peephole weights
        h_ptr += d * (T + 1) * B * K
        if SAVE:
            c_ptr += d * (T + 1) * B * H
            gates_ptr += d * T * B * 4 * H
        else:
            c_ptr += d * 2 * B * H
    else:
        direction = 0
    counter_ptr = counters_ptr + direction * grid_b + pid_b
    failed_ptr = counters_ptr + LAYERS * DIRECTIONS * grid_b
    # Set once a barrier gave up: from then on this program stops waiting and its h is NaN.
    failed = tl.program_id(0) < 0  # False (built this way: older interpreters lack tl.full of int1)

    if RESIDENT and LAYERS == 1 and not FUSED_INPUT:
        # One hidden block per program (GRID_H == NUM_H_BLOCKS): its W_hh slice, loaded once, as the
        # transposed (K × BLOCK_H) right operand of the four gate products.
        res_offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        res_mask_h = res_offs_h < H
        res_offs_k = tl.arange(0, BLOCK_K)
        w_i, w_f, w_g, w_o = resident_slices(w_hh_ptr, pid_h * BLOCK_H, res_offs_k, True, H, K, GATES, BLOCK_H, GATE_BIT)

    if LAYERS > 1 or FUSED_INPUT:
        # The stack: the grid's third axis is the layer (a single program under the interpreter, which
        # then runs the layers one after another). A single layer whose input product is formed here runs
        # as a stack of one.
        for layer in range(tl.program_id(2), LAYERS, tl.num_programs(2)):
            failed = stack_layer(
                layer, projected_ptr, w_ih_ptr, bias_ptr, w_hh_ptr, h_ptr, c_ptr, gates_ptr, lengths_ptr, counters_ptr,
                T, B, grid_b, pid_h, pid_b, failed, H, HAS_LENGTHS, HAS_BIAS, SAVE, DOT_PRECISION, GRID_H, BLOCK_B,
                BLOCK_H, BLOCK_K, SPIN_LIMIT, LAYERS, RESIDENT, cell_params_ptr, PEEPHOLE, CELL, GATE_BIT, INPUT_AHEAD,
                FUSED_INPUT, IN_K if IN_K > 0 else H, IN_BLOCK_K if IN_BLOCK_K > 0 else BLOCK_K, dropout_mask_ptr,
                dropped_ptr, dropout_scale, DROPOUT, initial_ptr, HAS_INITIAL, ONE_TILE,
            )
    elif ONE_TILE:
        # The program owns one (batch block × hidden block) tile for the whole sequence (grid_b covers
        # every batch block), so its c and h stay in registers across steps, and the next step's input
        # projection, which does not depend on h, is loaded before the barrier wait: after the barrier
        # only the h exchange, the product and the cell update remain on the critical path. Resident
        # plans run this way wherever they own one tile; streamed ones when they ask (ForwardPlan).
        offs_b, mask_b, rows, offs_h, mask_h = one_tile(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
        mask_bh = mask_b[:, None] & mask_h[None, :]
        h_own, c_own = load_own_state(h_ptr, c_ptr, 0, B, rows, offs_h, mask_bh, H, K, True, SAVE)
        first = tl.full((), 0, tl.int64)  # T >= 1 here
        times = time_rows(first, direction, T, lengths_ptr, offs_b, mask_b, HAS_LENGTHS, DIRECTIONS)
        x_i, x_f, x_g, x_o = gate_inputs(projected_ptr, first, times, direction, T, B, rows, offs_h, mask_bh, H,
                                          DIRECTIONS, GATES, SAVE)
        for t in range(T):
            # int64: T·B·4H can pass 2³¹ elements.
            step = tl.full((), t, tl.int64)
            if RESIDENT:
                acc_i, acc_f, acc_g, acc_o = recurrent_product_resident(
                    h_ptr + step * B * K, rows, mask_b, res_offs_k, w_i, w_f, w_g, w_o, K, DOT_PRECISION, GATES, GATE_BIT
                )
            else:
                acc_i, acc_f, acc_g, acc_o = recurrent_product_streamed(
                    h_ptr + step * B * K, w_hh_ptr, rows, mask_b, offs_h, mask_h, H, K, DOT_PRECISION, BLOCK_B, BLOCK_H,
                    BLOCK_K, GATES, GATE_BIT
                )
            h_own, c_own = update_and_store_h(
                acc_i, acc_f, acc_g, acc_o, x_i, x_f, x_g, x_o, h_own, c_own, h_ptr, c_ptr, gates_ptr, lengths_ptr,
                step, B, rows, offs_b, mask_b, offs_h, mask_h, H, K, HAS_LENGTHS, SAVE, failed,
                out_ptr, times, direction, DIRECTIONS, cell_params_ptr, PEEPHOLE, CELL,
            )
            # (The last step reloads its own inputs rather than read past the end.)
            next_step = tl.minimum(step + 1, T - 1)
            times = time_rows(next_step, direction, T, lengths_ptr, offs_b, mask_b, HAS_LENGTHS, DIRECTIONS)
            x_i, x_f, x_g, x_o = gate_inputs(projected_ptr, next_step, times, direction, T, B, rows, offs_h, mask_bh,
                                              H, DIRECTIONS, GATES, SAVE)
            # h_{t+1} of this batch group is complete once all GRID_H programs of the group have arrived.
            if not failed:
                failed = grid_barrier(counter_ptr, (t + 1) * GRID_H, failed_ptr, SPIN_LIMIT)
    else:
        for t in range(T):
            step = tl.full((), t, tl.int64)
            h_prev_ptr = h_ptr + step * B * K
            # num_stages=1: pipelining this loop would stage the whole-K h tile in several shared-memory
            # buffers (past the limit with a resident W_hh, and most programs own one batch block anyway).
            for bb in tl.range(pid_b, num_b_blocks, grid_b, num_stages=1):
                offs_b = bb * BLOCK_B + tl.arange(0, BLOCK_B)
                mask_b = offs_b < B
                rows = offs_b.to(tl.int64)
                if RESIDENT:
                    acc_i, acc_f, acc_g, acc_o = recurrent_product_resident(
                        h_prev_ptr, rows, mask_b, res_offs_k, w_i, w_f, w_g, w_o, K, DOT_PRECISION, GATES, GATE_BIT
                    )
                    cell_step(acc_i, acc_f, acc_g, acc_o, projected_ptr, h_ptr, c_ptr, gates_ptr, lengths_ptr,
                               step, B, rows, offs_b, mask_b, res_offs_h, res_mask_h, H, K, HAS_LENGTHS, SAVE, failed,
                               out_ptr, T, direction, DIRECTIONS, cell_params_ptr, PEEPHOLE, CELL)
                else:
                    for hb in range(pid_h, NUM_H_BLOCKS, GRID_H):
                        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
                        mask_h = offs_h < H
                        acc_i, acc_f, acc_g, acc_o = recurrent_product_streamed(
                            h_prev_ptr, w_hh_ptr, rows, mask_b, offs_h, mask_h, H, K, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K,
                            GATES, GATE_BIT
                        )
                        cell_step(acc_i, acc_f, acc_g, acc_o, projected_ptr, h_ptr, c_ptr, gates_ptr, lengths_ptr,
                                   step, B, rows, offs_b, mask_b, offs_h, mask_h, H, K, HAS_LENGTHS, SAVE, failed,
                                   out_ptr, T, direction, DIRECTIONS, cell_params_ptr, PEEPHOLE, CELL)
            if not failed:
                failed = grid_barrier(counter_ptr, (t + 1) * GRID_H, failed_ptr, SPIN_LIMIT)


def plan_for(sequence: torch.Tensor, w_hh: torch.Tensor) -> ForwardPlan:
    """The plan for one layer and direction on the device of ``sequence`` (the interpreter when it is on
    the CPU): a (T, B, ·) tensor of the run, x or its projection (only T, B, the dtype and the device
    count), with W_hh (gates·H, H)."""
    if persistent_disabled():
        return ForwardPlan(False, "TRITON_LSTM_PERSISTENT=0")
    T, B = sequence.shape[:2]
    # The cell's gates (the LSTM's 4, the GRU's 3) are W_hh's rows over H.
    H = w_hh.shape[1]
    if sequence.device.type == "cuda":
        index = sequence.device.index if sequence.device.index is not None else torch.cuda.current_device()
        num_sms, shared = _device_limits(index)
        interpret, tensor_cores = False, fp32_tensor_cores(sequence.device)
    else:
        num_sms, shared, interpret, tensor_cores = 1, INTERPRETER_SHARED_MEMORY, True, False
    return plan_persistent_fwd(T, B, H, H, sequence.element_size(), num_sms, shared, interpret,
                               tensor_cores, gates=w_hh.shape[0] // H if H else 4)


# Plans whose kernel turned out not to fit the device (OutOfResources at load, or a cooperative launch
# the driver refused), keyed by (plan, dtype, device), and the plan that replaced each: a downgrade is
# found out once per process, not on every call.
_downgrades: dict[tuple, ForwardPlan] = {}


def _downgraded(plan: ForwardPlan, out_of_resources: bool) -> ForwardPlan:
    if out_of_resources and plan.resident:
        # Resident plans are 16-bit: stream the same tiles in 128-wide K chunks.
        return dataclasses.replace(plan, resident=False, block_k=min(128, plan.block_k),
                                   reason=plan.reason + "; resident did not fit, W_hh streamed")
    why = "did not fit the device" if out_of_resources else "was refused as a cooperative grid"
    return ForwardPlan(False, f"{plan.reason}; {why}: per-step kernel")


def lstm_fwd_persistent(
    projected: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    lengths: torch.Tensor | None,
    plan: ForwardPlan | None = None,
    save: bool = True,
    w_ch: torch.Tensor | None = None,
    b_hn: torch.Tensor | None = None,
    reuse_projected: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs the recurrence over ``projected`` (T, B, 4H); returns ``(h_all, c_all, gates)`` exactly as
    ``lstm_fwd`` does (``w_ch``: peephole weights; ``b_hn``: a GRU's, ``kernels/gru.py``;
    ``reuse_projected``: the gates may overwrite ``projected``; as there). Persistent when ``plan`` (by
    default ``plan_for`` the tensors) says so, else, and whenever the persistent kernel does not compile
    within the device's resources, ``lstm_fwd``.
    Without ``save``, an inference forward: no per-step gates or c (``finished_outputs``).

    All tensors are contiguous and on one device; ``lengths`` is int32 on that device. A ``plan`` given
    for a GPU must keep ``num_programs`` within the SM count, and under the interpreter equal to 1.
    """
    if plan is None:
        plan = plan_for(projected, w_hh)
        if plan.fused_input:  # the projection is given: the plan's schedule on it
            plan = dataclasses.replace(plan, fused_input=False)
    H = c0.shape[-1]
    projected, reuse_projected = in_gate_layout(projected, H, w_hh.shape[0] // H, save, reuse_projected)
    if not plan.persistent or projected.numel() == 0:
        return lstm_fwd(projected, h0, c0, w_hh, lengths, save=save, w_ch=w_ch, b_hn=b_hn,
                        reuse_projected=reuse_projected)
    if projected.device.type != "cuda" and plan.num_programs != 1:
        raise ValueError(f"under the interpreter a persistent plan must have one program, got {plan.num_programs}")
    key = (plan, projected.dtype, projected.device)
    plan = _downgrades.get(key, plan)
    outputs = allocate_forward_outputs(projected, h0, c0, w_hh.shape[1], save, reuse_projected)
    while plan.persistent:
        try:
            launch_persistent(plan, projected, w_hh, *outputs, lengths, save, w_ch=w_ch, b_hn=b_hn)
            return finished_outputs(outputs, save)
        except OutOfResources:
            # Raised while loading the compiled kernel, before anything ran: the buffers are untouched.
            plan = _downgrades[key] = _downgraded(plan, out_of_resources=True)
        except RuntimeError as error:
            if not refused_cooperative_launch(error):
                raise
            plan = _downgrades[key] = _downgraded(plan, out_of_resources=False)
    return lstm_fwd(projected, h0, c0, w_hh, lengths, outputs, save, w_ch, b_hn)


def lstm_fwd_persistent_strict(projected, h0, c0, w_hh, plan: ForwardPlan, lengths=None, save=True, b_hn=None):
    """Runs exactly ``plan`` (persistent, no projection), without fallbacks: raises ``OutOfResources`` when
    it does not fit and the driver's RuntimeError when the cooperative launch is refused (before anything
    ran, in both cases). For ``lstm_fwd_persistent`` and the tuning sweep (``benchmarks/tune.py``)."""
    H = c0.shape[-1]
    projected, ours = in_gate_layout(projected, H, w_hh.shape[0] // H, save)
    outputs = allocate_forward_outputs(projected, h0, c0, w_hh.shape[1], save, ours)
    launch_persistent(plan, projected, w_hh, *outputs, lengths, save, b_hn=b_hn)
    return finished_outputs(outputs, save)


def launch_persistent(plan, projected, w_hh, h_all, c_all, gates, lengths, save=True, *, layers=1, directions=1,
                      w_ih=None, bias=None, out=None, w_ch=None, b_hn=None, dropout=None, initial=None,
                      what="the persistent forward kernel"):
    """Launches ``_lstm_persistent_fwd_kernel`` for ``plan`` over buffers from ``allocate_forward_outputs``:
    one layer and direction, a stack of ``layers`` (with ``w_ih``, ``bias``: the input weights and biases
    of layers 1, 2, …: lstm_fwd_stack.py; or with ``plan.fused_input`` of every layer, ``projected`` then
    being x: lstm_fwd_fused_input.py) or both ``directions`` of a layer (with ``out``: lstm_fwd_bidirectional.py); ``w_ch``: the peephole
    weights, (3H,) or stacked per layer or direction; ``b_hn`` (H,), or stacked per layer or direction: a
    GRU instead (``kernels/gru.py``); ``dropout``: a stack's dropout between layers, ``(mask, dropped,
    scale)`` (``stack_layer``); ``initial``: a stack's (layers - 1, B, 4H) fp32 step-0 terms of the layers
    above 0 (``lstm_projection.py``). Raises OutOfResources or
    the driver's refusal of the cooperative launch before anything ran."""
    T, B = h_all.shape[-3] - 1, h_all.shape[-2]
    H, K = c_all.shape[-1], w_hh.shape[-1]
    if plan.fused_input and (directions > 1 or w_ih is None or w_ih.shape[0] != layers or initial is not None):
        raise ValueError("a plan with fused_input takes x and every layer's W_ih, and no initial terms "
                         "(lstm_fwd_fused_input.py)")
    # The input products' K: x's width where layer 0 forms its own from x, else H (a stack's layers above).
    in_k = projected.shape[-1] if plan.fused_input else H
    barrier_watch.check()  # an earlier launch whose barrier gave up raises here
    # Zeroed per launch: the counters are monotonic within a launch and never reused across launches.
    # One per layer (or direction) and batch group; the last element is the launch's failure flag.
    counters = torch.zeros(layers * directions * plan.grid_b + 1, dtype=torch.int32, device=projected.device)
    one_tile = one_tile_each(plan, B, H)
    # The grid's third axis: the directions (independent, so one program each even under the interpreter),
    # or a stack's layers on a GPU (under the interpreter one program runs them one after another).
    groups = directions if directions > 1 else layers if projected.device.type == "cuda" else 1
    _lstm_persistent_fwd_kernel[(plan.grid_h, plan.grid_b, groups)](
        projected,
        w_hh,
        h_all,
        c_all,
        gates,
        lengths if lengths is not None else counters,
        counters,
        w_ih if w_ih is not None else w_hh,  # w_ih_ptr, bias_ptr, out_ptr: read only where given
        bias if bias is not None else w_hh,
        out if out is not None else w_hh,
        w_ch if w_ch is not None else b_hn if b_hn is not None else w_hh,
        dropout[0] if dropout is not None else counters,  # dropout_mask_ptr, dropped_ptr: read only with DROPOUT
        dropout[1] if dropout is not None else w_hh,
        dropout[2] if dropout is not None else 1.0,
        T,
        B,
        plan.grid_b,
        initial if initial is not None else counters,  # initial_ptr: read only with HAS_INITIAL
        H=H,
        K=K,
        HAS_LENGTHS=lengths is not None,
        RESIDENT=plan.resident,
        ONE_TILE=one_tile_schedule(plan, layers, one_tile),
        SAVE=save,
        DOT_PRECISION=dot_precision(projected.dtype, plan.exact_fp32_dot),
        GRID_H=plan.grid_h,
        BLOCK_B=plan.block_b,
        BLOCK_H=plan.block_h,
        BLOCK_K=plan.block_k,
        SPIN_LIMIT=common.BARRIER_SPIN_LIMIT,
        LAYERS=layers,
        HAS_BIAS=bias is not None,
        DIRECTIONS=directions,
        PEEPHOLE=w_ch is not None,
        CELL="gru" if b_hn is not None else "lstm",
        GATE_BIT=gate_bit(plan),
        INPUT_AHEAD=(layers > 1 or plan.fused_input) and plan.input_ahead and one_tile,
        FUSED_INPUT=plan.fused_input,
        IN_K=in_k,
        IN_BLOCK_K=max(16, triton.next_power_of_2(in_k)) if plan.resident else plan.block_k,
        DROPOUT=dropout is not None,
        HAS_INITIAL=initial is not None,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        # A cooperative launch starts only if every program can be resident at once (else the driver
        # refuses it), so a kernel sharing the GPU on another stream cannot leave half of this grid
        # spinning for programs that never get an SM. The interpreter ignores the option.
        launch_cooperative_grid=True,
    )
    barrier_watch.watch(counters[layers * directions * plan.grid_b:], lambda: f"{what} ({plan})")
