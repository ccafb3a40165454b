"""The forward's plans: how each forward kernel runs for given shapes on a given device (persistent or
per step, resident or streamed W, tiles, grid, warps), as pure functions of the shapes and the device
limits, so that every decision is testable without a GPU and printed by ``triton-lstm bench --plan``.

``plan_persistent_fwd``: one layer and direction (``lstm_fwd_persistent.py``); ``plan_stack_fwd``: a
stack of unidirectional layers in one launch (``lstm_fwd_stack.py``); ``plan_bidirectional_fwd``: both
directions of a layer in one launch (``lstm_fwd_bidirectional.py``). The tile rules come from sweeps on
an H200 (``benchmarks/tune.py``, figures in benchmarks/NOTES.md) and from the sm_90 compiles of every
planned configuration (``benchmarks/compile_check.py``: no spills, within shared memory).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton

# Beyond this many hidden blocks per program and step the per-step kernel's full grid is likely the
# better use of the SMs (an estimate, not a measurement: no GPU was at hand when this was written).
MAX_HIDDEN_BLOCKS_PER_PROGRAM = 4
# Resident W_hh only up to this K: beyond it the whole-K operands of the per-step dots no longer fit the
# registers (sm_90, H = 1024: 255 registers and about 1 KB spilled), and streaming from L2 is faster
# (H200, bf16, H = 1024, B = 64: 9.3 µs/step streamed against 15.4 resident).
RESIDENT_MAX_K = 512
# With one dot for the four gates (ForwardPlan.gate_dot) a resident slice compiles without spills up to
# this K (sm_90, H = 1024, 32 × 16 tiles on 4 warps: 254 registers, no stack, under Triton 3.6 and 3.9; 3.4
# spills ~500 bytes): ``resident_gate_dot``, planned since run 13 (``with_measured_variants``).
RESIDENT_GATE_DOT_MAX_K = 1024
# ... from this Triton on: 3.4, the declared floor, spills that slice (456-504 bytes at K = 1024, sm_90).
RESIDENT_GATE_DOT_SINCE_TRITON = (3, 6)
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
# A stack whose programs own one tile each runs the stack's one-tile schedule (h and c in registers, a
# layer's two products in one K loop; kernels/stack_layer.py). Built without a GPU: off until one times it
# (``tune.py --layers 4 --variants gate_dot streamed_one_tile``; benchmarks/NOTES.md, "The stack's one-tile
# schedule"). plan_stack_fwd is cached: clear its cache after changing this.
STACK_ONE_TILE = False
# The variants built without a GPU (this stack one-tile schedule, the backward chain's PREFETCH and
# STACK_ONE_LOOP: backward_plans) take effect from this Triton on once switched on: under 3.4, the declared
# floor, some of their planned builds spill on sm_90 where 3.6 and 3.9 compile them clean (compile_check.py
# --variant …, every planned configuration): the stack's one-tile schedule 40 bytes (LSTM, H = 17, 16 × 32
# tiles), the chain's prefetch 104-136 bytes in 16-bit (GRUs at H = 17 and 33, GRU stacks at H = 1024) and
# 584-760 in fp32, its one loop 40-72 (GRU stacks at H = 17, fp16 LSTM stacks at H ≥ 2048).
WITHOUT_GPU_VARIANTS_SINCE_TRITON = (3, 6)

# Shared memory kept free of the resident estimate (the estimate leaves out small scratch buffers).
RESIDENT_HEADROOM = 8 * 1024
# Shared memory assumed under the interpreter, so that plans there are deterministic.
INTERPRETER_SHARED_MEMORY = 96 * 1024
# Shared memory assumed when the device does not report its opt-in limit (sm_86 and sm_89: the
# smallest opt-in limit among Ampere and later cards).
DEFAULT_SHARED_MEMORY = 99 * 1024


# The planners below are pure functions of ints and bools, called on every forward: cached, since each
# evaluation costs tens of µs of host time (triton.cdiv and next_power_of_2 are ~2 µs each from Python),
# which a launch-bound call (one step, short sequences) pays in full.
_cached_plan = functools.lru_cache(maxsize=1024)


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """How the forward of one layer and direction runs: ``persistent`` or per-step, and if persistent
    with which blocking. ``reason`` says why, in words (shown by the benchmark and the tests)."""

    persistent: bool
    reason: str
    resident: bool = False
    block_b: int = 16
    block_h: int = 16
    block_k: int = 16
    grid_h: int = 1
    grid_b: int = 1
    num_warps: int = 4
    # tl.dot's input_precision for fp32 inputs when PyTorch disallows TF32 ("ieee" or "tf32x3").
    exact_fp32_dot: str = "ieee"
    # Software-pipelining depth of the streamed K loop (Triton's default, 3: two chunks in flight).
    num_stages: int = 3
    # One dot per product for the four gates (N = 4·block_h, common.interleaved_gate_rows; per K chunk
    # when W streams) instead of four of N = block_h. Planned for 16-bit single layers and stacks since
    # run 13 (``with_measured_variants``); bidirectional layers are still to time.
    gate_dot: bool = False
    # A stack whose programs own one tile each: a layer forms its next step's input product before it
    # waits at its own barrier (kernels/stack_layer.py). Not planned: slower in run 13 (benchmarks/NOTES.md).
    input_ahead: bool = False
    # A streamed plan whose programs own one tile each runs the one-tile schedule that resident plans
    # always do (h and c in registers, the next input loaded before the barrier wait). Planned where run 13
    # timed it faster (``with_measured_variants``). On a stack (kernels/stack_layer.py): h and c in
    # registers, and with the gate dot a layer's two products in one K loop; not planned there (not timed).
    streamed_one_tile: bool = False
    # Layer 0 forms its input product x_t·W_ihᵀ + b in the kernel, as a stack's layers above do, instead
    # of reading it from the projection GEMM run before the launch (kernels/lstm_fwd_fused_input.py; in a
    # stack only where input size == hidden size). Not planned: slower than the GEMM and the plain kernel
    # in run 13, or over the shared memory (benchmarks/NOTES.md).
    fused_input: bool = False

    @property
    def num_programs(self) -> int:
        return self.grid_h * self.grid_b


def gate_bit(plan: ForwardPlan) -> int:
    """The kernels' ``GATE_BIT`` for ``plan``: 0 (four dots per product) unless ``plan.gate_dot``, else
    the column bit that carries the gate's high bit (``common.interleaved_gate_rows``), chosen
    where Triton's MMA layout for the tile keeps it in a thread's registers, so that splitting the gates
    apart moves no data (checked for sm_90 by ``benchmarks/compile_check.py --variant gate-dot``). Any
    bit gives the same numbers; only the cost of the split depends on it.

    - 64-row tiles on 4 or 8 warps run as wgmma (sm_90): each warpgroup holds a contiguous run of
      columns, every thread two adjacent ones (bit 0) in each 8-column group: bit 3 stays in a thread.
    - Narrower tiles run as mma.sync with the warps side by side along the columns, 8-column group j on
      warp j mod num_warps: the top column bit stays in a thread.
    """
    if not plan.gate_dot:
        return 0
    top = (4 * plan.block_h).bit_length() - 2  # log2(4·block_h) − 1
    if plan.block_b >= 64 and plan.num_warps % 4 == 0:
        return min(3, top)
    return top


def one_tile_each(plan: ForwardPlan, B: int, H: int) -> bool:
    """Every program of ``plan`` owns exactly one (batch block × hidden block) tile at these sizes.
    Called per launch: plain integer division, not triton.cdiv (~2 µs a call from Python)."""
    return plan.grid_h == -(-H // plan.block_h) and plan.grid_b == -(-B // plan.block_b)


def one_tile_schedule(plan: ForwardPlan, layers: int, one_tile: bool) -> bool:
    """The kernels' ``ONE_TILE``: whether ``plan``'s programs, owning one tile each (``one_tile``, from
    ``one_tile_each``), run the one-tile schedule (h and c in registers across steps). One layer: resident
    plans always, streamed ones where ``streamed_one_tile``; the kernels that form an input product
    (``stack_layer``: a stack, or ``fused_input``) where ``streamed_one_tile`` on a streamed plan, unless
    ``input_ahead`` (its own one-tile schedule)."""
    if not one_tile:
        return False
    if layers == 1 and not plan.fused_input:
        return plan.resident or plan.streamed_one_tile
    return plan.streamed_one_tile and not plan.resident and not plan.input_ahead


def without_gpu_variants_compile_clean() -> bool:
    """Whether this Triton compiles the variants built without a GPU clean (``WITHOUT_GPU_VARIANTS_SINCE_TRITON``
    on): the stack's one-tile schedule here, the chain's (``backward_plans.chain_variants``)."""
    return TRITON_VERSION >= WITHOUT_GPU_VARIANTS_SINCE_TRITON


def resident_bytes(block_b: int, block_h: int, K: int, element_size: int) -> int:
    """Shared memory a resident program is budgeted: its W_hh slice (4 gates × K × BLOCK_H), one h tile
    (BLOCK_B × K) staged for the dots, and the four fp32 accumulators converted for the epilogue.

    Checked against what Triton 3.9 allocates compiling for sm_90 (``benchmarks/compile_check.py``):
    an upper bound within 3-20 % (bf16, H = 1024, BLOCK_B = 32: 204,800 budgeted, 197,632 allocated;
    H = 256, BLOCK_B = 64: 81,920 and 67,584)."""
    k_pad = max(16, triton.next_power_of_2(K))
    return (4 * k_pad * block_h + block_b * k_pad) * element_size + 4 * block_b * block_h * 4


def streamed_bytes(block_b: int, block_h: int, block_k: int, element_size: int) -> int:
    """Shared memory a streamed program allocates, estimated: two K chunks in flight (three pipeline
    stages), each the four gates' BLOCK_K × BLOCK_H of W_hh and BLOCK_B × BLOCK_K of h. Against Triton 3.9's
    builds of every planned streamed forward (``benchmarks/compile_check.py``, one layer and both
    directions): exact or at most 2 KB under on sm_80, sm_86, sm_89 and sm_120, within ``RESIDENT_HEADROOM``
    (e.g. 16-bit 16 × 32 tiles with 256-wide chunks: 147,456 bytes, the 99-KB cards' case); up to 16 KB
    under on sm_90 and sm_100, whose MMAs stage more, and whose 227 KB hold the largest plan with room."""
    return 2 * (4 * block_h * block_k + block_b * block_k) * element_size


def resident_gate_dot(plan: ForwardPlan, H: int, K: int, element_size: int, shared_memory: int) -> ForwardPlan | None:
    """``plan``, a 16-bit streamed plan that ``RESIDENT_MAX_K`` keeps from holding W_hh resident, with its
    W_hh slice resident after all and one dot for the four gates — same tiles, grid and warps — or None where
    that does not apply: a resident plan holds one hidden block per program, K up to
    ``RESIDENT_GATE_DOT_MAX_K``, and its slice within the shared-memory budget by ``resident_bytes`` (a
    GRU's slice with the gate dot is four gates wide, its fourth zero, so the LSTM's estimate holds).

    Why: the streamed step at H = 1024 waits on L2 for 128 KiB of W_hh per program and step (9.3 µs per
    step, LSTM, H200); four resident dots over K = 1024 spilled ~1 KB of registers (15.4), the gate dot's
    one does not: 5.28 µs/step in run 13 (``with_measured_variants`` plans it)."""
    k_pad = max(16, triton.next_power_of_2(K))
    if (not plan.persistent or plan.resident or element_size != 2 or K > RESIDENT_GATE_DOT_MAX_K
            or plan.grid_h != -(-H // plan.block_h)
            or resident_bytes(plan.block_b, plan.block_h, K, element_size) > shared_memory - RESIDENT_HEADROOM):
        return None
    return dataclasses.replace(plan, resident=True, gate_dot=True, block_k=k_pad,
                               reason="persistent, W_hh resident past K = 512 with one dot for the four gates")


@_cached_plan
def plan_persistent_fwd(
    T: int,
    B: int,
    H: int,
    K: int,
    element_size: int,
    num_sms: int,
    shared_memory: int,
    interpret: bool = False,
    fp32_tensor_cores: bool = True,
    allow_resident: bool = True,
    gates: int = 4,
) -> ForwardPlan:
    """Chooses persistent (resident or streamed W_hh) or per-step for one layer's forward: the tiling of
    ``tile_persistent_fwd``, then for 16-bit plans on a GPU the kernel variants that run 13 timed faster
    (``with_measured_variants``). Arguments as ``tile_persistent_fwd``'s."""
    plan = tile_persistent_fwd(T, B, H, K, element_size, num_sms, shared_memory, interpret, fp32_tensor_cores,
                               allow_resident, gates)
    if interpret or element_size != 2 or not plan.persistent:
        return plan
    return with_measured_variants(plan, B, H, K, element_size, num_sms, shared_memory)


def with_measured_variants(plan: ForwardPlan, B: int, H: int, K: int, element_size: int, num_sms: int,
                           shared_memory: int) -> ForwardPlan:
    """A 16-bit persistent plan of one layer with the variants that were faster on an H200 (run 13:
    ``tune.py --variants``, bf16, kernel-only forward at T = 128; benchmarks/NOTES.md, "Run 13"), each rule
    where it was measured — the GRU at B = 256 and H = 1024 only, whose ratios matched the LSTM's (its
    16-row tiles, where the gate dot carries a zero fourth gate, take the same rules untimed):

    - one dot for the four gates everywhere (0.47-0.84 of the four dots' time on 64- and 32-row tiles, and
      on 16-row streamed ones; the same on 16 × 32 resident tiles, see the next rule);
    - K in (512, 1024] with one hidden block per program: W_hh resident after all
      (``resident_gate_dot``; H = 1024, B = 64: 5.28 µs/step against 9.29 streamed, GRU 5.16 against 8.01),
      from Triton 3.6 on (``RESIDENT_GATE_DOT_SINCE_TRITON``);
    - 16-row resident tiles take 16-unit hidden blocks, twice the programs (with the gate dot 16 × 16
      beat 16 × 32: H = 256, B = 64: 2.52 against 3.33; H = 512, B = 8: 2.69 against 3.41);
    - 64-row tiles, one per program, stream W in 64-wide chunks on the one-tile schedule rather than hold
      it resident (B = 256, H = 512: 4.72 against 5.11, GRU 4.36 against 4.68), and streamed 32-row ones
      take the one-tile schedule too (H = 1024, B = 64: 6.53 against 6.84, GRU 6.36 against 6.70);
    - 16-row streamed tiles read 128-wide K chunks, not 256 (H = 2048: 9.51 against 11.94).
    """
    twin = resident_gate_dot(plan, H, K, element_size, shared_memory)
    if twin is not None and TRITON_VERSION >= RESIDENT_GATE_DOT_SINCE_TRITON:
        return twin
    one_tile = one_tile_each(plan, B, H)
    if plan.resident and plan.block_b == 16 and plan.block_h == 32 and -(-H // 16) <= num_sms:
        grid_h = -(-H // 16)
        plan = dataclasses.replace(plan, block_h=16, grid_h=grid_h, grid_b=max(1, min(-(-B // 16), num_sms // grid_h)))
    elif plan.resident and plan.block_b == 64 and one_tile:
        plan = dataclasses.replace(plan, resident=False, block_k=min(64, plan.block_k), streamed_one_tile=True,
                                   reason="persistent, W_hh streamed from L2 (one tile per program)")
    elif not plan.resident and plan.block_b >= 32 and one_tile:
        plan = dataclasses.replace(plan, streamed_one_tile=True)
    elif not plan.resident and plan.block_b == 16:
        plan = dataclasses.replace(plan, block_k=min(128, plan.block_k))
    return dataclasses.replace(plan, gate_dot=True, reason=f"{plan.reason}; one dot for the four gates")


@_cached_plan
def tile_persistent_fwd(
    T: int,
    B: int,
    H: int,
    K: int,
    element_size: int,
    num_sms: int,
    shared_memory: int,
    interpret: bool = False,
    fp32_tensor_cores: bool = True,
    allow_resident: bool = True,
    gates: int = 4,
) -> ForwardPlan:
    """Chooses persistent (resident or streamed W_hh) or per-step for one layer's forward, and its tiles
    with the four-dot kernel (the variants come on top: ``plan_persistent_fwd``).

    A pure function of the shapes and the device limits, so the decision is testable without a GPU.
    ``num_sms`` bounds the grid (every program must be co-resident for the spin barrier); a resident
    program must fit ``shared_memory`` less ``RESIDENT_HEADROOM`` by the ``resident_bytes`` estimate (an
    estimate: a compile that does not fit raises OutOfResources, and the launcher then streams).
    ``fp32_tensor_cores``: the device runs TF32 dots (sm_80 and later), so exact fp32 can run as
    three TF32 products ("tf32x3") instead of on the FMA units. ``allow_resident`` False: streamed
    plans only (a stack's programs, lstm_fwd_stack.py). ``gates``: 4 for the LSTM, 3 for the GRU cell
    (``kernels/gru.py``; its resident slice is sized as the LSTM's, a quarter too large).

    The choices below were measured on an H200 with ``benchmarks/tune.py`` (bf16 and fp32, the five
    anchor shapes; figures in benchmarks/NOTES.md); other shapes and cards get the same rules untested.
    """
    if T == 0 or B == 0 or H == 0:
        return ForwardPlan(False, "empty input: nothing to run")
    if T == 1 and not interpret:
        # One step needs no barrier: the per-step kernel, whose launch costs the host less (H200, T = 1,
        # B = 8, H = 512, bf16, wall clock per call: 322 µs against 529 persistent, nn.LSTM 338; run 5).
        return ForwardPlan(False, "one step: the per-step kernel (no barrier to amortize)")
    if num_sms < 1:
        return ForwardPlan(False, "no SM count for the device")
    widest_b = max(16, min(64, triton.next_power_of_2(B)))
    fp32 = element_size >= 4
    k_pad = max(16, triton.next_power_of_2(K))

    if interpret:
        # One program (the interpreter runs programs one after another: a second would deadlock the
        # first one's barrier). It holds the whole H when that fits the budget, else it streams.
        budget = 0 if fp32 or not allow_resident else shared_memory - RESIDENT_HEADROOM
        block_h = max(16, triton.next_power_of_2(H))
        for bb in (widest_b, 32, 16):
            if bb <= widest_b and resident_bytes(bb, block_h, K, element_size) <= budget:
                return ForwardPlan(True, "interpreter: one program, W_hh resident", True, bb, block_h, k_pad, 1, 1)
        # fp32 16×16 tiles on 2 warps: Triton 3.9's LLVM aborts (an SLPVectorizer assertion) on FMA dots
        # that leave each thread 2 accumulators when the K loop runs once.
        warps = 2 if fp32 and widest_b == 16 else 4
        return ForwardPlan(True, "interpreter: one program, W_hh streamed", False, widest_b, 16,
                           max(16, min(32 if fp32 else 64, k_pad)), 1, 1, warps)

    if fp32 and not fp32_tensor_cores:
        # FMA dots: the plan the kernels had before tensor-core fp32 (2 warps for 16×16 tiles, see above).
        block_h = 16
        num_h_blocks = triton.cdiv(H, block_h)
        grid_h = min(num_h_blocks, num_sms)
        if triton.cdiv(num_h_blocks, grid_h) > MAX_HIDDEN_BLOCKS_PER_PROGRAM:
            return ForwardPlan(False, f"H={H}: over {MAX_HIDDEN_BLOCKS_PER_PROGRAM} hidden blocks per program "
                                      f"on {num_sms} SMs; per-step kernel")
        grid_b = max(1, min(triton.cdiv(B, widest_b), num_sms // grid_h))
        return ForwardPlan(True, "persistent, W_hh streamed (fp32 FMA dots)", False, widest_b, block_h,
                           max(16, min(32, k_pad)), grid_h, grid_b, 2 if widest_b * block_h <= 256 else 4)

    # The batch tile: the narrowest whose grid of 16-unit hidden blocks fits the SMs, so that spare SMs
    # split the batch (batch groups never wait for each other). Then 16-row tiles take 32-unit hidden
    # blocks: half the programs at each barrier, and a 16-row tile gives every warp the whole product
    # anyway. H = 256, B = 64 bf16: 8 × 4 programs of 16 × 32 3.3 µs/step, 16 × 4 of 16 × 16 3.6,
    # 16 × 1 of 64 × 16 4.4; H = 512, B = 8: 3.6 against 4.7.
    tiles = [bb for bb in (16, 32, 64) if bb <= widest_b]
    fitting = [bb for bb in tiles if triton.cdiv(H, 16) * triton.cdiv(B, bb) <= num_sms]
    block_b = fitting[0] if fitting else tiles[-1]
    block_h = 32 if block_b == 16 else 16
    # More hidden blocks than SMs: several blocks per program, and wider blocks only beyond
    # MAX_HIDDEN_BLOCKS_PER_PROGRAM (tiles of 32 × 32 and up spill or overflow shared memory on sm_90).
    while triton.cdiv(triton.cdiv(H, block_h), num_sms) > MAX_HIDDEN_BLOCKS_PER_PROGRAM and block_h < 64:
        block_h *= 2
    num_h_blocks = triton.cdiv(H, block_h)
    # Four warps, except 64-row 16-bit tiles: those spill with four (H = 512: 720 bytes on sm_90).
    warps = 8 if block_b == 64 and not fp32 else 4

    if allow_resident and not fp32 and K <= RESIDENT_MAX_K and num_h_blocks <= num_sms:
        for bb in reversed([bb for bb in tiles if bb <= block_b]):
            bh = 32 if bb == 16 else 16
            if resident_bytes(bb, bh, K, element_size) <= shared_memory - RESIDENT_HEADROOM:
                grid_h = triton.cdiv(H, bh)
                grid_b = max(1, min(triton.cdiv(B, bb), num_sms // grid_h))
                return ForwardPlan(True, "persistent, W_hh resident", True, bb, bh, k_pad, grid_h, grid_b,
                                   8 if bb == 64 else 4)

    # Streamed. 16-bit: 128-wide K chunks up to K = 1024 (H = 1024, B = 64: 9.3 µs/step against 10.0
    # for 64 and 9.7 for 256), 256 beyond for 16 × 32 tiles (H = 2048: 11.5 against 16.0 for 128).
    # fp32: tensor-core dots in three TF32 passes ("tf32x3", fp32-level accuracy), 2–4× faster than
    # FMA dots at all five shapes (H = 256, B = 64: 8.7 against 20.1 µs/step), over 64-wide chunks.
    # Narrower chunks where the sm_90 compiles (Triton 3.6 and 3.9, benchmarks/compile_check.py) of
    # wider ones spill or overflow shared memory: 64-row tiles (16-bit 64, fp32 32 above K = 512) and
    # fp32 below K = 256 (64-wide chunks past K spilled 448 bytes at H = 33).
    # The GRU cell in fp32: 32-row tiles with 64-wide chunks spilled 48 bytes above K = 1024 (the LSTM's
    # 16-24), so 32 there.
    if fp32:
        gru_spills = gates == 3 and block_b == 32 and K > 1024
        block_k = 64 if 256 <= K and (block_b < 64 or K <= 512) and not gru_spills else 32
    elif block_b == 64:
        block_k = 64
    else:
        block_k = 256 if K > 1024 and block_b == 16 and block_h <= 32 else 128
    block_k = max(16, min(block_k, k_pad))
    while block_k > 16 and streamed_bytes(block_b, block_h, block_k, element_size) > shared_memory - RESIDENT_HEADROOM:
        # A card with less shared memory than the H200's (99 KB on sm_86, sm_89, sm_120): narrower chunks,
        # where the widest (16-bit 16 × 32 tiles, 256 wide: 147,456 bytes) would not load.
        block_k //= 2
    grid_h = min(num_h_blocks, num_sms)
    if triton.cdiv(num_h_blocks, grid_h) > MAX_HIDDEN_BLOCKS_PER_PROGRAM:
        return ForwardPlan(False, f"H={H}: over {MAX_HIDDEN_BLOCKS_PER_PROGRAM} hidden blocks per program "
                                  f"on {num_sms} SMs; per-step kernel")
    grid_b = max(1, min(triton.cdiv(B, block_b), num_sms // grid_h))
    return ForwardPlan(True, "persistent, W_hh streamed from L2", False, block_b, block_h, block_k, grid_h, grid_b,
                       warps, exact_fp32_dot="tf32x3" if fp32 else "ieee")


@functools.lru_cache(maxsize=None)
def _device_limits(device_index: int) -> tuple[int, int]:
    """(SM count, opt-in shared memory per program in bytes) of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or 0
    if not shared:
        # Older torch builds lack the opt-in figure; a program may not take all of the SM's shared
        # memory (the driver reserves 1 KiB per block).
        shared = max(0, (getattr(props, "shared_memory_per_multiprocessor", 0) or 0) - 1024) or DEFAULT_SHARED_MEMORY
    return props.multi_processor_count, shared


def persistent_disabled() -> bool:
    """``TRITON_LSTM_PERSISTENT=0`` sends every forward to the per-step kernel."""
    return os.environ.get("TRITON_LSTM_PERSISTENT", "1") == "0"


def stack_disabled() -> bool:
    """``TRITON_LSTM_STACK=0`` runs stacks layer by layer (for A/B timing and debugging)."""
    return os.environ.get("TRITON_LSTM_STACK", "1") == "0" or persistent_disabled()


@_cached_plan
def plan_stack_fwd(
    T: int,
    B: int,
    H: int,
    layers: int,
    element_size: int,
    num_sms: int,
    shared_memory: int,
    interpret: bool = False,
    fp32_tensor_cores: bool = True,
    peephole: bool = False,
    dropout: bool = False,
    projection: bool = False,
) -> ForwardPlan:
    """The plan of one layer of the stack (every layer runs the same one), or not persistent: then the
    stack runs layer by layer. A pure function of the shapes, the device limits, ``peephole`` (the
    layers have peephole weights), ``dropout`` (dropout between layers, in training) and ``projection``
    (proj_size > 0: the layers above 0 add a step-0 term, ``stack_layer``). A GRU stack takes the same
    plan (its planned configurations compile as cleanly: ``compile_check.py --kernel stack --cell gru``).

    On a GPU each layer gets ``num_sms // layers`` SMs, tiled as the comment below says; under the
    interpreter one program runs everything.
    """
    if layers < 2:
        return ForwardPlan(False, "one layer: the single-layer kernel")
    if dropout and projection:
        # Dropout masks h_t = m_t·W_hrᵀ, which the projected stack, running in m_t, never forms.
        return ForwardPlan(False, "dropout between projected layers: layer by layer")
    if T == 0 or B == 0 or H == 0:
        return ForwardPlan(False, "empty input: nothing to run")
    if T == 1 and not interpret:
        # As for one layer (plan_persistent_fwd): a single step needs no barrier, and a persistent launch
        # costs the host more than the per-step kernel (H200, one layer: 529 against 322 µs per call).
        return ForwardPlan(False, "one step: layer by layer, the per-step kernel")
    if element_size >= 4 and not interpret:
        # Two streamed products with fp32 operands spill on sm_90 (232-296 bytes with 64-row tiles).
        return ForwardPlan(False, "fp32 stack: layer by layer (the stacked kernel spills in fp32)")
    if not interpret and num_sms // layers < 1:
        return ForwardPlan(False, f"{layers} layers on {num_sms} SMs: fewer SMs than layers; layer by layer")
    reason = f"stack of {layers} layers in one launch, W streamed"
    k_pad = max(16, triton.next_power_of_2(H))
    if interpret:
        base = plan_persistent_fwd(T, B, H, H, element_size, 1, shared_memory, True, fp32_tensor_cores,
                                   allow_resident=False)
        return ForwardPlan(True, reason, False, base.block_b, base.block_h, min(base.block_k, 64), 1, 1, base.num_warps)
    # Tiles of 16 × 32 or 64 × 16 on 8 warps, 64-wide K chunks: what compiles without spills for the
    # stack's two products on sm_90 under Triton 3.6 and 3.9 (benchmarks/compile_check.py --kernel
    # stack). 32-row tiles spilled 40-72 bytes with 4 or 8 warps, 128-wide chunks up to 688; 64 × 16
    # tiles take 32-wide chunks where H is not a power of two or a program owns several hidden blocks
    # (64-wide ones spilled 56-72 bytes under Triton 3.6: H = 768, and H = 512 on 28 SMs per layer).
    # Measured on an H200 (tune.py --layers 4, (T, B, H) = (128, 64, 512), bf16): 64-wide chunks 11.9 µs
    # per step, 32-wide 14.5, 128-wide 11.1 but spilling 88 bytes under Triton 3.6.
    budget = num_sms // layers
    block_b = 16 if B <= 32 else 64
    block_h = 32 if block_b == 16 else 16
    # Wider hidden blocks only up to 1024-element tiles (64 × 64 spilled 56 bytes at H = 4096).
    while triton.cdiv(triton.cdiv(H, block_h), budget) > MAX_HIDDEN_BLOCKS_PER_PROGRAM and block_b * block_h < 1024:
        block_h *= 2
    num_h_blocks = triton.cdiv(H, block_h)
    grid_h = min(num_h_blocks, budget)
    if triton.cdiv(num_h_blocks, grid_h) > MAX_HIDDEN_BLOCKS_PER_PROGRAM:
        return ForwardPlan(False, f"H={H}: over {MAX_HIDDEN_BLOCKS_PER_PROGRAM} hidden blocks per program on "
                                  f"{budget} SMs per layer; layer by layer")
    grid_b = max(1, min(triton.cdiv(B, block_b), budget // grid_h))
    one_block_each = grid_h == num_h_blocks
    block_k = 64 if block_b < 64 or (one_block_each and not H & (H - 1)) else 32
    if peephole and block_b == 16:
        block_k = 32  # 64-wide chunks spilled 128 bytes with peepholes (Triton 3.6, H = 1024, 2 layers)
    warps = 8
    if dropout and (block_b == 16 or layers == 2):
        # The dropped copy of h_t (stack_layer) under Triton 3.6 (3.9 spilled nothing either way): 64-wide
        # chunks spilled 112-136 bytes at 16-row tiles, 40 at 64 × 16 on 2 layers, H = 512; 32-wide ones
        # on 8 warps still 128 at a GRU's 16 × 32 at H = 768, on 4 warps 0-16 bytes.
        block_k = 32
        warps = 4 if block_b == 16 else 8
    if projection and block_b == 16 and k_pad <= 64:
        # The layers' step-0 term (HAS_INITIAL) with all of K in one 64-wide chunk: 16 × 32 tiles spilled 40
        # bytes under Triton 3.6 (H = 64, 3-4 layers); 32-wide chunks compile clean under 3.6 and 3.9, and so
        # does every other projected plan with the gate dot (compile_check.py --kernel stack --projection).
        block_k = 32
    # One dot for the four gates (run 13, H200, bf16, (T, B, H) = (128, 64, 512), 4 layers: 64 × 16 tiles
    # 6.84 µs per step against 11.85 with four dots, 16 × 32 ones 14.38 against 18.36), except dropout's
    # 16-row tiles on 4 warps: a GRU's spilled 48 bytes with it (Triton 3.9, H = 100, 2 layers).
    if dropout and block_b == 16:
        return ForwardPlan(True, reason, False, block_b, block_h, min(block_k, k_pad), grid_h, grid_b, warps)
    plan = ForwardPlan(True, reason + ", one dot for the four gates", False, block_b, block_h, min(block_k, k_pad),
                       grid_h, grid_b, warps, gate_dot=True)
    if STACK_ONE_TILE and without_gpu_variants_compile_clean() and one_tile_each(plan, B, H):
        plan = dataclasses.replace(plan, streamed_one_tile=True, reason=plan.reason + ", one tile per program")
    return plan


@_cached_plan
def plan_bidirectional_fwd(T: int, B: int, H: int, element_size: int, num_sms: int, shared_memory: int,
                           interpret: bool = False, fp32_tensor_cores: bool = True, gates: int = 4) -> ForwardPlan:
    """The plan of each direction (both run the same one), or not persistent (then the directions run one
    after the other). A pure function of the shapes and the device limits: the single-layer plan for half
    the SMs; under the interpreter one program per direction (the directions never wait for each other).
    ``gates`` 3: a GRU layer (as ``plan_persistent_fwd``)."""
    if not interpret and num_sms < 2:
        return ForwardPlan(False, "fewer than 2 SMs: one direction after the other")
    budget = max(1, num_sms // 2)
    # The four-dot tiling: the variants were timed on one direction, not yet on this kernel.
    base = tile_persistent_fwd(T, B, H, H, element_size, budget, shared_memory, interpret, fp32_tensor_cores,
                               gates=gates)
    if not base.persistent:
        return base
    block_b, block_h, grid_h, grid_b = base.block_b, base.block_h, base.grid_h, base.grid_b
    if block_b == 32:
        # 32-row tiles (what half the SMs leave at B = 64) spilled in the two-direction kernel on sm_90
        # (bf16, H = 512, resident: 48 bytes; fp32, H = 4096, streamed 32 × 32: 248): the same area as
        # 16 × 2·BLOCK_H tiles instead (16 and 16 bytes), or one direction after the other.
        if triton.cdiv(H, 2 * block_h) > budget:
            return ForwardPlan(False, f"H={H}: no spill-free tiling on half the SMs; one direction after the other")
        block_b, block_h = 16, 2 * block_h
        grid_h = triton.cdiv(H, block_h)
        grid_b = max(1, min(triton.cdiv(B, block_b), budget // grid_h))
    if block_b * block_h > 1024:
        # Larger tiles (H = 4096 on half the SMs) spilled too (fp32 64 × 32: 48 bytes under Triton 3.6).
        return ForwardPlan(False, f"H={H}: no spill-free tiling on half the SMs; one direction after the other")
    return ForwardPlan(True, f"both directions in one launch, {base.reason.removeprefix('persistent, ')}",
                       base.resident, block_b, block_h, base.block_k, grid_h, grid_b, base.num_warps,
                       base.exact_fp32_dot, base.num_stages)
