"""The plain-PyTorch LSTM and GRU recurrences: the oracle of every test and the path CPU tensors take.

One layer, one direction. Every function here works on the same saved layout as the Triton kernels:

- ``h_all``  (T + 1, B, P): h0 followed by h_1 … h_T, in the input dtype (P = proj_size or hidden_size);
- ``c_all``  (T + 1, B, H): c0 followed by c_1 … c_T, in fp32 (fp64 for fp64 inputs);
- ``gates``  (T, B, 4H): the gate activations sigmoid(i), sigmoid(f), tanh(g), sigmoid(o), in the input dtype.

``w_ch`` (3H,), optional: peephole weights (i, f, o) — i and f also see w_ci ⊙ c_{t-1} and w_cf ⊙ c_{t-1},
o sees w_co ⊙ c_t (Gers, Schraudolph & Schmidhuber 2002).

``lengths`` (B,), optional, gives each sequence's length: past its end a sequence's state is carried
unchanged and its gates are stored as zero, which is how packed sequences run.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrence computes in: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def input_projection(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                     out: Tensor | None = None) -> Tensor:
    """x·W_ihᵀ + b_ih + b_hh for all time steps at once: (T, B, I) -> (T, B, N) for W_ih (N, I), in x's
    dtype (``b_hh`` None with ``b_ih`` given: b_ih alone). With ``out`` (contiguous (T, B, ≥ N), a gate
    buffer the forward kernels read it from: ``lstm_fwd.in_gate_layout``) written into its first N columns,
    and ``out`` returned.

    One GEMM with the bias in its epilogue (addmm), not a GEMM and then a pass over T·B·N to add it; into
    ``out``'s rows in place (their stride is the GEMM's leading dimension: no copy)."""
    T, B, I = x.shape
    rows = x.reshape(T * B, I)
    bias = projection_bias(b_ih, b_hh)
    out_rows = None if out is None else out.view(T * B, out.shape[-1])[:, :w_ih.shape[0]]
    if bias is None:
        projected = torch.matmul(rows, w_ih.t(), out=out_rows)
    else:
        projected = torch.addmm(bias, rows, w_ih.t(), out=out_rows)
    return projected.reshape(T, B, w_ih.shape[0]) if out is None else out


def projection_bias(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    """The bias ``input_projection`` adds: b_ih + b_hh, either alone when the other is None, or none."""
    if b_ih is None or b_hh is None:
        return b_hh if b_ih is None else b_ih
    return b_ih + b_hh


def both_biases(b_ih: Tensor | None, b_hh: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Both biases or neither, as the ops take them: nn's modules pass both or none, a caller of
    ``lstm_layer`` / ``gru_layer`` may pass one, whose missing partner is then zeros."""
    if (b_ih is None) == (b_hh is None):
        return b_ih, b_hh
    return (b_ih, torch.zeros_like(b_ih)) if b_hh is None else (torch.zeros_like(b_hh), b_hh)


def lstm_recurrence_reference(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None = None,
    lengths: Tensor | None = None,
    w_ch: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs the recurrence step by step; returns ``(h_all, c_all, gates)``.

    Differentiable under autograd, so in float64 it is the gradient oracle of the tests.
    """
    dtype = x.dtype
    acc = accumulate_dtype(dtype)
    projected = input_projection(x, w_ih, b_ih, b_hh).to(acc)
    w_hh = w_hh.to(acc)
    w_hr = None if w_hr is None else w_hr.to(acc)
    w_ci, w_cf, w_co = (None, None, None) if w_ch is None else w_ch.to(acc).chunk(3)
    h_prev, c_prev = h0, c0.to(acc)
    hs, cs, acts = [h0], [c_prev], []
    for t in range(x.shape[0]):
        pre = projected[t] + h_prev.to(acc) @ w_hh.t()
        i, f, g, o = pre.chunk(4, dim=1)
        if w_ch is not None:
            i, f = i + w_ci * c_prev, f + w_cf * c_prev
        i, f, g = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g)
        c = f * c_prev + i * g
        o = torch.sigmoid(o if w_ch is None else o + w_co * c)
        m = o * torch.tanh(c)
        h = (m if w_hr is None else m @ w_hr.t()).to(dtype)
        act = torch.cat([i, f, g, o], dim=1)
        if lengths is not None:
            valid = (t < lengths).unsqueeze(1)
            c = torch.where(valid, c, c_prev)
            h = torch.where(valid, h, h_prev)
            act = torch.where(valid, act, torch.zeros_like(act))
        hs.append(h)
        cs.append(c)
        acts.append(act.to(dtype))
        h_prev, c_prev = h, c
    return torch.stack(hs), torch.stack(cs), torch.stack(acts)


def lstm_recurrence_backward_reference(
    grad_out: Tensor,
    grad_h_n: Tensor,
    grad_c_n: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    gates: Tensor,
    h_all: Tensor,
    c_all: Tensor,
    lengths: Tensor | None,
    w_ch: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Backpropagation through time from the saved activations.

    ``grad_out`` is the gradient of ``h_all[1:]``, ``grad_h_n`` / ``grad_c_n`` those of the final states.
    Returns the gradients of x, h0, c0, W_ih, W_hh, the bias (b_ih and b_hh get the same one), W_hr
    (None without a projection) and the peephole weights w_ch (None without them). Only the per-step chain is a loop; the weight and input gradients are
    single GEMMs over all time steps.
    """
    dtype = x.dtype
    acc = accumulate_dtype(dtype)
    T, B = x.shape[0], x.shape[1]
    H = w_hh.shape[0] // 4
    w_hh_acc = w_hh.to(acc)
    w_hr_acc = None if w_hr is None else w_hr.to(acc)
    grad_pre = torch.empty(T, B, 4 * H, dtype=acc, device=x.device)
    grad_h_steps = torch.empty(T, B, h_all.shape[2], dtype=acc, device=x.device) if w_hr is not None else None
    dh = grad_h_n.to(acc)
    dc = grad_c_n.to(acc)
    w_ci, w_cf, w_co = (None, None, None) if w_ch is None else w_ch.to(acc).chunk(3)
    for t in reversed(range(T)):
        dh = dh + grad_out[t].to(acc)
        i, f, g, o = gates[t].to(acc).chunk(4, dim=1)
        c, c_prev = c_all[t + 1].to(acc), c_all[t].to(acc)
        tanh_c = torch.tanh(c)
        if w_hr is None:
            dm = dh
        else:
            grad_h_steps[t] = dh
            dm = dh @ w_hr_acc
        d_o = dm * tanh_c * o * (1 - o)
        dc_cell = dc + dm * o * (1 - tanh_c * tanh_c)
        if w_ch is not None:
            dc_cell = dc_cell + d_o * w_co  # o saw w_co ⊙ c_t
        d_i = dc_cell * g * i * (1 - i)
        d_f = dc_cell * c_prev * f * (1 - f)
        d_pre = torch.cat([d_i, d_f, dc_cell * i * (1 - g * g), d_o], dim=1)
        dh_prev = d_pre @ w_hh_acc
        dc_prev = dc_cell * f
        if w_ch is not None:
            dc_prev = dc_prev + d_i * w_ci + d_f * w_cf  # i and f saw c_{t-1}
        if lengths is not None:
            # Past a sequence's end its state was carried unchanged: the gradient passes straight through.
            valid = (t < lengths).unsqueeze(1)
            d_pre = torch.where(valid, d_pre, torch.zeros_like(d_pre))
            dh_prev = torch.where(valid, dh_prev, dh)
            dc_prev = torch.where(valid, dc_prev, dc)
        grad_pre[t] = d_pre
        dh, dc = dh_prev, dc_prev

    grad_pre_2d = grad_pre.reshape(T * B, 4 * H)
    # Sizes spelled out, not -1: an empty batch must reshape too.
    grad_x = (grad_pre_2d @ w_ih.to(acc)).reshape(T, B, x.shape[2])
    grad_w_ih = grad_pre_2d.t() @ x.reshape(T * B, x.shape[2]).to(acc)
    grad_w_hh = grad_pre_2d.t() @ h_all[:-1].reshape(T * B, h_all.shape[2]).to(acc)
    grad_bias = grad_pre_2d.sum(0)
    grad_w_hr = None
    if w_hr is not None:
        # m_t = o ⊙ tanh(c_t), recomputed from the saved gates (zero past a sequence's end, as o is).
        o_all = gates[..., 3 * H :].to(acc)
        m_all = o_all * torch.tanh(c_all[1:].to(acc))
        grad_w_hr = grad_h_steps.reshape(T * B, h_all.shape[2]).t() @ m_all.reshape(T * B, H)
        grad_w_hr = grad_w_hr.to(w_hr.dtype)
    grad_w_ch = None if w_ch is None else peephole_grad(grad_pre, c_all.to(acc)).to(w_ch.dtype)
    return (
        grad_x.to(dtype),
        dh.to(dtype),
        dc.to(dtype),
        grad_w_ih.to(w_ih.dtype),
        grad_w_hh.to(w_hh.dtype),
        grad_bias.to(w_ih.dtype),
        grad_w_hr,
        grad_w_ch,
    )


def peephole_grad(grad_gates: Tensor, c_all: Tensor) -> Tensor:
    """The gradient of the peephole weights (3H,) from the pre-activation gate gradients ``grad_gates``
    (T, B, 4H) and the cell states ``c_all`` (T + 1, B, H): Σ dI ⊙ c_{t-1}, Σ dF ⊙ c_{t-1}, Σ dO ⊙ c_t
    over steps and rows, in c_all's dtype. Past a sequence's end the gate gradients are zero already.
    One gate at a time, as a contraction: the only temporary is one gate's dG in c's dtype (T·B·H)."""
    H = c_all.shape[-1]
    c_prev, c = c_all[:-1], c_all[1:]
    return torch.cat([torch.einsum("tbh,tbh->h", grad_gates[..., gate * H:(gate + 1) * H].to(c_all.dtype), state)
                      for gate, state in ((0, c_prev), (1, c_prev), (3, c))])


# The GRU (PyTorch's equations, gates in its order r, z, n), on the same saved layout as the LSTM:
#
# - ``h_all``  (T + 1, B, H): h0 followed by h_1 … h_T, in the input dtype (what the recurrent product reads);
# - ``state_all`` (T + 1, B, H): the same states in fp32 (fp64 for fp64 inputs), where the LSTM keeps c:
#   the pointwise update z ⊙ h + (1 − z) ⊙ n runs on them, as the LSTM's runs on c;
# - ``gates`` (T, B, 4H): r, z, n and hn = h·W_hnᵀ + b_hn (what the reset gate multiplies), in the input dtype.


def gru_input_projection(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    """x·W_ihᵀ + b_ih + (b_hr, b_hz, 0): (T, B, I) -> (T, B, 3H). b_hn stays out, inside r ⊙ (W_hn·h + b_hn)."""
    return input_projection(x, w_ih, gru_projection_bias(b_ih, b_hh), None)


def gru_projection_bias(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    """The biases the GRU's input projection takes: b_ih + (b_hr, b_hz, 0), either part alone when the
    other bias is None, or none."""
    if b_hh is None:
        return b_ih
    H = b_hh.shape[0] // 3
    folded = torch.cat((b_hh[: 2 * H], b_hh.new_zeros(H)))
    return folded if b_ih is None else b_ih + folded


def gru_recurrence_reference(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Runs the GRU recurrence step by step; returns ``(h_all, state_all, gates)``:

        r = σ(W_ir x + b_ir + W_hr h + b_hr),  z = σ(W_iz x + b_iz + W_hz h + b_hz),
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),  h' = (1 − z) ⊙ n + z ⊙ h.

    Differentiable under autograd, so in float64 it is the gradient oracle of the tests (with nn.GRU)."""
    dtype = x.dtype
    acc = accumulate_dtype(dtype)
    H = w_hh.shape[1]
    projected = gru_input_projection(x, w_ih, b_ih, b_hh).to(acc)
    w_hh = w_hh.to(acc)
    b_hn = 0.0 if b_hh is None else b_hh[2 * H:].to(acc)
    h_prev, state_prev = h0, h0.to(acc)
    hs, states, acts = [h0], [state_prev], []
    for t in range(x.shape[0]):
        x_r, x_z, x_n = projected[t].chunk(3, dim=1)
        h_r, h_z, h_n = (h_prev.to(acc) @ w_hh.t()).chunk(3, dim=1)
        hn = h_n + b_hn
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * hn)
        state = n + z * (state_prev - n)
        act = torch.cat([r, z, n, hn], dim=1)
        if lengths is not None:
            valid = (t < lengths).unsqueeze(1)
            state = torch.where(valid, state, state_prev)
            act = torch.where(valid, act, torch.zeros_like(act))
        h = state.to(dtype)
        hs.append(h)
        states.append(state)
        acts.append(act.to(dtype))
        h_prev, state_prev = h, state
    return torch.stack(hs), torch.stack(states), torch.stack(acts)


def gru_recurrence_backward_reference(
    grad_out: Tensor,
    grad_h_n: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    gates: Tensor,
    h_all: Tensor,
    state_all: Tensor,
    lengths: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backpropagation through time of the GRU from its saved activations. Returns the gradients of x, h0,
    W_ih, W_hh, b_ih and b_hh (unlike the LSTM's, the two biases differ: b_hn sits behind the reset gate).

    Per step the pre-activation gradients are kept as four columns, (dR, dZ, dN, dN ⊙ r): the first
    three are what x's side (W_ih, b_ih) sees, (dR, dZ, dN ⊙ r) what h's side (W_hh, b_hh) sees — the fused
    backward's layout (``kernels/gru.py``)."""
    dtype = x.dtype
    acc = accumulate_dtype(dtype)
    T, B = x.shape[0], x.shape[1]
    H = w_hh.shape[1]
    w_hh_acc = w_hh.to(acc)
    grad_pre = torch.empty(T, B, 4 * H, dtype=acc, device=x.device)
    dh = grad_h_n.to(acc)
    for t in reversed(range(T)):
        dh = dh + grad_out[t].to(acc)
        r, z, n, hn = gates[t].to(acc).chunk(4, dim=1)
        h_prev = state_all[t].to(acc)
        d_n = dh * (1 - z) * (1 - n * n)
        d_z = dh * (h_prev - n) * z * (1 - z)
        d_r = d_n * hn * r * (1 - r)
        d_pre = torch.cat([d_r, d_z, d_n, d_n * r], dim=1)
        dh_prev = torch.cat([d_r, d_z, d_n * r], dim=1) @ w_hh_acc + dh * z
        if lengths is not None:
            # Past a sequence's end its state was carried unchanged: the gradient passes straight through.
            valid = (t < lengths).unsqueeze(1)
            d_pre = torch.where(valid, d_pre, torch.zeros_like(d_pre))
            dh_prev = torch.where(valid, dh_prev, dh)
        grad_pre[t] = d_pre
        dh = dh_prev

    rows = grad_pre.reshape(T * B, 4 * H)
    input_side = rows[:, : 3 * H]
    hidden_side = torch.cat((rows[:, : 2 * H], rows[:, 3 * H:]), dim=1)
    grad_x = (input_side @ w_ih.to(acc)).reshape(T, B, x.shape[2])
    grad_w_ih = input_side.t() @ x.reshape(T * B, x.shape[2]).to(acc)
    grad_w_hh = hidden_side.t() @ h_all[:-1].reshape(T * B, H).to(acc)
    return (
        grad_x.to(dtype),
        dh.to(dtype),
        grad_w_ih.to(w_ih.dtype),
        grad_w_hh.to(w_hh.dtype),
        input_side.sum(0).to(w_ih.dtype),
        hidden_side.sum(0).to(w_hh.dtype),
    )
