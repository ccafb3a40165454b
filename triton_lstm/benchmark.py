"""Benchmark harness: triton_lstm against cuDNN (``nn.LSTM``) and an ``nn.LSTMCell`` Python loop.

Run as ``python benchmarks/bench.py …`` or ``triton-lstm bench …``; ``--help`` lists the options.
Each measurement is the median of ``triton.testing.do_bench`` after its warm-up, all providers in the
same run and process; TF32 is off for both sides. Results go to ``<out>/<gpu-name>/``:

- ``results.csv`` with the columns of ``benchmark_cases.COLUMNS`` (``ms`` per call of the whole sequence, ``peak_mb`` the
  peak of ``torch.cuda.max_memory_allocated`` during one call, inputs and weights included);
- ``versions.txt``: device, torch, triton, CUDA, cuDNN and driver versions and the command line;
- ``summary.md``: µs per time step and speedup over cuDNN, per shape (the table the README shows);
- ``<mode>_<dtype>.png``: time per step and speedup over cuDNN (needs matplotlib: the ``bench`` extra).

Without CUDA it refuses, except with ``--dry-run``: a seconds-long CPU run of the harness itself on
tiny shapes (wall-clock medians, the plain-PyTorch path) that CI uses to test the CSV; its figures say
nothing about speed and it writes to a temporary folder unless ``--out`` is given.

The shapes and providers are in ``benchmark_cases.py``; the summary, the README's table and the plots
in ``benchmark_report.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

from triton_lstm.benchmark_cases import (
    ANCHOR_CASES,
    COLUMNS,
    CPU_CASES,
    DEFAULT_OUT,
    DEFAULT_PROVIDERS,
    DRY_RUN_CASES,
    DTYPES,
    GRU_PROVIDERS,
    MODES,
    PROVIDERS,
    STACKED_CASES,
    SWEEP_CASES,
    Case,
)
from triton_lstm.benchmark_report import plot_results, summary_markdown

DESCRIPTION = "Time triton_lstm against cuDNN nn.LSTM and an nn.LSTMCell loop; write CSV, plots and versions."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench options, for ``triton-lstm bench`` and ``benchmarks/bench.py`` alike."""
    parser.add_argument("--quick", action="store_true",
                        help="the five anchor shapes and the stacks: bf16 fwd (the default providers), "
                             "bf16 fwdbwd and fp32 fwd (triton_lstm, cudnn), and with --provider … triton_peephole "
                             "the peephole LSTM at the five shapes; meant to fit a short GPU lease")
    parser.add_argument("--cases", choices=["anchor", "stacked", "sweeps", "all"], default="all",
                        help="anchor: the five issue shapes + the stacks; stacked: the stacks alone; sweeps: T, B and "
                             "H sweeps; all: anchor and sweeps")
    parser.add_argument("--plan", action="store_true",
                        help="print which path triton_lstm takes for each case (kernel, plan, launches)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=None, help="fwd (no grad) and/or fwdbwd")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None)
    parser.add_argument("--provider", nargs="+", choices=PROVIDERS, default=list(DEFAULT_PROVIDERS),
                        help="not run by default: triton_peephole (triton_lstm.LSTM(..., peephole=True)), triton_gru "
                             "(triton_lstm.GRU) and cudnn_gru (nn.GRU)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results root (default ./{DEFAULT_OUT} in the current directory; a dry run: a temporary folder)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--cell-loop-max-steps", type=int, default=1024,
                        help="skip the nn.LSTMCell loop beyond this many time steps (it is launch-bound and slow)")
    parser.add_argument("--no-plots", action="store_true", help="write the CSV only")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU smoke run of the harness on tiny shapes (no GPU needed; timings meaningless)")
    parser.add_argument("--device", dest="bench_device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: triton_lstm's CPU path against nn.LSTM on the CPU, one thread (torch.utils.benchmark "
                             "medians), fp32, fwd and fwdbwd; the 'cudnn' column is then nn.LSTM on the CPU")


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="triton-lstm bench", description=DESCRIPTION)
    add_arguments(parser)
    return parser.parse_args(argv)


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def describe_path(case: Case, dtype: torch.dtype, device: str) -> str:
    """Which path triton_lstm.LSTM takes for ``case``, in words: what ``--plan`` prints."""
    if device != "cuda":
        return "CPU: ATen's LSTM (as nn.LSTM)" if not _interpreting() else "the interpreter: one program"
    from triton_lstm.ops import kernels_run_on

    if not kernels_run_on(torch.device("cuda", torch.cuda.current_device())):
        return "ATen's LSTM (as nn.LSTM): the kernels do not run on this GPU"
    from triton_lstm.kernels.forward_plans import (
        _device_limits,
        plan_bidirectional_fwd,
        plan_persistent_fwd,
        plan_stack_fwd,
        stack_disabled,
    )

    num_sms, shared = _device_limits(torch.cuda.current_device())
    size = torch.tensor([], dtype=dtype).element_size()
    directions = 2 if case.bidirectional else 1
    if case.layers > 1 and directions == 1 and not stack_disabled():
        stack = plan_stack_fwd(case.T, case.B, case.H, case.layers, size, num_sms, shared)
        if stack.persistent:
            return (f"forward: {stack.reason} (bb{stack.block_b} bh{stack.block_h} bk{stack.block_k} "
                    f"w{stack.num_warps}, {case.layers} x {stack.grid_h}x{stack.grid_b} programs); backward: one launch too")
    if directions == 2:
        both = plan_bidirectional_fwd(case.T, case.B, case.H, size, num_sms, shared)
        if both.persistent and os.environ.get("TRITON_LSTM_BIDIRECTIONAL", "1") != "0":
            return (f"forward: {case.layers} launch(es) of {both.reason} (bb{both.block_b} bh{both.block_h} "
                    f"bk{both.block_k} w{both.num_warps}, 2 x {both.grid_h}x{both.grid_b} programs); backward: both directions in one launch")
    layer = plan_persistent_fwd(case.T, case.B, case.H, case.H, size, num_sms, shared)
    launches = case.layers * directions
    tiles = f" (bb{layer.block_b} bh{layer.block_h} bk{layer.block_k} w{layer.num_warps}, {layer.grid_h}x{layer.grid_b} programs)"
    return f"{launches} layer launch(es) of: {layer.reason}{tiles if layer.persistent else ''}"


def _interpreting() -> bool:
    from triton_lstm.ops import interpreting

    return interpreting()


def _plan(args) -> list[tuple[str, str, Case, tuple[str, ...]]]:
    """(mode, dtype, case, providers) to measure, in order."""
    chosen = tuple(args.provider)
    if args.bench_device == "cpu" and not args.dry_run:
        cpu_providers = tuple(p for p in chosen if p != "cell_loop")
        return [(m, "fp32", c, cpu_providers) for m in (args.mode or list(MODES)) for c in CPU_CASES]
    if args.dry_run:
        modes = args.mode or list(MODES)
        dtypes = args.dtype or ["fp32"]
        return [(m, d, c, chosen) for m in modes for d in dtypes for c in DRY_RUN_CASES]
    if args.quick:
        # The nn.LSTMCell loop is slow and its speed is known (launch-bound): bf16 forward only.
        cases = ANCHOR_CASES + STACKED_CASES
        plan = [("fwd", "bf16", c, DEFAULT_PROVIDERS) for c in cases]
        plan += [("fwdbwd", "bf16", c, ("triton_lstm", "cudnn")) for c in cases]
        plan += [("fwd", "fp32", c, ("triton_lstm", "cudnn")) for c in ANCHOR_CASES]
        # The peepholes' cost (with --provider … triton_peephole) and the GRU against cuDNN's (with --provider …
        # triton_gru cudnn_gru): bf16 at the five shapes, both modes (the GRU also as a 2-layer bidirectional
        # model).
        plan += [(m, "bf16", c, ("triton_peephole",)) for m in MODES for c in ANCHOR_CASES]
        plan += [(m, "bf16", c, GRU_PROVIDERS) for m in MODES for c in ANCHOR_CASES + STACKED_CASES[2:]]
        plan = [(m, d, c, tuple(p for p in providers if p in chosen)) for m, d, c, providers in plan]
        return [(m, d, c, p) for m, d, c, p in plan
                if p and (not args.mode or m in args.mode) and (not args.dtype or d in args.dtype)]
    cases = {"anchor": ANCHOR_CASES + STACKED_CASES, "stacked": STACKED_CASES, "sweeps": SWEEP_CASES,
             "all": ANCHOR_CASES + STACKED_CASES + SWEEP_CASES}[args.cases]
    cases = list(dict.fromkeys(cases))
    modes = args.mode or list(MODES)
    dtypes = args.dtype or ["bf16", "fp16", "fp32"]
    return [(m, d, c, chosen) for m in modes for d in dtypes for c in cases]


# --- Providers --------------------------------------------------------------------------------------

class _CellLoop(nn.Module):
    """The same LSTM as a Python loop over ``nn.LSTMCell``: the launch-bound baseline."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.layers, self.directions = lstm.num_layers, 2 if lstm.bidirectional else 1
        self.cells = nn.ModuleList()
        for layer in range(self.layers):
            for direction in range(self.directions):
                suffix = f"_l{layer}{'_reverse' if direction else ''}"
                cell = nn.LSTMCell(lstm.input_size if layer == 0 else lstm.hidden_size * self.directions, lstm.hidden_size,
                                   device=lstm.weight_ih_l0.device, dtype=lstm.weight_ih_l0.dtype)
                with torch.no_grad():
                    cell.weight_ih.copy_(getattr(lstm, "weight_ih" + suffix))
                    cell.weight_hh.copy_(getattr(lstm, "weight_hh" + suffix))
                    cell.bias_ih.copy_(getattr(lstm, "bias_ih" + suffix))
                    cell.bias_hh.copy_(getattr(lstm, "bias_hh" + suffix))
                self.cells.append(cell)

    def forward(self, x, hx):
        h0, c0 = hx
        layer_input, h_n, c_n = x, [], []
        for layer in range(self.layers):
            outputs = []
            for direction in range(self.directions):
                index = layer * self.directions + direction
                h, c = h0[index], c0[index]
                steps = range(x.shape[0] - 1, -1, -1) if direction else range(x.shape[0])
                out = [None] * x.shape[0]
                for t in steps:
                    h, c = self.cells[index](layer_input[t], (h, c))
                    out[t] = h
                outputs.append(torch.stack(out))
                h_n.append(h)
                c_n.append(c)
            layer_input = torch.cat(outputs, dim=2) if self.directions == 2 else outputs[0]
        return layer_input, (torch.stack(h_n), torch.stack(c_n))


def _model(provider: str, reference: nn.Module) -> nn.Module:
    """The provider's module with ``reference``'s weights (an nn.LSTM, or an nn.GRU for the GRU providers)."""
    if provider in ("cudnn", "cudnn_gru"):
        return reference
    if provider == "cell_loop":
        return _CellLoop(reference)
    from triton_lstm.gru_modules import GRU
    from triton_lstm.modules import LSTM

    options = dict(num_layers=reference.num_layers, bidirectional=reference.bidirectional,
                   device=reference.weight_ih_l0.device, dtype=reference.weight_ih_l0.dtype)
    if provider == "triton_gru":
        model = GRU(reference.input_size, reference.hidden_size, **options)
    else:
        model = LSTM(reference.input_size, reference.hidden_size, peephole=provider == "triton_peephole", **options)
    model.load_state_dict(reference.state_dict(), strict=provider != "triton_peephole")  # the peepholes keep their init
    return model


def _workload(provider: str, mode: str, dtype: torch.dtype, case: Case, device: str):
    """Returns (fn, tensors whose .grad do_bench resets)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    gru = provider in GRU_PROVIDERS
    reference = (nn.GRU if gru else nn.LSTM)(case.I, case.H, num_layers=case.layers, bidirectional=case.bidirectional,
                                              device=device, dtype=dtype)
    model = _model(provider, reference)
    directions = 2 if case.bidirectional else 1

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    x = randn(case.T, case.B, case.I)
    h0 = randn(case.layers * directions, case.B, case.H)
    c0 = randn(case.layers * directions, case.B, case.H)
    state = h0 if gru else (h0, c0)
    if mode == "fwd":
        model.eval()

        def forward():
            with torch.no_grad():
                model(x, state)

        return forward, None
    model.train()  # cuDNN's RNN backward runs in training mode only (dropout is 0 here)
    for tensor in (x, h0, c0):
        tensor.requires_grad_(True)
    grad_out = randn(case.T, case.B, directions * case.H)
    grad_h = randn(case.layers * directions, case.B, case.H)
    grad_c = randn(case.layers * directions, case.B, case.H)
    leaves = [x, h0, *([] if gru else [c0]), *model.parameters()]

    def forward_backward():
        out, hidden = model(x, state)
        if gru:
            torch.autograd.backward([out, hidden], [grad_out, grad_h])
        else:
            torch.autograd.backward([out, *hidden], [grad_out, grad_h, grad_c])

    return forward_backward, leaves


# --- Timing -----------------------------------------------------------------------------------------

def _time_gpu(fn, leaves, warmup: int, rep: int) -> tuple[float, float]:
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=leaves, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return ms, torch.cuda.max_memory_allocated() / 2**20


def _time_cpu(fn, leaves) -> tuple[float, float]:
    """Median wall time on the CPU, by torch.utils.benchmark (warm-up, thread settings, median)."""
    from torch.utils import benchmark as torch_benchmark

    def run():
        for leaf in leaves or ():
            leaf.grad = None
        fn()

    run()  # warm-up
    measurement = torch_benchmark.Timer("run()", globals={"run": run}).blocked_autorange(min_run_time=0.05)
    return measurement.median * 1e3, float("nan")


# --- Output -----------------------------------------------------------------------------------------

def _device_folder(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", name).strip("-") or "unknown"


def _driver_version() -> str:
    # nvidia-smi rather than torch.utils.collect_env: the same query, without collect_env's seconds of
    # pip and conda probing.
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=True)
        return result.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def _write_versions(folder: Path, device: str, argv) -> None:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines = [
        f"device: {device}",
        f"torch: {torch.__version__}",
        f"triton: {_triton_version() or 'not installed'}",
        f"cuda: {torch.version.cuda}",
        f"cudnn: {cudnn}",
        f"driver: {_driver_version() if torch.cuda.is_available() else 'none'}",
        f"python: {sys.version.split()[0]}",
        f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"command: triton-lstm bench {' '.join(argv)}",
        "tf32: off (torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False)",
    ]
    (folder / "versions.txt").write_text("\n".join(lines) + "\n")


# --- Entry point ------------------------------------------------------------------------------------

@contextlib.contextmanager
def exit_on_sigterm():
    """Within it, SIGTERM (``timeout`` ending a stage of benchmarks/gpu_check.sh at its limit) raises
    SystemExit, so that ``finally`` blocks still write what was measured before the stage was cut (Python's
    default for SIGTERM exits at once); the previous handler is restored after. Only on the main thread,
    where Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    """``triton-lstm bench``: returns 0 on success; exits with status 2 and a message without CUDA."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(_parse_args(argv), argv)


def run(args, argv) -> int:
    """Runs the benchmark for parsed ``args`` (``argv`` is recorded in versions.txt)."""
    on_cpu = args.dry_run or args.bench_device == "cpu"
    if not on_cpu:
        if not torch.cuda.is_available():
            sys.stderr.write("triton-lstm bench: no CUDA device (torch.cuda.is_available() is False); the "
                             "benchmark needs an NVIDIA GPU. Use --dry-run for a CPU smoke run of the harness.\n")
            return 2
        if _triton_version() is None:
            sys.stderr.write("triton-lstm bench: triton is not installed, and the benchmark times its kernels "
                             "(pip install triton; Linux only).\n")
            return 2
    triton_version = _triton_version() or "not installed"
    if args.dry_run:
        device, device_name, out_root = "cpu", "cpu-dry-run", args.out or Path(tempfile.mkdtemp(prefix="triton-lstm-bench-"))
    elif on_cpu:
        torch.set_num_threads(1)
        device, device_name, out_root = "cpu", f"cpu-{platform.machine()}-1-thread", args.out or DEFAULT_OUT
    else:
        device, device_name, out_root = "cuda", torch.cuda.get_device_name(), args.out or DEFAULT_OUT
    folder = Path(out_root) / _device_folder(device_name)
    folder.mkdir(parents=True, exist_ok=True)

    saved_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with exit_on_sigterm():
        rows, planned, finished = [], 0, False
        try:
            plan = _plan(args)
            planned = sum(len(p) for *_, p in plan)
            print(f"{planned} measurements on {device_name}; results in {folder}")
            for mode, dtype_name, case, providers in plan:
                if args.plan and "triton_lstm" in providers:
                    print(f"  plan   {dtype_name} {case.label:28} {describe_path(case, DTYPES[dtype_name], device)}", flush=True)
                for provider in providers:
                    if provider == "cell_loop" and case.T > args.cell_loop_max_steps:
                        continue
                    fn, leaves = _workload(provider, mode, DTYPES[dtype_name], case, device)
                    ms, peak_mb = _time_cpu(fn, leaves) if on_cpu else _time_gpu(fn, leaves, args.warmup, args.rep)
                    row = dict(device=device_name, torch=torch.__version__, triton=triton_version, provider=provider, mode=mode,
                               dtype=dtype_name, T=case.T, B=case.B, I=case.I, H=case.H, layers=case.layers,
                               bidirectional=case.bidirectional, ms=f"{ms:.6g}", peak_mb=f"{peak_mb:.1f}")
                    rows.append({key: str(value) for key, value in row.items()})
                    print(f"  {mode:6} {dtype_name} {case.label:28} {provider:11} {ms * 1e3 / case.T:9.2f} us/step  peak {peak_mb:.0f} MiB", flush=True)
                    del fn, leaves
            finished = True
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32
            # Also when the run was cut (a stage's time limit, an error): what was measured so far, so marked.
            if finished or rows:
                _write_results(folder, rows, device_name, argv, args, on_cpu,
                               None if finished else f"cut short after {len(rows)} of {planned} measurements")
    return 0


def _write_results(folder: Path, rows: list[dict], device_name: str, argv, args, on_cpu: bool,
                   cut_short: str | None) -> None:
    """results.csv, versions.txt, summary.md (marked when the run was ``cut_short``) and, for a whole
    run, the plots."""
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    _write_versions(folder, device_name, argv)
    if args.dry_run:
        timing = "CPU dry run: wall-clock medians, meaningless for speed"
    elif on_cpu:
        timing = "CPU, one thread, torch.utils.benchmark medians; the cudnn column is nn.LSTM on the CPU"
    else:
        timing = "median of triton.testing.do_bench"
    summary = summary_markdown(rows, timing + (f"; {cut_short}" if cut_short else ""))
    (folder / "summary.md").write_text(summary)
    print(summary)
    if not args.no_plots and not cut_short:
        for path in plot_results(rows, folder):
            print(f"wrote {path}")
    print(f"wrote {folder / 'results.csv'}")


if __name__ == "__main__":
    sys.exit(main())
