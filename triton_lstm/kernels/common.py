"""Pieces shared by the LSTM kernels."""

import torch
import triton
import triton.language as tl

sigmoid = tl.sigmoid


@triton.jit
def tanh(x):
    # Built from exp: libdevice's tanh does not run under the interpreter. exp(-2|x|) never overflows,
    # so saturated pre-activations (|x| ~ 1e4) give exactly ±1. Near 0, (1 - e) / (1 + e) loses the
    # relative accuracy of exp's rounding, so |x| < 0.125 uses the odd Taylor series to x⁹ instead
    # (truncation < 2e-11 relative there).
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    from_exp = (1.0 - e) / (1.0 + e)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    magnitude = tl.where(a < 0.125, series, from_exp)
    return tl.where(x >= 0, magnitude, -magnitude)


@triton.jit
def grid_barrier(counter_ptr, target):
    """Waits until ``target`` arrivals have been counted at ``counter_ptr``, after arriving once.

    Arrive: the CTA barrier orders every thread's earlier stores before thread 0's gpu-scope release add
    (release is cumulative in the PTX memory model, so it publishes them all). Wait: spin on an acquire
    read, which pairs with the other programs' releases; the CTA barrier after it extends the acquire
    to every thread of the program. The counter only grows (targets are programs × steps done), so it is
    zeroed once per launch, never inside one. Every program must be co-resident (a cooperative launch):
    a program spinning here waits for all the others to arrive.
    """
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 dots are exact ("ieee") unless PyTorch allows TF32 for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
