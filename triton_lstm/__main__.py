"""``python -m triton_lstm`` / ``triton-lstm``: check triton_lstm against nn.LSTM (and nn.GRU) on this machine.

``triton-lstm`` (no argument, or ``check``) runs a few shapes through both modules, compares them with
nn.LSTM (nn.GRU for the GRU rows) in float64 and prints a table: shape, dtype, max error of each, time of
each.
``triton-lstm bench ...`` runs the benchmark suite (``triton_lstm.benchmark``; ``--help`` lists its options).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import triton_lstm
from triton_lstm import ops

# (T, B, input_size, hidden_size, num_layers, bidirectional)
# One layer (resident and streamed W_hh), a 2-layer stack in one launch, a bidirectional pair of layers.
GPU_SHAPES = [(512, 64, 256, 256, 1, False), (256, 16, 1024, 1024, 1, False), (128, 32, 256, 512, 2, False),
              (128, 32, 256, 512, 2, True)]
CPU_SHAPES = [(64, 8, 32, 64, 1, False), (32, 4, 16, 33, 2, True)]
INTERPRETER_SHAPES = [(8, 3, 8, 17, 1, False), (6, 2, 5, 16, 2, True)]


def _where_it_runs(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        if ops.kernels_run_on(torch.device("cuda", torch.cuda.current_device())):
            return f"Triton kernels on {name}"
        if not ops.HAS_TRITON:
            return f"ATen's LSTM on {name}, as nn.LSTM runs it (triton could not be imported: {ops.TRITON_IMPORT_ERROR})"
        why = ops.unsupported_gpu(torch.cuda.get_device_capability(), torch.version.hip)
        return f"ATen's LSTM on {name}, as nn.LSTM runs it (the kernels do not run there: {why})"
    if ops.interpreting() and ops.HAS_TRITON:
        return "Triton kernels through Triton's interpreter on the CPU (TRITON_INTERPRET=1: slow, for testing)"
    return ("ATen's LSTM on the CPU, as nn.LSTM runs it (the kernels are for NVIDIA GPUs; set TRITON_INTERPRET=1 "
            "to run them interpreted)")


def _time_ms(fn, device: str) -> float:
    """Median milliseconds per call: do_bench on the GPU, torch.utils.benchmark on the CPU."""
    fn()  # warm-up (compiles the kernels on first use)
    if device == "cuda" and ops.HAS_TRITON:
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    if device == "cuda":
        torch.cuda.synchronize()
    from torch.utils import benchmark as torch_benchmark

    return torch_benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.1).median * 1e3


MODULES = {"LSTM": (nn.LSTM, triton_lstm.LSTM), "GRU": (nn.GRU, triton_lstm.GRU)}


def check(shapes, dtypes, device: str, module: str = "LSTM") -> list[dict]:
    """One row per shape and dtype: ``module`` ("LSTM" or "GRU"), ours and nn's, against nn's in float64."""
    theirs_class, ours_class = MODULES[module]
    rows = []
    for T, B, I, H, layers, bidirectional in shapes:  # noqa: E741
        torch.manual_seed(0)
        theirs = theirs_class(I, H, num_layers=layers, bidirectional=bidirectional)
        ours = ours_class(I, H, num_layers=layers, bidirectional=bidirectional)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(T, B, I)
        expected = theirs.double()(x.double())[0]
        for dtype in dtypes:
            theirs.to(device=device, dtype=dtype)
            ours.to(device=device, dtype=dtype)
            x_dev = x.to(device=device, dtype=dtype)
            with torch.no_grad():
                out_ours, out_theirs = ours(x_dev)[0], theirs(x_dev)[0]
                rows.append(
                    dict(
                        shape=(f"{module} T={T} B={B} I={I} H={H}" + (f" L={layers}" if layers > 1 else "")
                               + (" bidir" if bidirectional else "")),
                        dtype=str(dtype).removeprefix("torch."),
                        err_ours=(out_ours.double().cpu() - expected).abs().max().item(),
                        err_theirs=(out_theirs.double().cpu() - expected).abs().max().item(),
                        ms_ours=_time_ms(lambda: ours(x_dev), device),
                        ms_theirs=_time_ms(lambda: theirs(x_dev), device),
                    )
                )
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'shape':<38} {'dtype':<9} {'max err ours':>12} {'max err nn':>12} {'ms ours':>10} {'ms nn':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['shape']:<38} {r['dtype']:<9} {r['err_ours']:>12.2e} {r['err_theirs']:>12.2e} "
            f"{r['ms_ours']:>10.3f} {r['ms_theirs']:>10.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    from triton_lstm import benchmark

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="triton-lstm",
        description="triton_lstm: check it against torch.nn.LSTM on this machine (the default), or benchmark it.",
    )
    parser.add_argument("--device", default=None, help="where check runs: cuda (the default with a GPU) or cpu")
    commands = parser.add_subparsers(dest="command", metavar="{check,bench}")
    check_parser = commands.add_parser("check", help="compare with nn.LSTM in float64 and time both (the default)")
    check_parser.add_argument("--device", default=argparse.SUPPRESS, help="cuda (the default with a GPU) or cpu")
    bench_parser = commands.add_parser("bench", help=benchmark.DESCRIPTION, description=benchmark.DESCRIPTION)
    benchmark.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    if args.command == "bench":
        if args.device is not None:
            parser.error("--device applies to check; the benchmark runs on the GPU (or --dry-run on the CPU)")
        return benchmark.run(args, argv[argv.index("bench") + 1:])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "triton-lstm: --device cuda, but torch.cuda.is_available() is False on this machine\n")
    print(f"triton_lstm {triton_lstm.__version__}, torch {torch.__version__}: runs {_where_it_runs(device)}")
    if device == "cuda":
        # bf16 where the kernels run (Ampere and newer); an older GPU's ATen LSTM (cuDNN) may lack it.
        kernels = ops.kernels_run_on(torch.device("cuda", torch.cuda.current_device()))
        shapes, dtypes = GPU_SHAPES, [torch.float32, torch.float16] + ([torch.bfloat16] if kernels else [])
    elif ops.interpreting() and ops.HAS_TRITON:
        shapes, dtypes = INTERPRETER_SHAPES, [torch.float32, torch.float16]
    else:
        shapes, dtypes = CPU_SHAPES, [torch.float32, torch.bfloat16]
    print("Forward output of triton_lstm.LSTM / GRU and torch.nn.LSTM / GRU, errors against nn's in float64:\n")
    # The GRU at the first (one layer) and the last (a bidirectional stack) shape.
    print_table(check(shapes, dtypes, device) + check([shapes[0], shapes[-1]], dtypes, device, "GRU"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
