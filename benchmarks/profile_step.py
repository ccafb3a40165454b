"""Where a time step goes: per-kernel GPU time of one training step, ours against cuDNN, per time step.

    python benchmarks/profile_step.py                           # the anchor shapes that miss a target
    python benchmarks/profile_step.py --shape 256 64 1024 1024  # one shape
    python benchmarks/profile_step.py --shape 512 64 512 512 --layers 4   # a 4-layer stack
    python benchmarks/profile_step.py --shape 128 256 512 512 --cell gru --forward   # a GRU's no_grad forward
    python benchmarks/profile_step.py --shape 128 256 512 512 --peephole   # what the peepholes add, per kernel
    ncu --clock-control none -k regex:persistent --launch-skip 3 --launch-count 1 \\
        python benchmarks/profile_step.py --shape 256 64 1024 1024 --ncu   # forward only, few launches

The PyTorch profiler records every kernel of a few forward+backward calls of ``triton_lstm.LSTM`` and of
``nn.LSTM`` (bf16, same weights and inputs), and prints each kernel's device time divided by calls × T:
µs per time step, so the recurrence, the projection GEMMs and the weight-gradient GEMMs can be read
against each other and against cuDNN's kernels; then the same calls' elapsed time between two CUDA events,
unprofiled: where it exceeds the kernels' sum, the GPU sat idle between kernels (waiting on the host).
Then the host's side of the same calls: the time to issue them back to back (unprofiled; the host's own
as long as nothing in a call waits on the GPU) and, under the profiler, the host's self time per call by
event (Python ops, ``cudaLaunchKernel``, ``cudaMemcpyAsync``, ``cudaEventRecord``, the driver's launches…):
where a call's host time goes when it exceeds its kernels'.
``--cell gru``: ``triton_lstm.GRU`` against ``nn.GRU``; ``--forward``: a ``no_grad`` forward alone (what
the benchmark's fwd rows time). ``--peephole``: ``triton_lstm.LSTM(peephole=True)`` against the plain
``triton_lstm.LSTM`` with the same weights instead of cuDNN (what the peepholes cost, kernel by kernel).
``--ncu`` only runs a few plain forwards, for Nsight Compute to pick one launch of the persistent kernel.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import triton_lstm  # noqa: E402
from triton_lstm.benchmark_cases import DTYPES  # noqa: E402

# The bf16 anchor shapes whose forward or forward+backward misses the target after run 3.
MISSED = [(256, 64, 1024, 1024), (128, 256, 512, 512), (256, 16, 2048, 2048)]


def models(I, H, dtype, layers=1, cell="lstm", peephole=False, device="cuda"):
    """The two models to profile, by name, with the same weights: ours and cuDNN's, or with ``peephole``
    our peephole LSTM and our plain one (the peephole weights on top, at their initialization)."""
    torch.manual_seed(0)
    name = cell.upper()
    theirs = getattr(nn, name)(I, H, num_layers=layers, device=device, dtype=dtype)
    ours = getattr(triton_lstm, name)(I, H, num_layers=layers, device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    if not peephole:
        return {"triton_lstm": ours, "cudnn": theirs}
    with_peepholes = triton_lstm.LSTM(I, H, num_layers=layers, device=device, dtype=dtype, peephole=True)
    with_peepholes.load_state_dict(theirs.state_dict(), strict=False)  # nn.LSTM's state has no peephole weights
    return {"triton_peephole": with_peepholes, "triton_lstm": ours}


def step(model, x, grad, forward_only=False):
    """One call: a no_grad forward, or a forward and its backward."""
    if forward_only:
        with torch.no_grad():
            model(x)
    else:
        out, _ = model(x)
        out.backward(grad)


def kernel_table(model, x, grad, calls, forward_only=False):
    """(device time per kernel name, launches per kernel name, elapsed µs of ``calls`` unprofiled calls)."""
    def one_call():
        step(model, x, grad, forward_only)

    for _ in range(3):  # compile, autotune and warm the caches outside the profile
        one_call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            one_call()
        torch.cuda.synchronize()
    totals, counts = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.time_range.elapsed_us()
            counts[event.name] += 1
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        one_call()
    end.record()
    end.synchronize()
    return totals, counts, start.elapsed_time(end) * 1e3


def host_table(call, calls, synchronize) -> tuple[float, dict[str, float]]:
    """(µs per call the host takes to issue ``calls`` calls of ``call`` back to back, unprofiled; the host's
    self time per call by event name under the profiler: ops, and on a GPU the CUDA runtime and driver
    calls the profiler records). ``synchronize``: the device's (a no-op on the CPU)."""
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    issue = (time.perf_counter() - start) * 1e6 / calls
    synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)  # CUPTI: the runtime and driver API calls
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        synchronize()
    self_time = defaultdict(float)
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0:
            self_time[event.key] += event.self_cpu_time_total / calls
    return issue, self_time


def profile_shape(T, B, I, H, dtype, calls, layers=1, cell="lstm", forward_only=False, peephole=False):
    x = torch.randn(T, B, I, device="cuda", dtype=dtype)
    grad = torch.randn(T, B, H, device="cuda", dtype=dtype)
    what = "no_grad forward" if forward_only else "forward+backward"
    print(f"\n## {cell.upper()} T {T}, B {B}, I {I}, H {H}, {layers} layer(s), {dtype}: {what}, device time in µs per "
          f"time step")
    for name, model in models(I, H, dtype, layers, cell, peephole).items():
        totals, counts, elapsed = kernel_table(model, x, grad, calls, forward_only)
        whole = sum(totals.values()) / calls / T
        print(f"{name}: {whole:.2f} µs/step of kernels in all; {elapsed / calls / T:.2f} µs/step elapsed unprofiled")
        for kernel, total in sorted(totals.items(), key=lambda item: -item[1])[:8]:
            share = total / calls / T
            print(f"  {share:7.2f}  {counts[kernel] // calls:3d}x/call  {kernel[:110]}")
        issue, self_time = host_table(lambda: step(model, x, grad, forward_only), calls, torch.cuda.synchronize)
        print(f"  host: {issue:.0f} µs per call to issue unprofiled ({issue / T:.2f} µs/step); under the profiler, "
              f"{sum(self_time.values()):.0f} µs per call of host self time, the most:")
        for name, spent in sorted(self_time.items(), key=lambda item: -item[1])[:8]:
            print(f"  {spent:7.1f} µs/call  {name[:100]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", nargs=4, type=int, metavar=("T", "B", "I", "H"), action="append")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--forward", action="store_true", help="a no_grad forward alone, not forward+backward")
    parser.add_argument("--peephole", action="store_true",
                        help="the peephole LSTM against the plain triton_lstm.LSTM (same weights) instead of cuDNN")
    parser.add_argument("--ncu", action="store_true", help="only run a few forwards (under Nsight Compute)")
    args = parser.parse_args(argv)
    if args.peephole and args.cell != "lstm":
        parser.error("--peephole is an LSTM option (--cell lstm)")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    for T, B, I, H in args.shape or MISSED:
        if args.ncu:
            model = models(I, H, dtype, args.layers, args.cell)["triton_lstm"]
            x = torch.randn(T, B, I, device="cuda", dtype=dtype)
            with torch.no_grad():
                for _ in range(5):
                    model(x)
            torch.cuda.synchronize()
        else:
            profile_shape(T, B, I, H, dtype, args.calls, args.layers, args.cell, args.forward, args.peephole)
    return 0


if __name__ == "__main__":
    sys.exit(main())
