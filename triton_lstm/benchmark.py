"""Benchmark harness: triton_lstm against cuDNN (``nn.LSTM``) and an ``nn.LSTMCell`` Python loop.

Run as ``python benchmarks/bench.py …`` or ``triton-lstm bench …``; ``--help`` lists the options.
Each measurement is the median of ``triton.testing.do_bench`` after its warm-up, all providers in the
same run and process; TF32 is off for both sides. Results go to ``<out>/<gpu-name>/``:

- ``results.csv`` with the columns of ``COLUMNS`` (``ms`` per call of the whole sequence, ``peak_mb`` the
  peak of ``torch.cuda.max_memory_allocated`` during one call, inputs and weights included);
- ``versions.txt``: device, torch, triton, CUDA, cuDNN and driver versions and the command line;
- ``summary.md``: µs per time step and speedup over cuDNN, per shape (the table the README shows);
- ``<mode>_<dtype>.png``: time per step and speedup over cuDNN (needs matplotlib: the ``bench`` extra).

Without CUDA it refuses, except with ``--dry-run``: a seconds-long CPU run of the harness itself on
tiny shapes (wall-clock medians, the plain-PyTorch path) that CI uses to test the CSV; its figures say
nothing about speed and it writes to a temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

COLUMNS = ["device", "torch", "triton", "provider", "mode", "dtype", "T", "B", "I", "H", "layers", "bidirectional", "ms", "peak_mb"]
PROVIDERS = ("triton_lstm", "cudnn", "cell_loop", "triton_peephole", "triton_gru", "cudnn_gru")
# What runs unless --provider says otherwise; triton_peephole (triton_lstm.LSTM with peephole=True, the same
# weights plus the peephole ones) is asked for by name, to measure what the peepholes cost, and so are the
# GRU's: triton_gru (triton_lstm.GRU) against cudnn_gru (nn.GRU, cuDNN's), the same weights.
DEFAULT_PROVIDERS = PROVIDERS[:3]
GRU_PROVIDERS = ("triton_gru", "cudnn_gru")
# (ours, cuDNN's): the pairs whose ratio is a speedup.
SPEEDUP_PAIRS = (("triton_lstm", "cudnn"), ("triton_gru", "cudnn_gru"))
MODES = ("fwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative to the working directory: from a checkout the repository's results folder, from an installed
# wheel a folder beside wherever the user runs it (never inside site-packages).
DEFAULT_OUT = Path("benchmarks") / "results"


@dataclasses.dataclass(frozen=True)
class Case:
    T: int
    B: int
    I: int  # noqa: E741 (the input size, named as in the CSV)
    H: int
    layers: int = 1
    bidirectional: bool = False

    @property
    def label(self) -> str:
        extra = f" L{self.layers}{' bi' if self.bidirectional else ''}" if self.layers > 1 or self.bidirectional else ""
        return f"T{self.T} B{self.B} I{self.I} H{self.H}{extra}"


# The five shapes measured in issue 3 (T, B, I, H), single layer.
ANCHOR_CASES = [Case(512, 64, 256, 256), Case(256, 64, 1024, 1024), Case(1024, 8, 512, 512), Case(128, 256, 512, 512), Case(256, 16, 2048, 2048)]
# Stacks: the 2-layer bidirectional shape measured since run 1, and the targets of issue "Whole-module
# kernels" at (T, B, I = H) = (512, 64, 512): 4 layers (one stacked launch) and 2 layers bidirectional.
STACKED_CASES = [Case(256, 64, 512, 512, layers=2, bidirectional=True), Case(512, 64, 512, 512, layers=4),
                 Case(512, 64, 512, 512, layers=2, bidirectional=True)]
SWEEP_CASES = (
    [Case(T, 64, 512, 512) for T in (16, 64, 256, 1024, 4096)]
    + [Case(256, B, 512, 512) for B in (1, 8, 32, 128, 512)]
    + [Case(256, 64, H, H) for H in (64, 128, 256, 512, 1024, 2048, 4096)]
)
DRY_RUN_CASES = [Case(3, 2, 4, 8), Case(2, 3, 5, 4, layers=2, bidirectional=True), Case(3, 2, 4, 8, layers=3)]
# --device cpu: the CPU path (ATen's LSTM, as nn.LSTM) against nn.LSTM, one thread: a small model, a
# 2-layer language model (the PTB "medium" LSTM) and a single step (an RL rollout on the CPU).
CPU_CASES = [Case(64, 8, 32, 64), Case(35, 20, 200, 200, layers=2), Case(1, 4, 32, 64)]


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
    layer = plan_persistent_fwd(case.T, case.B, case.H, case.H, size, False, num_sms, shared)
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


def _per_step_us(row) -> float:
    return float(row["ms"]) * 1e3 / int(row["T"])


def _summary(rows, timing: str) -> str:
    """Markdown: µs per step of each provider and speedup of triton_lstm over cuDNN, per mode, dtype, shape."""
    by_key = {}
    for row in rows:
        key = (row["mode"], row["dtype"], row["T"], row["B"], row["I"], row["H"], row["layers"], row["bidirectional"])
        by_key.setdefault(key, {})[row["provider"]] = _per_step_us(row)
    device = rows[0]["device"] if rows else "?"
    providers = _providers_in(rows)
    lines = [f"Device: {device}. µs per time step ({timing}); speedup = cuDNN time / triton_lstm time (for the GRU "
             "rows: cudnn_gru / triton_gru).", "",
             "| mode | dtype | T | B | I | H | layers | bidir | " + " | ".join(providers) + " | speedup vs cuDNN |",
             "|" + "---|" * (9 + len(providers))]
    for key, values in by_key.items():
        cells = [f"{values[p]:.1f}" if p in values else "-" for p in providers]
        speedups = [f"{values[theirs] / values[ours]:.2f}x" for ours, theirs in SPEEDUP_PAIRS if ours in values and theirs in values]
        speedup = " / ".join(speedups) or "-"
        lines.append("| " + " | ".join([*map(str, key), *cells, speedup]) + " |")
    return "\n".join(lines) + "\n"


def _providers_in(rows) -> list[str]:
    """The default providers, and any other that has rows, in PROVIDERS' order."""
    present = {row["provider"] for row in rows}
    return [p for p in PROVIDERS if p in DEFAULT_PROVIDERS or p in present]


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


def speed_table(rows) -> str:
    """The README's speed table from a results CSV: per shape, µs per time step of triton_lstm and of
    cuDNN measured in the same run, the speedup, and the peak memory of a bf16 forward+backward."""
    by_key = {}
    for row in rows:
        case = (int(row["T"]), int(row["B"]), int(row["I"]), int(row["H"]), int(row["layers"]), row["bidirectional"] == "True")
        by_key.setdefault(case, {})[(row["mode"], row["dtype"], row["provider"])] = row
    columns = [("fwd", "bf16"), ("fwdbwd", "bf16"), ("fwd", "fp32")]
    present = [c for c in columns if any((*c, "triton_lstm") in values for values in by_key.values())]
    header = ["shape (T, B, I, H)"] + [f"{'fwd+bwd' if m == 'fwdbwd' else m} {d}: ours / cuDNN µs per step" for m, d in present]
    header.append("peak MiB fwd+bwd bf16: ours / cuDNN")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (T, B, I, H, layers, bidirectional), values in by_key.items():
        label = f"{T}, {B}, {I}, {H}" + (f", {layers} layers" if layers > 1 else "") + (", bidirectional" if bidirectional else "")
        cells = [label]
        for mode, dtype in present:
            ours, theirs = values.get((mode, dtype, "triton_lstm")), values.get((mode, dtype, "cudnn"))
            if ours and theirs:
                cells.append(f"{_per_step_us(ours):.1f} / {_per_step_us(theirs):.1f} ({float(theirs['ms']) / float(ours['ms']):.2f}×)")
            else:
                cells.append("-")
        ours, theirs = values.get(("fwdbwd", "bf16", "triton_lstm")), values.get(("fwdbwd", "bf16", "cudnn"))
        cells.append(f"{float(ours['peak_mb']):.0f} / {float(theirs['peak_mb']):.0f}" if ours and theirs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows, folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'triton-lstm[bench]'): no plots, the CSV is written.")
        return []
    written = []
    for mode, dtype in dict.fromkeys((row["mode"], row["dtype"]) for row in rows):
        subset = [row for row in rows if row["mode"] == mode and row["dtype"] == dtype]
        labels = list(dict.fromkeys(Case(int(r["T"]), int(r["B"]), int(r["I"]), int(r["H"]), int(r["layers"]), r["bidirectional"] == "True").label for r in subset))
        providers = _providers_in(rows)
        per_provider = {p: {} for p in providers}
        for row in subset:
            case = Case(int(row["T"]), int(row["B"]), int(row["I"]), int(row["H"]), int(row["layers"]), row["bidirectional"] == "True")
            per_provider[row["provider"]][case.label] = _per_step_us(row)
        figure, (left, right) = plt.subplots(1, 2, figsize=(max(10, 0.7 * len(labels) + 6), 5))
        width = 0.8 / len(providers)
        positions = range(len(labels))
        for index, provider in enumerate(providers):
            values = [per_provider[provider].get(label, float("nan")) for label in labels]
            left.bar([p + index * width for p in positions], values, width, label=provider)
        left.set_yscale("log")
        left.set_ylabel("µs per time step")
        left.set_title(f"{mode} {dtype}: time per step")
        left.set_xticks([p + width for p in positions], labels, rotation=60, ha="right", fontsize=7)
        left.legend()
        for provider in ("triton_lstm", "cell_loop"):
            speedups = [per_provider["cudnn"][label] / per_provider[provider][label]
                        if label in per_provider["cudnn"] and label in per_provider[provider] else float("nan") for label in labels]
            right.plot(list(positions), speedups, marker="o", label=provider)
        right.axhline(1.0, color="gray", linewidth=0.8)
        right.set_yscale("log")
        right.set_ylabel("speedup over cuDNN (×)")
        right.set_title(f"{mode} {dtype}: speedup over cuDNN")
        right.set_xticks(list(positions), labels, rotation=60, ha="right", fontsize=7)
        right.legend()
        figure.suptitle(rows[0]["device"])
        figure.tight_layout()
        path = folder / f"{mode}_{dtype}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


# --- Entry point ------------------------------------------------------------------------------------

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
    rows = []
    try:
        plan = _plan(args)
        print(f"{sum(len(p) for *_, p in plan)} measurements on {device_name}; results in {folder}")
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
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32

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
    summary = _summary(rows, timing)
    (folder / "summary.md").write_text(summary)
    print(summary)
    if not args.no_plots:
        for path in _plot(rows, folder):
            print(f"wrote {path}")
    print(f"wrote {folder / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
