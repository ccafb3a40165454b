"""Compiles the LSTM kernels for a GPU architecture on a machine without a GPU.

For every configuration that the launchers pick over a grid of shapes, dtypes and device presets
(``--kernel persistent``: ``plan_persistent_fwd``; ``step``: the per-step forward's block sizes; ``bwd``:
``plan_bwd``, both schedules), Triton compiles the kernel ahead of time (``triton.compile`` with a
``GPUTarget``; ptxas ships with triton) and this script checks what can be checked without running it:

- it compiles at all (each compile runs in its own process: an LLVM assertion aborts the process);
- the shared memory it allocates fits the device preset's opt-in limit, and against ``resident_bytes``;
- no register spills beyond ``SPILL_TOLERANCE`` bytes (the cubin's stack frame, by ``cuobjdump
  -res-usage``: spills are made by ptxas, the PTX cannot show them);
- the grid barrier is what the design says: a release reduction on arrive, an acquire load (or atomic)
  in the spin, and ``ld.global.cg`` loads of h (or of dG in the backward).

    python benchmarks/compile_check.py            # all planned persistent-forward configurations (minutes)
    python benchmarks/compile_check.py --quick    # the five anchor shapes, H100 preset
    python benchmarks/compile_check.py --kernel bwd --quick
    python benchmarks/compile_check.py --kernel persistent --peephole   # the same plans with peepholes
    python benchmarks/compile_check.py --kernel bwd --cell gru          # the GRU cell on the same drivers
    python benchmarks/compile_check.py --kernel stack --inference       # as a no-grad forward runs them
    python benchmarks/compile_check.py --kernel stack --dropout         # with dropout between layers
    python benchmarks/compile_check.py --kernel stack --projection      # a stack with projections (proj_size > 0)
    python benchmarks/compile_check.py --kernel persistent --variant gate-dot   # beside the planned build
    python benchmarks/compile_check.py --kernel stack --variant input-ahead
    python benchmarks/compile_check.py --kernel persistent --variant resident-gate-dot   # W_hh resident past K = 512
    python benchmarks/compile_check.py --kernel stack --variant streamed-one-tile   # the stack's one-tile schedule
    python benchmarks/compile_check.py --kernel stack --variant one-loop   # its backward chain in one K loop

It says nothing about speed, and the GPU machine may run another Triton version than this one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A stack frame up to this size passes: the plans measured fastest on an H200 compile with 8–24 bytes
# (one or a few spilled registers at 255 registers); the resident H = 1024 plan that spilled ~1 KB was
# 1.7× slower than streaming, and plans like it must fail here.
SPILL_TOLERANCE = 32
# (name, SM count, opt-in shared memory per block in bytes)
DEVICES = [("H100-SXM/H200", 132, 232448), ("H100-PCIe", 114, 232448), ("A100", 108, 166912)]
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
ANCHORS = [(64, 256), (64, 1024), (8, 512), (256, 512), (16, 2048)]  # (B, H)


def _kernel_and_signature(config: dict):
    """The jit function, its argument types and its constexprs for one configuration."""
    from triton_lstm.kernels.common import BARRIER_SPIN_LIMIT

    dtype, kind = config["dtype"], config.get("kernel", "persistent")
    if kind == "persistent":
        from triton_lstm.kernels.lstm_fwd_persistent import _lstm_persistent_fwd_kernel as kernel

        signature = {"projected_ptr": f"*{dtype}", "w_hh_ptr": f"*{dtype}", "h_ptr": f"*{dtype}", "c_ptr": "*fp32",
                     "gates_ptr": f"*{dtype}", "lengths_ptr": "*i32", "counters_ptr": "*i32",
                     "w_ih_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "cell_params_ptr": f"*{dtype}",
                     # the dropout mask's pointer: uint8 masks with DROPOUT, else the launcher's int32 placeholder
                     "dropout_mask_ptr": "*u8" if config.get("dropout") else "*i32", "dropped_ptr": f"*{dtype}",
                     "dropout_scale": "fp32", "T": "i32", "B": "i32", "grid_b": "i32",
                     # the step-0 terms of a projected stack's layers above 0: fp32 with HAS_INITIAL, else a placeholder
                     "initial_ptr": "*fp32" if config.get("projection") else "*i32"}
        constants = dict(H=config["H"], K=config["H"], HAS_LENGTHS=1, RESIDENT=int(config["resident"]),
                         ONE_TILE=int(config.get("one_tile", False) and not config.get("fused_input", False)), SAVE=int(config.get("save", True)),
                         DOT_PRECISION=config.get("precision", "ieee"),
                         GRID_H=config["grid_h"], BLOCK_B=config["block_b"],
                         BLOCK_H=config["block_h"], BLOCK_K=config["block_k"], SPIN_LIMIT=BARRIER_SPIN_LIMIT,
                         LAYERS=config.get("layers", 1),
                         HAS_BIAS=int(config.get("layers", 1) > 1 or config.get("fused_input", False)),
                         DIRECTIONS=config.get("directions", 1), PEEPHOLE=int(config.get("peephole", False)),
                         CELL=config.get("cell", "lstm"), GATE_BIT=config.get("gate_bit", 0),
                         INPUT_AHEAD=int(config.get("input_ahead", False)),
                         FUSED_INPUT=int(config.get("fused_input", False)), IN_K=config.get("in_k", 0),
                         IN_BLOCK_K=config.get("in_block_k", 0), DROPOUT=int(config.get("dropout", False)),
                         HAS_INITIAL=int(config.get("projection", False)))
    elif kind == "step":
        from triton_lstm.kernels.lstm_fwd import _lstm_step_fwd_kernel as kernel

        signature = {"projected_ptr": f"*{dtype}", "w_hh_ptr": f"*{dtype}", "h_ptr": f"*{dtype}", "c_ptr": "*fp32",
                     "gates_ptr": f"*{dtype}", "lengths_ptr": "*i32",
                     "cell_params_ptr": f"*{dtype}", "t": "i32", "B": "i32"}
        constants = dict(H=config["H"], K=config["K"], HAS_LENGTHS=1, SAVE=1,
                         DOT_PRECISION=config.get("precision", "ieee"), BLOCK_B=config["block_b"], BLOCK_H=config["block_h"], BLOCK_K=config["block_k"],
                         PEEPHOLE=int(config.get("peephole", False)), CELL=config.get("cell", "lstm"))
    elif kind == "peephole_grad":  # the peephole weights' reduction (not planned: its one tile per dtype)
        from triton_lstm.kernels.weight_grads import _peephole_grad_kernel as kernel

        signature = {"grad_gates_ptr": f"*{dtype}", "c_ptr": "*fp32", "partial_ptr": "*fp32", "rows": "i32", "B": "i32",
                     "rows_per_split": "i32"}
        constants = dict(H=config["H"], BLOCK_R=config["block_b"], BLOCK_H=config["block_h"])
    else:
        from triton_lstm.kernels.backward_plans import chain_variants
        from triton_lstm.kernels.lstm_bwd import _lstm_bwd_kernel as kernel

        dropout = bool(config.get("dropout", False))
        prefetch, one_loop = chain_variants(DTYPES[dtype], config.get("layers", 1), config.get("cell", "lstm"), dropout,
                                            False)
        signature = {"grad_out_ptr": f"*{dtype}", "gates_ptr": f"*{dtype}", "c_ptr": "*fp32", "w_hh_ptr": f"*{dtype}",
                     "lengths_ptr": "*i32", "grad_gates_ptr": f"*{dtype}", "dh_ptr": "*fp32", "dc_ptr": "*fp32",
                     "counter_ptr": "*i32", "w_ih_above_ptr": f"*{dtype}", "w_ch_ptr": f"*{dtype}",
                     "dropout_mask_ptr": "*u8" if dropout else "*i32", "dropout_scale": "fp32",
                     "T": "i32", "B": "i32", "t_start": "i32", "n_steps": "i32", "seg_start": "i32"}
        constants = dict(H=config["H"], HAS_LENGTHS=1, USE_BARRIER=int(config["resident"]), DOT_PRECISION="ieee",
                         BLOCK_B=config["block_b"], BLOCK_H=config["block_h"], BLOCK_K=config["block_k"],
                         SPIN_LIMIT=BARRIER_SPIN_LIMIT, LAYERS=config.get("layers", 1),
                         DIRECTIONS=config.get("directions", 1), PEEPHOLE=int(config.get("peephole", False)),
                         CELL=config.get("cell", "lstm"), DROPOUT=int(config.get("dropout", False)),
                         # The chain's variants where the launchers take them (the rules of this Triton), unless
                         # the configuration says (a variant's build and its baseline, _variant_configs).
                         PREFETCH=int(config.get("prefetch", prefetch)), ONE_LOOP=int(config.get("one_loop", one_loop)))
    signature.update({name: "constexpr" for name in constants})
    return kernel, signature, constants


def _compile_one(config: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constants = _kernel_and_signature(config)
    options = {"num_warps": config["num_warps"], "num_stages": config.get("num_stages", 3)}
    if config.get("kernel", "persistent") not in ("step", "peephole_grad"):
        options["launch_cooperative_grid"] = True
    # The JIT marks pointers to 16-byte-aligned tensors (every torch allocation) as such; without these
    # attributes the compiler sees unaligned pointers and builds another kernel (scalar loads, other
    # pipelining and shared memory).
    attrs = {(index,): [["tt.divisibility", 16]] for index, kind in enumerate(signature.values()) if kind.startswith("*")}
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", config["arch"], 32),
                              options=options)
    ptx = compiled.asm["ptx"]
    registers, spilled = _resource_usage(compiled.asm["cubin"])
    return {
        "shared": compiled.metadata.shared,
        "registers": registers,
        "spills": spilled,
        "release": bool(re.search(r"(red|atom)\.global\.gpu\.release", ptx)),
        "acquire": bool(re.search(r"(ld|atom)\.global\.gpu\.acquire", ptx)),
        "ld_cg": len(re.findall(r"ld\.global\.cg", ptx)),
        "cp_async_ca": len(re.findall(r"cp\.async\.ca", ptx)),
        "cp_async_cg": len(re.findall(r"cp\.async\.cg", ptx)),
        "mma": len(re.findall(r"wgmma\.mma_async|mma\.sync", ptx)),
        "bar_sync": len(re.findall(r"bar\.sync", ptx)),
    }


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack frame bytes) of the compiled kernel, read by the cuobjdump that ships
    with triton. Spills are made by ptxas, so the PTX cannot show them; they land in the stack frame
    (the kernels use no stack otherwise)."""
    import tempfile

    import triton

    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        report = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", report)
    stack = re.search(r"STACK:(\d+)", report)
    return (int(registers.group(1)) if registers else -1), (int(stack.group(1)) if stack else -1)


def _configs(quick: bool, arch: int, kernel: str = "persistent", peephole: bool = False, cell: str = "lstm",
             dropout: bool = False, projection: bool = False) -> list[dict]:
    from triton_lstm.kernels.forward_plans import (
        gate_bit,
        one_tile_each,
        plan_bidirectional_fwd,
        plan_persistent_fwd,
        resident_bytes,
    )

    devices = DEVICES[:1] if quick else DEVICES
    shapes = ANCHORS if quick else [(B, H) for H in (1, 16, 17, 33, 64, 100, 128, 256, 512, 768, 1024, 2048, 4096)
                                    for B in (1, 3, 8, 16, 17, 64, 256, 512)]
    if kernel == "step":
        return _step_configs(shapes, arch)
    if kernel == "bwd":
        return _bwd_configs(shapes, devices, arch)
    if kernel == "stack":
        return _stack_configs(shapes, devices, arch, quick, peephole, dropout, projection)
    directions = 2 if kernel == "bidir" else 1
    dtypes = {"bf16": 2} if quick and directions == 2 else DTYPES  # CI's time: the bidirectional kernels in bf16
    seen = {}
    for device, num_sms, shared in devices:
        for dtype, size in dtypes.items():
            for B, H in shapes:
                if directions == 2:
                    plan = plan_bidirectional_fwd(100, B, H, size, num_sms, shared, gates=3 if cell == "gru" else 4)
                else:
                    plan = plan_persistent_fwd(100, B, H, H, size, num_sms, shared, gates=3 if cell == "gru" else 4)
                if not plan.persistent:
                    continue
                owns_one_tile = one_tile_each(plan, B, H)
                # the launcher's ONE_TILE and GATE_BIT for a planned plan
                one_tile = (plan.resident or plan.streamed_one_tile) and owns_one_tile
                key = (dtype, H, plan.resident, owns_one_tile, one_tile, plan.block_b, plan.block_h, plan.block_k,
                       plan.num_warps, plan.grid_h, plan.exact_fp32_dot, gate_bit(plan))
                estimate = resident_bytes(plan.block_b, plan.block_h, H, size) if plan.resident else None
                seen.setdefault(key, dict(dtype=dtype, H=H, resident=plan.resident, one_tile=one_tile,
                                          owns_one_tile=owns_one_tile, block_b=plan.block_b,
                                          block_h=plan.block_h, block_k=plan.block_k, num_warps=plan.num_warps,
                                          grid_h=plan.grid_h, arch=arch, limit=shared, device=device,
                                          estimate=estimate, precision=plan.exact_fp32_dot, directions=directions,
                                          gate_bit=gate_bit(plan)))
                if directions == 2:
                    # The backward's chain, both directions in one launch (lstm_bwd_bidirectional_gate_grads).
                    from triton_lstm.kernels.backward_plans import bwd_launch_options, plan_bwd

                    try:
                        _, block_b, block_h = plan_bwd(B, H, num_sms // 2, "persistent", max_tile=1024)
                    except ValueError:
                        continue
                    options = bwd_launch_options(H, block_b, block_h, size, whole_module=True)
                    key = ("bwd", dtype, H, block_b, block_h, *options.values())
                    seen.setdefault(key, dict(kernel="bwd", dtype=dtype, H=H, resident=True, directions=2, block_b=block_b,
                                              block_h=block_h, block_k=options["BLOCK_K"], num_warps=options["num_warps"],
                                              arch=arch, limit=shared, device=device, estimate=None))
    return list(seen.values())


def _stack_configs(shapes, devices, arch: int, quick: bool, peephole: bool = False, dropout: bool = False,
                   projection: bool = False) -> list[dict]:
    """The stacked forward's planned configurations (lstm_fwd_stack.py) for 2, 3 and 4 layers, and the
    stacked backward's."""
    from triton_lstm.kernels.backward_plans import bwd_launch_options, plan_bwd
    from triton_lstm.kernels.forward_plans import gate_bit, one_tile_each, one_tile_schedule, plan_stack_fwd

    seen = {}
    dtypes = {"bf16": 2} if quick else DTYPES
    for device, num_sms, shared in devices:
        for dtype, size in dtypes.items():
            for B, H in shapes:
                for layers in (4,) if quick else (2, 3, 4):
                    plan = plan_stack_fwd(100, B, H, layers, size, num_sms, shared, peephole=peephole, dropout=dropout,
                                          projection=projection)
                    if not plan.persistent:
                        continue
                    owns_one_tile = one_tile_each(plan, B, H)
                    key = (dtype, H, layers, plan.block_b, plan.block_h, plan.block_k, plan.num_warps, plan.grid_h,
                           owns_one_tile, gate_bit(plan), plan.streamed_one_tile)
                    seen.setdefault(key, dict(dtype=dtype, H=H, resident=False, block_b=plan.block_b, layers=layers,
                                              owns_one_tile=owns_one_tile, gate_bit=gate_bit(plan),
                                              one_tile=one_tile_schedule(plan, layers, owns_one_tile),
                                              block_h=plan.block_h, block_k=plan.block_k, num_warps=plan.num_warps,
                                              grid_h=plan.grid_h, arch=arch, limit=shared, device=device, estimate=None,
                                              precision=plan.exact_fp32_dot))
                    # The stacked backward's chain (lstm_bwd_stack_gate_grads): each layer's tiles on its share.
                    try:
                        _, block_b, block_h = plan_bwd(B, H, num_sms // layers, "persistent", max_tile=1024)
                    except ValueError:
                        continue
                    options = bwd_launch_options(H, block_b, block_h, size, whole_module=True)
                    key = ("bwd", dtype, H, layers, block_b, block_h, *options.values())
                    seen.setdefault(key, dict(kernel="bwd", dtype=dtype, H=H, resident=True, layers=layers, block_b=block_b,
                                              block_h=block_h, block_k=options["BLOCK_K"], num_warps=options["num_warps"],
                                              arch=arch, limit=shared, device=device, estimate=None))
    return list(seen.values())


def _step_configs(shapes, arch: int) -> list[dict]:
    from triton_lstm.kernels.lstm_fwd import step_blocks

    seen = {}
    for dtype, size in DTYPES.items():
        for B, H in shapes:
            block_b, block_h, block_k, precision = step_blocks(B, H, H, size, arch >= 80)
            key = (dtype, H, block_b, block_h, block_k, precision)
            seen.setdefault(key, dict(kernel="step", dtype=dtype, H=H, K=H, resident=False, block_b=block_b,
                                      block_h=block_h, block_k=block_k, num_warps=4, arch=arch,
                                      limit=DEVICES[0][2], device=DEVICES[0][0], estimate=None, precision=precision))
    return list(seen.values())


def _bwd_configs(shapes, devices, arch: int) -> list[dict]:
    from triton_lstm.kernels.backward_plans import bwd_launch_options, plan_bwd

    seen = {}
    for device, num_sms, shared in devices:
        for dtype in DTYPES:
            for B, H in shapes:
                schedule, block_b, block_h = plan_bwd(B, H, num_sms, "auto")
                options = bwd_launch_options(H, block_b, block_h, DTYPES[dtype])
                persistent = schedule == "persistent"
                key = (dtype, H, persistent, block_b, block_h, options["BLOCK_K"], options["num_warps"])
                seen.setdefault(key, dict(kernel="bwd", dtype=dtype, H=H, resident=persistent, block_b=block_b,
                                          block_h=block_h, block_k=options["BLOCK_K"], num_warps=options["num_warps"],
                                          arch=arch, limit=shared, device=device, estimate=None))
    return list(seen.values())


# The kernel variants (ForwardPlan's gate_dot, input_ahead, streamed_one_tile, fused_input), and the kernels
# they apply to: each built beside the four-dot build of every planned configuration it applies to.
VARIANTS = {"gate-dot": ("persistent", "stack", "bidir"), "input-ahead": ("stack",),
            "streamed-one-tile": ("persistent", "bidir", "stack"), "fused-input": ("persistent", "stack"),
            "resident-gate-dot": ("persistent",), "prefetch": ("bwd", "stack", "bidir"), "one-loop": ("stack",)}


def _variant_configs(configs: list[dict], variant: str) -> list[dict]:
    """The forward configurations ``variant`` applies to, each as the variant's build followed by its plain
    build (``baseline``) for the comparison. The gate dot: 16-bit plans (fp32 keeps four dots: its tf32x3
    dots at H = 1024 spilled 64 bytes with one), its column bit from ``forward_plans.gate_bit``. The
    input ahead: stacks whose programs own one tile each. The streamed one-tile schedule: 16-bit streamed
    plans whose programs own one tile each (fp32's spilled 80-136 bytes with it); on a stack, beside the
    planned build with its gate bit (stack_layer's one-tile schedule). The input product in the
    kernel: 16-bit plans of one layer or a stack, which then run as a stack (``stack_layer``), with the next
    input product ahead of the barrier wait where the programs own one tile each (a resident W_ih slice
    beside W_hh's fits shared memory only then). W_hh resident with the gate dot: 16-bit streamed plans
    that ``forward_plans.resident_gate_dot`` holds resident (K up to 1024, within the budget). Each pair
    shares a ``pair`` number."""
    from triton_lstm.kernels.forward_plans import ForwardPlan, gate_bit, resident_bytes, resident_gate_dot

    paired = []
    for config in configs:
        if (config.get("kernel") == "bwd") != (variant in ("prefetch", "one-loop")):
            continue  # the backward chain's variants on its configurations, the forward's on theirs
        if variant == "one-loop":  # a stack's chain in one K loop (backward_plans.STACK_ONE_LOOP), alone and prefetching
            if config.get("layers", 1) > 1 and not config.get("dropout"):
                for prefetch in (False, True):
                    pair = len(paired) // 2
                    paired += [dict(config, one_loop=True, prefetch=prefetch, pair=pair),
                               dict(config, one_loop=False, prefetch=prefetch, baseline=True, pair=pair)]
            continue
        if variant == "prefetch":  # the chain's saved operands loaded a step ahead (backward_plans.PREFETCH)
            pair = len(paired) // 2
            paired += [dict(config, prefetch=True, pair=pair), dict(config, prefetch=False, baseline=True, pair=pair)]
            continue
        if variant == "streamed-one-tile" and config.get("layers", 1) > 1:
            # A stack's one-tile schedule (stack_layer's ONE_TILE) beside the planned build, gate dot and all.
            if config.get("owns_one_tile") and not config["resident"] and not config.get("one_tile"):
                pair = len(paired) // 2
                paired += [dict(config, one_tile=True, pair=pair), dict(config, baseline=True, pair=pair)]
            continue
        plan = ForwardPlan(True, "", config["resident"], config["block_b"], config["block_h"], config["block_k"],
                           config["grid_h"], num_warps=config["num_warps"])
        if config.get("gate_bit"):
            # planned with the gate dot (since run 13): the variants are built beside its four-dot build
            config = dict(config, gate_bit=0, one_tile=config["resident"] and config.get("owns_one_tile", False))
        built = None
        if variant == "gate-dot" and config["dtype"] != "fp32":
            built = dict(config, gate_bit=gate_bit(dataclasses.replace(plan, gate_dot=True)))
        elif variant == "input-ahead" and config.get("owns_one_tile"):
            built = dict(config, input_ahead=True)
        elif (variant == "streamed-one-tile" and not config["resident"] and config.get("owns_one_tile")
              and config["dtype"] != "fp32"):
            built = dict(config, one_tile=True)
        elif variant == "fused-input" and config["dtype"] != "fp32":
            built = dict(config, fused_input=True, input_ahead=bool(config.get("owns_one_tile")))
        elif variant == "resident-gate-dot":
            size = DTYPES[config["dtype"]]
            twin = resident_gate_dot(plan, config["H"], config["H"], size, config["limit"])
            if twin is not None:
                built = dict(config, resident=True, block_k=twin.block_k, one_tile=bool(config.get("owns_one_tile")),
                             gate_bit=gate_bit(twin), estimate=resident_bytes(twin.block_b, twin.block_h, config["H"], size))
        if built is not None:
            pair = len(paired) // 2
            paired += [dict(built, pair=pair), dict(config, baseline=True, pair=pair)]
    return paired


def _subprocess(configs: list[dict]) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, __file__, "--batch", json.dumps(configs)], capture_output=True, text=True, env=env)


def _run_batch(configs: list[dict]) -> list[tuple[dict, dict | str]]:
    """Compiles ``configs`` in one child process (one import of torch and triton for all of them). An
    LLVM assertion aborts the whole process: then each configuration it did not finish is compiled in a
    process of its own, so the abort is pinned on the one that caused it."""
    result = _subprocess(configs)
    done = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode == 0 and len(done) == len(configs):
        return list(zip(configs, done))
    if len(configs) == 1:
        tail = (result.stdout + result.stderr).strip().splitlines()
        return [(configs[0], (tail[-1] if tail else f"exit {result.returncode}")[:200])]
    return list(zip(configs, done)) + [pair for config in configs[len(done):] for pair in _run_batch([config])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="anchor shapes on the H100 preset only")
    parser.add_argument("--kernel", choices=["persistent", "step", "bwd", "stack", "bidir"], default="persistent",
                        help="persistent forward, per-step forward, the backward's gate-gradient kernel, the "
                             "stacked forward and backward (all layers in one launch), or the bidirectional forward")
    parser.add_argument("--peephole", action="store_true", help="the same kernels with peephole connections")
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm",
                        help="the cell the drivers run")
    parser.add_argument("--inference", action="store_true",
                        help="the forward kernels as an inference forward runs them (SAVE = 0: no per-step gates or c)")
    parser.add_argument("--dropout", action="store_true",
                        help="the stacked kernels with dropout between layers (training), forward and backward")
    parser.add_argument("--projection", action="store_true",
                        help="the stacked forward with projections (proj_size > 0: a step-0 term per layer above 0)")
    parser.add_argument("--variant", choices=sorted(VARIANTS),
                        help="a kernel variant (ForwardPlan's gate_dot, input_ahead, "
                             "streamed_one_tile, fused_input; W_hh resident with the gate dot past K = 512), on each "
                             "planned configuration it applies to, beside its plain build; "
                             "the gate dot fails where its split adds CTA barriers")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch:
        for config in json.loads(args.batch):
            print(json.dumps(_compile_one(config)), flush=True)
        return 0
    if args.cell == "gru" and args.peephole:
        parser.error("--cell gru takes no --peephole (peepholes are the LSTM's)")
    configs = _configs(args.quick, args.arch, args.kernel, args.peephole, args.cell, args.dropout, args.projection)
    if args.peephole:
        configs = [dict(config, peephole=True) for config in configs]
    if args.cell == "gru":
        configs = [dict(config, cell="gru") for config in configs]
    if args.dropout:
        if args.kernel != "stack":
            parser.error("--dropout is for the stacked kernels (--kernel stack)")
        configs = [dict(config, dropout=True) for config in configs]
    if args.projection:
        if args.kernel != "stack" or args.cell != "lstm" or args.peephole or args.dropout:
            parser.error("--projection is for the LSTM's stacked forward (--kernel stack), without peepholes or dropout")
        # Its backward is the plain chain on merged weights: the forward alone differs.
        configs = [dict(config, projection=True) for config in configs if config.get("kernel") != "bwd"]
    if args.inference:
        if args.kernel not in ("persistent", "stack", "bidir"):
            parser.error("--inference is for the persistent forward kernels (persistent, stack, bidir)")
        configs = [dict(config, save=False) for config in configs if config.get("kernel") != "bwd"]
    if args.variant:
        if args.kernel not in VARIANTS[args.variant]:
            parser.error(f"--variant {args.variant} applies to --kernel {' / '.join(VARIANTS[args.variant])}")
        configs = _variant_configs(configs, args.variant)
    print(f"{len(configs)} planned configurations, compiled for sm_{args.arch}")
    failures = 0
    batches = [configs[index::max(1, args.jobs)] for index in range(max(1, args.jobs))]
    with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool:
        outcomes = [pair for batch in pool.map(_run_batch, [b for b in batches if b]) for pair in batch]
    if args.variant:
        # Each variant's build beside the plain one (the jobs interleave the batches: match by pair).
        baselines = {config["pair"]: outcome for config, outcome in outcomes if config.get("baseline")}
        outcomes = [(dict(config, plain=baselines.get(config["pair"])), outcome)
                    for config, outcome in outcomes if not config.get("baseline")]
        configs = [config for config, _ in outcomes]
    for config, outcome in outcomes:
        resident = ("resident" if config["resident"] else "streamed") + (" one-tile" if config.get("one_tile") else "")
        mode = {"persistent": resident, "bidir": "both directions, " + (resident if config.get("kernel") != "bwd" else "bwd"),
                "step": f"K={config.get('K')}", "bwd": "persistent" if config["resident"] else "per-step",
                "stack": f"{config.get('layers')} layers {config.get('kernel', 'forward')}"}[args.kernel]
        variant = ((" peephole" if config.get("peephole") else "") + (" gru" if config.get("cell") == "gru" else "")
                   + (" inference" if config.get("save") is False else "") + (" dropout" if config.get("dropout") else "")
                   + (" projection" if config.get("projection") else "")
                   + (f" gate-dot (bit {config['gate_bit']})" if config.get("gate_bit") else ""))
        name = (f"{config['dtype']} H={config['H']} {mode}{variant} "
                f"BLOCK_B={config['block_b']} BLOCK_H={config['block_h']} BLOCK_K={config['block_k']} warps={config['num_warps']}")
        if isinstance(outcome, str):
            failures += 1
            print(f"FAIL {name}: {outcome}")
            continue
        problems = []
        if args.variant and isinstance(config.get("plain"), dict):
            plain = config["plain"]
            name += (f" {args.variant}: tensor-core instructions {plain['mma']} -> {outcome['mma']}, "
                     f"registers {plain['registers']} -> {outcome['registers']}")
            if args.variant == "gate-dot" and outcome["bar_sync"] > plain["bar_sync"]:
                problems.append(f"the gates' split added CTA barriers ({plain['bar_sync']} -> {outcome['bar_sync']} bar.sync)")
        if outcome["shared"] > config["limit"]:
            problems.append(f"shared {outcome['shared']} > {config['limit']} ({config['device']})")
        if outcome["spills"] > SPILL_TOLERANCE:
            problems.append(f"stack frame {outcome['spills']} bytes (spills)")
        barrier = args.kernel in ("persistent", "stack", "bidir") or (args.kernel == "bwd" and config["resident"])
        # Correctness rests on the release/acquire pair (plus the CTA barriers around it): in the PTX
        # memory model the loads after an acquire observe what the other programs released, wherever
        # they are cached. The ".cg" loads are a second guard, which Triton's pipeliner drops when it
        # stages fp32 dot operands with cp.async.ca: such configurations are reported, not failed.
        if barrier and not (outcome["release"] and outcome["acquire"] and (outcome["ld_cg"] or outcome["cp_async_cg"] or outcome["cp_async_ca"])):
            problems.append(f"barrier PTX not as designed: {outcome}")
        failures += bool(problems)
        estimate = f" (estimate {config['estimate']})" if config["estimate"] else ""
        stack = f", stack frame {outcome['spills']} B" if outcome["spills"] else ""
        print(f"{'FAIL' if problems else 'ok  '} {name}: shared {outcome['shared']}{estimate}, "
              f"{outcome['registers']} registers{stack} {'; '.join(problems)}", flush=True)
    print(f"{len(configs) - failures} of {len(configs)} ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
