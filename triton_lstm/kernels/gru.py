"""The GRU on the LSTM's kernels: the same drivers with the cell ``CELL="gru"`` (``cells.gru_cell_update``
in the forward, ``cells.gru_step_grads`` in the backward chain).

What the GRU changes, and what it keeps:

- Three gates (r, z, n): the input projection is (T, B, 3H) — in a training forward the first 3H
  columns of the gate rows the kernel then overwrites (``lstm_fwd.in_gate_layout``) — and W_hh (3H, H);
  the products skip the fourth gate. b_hn cannot be folded into the projection (the reset gate
  multiplies it): the cell reads it.
- The state is h alone; the drivers' fp32 cell-state buffer holds h in fp32 (``state_all``), so the
  update and the backward run on h at full precision while the recurrent product reads h in the input
  dtype, as the LSTM's does.
- The forward saves four H-vectors per step — r, z, n and hn = W_hn·h + b_hn — in the LSTM's gate buffer,
  so the backward chain keeps its shape. Its dG row is (dR, dZ, dN, dN ⊙ r): x's side (W_ih, b_ih) sees
  the first three, h's side (W_hh, b_hh) sees dR, dZ and dN ⊙ r; the chain's register that carries the
  LSTM's dc carries z ⊙ dh, the gradient reaching h_{t-1} directly.
- Planning, the persistent schedule, the barrier, the per-step fallback and the launch checks are the
  LSTM's, unchanged; so are the whole-module launches: a stack of GRU layers runs in one launch each way
  (``gru_stack.py``), a bidirectional layer both directions at once (``gru_bidirectional.py``).
"""

from __future__ import annotations

import torch

from triton_lstm.kernels.lstm_bwd import gates_as_dg, lstm_bwd_gate_grads
from triton_lstm.kernels.lstm_fwd_fused_input import lstm_fwd_from_input
from triton_lstm.kernels.lstm_fwd_persistent import lstm_fwd_persistent
from triton_lstm.kernels.weight_grads import gru_weight_and_input_grads
from triton_lstm.reference import gru_recurrence_backward_reference


def hidden_bias_n(b_hh: torch.Tensor | None, w_hh: torch.Tensor) -> torch.Tensor:
    """b_hn, the part of b_hh the cell adds inside the reset gate (zeros without a bias)."""
    H = w_hh.shape[1]
    if b_hh is None:
        return w_hh.new_zeros(H)
    return b_hh[2 * H:].contiguous()


def gru_fwd(projected: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, b_hn: torch.Tensor,
            lengths: torch.Tensor | None, save: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs the GRU recurrence over ``projected`` (T, B, 3H, ``reference.gru_input_projection``, or in gate
    layout: ``lstm_fwd.in_gate_layout``); returns ``(h_all, state_all, gates)`` (layout in
    ``triton_lstm.reference``): persistent where the planner
    allows, else one launch per step, as ``lstm_fwd_persistent``. Without ``save`` an inference forward:
    state_all (1, B, H) holding h_T in fp32 and no gates. Tensors contiguous, ``lengths`` int32."""
    return lstm_fwd_persistent(projected, h0, h0, w_hh, lengths, save=save, b_hn=b_hn)


def gru_fwd_from_input(x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                       bias: torch.Tensor | None, b_hn: torch.Tensor, lengths: torch.Tensor | None,
                       save: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gru_fwd`` from the layer's input ``x`` (T, B, I): its projection with ``bias`` (b_ih + (b_hr, b_hz,
    0), or None) first, or formed in the kernel where the plan asks (``lstm_fwd_from_input``)."""
    return lstm_fwd_from_input(x, h0, h0, w_ih, w_hh, bias, lengths, save, b_hn=b_hn)


def gru_bwd(
    grad_out: torch.Tensor,
    grad_h_n: torch.Tensor,
    x: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    gates: torch.Tensor,
    h_all: torch.Tensor,
    state_all: torch.Tensor,
    lengths: torch.Tensor | None,
    schedule: str = "auto",
    overwrite_gates: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Fused backward of one GRU layer and direction; same arguments and outputs as
    ``reference.gru_recurrence_backward_reference`` (gradients of x, h0, W_ih, W_hh, b_ih, b_hh).
    ``schedule`` and ``overwrite_gates`` as ``lstm_bwd``'s."""
    if gates.numel() == 0:
        return gru_recurrence_backward_reference(grad_out, grad_h_n, x, w_ih, w_hh, gates, h_all, state_all, lengths)
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int32)
    grad_gates, grad_h0, _ = lstm_bwd_gate_grads(
        grad_out, grad_h_n, torch.zeros_like(grad_h_n), w_hh, lengths, [(0, gates, state_all)], schedule, cell="gru",
        into=gates_as_dg(gates, overwrite_gates),
    )
    grad_x, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh = gru_weight_and_input_grads(grad_gates, x, h_all[:-1], w_ih,
                                                                                    w_hh)
    return grad_x, grad_h0.to(x.dtype), grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh
