"""Plans of the backward chain (``lstm_bwd.py``): its schedule, tile and launch options, pure functions of
the shapes and the SM count, so they can be checked without a GPU (``tests/test_fused_bwd.py``,
``benchmarks/compile_check.py --kernel bwd``) and swept on one (``benchmarks/tune.py``)."""

from __future__ import annotations

import os

import triton

from triton_lstm.kernels import forward_plans

SCHEDULES = ("auto", "persistent", "per_step")

# The chain loads each step's saved gates and state and its output gradient during the step before, ahead
# of the barrier wait, rather than after the recurrent product (the kernels' PREFETCH): one memory round
# trip off each step's critical path, as the forward's one-tile schedule took its input projection's
# (0.5-1 µs per step in run 2). Built without a GPU: off until one times it (``tune.py --mode bwd
# --variants prefetch``; benchmarks/NOTES.md, "The backward chain's prefetch").
PREFETCH = False
# A stack's chain forms a layer's two products (dG_{t+1}·W_hh and the layer above's dG^{l+1}_t·W_ih^{l+1}) in
# one K loop, one software pipeline, after its wait for the layer above (the kernels' ONE_LOOP; not with
# dropout between layers, whose mask applies to the second product alone). Built without a GPU: off until
# one times it (``tune.py --layers 4 --mode bwd --variants one_loop``; benchmarks/NOTES.md, "The stack's
# one-tile schedule").
STACK_ONE_LOOP = False


def chain_variants(element_size: int, layers: int, cell: str, dropout: bool, interpret: bool) -> tuple[bool, bool]:
    """(PREFETCH, ONE_LOOP) of a chain launch (``layers`` > 1: a stack's; ``dropout``: between its layers).
    The one loop where ``STACK_ONE_LOOP`` is on, on stacks without dropout (its mask applies to the product
    from above alone); the prefetch where ``PREFETCH`` is on. On a GPU only where every planned build
    compiles without spills on sm_90 (compile_check.py --kernel bwd|stack|bidir --variant prefetch|one-loop):
    on a Triton that compiles them clean (``forward_plans.without_gpu_variants_compile_clean``); the prefetch
    on 16-bit chains (fp32 GRU chains spilled 40-64 bytes under Triton 3.6 at H = 33 and 100), without
    dropout (40 bytes at six stacked chains under 3.9), and on a GRU stack only with the one loop (with two
    loops a 4-layer chain at H = 1024 spilled 40 bytes under 3.6; with one, every GRU stack compiles clean).
    Under the interpreter, wherever switched on."""
    one_loop = STACK_ONE_LOOP and layers > 1 and not dropout
    if interpret:
        return PREFETCH, one_loop
    compile_clean = forward_plans.without_gpu_variants_compile_clean()
    one_loop = one_loop and compile_clean
    prefetch = (PREFETCH and element_size == 2 and not dropout and compile_clean
                and (one_loop or cell != "gru" or layers == 1))
    return prefetch, one_loop


def tile_count(B: int, H: int, block_b: int, block_h: int) -> int:
    """Programs of a chain over (B × H) in tiles of block_b × block_h: one per tile."""
    return triton.cdiv(B, block_b) * triton.cdiv(H, block_h)


def plan_bwd(B: int, H: int, num_sms: int | None, schedule: str, max_tile: int = 4096) -> tuple[str, int, int]:
    """Returns (schedule, BLOCK_B, BLOCK_H) for the gate-gradient kernel on a GPU of ``num_sms`` SMs
    (None: Triton's interpreter). A pure function of the shapes, so it can be checked without a GPU.

    tl.dot needs every dimension >= 16: smaller B and H are masked up to 16. ``max_tile`` bounds
    BLOCK_B × BLOCK_H (the stacked backward's second product spills beyond 1024 on sm_90).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lstm_bwd: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if num_sms is None:
        # Triton's interpreter runs programs one after another: a program spinning on the barrier would
        # wait forever for the next one. One program owning every batch row and hidden unit never waits.
        block_b = max(16, triton.next_power_of_2(B))
        block_h = max(16, triton.next_power_of_2(H))
        if schedule == "per_step":
            return "per_step", 16, 16  # several programs per launch: exercises the tiling
        return "persistent", block_b, block_h
    widest_b = max(16, min(64, triton.next_power_of_2(B)))
    if schedule != "per_step" and os.environ.get("TRITON_LSTM_PERSISTENT_BWD", "1") != "0":
        # Every program must be resident at once or the barrier deadlocks: at most one program per SM
        # (each fits an SM on its own, whatever its register and shared-memory use). Smaller tiles spread
        # the recurrent product over more SMs; wider batch tiles re-read W_hh fewer times.
        if H >= 1024 and tile_count(B, H, 16, 32) <= num_sms:
            # Where W_hh streams (H >= 1024), 16 × 32 tiles beat the widest batch tile on an H200 (tune.py,
            # run 4, µs/step of the chain: 12.9 against 15.1 at B = 64, H = 1024; 22.6 against 23.5 at
            # B = 16, H = 2048).
            return "persistent", 16, 32
        block_b = widest_b
        while block_b >= 16:
            for block_h in (16, 32, 64, 128, 256):
                if block_b * block_h <= max_tile and tile_count(B, H, block_b, block_h) <= num_sms:
                    return "persistent", block_b, block_h
            block_b //= 2
        if schedule == "persistent":
            raise ValueError(f"lstm_bwd: B={B}, H={H} needs more tiles than the {num_sms} SMs can hold at once")
    return "per_step", widest_b, 32


def bwd_launch_options(H: int, block_b: int, block_h: int, element_size: int = 2, whole_module: bool = False) -> dict:
    """BLOCK_K and num_warps of the gate-gradient kernel for a tile of BLOCK_B × BLOCK_H. ``whole_module``:
    the stacked and the bidirectional launches (tiles of at most 1024 elements), which below H = 512 (and
    in fp32) need 8 warps and 64-wide chunks from 1024-element tiles: with 4 warps 64 × 16 tiles spilled
    280 bytes under Triton 3.6 (stack, H = 256), with 128-wide chunks 32 × 32 tiles 24-40 bytes (stack,
    H = 256), and fp32 64 × 16 tiles 40 bytes with 4 warps (both directions, H = 64)."""
    # 128-wide chunks of the 4H gate columns in 16-bit: faster than 64 at all five anchor shapes on an
    # H200 (tune.py, bf16: 7.6 against 8.5 µs/step at H = 256, 22.0 against 29.7 at H = 2048); 64 in
    # fp32 (FMA dots), where 128 spills under Triton 3.4 (64-row tiles). Eight warps from 64 × 32 tiles,
    # which spill on sm_90 with four (fp32 and, under Triton 3.6, fp16).
    # fp32 below 4H = 256 takes 32: a 64-wide chunk spilled at H = 33 (sm_90, 64 × 16 tiles).
    large = block_b * block_h >= (1024 if whole_module else 2048)
    widest = 128 if element_size < 4 else 64 if 4 * H >= 256 else 32
    if block_b * block_h >= 4096:
        # 64 × 64 tiles (large batches: B ≳ 512 at H ≥ 512) in 16-bit: 128-wide chunks sat at 255 registers
        # with 16-40-byte stack frames under Triton 3.6 (40 at H = 768, bf16), 64-wide ones at 198-255 with
        # none (24 bytes at H = 768, bf16). Not timed: no anchor shape takes these tiles.
        widest = min(widest, 64)
    if whole_module and large:
        if element_size < 4 and H >= 512:
            # 128-wide chunks on four warps, as a single layer's tiles of this size: a 4-layer stack's
            # chain at (T, B, H) = (128, 64, 512) took 17.8 µs per step against 23.5 with 64-wide chunks
            # on eight (H200, bf16, tune.py --layers 4); both compile without spills from H = 512 up.
            return dict(BLOCK_K=128, num_warps=4)
        widest = min(widest, 64)
    return dict(BLOCK_K=max(16, min(widest, triton.next_power_of_2(4 * H))), num_warps=8 if large else 4)
