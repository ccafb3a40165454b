"""Pieces shared by the LSTM kernels."""

import torch
import triton
import triton.language as tl

sigmoid = tl.sigmoid


@triton.jit
def tanh(x):
    # Built from exp: libdevice's tanh does not run under the interpreter. exp(-2|x|) never overflows,
    # so saturated pre-activations (|x| ~ 1e4) give exactly ±1.
    e = tl.exp(-2.0 * tl.abs(x))
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, magnitude, -magnitude)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 dots are exact ("ieee") unless PyTorch allows TF32 for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
