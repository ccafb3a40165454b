"""Forward kernel: one fused LSTM time step, launched once per step.

Per step and per tile of (batch rows × hidden units), a program computes the recurrent product
h_{t-1}·W_hhᵀ for the four gates of its hidden units (four ``tl.dot`` accumulators), adds that step's
precomputed input projection, applies sigmoid / tanh, updates the cell state and writes h_t, c_t and the
gate activations the backward needs. State and arithmetic are fp32 whatever the input dtype.

Buffers follow the layout of ``triton_lstm.reference``: ``h_all`` (T+1, B, K) with h0 at step 0,
``c_all`` (T+1, B, H) fp32 with c0 at step 0, ``gates`` (T, B, 4H). Step t reads index t and writes t+1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_lstm.kernels.cells import cell_update
from triton_lstm.kernels.common import (
    dot_precision,
    load_gate_inputs,
    load_own_state,
    recurrent_product_streamed,
)
from triton_lstm.reference import input_projection


@triton.jit(do_not_specialize=["t", "B"])
def _lstm_step_fwd_kernel(
    projected_ptr,  # x·W_ihᵀ + biases (T, B, ·), input dtype, its rows as common.load_gate_inputs reads them
    w_hh_ptr,  # (4H, H)
    h_ptr,  # (T+1, B, H)
    c_ptr,  # (T+1, B, H), fp32
    gates_ptr,  # (T, B, 4H)
    lengths_ptr,  # (B,) int32, read when HAS_LENGTHS
    cell_params_ptr,  # PEEPHOLE: (3H,) peephole weights (w_ci, w_cf, w_co); CELL "gru": (H,) b_hn
    t,
    B,
    H: tl.constexpr,
    K: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    SAVE: tl.constexpr,  # store every step's gates and c for the backward (else an inference forward)
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PEEPHOLE: tl.constexpr = False,
    CELL: tl.constexpr = "lstm",  # "gru": projected r, z, n, w_hh (3H, K), c_all its fp32 h (cells.cell_update)
):
    GATES: tl.constexpr = 3 if CELL == "gru" else 4
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_b = offs_b < B
    mask_h = offs_h < H
    mask_bh = mask_b[:, None] & mask_h[None, :]
    # int64 row offsets: T·B·4H can pass 2³¹ elements.
    rows = offs_b.to(tl.int64)
    step = t.to(tl.int64)
    h_prev_ptr = h_ptr + step * B * K

    acc_i, acc_f, acc_g, acc_o = recurrent_product_streamed(
        h_prev_ptr, w_hh_ptr, rows, mask_b, offs_h, mask_h, H, K, DOT_PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, GATES
    )
    x_i, x_f, x_g, x_o = load_gate_inputs(projected_ptr, step, B, rows, offs_h, mask_bh, H, GATES, SAVE)
    h_prev, c_prev = load_own_state(h_ptr, c_ptr, step, B, rows, offs_h, mask_bh, H, K, HAS_LENGTHS, SAVE)
    h, _ = cell_update(
        acc_i, acc_f, acc_g, acc_o, x_i, x_f, x_g, x_o, h_prev, c_prev, c_ptr, gates_ptr, lengths_ptr,
        step, B, rows, offs_b, mask_b, offs_h, mask_h, H, HAS_LENGTHS, SAVE, cell_params_ptr, PEEPHOLE, CELL,
    )
    state_offs = rows[:, None] * H + offs_h[None, :]
    tl.store(h_ptr + (step + 1) * B * K + state_offs, h.to(h_ptr.dtype.element_ty), mask=mask_bh)


def step_blocks(B: int, H: int, K: int, element_size: int, fp32_tensor_cores: bool) -> tuple[int, int, int, str]:
    """(BLOCK_B, BLOCK_H, BLOCK_K, exact-fp32 dot precision) of the per-step kernel.

    tl.dot needs every dimension >= 16 on the GPU; smaller B, H or K are masked up to 16. fp32 runs its
    dots on tensor cores as "tf32x3" (fp32-level accuracy) where the card has TF32, in 32-wide K chunks
    and 16-unit hidden blocks: the FMA dots abort Triton 3.9's LLVM (an SLPVectorizer assertion) at
    small K, and wider tiles spill.
    """
    block_b = max(16, min(64, triton.next_power_of_2(B)))
    block_h = max(16, min(32, triton.next_power_of_2(H)))
    block_k = max(16, min(64, triton.next_power_of_2(K)))
    if element_size >= 4 and fp32_tensor_cores:
        return block_b, 16, min(block_k, 32), "tf32x3"  # 32 × 32 fp32 tiles spill 40 bytes
    return block_b, block_h, block_k, "ieee"


def fp32_tensor_cores(device: torch.device) -> bool:
    """Whether the device runs TF32 dots (sm_80 and later), so exact fp32 can run as tf32x3."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def in_gate_layout(projected: torch.Tensor, H: int, gates: int, save: bool,
                   reuse_projected: bool = False) -> tuple[torch.Tensor, bool]:
    """``projected`` (…, T, B, ·) as the forward kernels read it (``common.load_gate_inputs``), and whether
    the gates may take its place (``reuse_projected``, or a copy made here: ours alone). In a training
    forward (``save``) in rows of the gate buffer, 4H wide, which the gates then overwrite; in an inference
    forward dense, ``gates``·H wide (``gates`` 3: a GRU's r, z, n). An LSTM's projection is both. A GRU's
    given 3H wide to a training forward is copied into the first 3H columns of a new gate buffer (for
    callers that build their own: ``projection_for_forward`` writes it there in the first place); given in a
    gate buffer to an inference forward, its 3H columns are copied out. Contiguous either way."""
    width = 4 * H if save else gates * H
    if projected.shape[-1] == width:
        laid_out = projected.contiguous()
    elif save:
        laid_out = projected.new_empty(*projected.shape[:-1], width)
        laid_out[..., :projected.shape[-1]] = projected
    else:
        laid_out = projected[..., :width].contiguous()
    return laid_out, reuse_projected or laid_out.data_ptr() != projected.data_ptr()


def projection_for_forward(x: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor | None, H: int,
                           save: bool) -> torch.Tensor:
    """x·W_ihᵀ + ``bias`` (T, B, I → gates·H, ``reference.input_projection``) laid out for the forward
    kernels (``in_gate_layout``): in a training forward written straight into a new gate buffer (T, B, 4H)
    for the gates to take over (``allocate_forward_outputs``'s ``reuse_projected``), else dense."""
    into = x.new_empty(x.shape[0], x.shape[1], 4 * H) if save else None
    return input_projection(x, w_ih, bias, None, out=into).contiguous()


def allocate_forward_outputs(projected: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, K: int, save: bool = True,
                             reuse_projected: bool = False):
    """``(h_all, c_all, gates)`` for a forward over ``projected`` ((…, T, B, ·): a layer's input projection,
    or x), with h0 and c0 in place at step 0 and everything else left for the kernel to write (layout in
    ``triton_lstm.reference``). Without ``save`` (an inference forward) c_all has two slots used in turn
    and gates no steps. With ``h0``/``c0`` of shape (G, B, ·) (a stack's layers, a bidirectional layer's
    directions) every output gets that leading axis of G.

    ``reuse_projected``: the gates may take the place of ``projected``, which the caller needs no more
    (each program reads its own tile of step t's projection before it writes the same tile of the gates,
    and no program reads another's): T·B·4H elements fewer at the forward's peak, per layer or direction.
    Only where ``projected`` is the gates' shape, contiguous: an input projection in gate layout
    (``in_gate_layout``) of one layer, or of both directions of a bidirectional one."""
    T, B = projected.shape[-3], projected.shape[-2]
    H = c0.shape[-1]
    groups = tuple(h0.shape[:-2])
    h_all = torch.empty(*groups, T + 1, B, K, dtype=projected.dtype, device=projected.device)
    c_all = torch.empty(*groups, T + 1 if save else 2, B, H, dtype=torch.float32, device=projected.device)
    shape = (*groups, T if save else 0, B, 4 * H)
    if reuse_projected and save and projected.shape == shape and projected.is_contiguous():
        gates = projected
    else:
        gates = torch.empty(shape, dtype=projected.dtype, device=projected.device)
    h_all[..., 0, :, :] = h0
    c_all[..., 0, :, :] = c0
    return h_all, c_all, gates


def finished_outputs(outputs, save: bool):
    """What the forward returns: with ``save`` its buffers as they are; without, c_all cut to the slot
    holding c_T (shape (1, B, H), or (G, 1, B, H) with a leading group axis), so that c_all[..., -1, :, :]
    is c_n either way."""
    if save:
        return outputs
    h_all, c_all, gates = outputs
    steps_axis = h_all.dim() - 3
    last = (h_all.shape[steps_axis] - 1) % 2  # c_slot: c after T steps
    return h_all, c_all.narrow(steps_axis, last, 1), gates


def lstm_fwd(
    projected: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_hh: torch.Tensor,
    lengths: torch.Tensor | None,
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    save: bool = True,
    w_ch: torch.Tensor | None = None,
    b_hn: torch.Tensor | None = None,
    reuse_projected: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs the recurrence over ``projected`` (T, B, 4H); returns ``(h_all, c_all, gates)``.

    All tensors are contiguous and on one device; ``lengths`` is int32 on that device. ``outputs``:
    buffers from ``allocate_forward_outputs`` to fill (a persistent launch that fell back hands over its
    own, ``projected`` then laid out already), else new ones. Without ``save``: an inference forward (see
    ``finished_outputs``). ``w_ch`` (3H,): peephole weights. ``b_hn`` (H,): a GRU (``kernels/gru.py``):
    ``projected`` is (T, B, 3H) or in gate layout (``in_gate_layout``), ``w_hh`` (3H, H), ``c0`` and
    ``c_all`` its state in fp32. ``reuse_projected``: the gates may overwrite ``projected``
    (``allocate_forward_outputs``).
    """
    T, B = projected.shape[:2]
    H = c0.shape[-1]
    K = w_hh.shape[1]
    dtype = projected.dtype
    if outputs is None:
        projected, reuse_projected = in_gate_layout(projected, H, w_hh.shape[0] // H, save, reuse_projected)
        outputs = allocate_forward_outputs(projected, h0, c0, K, save, reuse_projected)
    h_all, c_all, gates = outputs
    block_b, block_h, block_k, exact_fp32 = step_blocks(B, H, K, projected.element_size(), fp32_tensor_cores(projected.device))
    grid = (triton.cdiv(B, block_b), triton.cdiv(H, block_h))
    for t in range(T):
        _lstm_step_fwd_kernel[grid](
            projected,
            w_hh,
            h_all,
            c_all,
            gates,
            lengths if lengths is not None else h_all,
            w_ch if w_ch is not None else b_hn if b_hn is not None else h_all,
            t,
            B,
            H=H,
            K=K,
            HAS_LENGTHS=lengths is not None,
            SAVE=save,
            DOT_PRECISION=dot_precision(dtype, exact_fp32),
            BLOCK_B=block_b,
            BLOCK_H=block_h,
            BLOCK_K=block_k,
            PEEPHOLE=w_ch is not None,
            CELL="gru" if b_hn is not None else "lstm",
        )
    return finished_outputs(outputs, save)
