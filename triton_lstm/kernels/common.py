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


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 dots are exact ("ieee") unless PyTorch allows TF32 for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
