"""The backward's half that is parallel over time: once the chain (``lstm_bwd.py``) has written every
step's gate gradients dG (T, B, 4H), the weight, bias and input gradients are GEMMs and reductions over all
T·B rows at once — ``weight_and_input_grads`` for the LSTM, ``gru_weight_and_input_grads`` for the GRU's
dG row (dR, dZ, dN, dN ⊙ r), and ``peephole_weight_grads``, one Triton pass for the peephole weights."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_lstm.reference import accumulate_dtype


def input_gradient(grad_gates: torch.Tensor, w_ih: torch.Tensor) -> torch.Tensor:
    """The gradient of a layer's input, dG·W_ih over all T·B rows: (T, B, I) from dG (T, B, 4H) and W_ih
    (N, I), whose rows meet dG's first N columns (a GRU's x side: dR, dZ, dN; a strided view, no copy)."""
    T, B, four_h = grad_gates.shape
    return torch.matmul(grad_gates.reshape(T * B, four_h)[:, :w_ih.shape[0]], w_ih).reshape(T, B, -1)


def weight_and_input_grads(grad_gates: torch.Tensor, x: torch.Tensor, h_prev: torch.Tensor, w_ih: torch.Tensor,
                           input_grad: bool = True):
    """grad_x, grad_W_ih, grad_W_hh and the bias gradient from dG (T, B, 4H), as GEMMs over all T·B rows.

    ``h_prev`` (T, B, H) is h_0 … h_{T-1}. The GEMMs run in the input dtype with fp32 accumulation;
    the bias gradient is summed in fp32. Without ``input_grad`` grad_x is None (a stack's upper layers:
    the stacked backward formed it in the kernel).
    """
    T, B, four_h = grad_gates.shape
    rows = grad_gates.reshape(T * B, four_h)
    grad_x = input_gradient(grad_gates, w_ih) if input_grad else None
    grad_w_ih = torch.matmul(rows.t(), x.reshape(T * B, -1))
    grad_w_hh = torch.matmul(rows.t(), h_prev.reshape(T * B, -1))
    grad_bias = rows.sum(0, dtype=accumulate_dtype(rows.dtype)).to(w_ih.dtype)
    return grad_x, grad_w_ih, grad_w_hh, grad_bias


def gru_weight_and_input_grads(grad_gates: torch.Tensor, x: torch.Tensor, h_prev: torch.Tensor, w_ih: torch.Tensor,
                               w_hh: torch.Tensor, input_grad: bool = True) -> tuple[torch.Tensor, ...]:
    """grad_x, grad_W_ih, grad_W_hh, grad_b_ih and grad_b_hh from a GRU's dG (T, B, 4H) — (dR, dZ, dN, dN ⊙ r)
    per row — as GEMMs over all T·B rows in the input dtype with fp32 accumulation (bias sums in fp32).
    ``h_prev`` (T, B, H) is h_0 … h_{T-1}. Without ``input_grad`` grad_x is None (a stack's upper layers:
    the stacked backward formed it in the kernel)."""
    T, B, four_h = grad_gates.shape
    H = four_h // 4
    rows = grad_gates.reshape(T * B, four_h)
    input_side = rows[:, : 3 * H]  # (dR, dZ, dN): a strided view, read in place by the GEMMs
    h_prev = h_prev.reshape(T * B, H)
    grad_x = input_gradient(grad_gates, w_ih) if input_grad else None
    grad_w_ih = torch.matmul(input_side.t(), x.reshape(T * B, -1))
    # h's side is (dR, dZ, dN ⊙ r): two GEMMs over the column blocks, no copy of dG.
    grad_w_hh = torch.cat((torch.matmul(rows[:, : 2 * H].t(), h_prev), torch.matmul(rows[:, 3 * H:].t(), h_prev)))
    sums = rows.sum(0, dtype=accumulate_dtype(rows.dtype))
    grad_b_ih = sums[: 3 * H].to(w_ih.dtype)
    grad_b_hh = torch.cat((sums[: 2 * H], sums[3 * H:])).to(w_hh.dtype)
    return grad_x, grad_w_ih, grad_w_hh.to(w_hh.dtype), grad_b_ih, grad_b_hh


@triton.jit(do_not_specialize=["rows", "B", "rows_per_split"])
def _peephole_grad_kernel(
    grad_gates_ptr,  # (G, rows, 4H) contiguous: dG of G layers or directions, rows = T·B
    c_ptr,  # (G, rows + B, H) fp32 contiguous: c_0 … c_T of each
    partial_ptr,  # (splits, G, 3H) fp32: each split's sums
    rows,
    B,
    rows_per_split,  # a multiple of BLOCK_R
    H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One pass over dG's i, f, o columns and c: Σ dI ⊙ c_{t-1}, Σ dF ⊙ c_{t-1}, Σ dO ⊙ c_t over the
    split's rows, for one block of hidden units of one layer or direction (row r = t·B + b: c_{t-1} is
    c's row r, c_t its row r + B)."""
    pid_h, split, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    grad_base = grad_gates_ptr + g.to(tl.int64) * rows * 4 * H
    c_base = c_ptr + g.to(tl.int64) * (rows + B) * H
    acc_i = tl.zeros((BLOCK_R, BLOCK_H), tl.float32)
    acc_f = tl.zeros((BLOCK_R, BLOCK_H), tl.float32)
    acc_o = tl.zeros((BLOCK_R, BLOCK_H), tl.float32)
    first = split * rows_per_split
    for start in range(first, tl.minimum(first + rows_per_split, rows), BLOCK_R):
        offs_r = start + tl.arange(0, BLOCK_R)
        mask = (offs_r < rows)[:, None] & mask_h[None, :]
        grad_row = grad_base + offs_r.to(tl.int64)[:, None] * 4 * H + offs_h[None, :]
        c_row = c_base + offs_r.to(tl.int64)[:, None] * H + offs_h[None, :]
        c_prev = tl.load(c_row, mask=mask, other=0.0)
        c_next = tl.load(c_row + B * H, mask=mask, other=0.0)
        acc_i += tl.load(grad_row, mask=mask, other=0.0).to(tl.float32) * c_prev
        acc_f += tl.load(grad_row + H, mask=mask, other=0.0).to(tl.float32) * c_prev
        acc_o += tl.load(grad_row + 3 * H, mask=mask, other=0.0).to(tl.float32) * c_next
    out = partial_ptr + (split * tl.num_programs(2) + g) * 3 * H + offs_h
    tl.store(out, tl.sum(acc_i, axis=0), mask=mask_h)
    tl.store(out + H, tl.sum(acc_f, axis=0), mask=mask_h)
    tl.store(out + 2 * H, tl.sum(acc_o, axis=0), mask=mask_h)


def peephole_weight_grads(grad_gates: torch.Tensor, c_all: torch.Tensor) -> torch.Tensor:
    """The peephole weights' gradients (G, 3H) in fp32, as ``reference.peephole_grad`` of each of G layers or
    directions: ``grad_gates`` (G, T, B, 4H), ``c_all`` (G, T + 1, B, H) fp32. One pass over dG's three
    gates and c (the contraction PyTorch would run transposes and casts each gate first: on an H200 that
    cost a peephole LSTM's training step 1.07-1.47x a plain one's); the rows split so that the launch
    fills the SMs, the splits summed after (deterministic: no atomics)."""
    G, T, B, four_h = grad_gates.shape
    H, rows = four_h // 4, T * B
    block_h = min(64, max(16, triton.next_power_of_2(H)))
    block_r = 32 if grad_gates.device.type == "cuda" else 16
    h_blocks, row_blocks = triton.cdiv(H, block_h), max(1, triton.cdiv(rows, block_r))
    if grad_gates.device.type == "cuda":
        num_sms = torch.cuda.get_device_properties(grad_gates.device).multi_processor_count
        splits = max(1, min(row_blocks, triton.cdiv(4 * num_sms, G * h_blocks)))
    else:
        splits = min(row_blocks, 3)  # the interpreter: a few splits, to exercise them
    rows_per_split = triton.cdiv(row_blocks, splits) * block_r
    splits = triton.cdiv(rows, rows_per_split) if rows else 1
    # NaN where a program wrote nothing (a tiling bug shows in the gradient); no rows: the sums are zero.
    partial = torch.full((splits, G, 3 * H), float("nan") if rows else 0.0, device=grad_gates.device,
                         dtype=torch.float32)
    if rows:
        _peephole_grad_kernel[(h_blocks, splits, G)](grad_gates.contiguous(), c_all.contiguous(), partial, rows, B,
                                                     rows_per_split, H=H, BLOCK_R=block_r, BLOCK_H=block_h)
    return partial.sum(0)
