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

Both directions of a bidirectional layer (``lstmp_fwd_bidirectional``) and a stack's layers
(``lstmp_fwd_stack``: layer l > 0 reads the layer below's m through W_ih^l·W_hr^{l-1}, and its h0 enters
as a step-0 term) keep their one launch each way; their ops (``bidirectional.py``, ``stack.py``) use the
backward's helpers here.

The price: the recurrent product has K = H instead of P (the step is latency-bound, not FLOP-bound, at the
sizes an LSTM runs), and m_t is rounded to the input dtype each step (where nn.LSTM rounds h_t) and the
merged weight once (errors of the same order; the tests hold ours to twice PyTorch's own). Same arguments, outputs and
saved layout as the reference (``reference.py``: h_all holds the projected h).
"""

from __future__ import annotations

import torch

from triton_lstm.kernels import lstm_fwd_persistent as persistent
from triton_lstm.kernels.lstm_bwd import gates_as_dg, lstm_bwd_gate_grads
from triton_lstm.kernels.lstm_fwd_bidirectional import lstm_fwd_bidirectional
from triton_lstm.kernels.lstm_fwd_stack import lstm_fwd_stack
from triton_lstm.kernels.weight_grads import weight_and_input_grads
from triton_lstm.reference import accumulate_dtype, input_projection


def merged_recurrent_weight(w_hh: torch.Tensor, w_hr: torch.Tensor) -> torch.Tensor:
    """W_hh·W_hr (4H, H), or stacked per direction or layer: the recurrent weight of m_{t-1} (or with a
    layer's W_ih and the layer below's W_hr, the input weight of the layer below's m_t), computed in fp32
    and rounded once to the input dtype."""
    acc = accumulate_dtype(w_hh.dtype)
    return torch.matmul(w_hh.to(acc), w_hr.to(acc)).to(w_hh.dtype)


def last_steps(lengths: torch.Tensor | None, T: int, B: int, device) -> torch.Tensor:
    """Each sequence's last step, len_b − 1 (−1 for an empty one; T − 1 without lengths), int64 (B,)."""
    return torch.full((B,), T - 1, device=device) if lengths is None else lengths.to(torch.int64) - 1


def first_steps(lengths: torch.Tensor | None, T: int, B: int, device, reverse: bool = False) -> torch.Tensor:
    """The flat row (t·B + b) of each sequence's first step: t = 0, or with ``reverse`` (the reverse
    direction of a bidirectional layer, in time order) its last element, len_b − 1 (0 for an empty one)."""
    batch = torch.arange(B, device=device)
    if not reverse:
        return batch
    return last_steps(lengths, T, B, device).clamp(min=0) * B + batch


def add_initial_state(projected: torch.Tensor, columns: slice, h0: torch.Tensor, w_hh: torch.Tensor,
                      rows: torch.Tensor) -> None:
    """Adds h0·W_hhᵀ to each sequence's first step (``rows``, ``first_steps``) of ``projected``'s ``columns``:
    the recurrence in m starts from m_{-1} = 0, and h0 = h_{-1} enters through this step's gates."""
    if projected.shape[0] == 0:
        return
    acc = accumulate_dtype(projected.dtype)
    flat = projected.view(-1, projected.shape[-1])
    first = flat[rows, columns].to(acc) + torch.matmul(h0.to(acc), w_hh.to(acc).t())
    flat[rows, columns] = first.to(projected.dtype)


def project(m_all: torch.Tensor, h0: torch.Tensor, w_hr: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """h_all (T + 1, B, P) from the recurrence's m_all (T + 1, B, H), step-indexed: h0, then m_t·W_hrᵀ (a
    sequence of length 0 keeps h0 throughout, as in the reference)."""
    T, B, H = m_all.shape[0] - 1, m_all.shape[1], m_all.shape[2]
    h_all = torch.empty(T + 1, B, w_hr.shape[0], dtype=m_all.dtype, device=m_all.device)
    h_all[0] = h0
    torch.mm(m_all[1:].reshape(T * B, H), w_hr.t(), out=h_all[1:].view(T * B, w_hr.shape[0]))
    if lengths is not None and T > 0:
        h_all[1:] = torch.where((lengths == 0)[None, :, None], h0, h_all[1:])
    return h_all


def lstmp_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save: bool = True):
    """The forward of one layer and direction with a projection: ``(h_all, c_all, gates)`` as
    ``reference.lstm_recurrence_reference`` returns them (h_all (T + 1, B, P) the projected h), or without
    ``save`` the inference forward's (``lstm_fwd_persistent``). ``lengths`` int32 on x's device or None."""
    T, B = x.shape[0], x.shape[1]
    projected = input_projection(x, w_ih, b_ih, b_hh).contiguous()
    add_initial_state(projected, slice(None), h0, w_hh, first_steps(lengths, T, B, x.device))
    m_all, c_all, gates = persistent.lstm_fwd_persistent(
        projected, h0.new_zeros(B, w_hr.shape[1]), c0.contiguous(), merged_recurrent_weight(w_hh, w_hr).contiguous(),
        lengths, save=save, reuse_projected=True)  # (the projection is ours alone: the gates take its place)
    return project(m_all, h0, w_hr, lengths), c_all, gates


def lstmp_fwd_bidirectional(projected, h0, c0, w_hh, w_hr, lengths, plan, save: bool = True):
    """Both directions of a layer with projections in one launch (``lstm_fwd_bidirectional`` in m_t):
    ``projected`` (2, T, B, 4H) as there (the gates take its place), ``h0`` (2, B, P), ``c0`` (2, B, H),
    ``w_hh`` (2, 4H, P), ``w_hr`` (2, P, H). Returns ``(out (T, B, 2P), h_all (2, T + 1, B, P), c_all, gates)``
    as ``lstm_fwd_bidirectional`` does; raises as it does before anything ran (``projected`` then holds the
    h0 terms)."""
    T, B = projected.shape[1:3]
    H = w_hr.shape[-1]
    for direction in range(2):
        # Step-ordered: each direction's first step is step 0.
        add_initial_state(projected[direction], slice(None), h0[direction], w_hh[direction],
                          first_steps(lengths, T, B, projected.device))
    out_m, m_all, c_all, gates = lstm_fwd_bidirectional(projected, h0.new_zeros(2, B, H), c0,
                                                        merged_recurrent_weight(w_hh, w_hr).contiguous(), lengths, plan,
                                                        save, reuse_projected=True)
    # out_m is zero past each sequence's end, and so is its projection.
    out = torch.cat([torch.matmul(out_m[..., d * H:(d + 1) * H], w_hr[d].t()) for d in range(2)], dim=2)
    h_all = torch.stack([project(m_all[d], h0[d], w_hr[d], lengths) for d in range(2)])
    return out, h_all, c_all, gates


def lstmp_fwd_stack(projected, h0, c0, w_hh, w_ih_above, bias_above, w_hr, lengths, plan, save: bool = True,
                    outputs=None):
    """A stack of L layers with projections in one launch (``lstm_fwd_stack`` in m_t): ``projected`` layer 0's
    input projection (T, B, 4H), ``h0`` (L, B, P), ``c0`` (L, B, H), ``w_hh`` (L, 4H, P), ``w_ih_above``
    (L - 1, 4H, P) and ``bias_above`` as there, ``w_hr`` (L, P, H); ``outputs`` the recurrence's buffers
    in m (``lstm_fwd_stack.projection_in_gates`` with h0 zeros (L, B, H): ``projected`` then in layer 0's
    gates), else new ones. Layer l > 0 reads the layer below's h_t = m_t·W_hr^{l-1}ᵀ through the merged
    input weight W_ih^l·W_hr^{l-1}, and its h0 enters as a step-0 term (``initial``). Returns
    ``(h_all (L, T + 1, B, P), c_all, gates)``; raises as ``lstm_fwd_stack`` does, before anything ran. No
    dropout: a mask on h does not carry over to m."""
    T, B = projected.shape[:2]
    layers, H = w_hh.shape[0], w_hr.shape[-1]
    acc = accumulate_dtype(projected.dtype)
    add_initial_state(projected, slice(None), h0[0], w_hh[0], first_steps(lengths, T, B, projected.device))
    initial = torch.matmul(h0[1:].to(acc), w_hh[1:].to(acc).transpose(1, 2)).contiguous()
    m_all, c_all, gates = lstm_fwd_stack(
        projected, h0.new_zeros(layers, B, H), c0, merged_recurrent_weight(w_hh, w_hr).contiguous(),
        merged_recurrent_weight(w_ih_above, w_hr[:-1]).contiguous(), bias_above, lengths, plan, save, initial=initial,
        outputs=outputs)
    h_all = torch.stack([project(m_all[layer], h0[layer], w_hr[layer], lengths) for layer in range(layers)])
    return h_all, c_all, gates


def gradients_at_m(grad_out: torch.Tensor, grad_h_n: torch.Tensor, w_hr: torch.Tensor):
    """The gradients reaching m_t from h_t = m_t·W_hrᵀ, (grad_out·W_hr, grad_h_n·W_hr), in fp32 (the chain
    reads them as they are). ``grad_out`` (T, B, P)."""
    acc = accumulate_dtype(w_hr.dtype)
    T, B, P = grad_out.shape
    w_hr_acc = w_hr.to(acc)
    grad_m = torch.matmul(grad_out.reshape(T * B, P).to(acc), w_hr_acc).reshape(T, B, -1)
    return grad_m, torch.matmul(grad_h_n.to(acc), w_hr_acc)


def cell_outputs(gates, c_all):
    """m_t = o ⊙ tanh(c_t) of steps 1 … T, recomputed from the saved gates and c (zero past a sequence's
    end, as o is), in the gates' dtype: what W_hr's gradient needs (``projection_grads``), taken before a
    chain that writes dG over the gates. A leading axis of layers or directions on both, or none."""
    H = c_all.shape[-1]
    acc = accumulate_dtype(gates.dtype)
    return (gates[..., 3 * H:].to(acc) * torch.tanh(c_all[..., 1:, :, :])).to(gates.dtype)


def projection_grads(grad_out, grad_h_n, grad_gates, w_hh, w_hr, m_all, lengths):
    """W_hr's gradient and h0's, once the chain has run, for one layer and direction, all step-indexed:
    ``grad_out`` (T, B, P) the gradient of h_1 … h_T, ``grad_gates`` the chain's dG (T, B, 4H), ``m_all``
    the cell outputs (``cell_outputs``). Returns (grad_w_hr in W_hr's dtype, grad_h0 fp32)."""
    T, B, P = grad_out.shape
    H = w_hr.shape[1]
    dtype = grad_gates.dtype
    acc = accumulate_dtype(dtype)
    # The gradient of h_t itself (B, P per step): its output's, what reaches it through step t+1's gates,
    # and at a sequence's last step what passed through the steps after its end (h_n's, and the outputs'
    # there, where h was carried unchanged).
    grad_h = grad_out.to(acc, memory_format=torch.contiguous_format, copy=True)
    if T > 1:
        grad_h[:-1] += torch.matmul(grad_gates[1:], w_hh).to(acc)
    last = last_steps(lengths, T, B, grad_out.device)
    tail = grad_h_n.to(acc)
    if lengths is not None:
        after_end = torch.arange(T, device=grad_out.device)[:, None] > last[None, :]
        tail = tail + (grad_out.to(acc) * after_end[..., None]).sum(0)
    if T > 0:
        # At each sequence's last step, its first in reverse (a sequence of length 0 adds its tail to step 0,
        # where its m is zero: W_hr's gradient is unchanged).
        grad_h.view(T * B, P).index_add_(0, first_steps(lengths, T, B, grad_out.device, reverse=True), tail)
    grad_w_hr = torch.matmul(grad_h.reshape(T * B, P).t().to(dtype), m_all.reshape(T * B, H))
    # h0 met W_hh in step 0; a sequence of length 0 passed it through to the end.
    through_step_0 = torch.matmul(grad_gates[0].to(acc), w_hh.to(acc)) if T > 0 else tail
    grad_h0 = torch.where((last >= 0)[:, None], through_step_0, tail)
    return grad_w_hr.to(w_hr.dtype), grad_h0


def lstmp_bwd(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, gates, h_all, c_all, lengths, schedule: str = "auto",
              overwrite_gates: bool = False):
    """The fused backward of one layer and direction with a projection: the gradients of x, h0, c0, W_ih,
    W_hh, the bias and W_hr (``reference.lstm_recurrence_backward_reference``'s first seven). ``lengths``
    int32 on x's device or None; ``overwrite_gates`` as ``lstm_bwd``'s (W_hr's gradient then takes m_t
    from the gates before the chain)."""
    grad_m, grad_m_n = gradients_at_m(grad_out, grad_h_n, w_hr)
    m_all = cell_outputs(gates, c_all)
    grad_gates, _, grad_c0 = lstm_bwd_gate_grads(grad_m.contiguous(), grad_m_n, grad_c_n,
                                                 merged_recurrent_weight(w_hh, w_hr), lengths, [(0, gates, c_all)],
                                                 schedule, into=gates_as_dg(gates, overwrite_gates))
    grad_x, grad_w_ih, grad_w_hh, grad_bias = weight_and_input_grads(grad_gates, x, h_all[:-1], w_ih)
    grad_w_hr, grad_h0 = projection_grads(grad_out, grad_h_n, grad_gates, w_hh, w_hr, m_all, lengths)
    dtype = x.dtype
    return grad_x, grad_h0.to(dtype), grad_c0.to(dtype), grad_w_ih, grad_w_hh.to(w_hh.dtype), grad_bias, grad_w_hr
