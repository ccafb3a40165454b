"""An LSTM with projections (``proj_size`` P > 0, LSTMP) on the plain LSTM's kernels.

nn.LSTM's projection h_t = m_t·W_hrᵀ (m_t = o_t ⊙ tanh(c_t), W_hr (P, H)) sits inside the recurrence: the
next step's gates read h_t·W_hhᵀ, so a kernel computing h_t itself would need a second exchange between
programs in every step (every program needs all of m_t for its slice of h_t). The projection is linear,
so h_t·W_hhᵀ = m_t·(W_hh·W_hr)ᵀ: the recurrence runs in m with the merged (4H, H) weight W_hh·W_hr — the
plain LSTM's persistent forward and fused backward chain, one barrier per step — and the projections of all
steps are GEMMs over all T·B rows around it:

- forward: the input projection with h0·W_hhᵀ added to step 0's rows (m_{-1} = 0), the recurrence in m,
  then h_t = m_t·W_hrᵀ for every step;
- backward: the output gradients pulled back to m (dh_t·W_hr), the chain on the merged weight, then dh_t
  itself (dh_t = grad_out_t + dG_{t+1}·W_hh) for W_hr's gradient, W_hh's gradient against the saved h.

The price: the recurrent product has K = H instead of P (the step is latency-bound, not FLOP-bound, at the
sizes an LSTM runs), and the merged weight is rounded once to the input dtype where nn.LSTM rounds h_t each
step instead (errors of the same order; the tests hold both to PyTorch's own). Same arguments, outputs and
saved layout as the reference (``reference.py``: h_all holds the projected h).
"""

from __future__ import annotations

import torch

from triton_lstm.kernels import lstm_fwd_persistent as persistent
from triton_lstm.kernels.lstm_bwd import lstm_bwd_gate_grads
from triton_lstm.kernels.weight_grads import weight_and_input_grads
from triton_lstm.reference import accumulate_dtype, input_projection


def merged_recurrent_weight(w_hh: torch.Tensor, w_hr: torch.Tensor) -> torch.Tensor:
    """W_hh·W_hr (4H, H): the recurrent weight of m_{t-1}, computed in fp32 and rounded once to the input dtype."""
    acc = accumulate_dtype(w_hh.dtype)
    return torch.matmul(w_hh.to(acc), w_hr.to(acc)).to(w_hh.dtype)


def lstmp_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save: bool = True):
    """The forward of one layer and direction with a projection: ``(h_all, c_all, gates)`` as
    ``reference.lstm_recurrence_reference`` returns them (h_all (T + 1, B, P) the projected h), or without
    ``save`` the inference forward's (``lstm_fwd_persistent``). ``lengths`` int32 on x's device or None;
    a sequence of length 0 keeps h0 throughout, as in the reference."""
    T, B = x.shape[0], x.shape[1]
    H = w_hr.shape[1]
    acc = accumulate_dtype(x.dtype)
    projected = input_projection(x, w_ih, b_ih, b_hh).contiguous()
    if T > 0:
        # h0's contribution to step 0: the recurrence in m starts from m_{-1} = 0.
        projected[0] = (projected[0].to(acc) + torch.matmul(h0.to(acc), w_hh.to(acc).t())).to(x.dtype)
    m0 = h0.new_zeros(B, H)
    m_all, c_all, gates = persistent.lstm_fwd_persistent(
        projected, m0, c0.contiguous(), merged_recurrent_weight(w_hh, w_hr).contiguous(), lengths, save=save)
    h_all = torch.empty(T + 1, B, w_hr.shape[0], dtype=x.dtype, device=x.device)
    h_all[0] = h0
    torch.mm(m_all[1:].reshape(T * B, H), w_hr.t(), out=h_all[1:].view(T * B, -1))
    if lengths is not None and T > 0:
        h_all[1:] = torch.where((lengths == 0)[None, :, None], h0, h_all[1:])
    return h_all, c_all, gates


def lstmp_bwd(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, gates, h_all, c_all, lengths, schedule: str = "auto"):
    """The fused backward of one layer and direction with a projection: the gradients of x, h0, c0, W_ih,
    W_hh, the bias and W_hr (``reference.lstm_recurrence_backward_reference``'s first seven). ``lengths``
    int32 on x's device or None."""
    T, B, P = grad_out.shape
    H = w_hr.shape[1]
    dtype = x.dtype
    acc = accumulate_dtype(dtype)
    w_hr_acc = w_hr.to(acc)
    # The gradients reaching m_t from h_t: dh·W_hr, in fp32 (the chain reads them as they are).
    grad_m = torch.matmul(grad_out.reshape(T * B, P).to(acc), w_hr_acc).reshape(T, B, H).contiguous()
    grad_m_n = torch.matmul(grad_h_n.to(acc), w_hr_acc)
    grad_gates, _, grad_c0 = lstm_bwd_gate_grads(grad_m, grad_m_n, grad_c_n, merged_recurrent_weight(w_hh, w_hr),
                                                 lengths, [(0, gates, c_all)], schedule)
    grad_x, grad_w_ih, grad_w_hh, grad_bias = weight_and_input_grads(grad_gates, x, h_all[:-1], w_ih)

    # The gradient of h_t itself (B, P per step): its output's, what reaches it through step t+1's gates,
    # and at a sequence's last step what passed through the steps after its end (h_n's, and the outputs'
    # there, where h was carried unchanged).
    grad_h = grad_out.to(acc, copy=True)
    if T > 1:
        grad_h[:-1] += torch.matmul(grad_gates[1:], w_hh).to(acc)
    if lengths is None:
        last = torch.full((B,), T - 1, dtype=torch.int64, device=x.device)
        tail = grad_h_n.to(acc)
    else:
        last = lengths.to(torch.int64) - 1
        after_end = torch.arange(T, device=x.device)[:, None] > last[None, :]
        tail = grad_h_n.to(acc) + (grad_out.to(acc) * after_end[..., None]).sum(0)
    if T > 0:
        # (A sequence of length 0 adds its tail to step 0, where its m is zero: W_hr's gradient is unchanged.)
        rows = last.clamp(min=0) * B + torch.arange(B, device=x.device)
        grad_h.view(T * B, P).index_add_(0, rows, tail)
    # m_t = o ⊙ tanh(c_t), recomputed from the saved gates (zero past a sequence's end, as o is).
    m_all = (gates[..., 3 * H:].to(acc) * torch.tanh(c_all[1:])).to(dtype)
    grad_w_hr = torch.matmul(grad_h.reshape(T * B, P).t().to(dtype), m_all.reshape(T * B, H))
    # h0 met W_hh in step 0; a sequence of length 0 passed it through to the end.
    through_step_0 = torch.matmul(grad_gates[0].to(acc), w_hh.to(acc)) if T > 0 else tail
    grad_h0 = torch.where((last >= 0)[:, None], through_step_0, tail)
    return (grad_x, grad_h0.to(dtype), grad_c0.to(dtype), grad_w_ih, grad_w_hh.to(w_hh.dtype), grad_bias,
            grad_w_hr.to(w_hr.dtype))
