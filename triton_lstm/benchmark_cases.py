"""What the benchmark measures: the shapes (``Case``: the five anchor shapes, the stacks, the sweeps, the
dry run's and the CPU's), the providers timed against each other, the modes and dtypes, and the columns of
``results.csv``. The harness is ``benchmark.py``, what it writes from its rows ``benchmark_report.py``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

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
