"""The cells the drivers run, chosen by their ``CELL`` constexpr: per tile of (batch rows × hidden units),
the forward's update from the gate pre-activations (``cell_update``: ``lstm_cell_update``, the peephole
LSTM included, or ``gru_cell_update``) and the backward chain's step (``lstm_step_grads``,
``gru_step_grads``). The drivers — the per-step and persistent forward (``lstm_fwd.py``,
``lstm_fwd_persistent.py``) and the backward chain (``lstm_bwd.py``) — own the time loop, the barrier, the
exchange of h and the products; a new variant adds a cell here and its reference in
``triton_lstm/reference.py``.
"""

import triton
import triton.language as tl

from triton_lstm.kernels.common import c_slot, sigmoid, tanh


@triton.jit
def lstm_cell_update(
    acc_i,
    acc_f,
    acc_g,
    acc_o,
    x_i,
    x_f,
    x_g,
    x_o,
    h_prev,
    c_prev,
    c_ptr,
    gates_ptr,
    lengths_ptr,
    step,
    B,
    rows,
    offs_b,
    mask_b,
    offs_h,
    mask_h,
    H: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    SAVE: tl.constexpr,
    w_ch_ptr,
    PEEPHOLE: tl.constexpr,
):
    """Gates, cell update and their stores for one (batch block × hidden block) tile of step ``step``.

    ``acc_*`` hold this tile's h_{t-1}·W_hhᵀ per gate and ``x_*`` its input projection (fp32);
    ``h_prev`` / ``c_prev`` are the tile's state of step t-1 in fp32. Stores the gate activations and c_t;
    returns (h_t, c_t) in fp32 for the caller to store. Past a sequence's end the state is carried: c_t =
    c_{t-1}, h_t = h_{t-1}, gates zero. Without SAVE (an
    inference forward) the gates are not stored and c goes to one of two slots (``c_slot``). With PEEPHOLE,
    ``w_ch_ptr`` holds the peephole weights (w_ci, w_cf, w_co), each H long: i and f also see c_{t-1}, o
    sees c_t.
    """
    mask_bh = mask_b[:, None] & mask_h[None, :]
    pre_i = acc_i + x_i
    pre_f = acc_f + x_f
    if PEEPHOLE:
        pre_i += tl.load(w_ch_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :] * c_prev
        pre_f += tl.load(w_ch_ptr + H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :] * c_prev
    i = sigmoid(pre_i)
    f = sigmoid(pre_f)
    g = tanh(acc_g + x_g)
    c = f * c_prev + i * g
    pre_o = acc_o + x_o
    if PEEPHOLE:
        pre_o += tl.load(w_ch_ptr + 2 * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :] * c
    o = sigmoid(pre_o)
    h = o * tanh(c)
    if HAS_LENGTHS:
        valid = (step < tl.load(lengths_ptr + offs_b, mask=mask_b, other=0))[:, None]
        c = tl.where(valid, c, c_prev)
        i, f, g, o = _zero_past_the_end(valid, i, f, g, o)
        h = tl.where(valid, h, h_prev)

    _store_step(i, f, g, o, c, gates_ptr, c_ptr, step, B, rows, offs_h, mask_bh, H, SAVE)
    return h, c


@triton.jit
def gru_cell_update(acc_r, acc_z, acc_n, x_r, x_z, x_n, h_prev, state_ptr, gates_ptr, lengths_ptr, step, B, rows, offs_b,
                    mask_b, offs_h, mask_h, H: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr, b_hn_ptr):
    """PyTorch's GRU step for one (batch block × hidden block) tile of step ``step``:
    r = σ(x_r + h·W_hrᵀ), z = σ(x_z + h·W_hzᵀ), n = tanh(x_n + r ⊙ (h·W_hnᵀ + b_hn)), h' = (1 − z) ⊙ n + z ⊙ h.

    ``acc_*`` hold the tile's h_{t-1}·W_hhᵀ per gate, ``x_*`` its input projection (with b_ir + b_hr,
    b_iz + b_hz and b_in: b_hn stays inside the reset gate's product, so it is read here from
    ``b_hn_ptr``), ``h_prev`` the state of step t-1 in fp32. The GRU's fp32 state lives where the LSTM
    keeps c (``state_ptr``, the same slots), so that the update and the backward use h at full precision.
    Stores (r, z, n, h·W_hnᵀ + b_hn) as the step's four gate vectors — the LSTM's gates layout, everything
    the backward needs — and returns (h_t, h_t) in fp32. Past a sequence's end h is carried and the gate
    vectors are zero."""
    mask_bh = mask_b[:, None] & mask_h[None, :]
    hn = acc_n + tl.load(b_hn_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    r = sigmoid(acc_r + x_r)
    z = sigmoid(acc_z + x_z)
    n = tanh(x_n + r * hn)
    h = n + z * (h_prev - n)
    if HAS_LENGTHS:
        valid = (step < tl.load(lengths_ptr + offs_b, mask=mask_b, other=0))[:, None]
        h = tl.where(valid, h, h_prev)
        r, z, n, hn = _zero_past_the_end(valid, r, z, n, hn)
    _store_step(r, z, n, hn, h, gates_ptr, state_ptr, step, B, rows, offs_h, mask_bh, H, SAVE)
    return h, h


@triton.jit
def _zero_past_the_end(valid, a, b, c, d):
    """A step's four gate vectors with the rows past their sequence's end (``valid`` False) zeroed: what
    the forward saves for those rows, for either cell."""
    return tl.where(valid, a, 0.0), tl.where(valid, b, 0.0), tl.where(valid, c, 0.0), tl.where(valid, d, 0.0)


@triton.jit
def _store_step(a, b, c, d, state, gates_ptr, state_ptr, step, B, rows, offs_h, mask_bh, H: tl.constexpr,
                SAVE: tl.constexpr):
    """A cell's stores for one tile of step ``step``: its four saved H-vectors (the LSTM's i, f, g, o, the
    GRU's r, z, n, hn) into the step's gates, in the gates' dtype, with SAVE; its fp32 state (c, or the GRU's
    h) into the state's slot after the step (``c_slot``)."""
    if SAVE:
        gates_ptrs = gates_ptr + step * B * 4 * H + rows[:, None] * (4 * H) + offs_h[None, :]
        out_dtype = gates_ptr.dtype.element_ty
        tl.store(gates_ptrs, a.to(out_dtype), mask=mask_bh)
        tl.store(gates_ptrs + H, b.to(out_dtype), mask=mask_bh)
        tl.store(gates_ptrs + 2 * H, c.to(out_dtype), mask=mask_bh)
        tl.store(gates_ptrs + 3 * H, d.to(out_dtype), mask=mask_bh)
    tl.store(state_ptr + c_slot(step + 1, SAVE) * B * H + rows[:, None] * H + offs_h[None, :], state, mask=mask_bh)


@triton.jit
def cell_update(acc_i, acc_f, acc_g, acc_o, x_i, x_f, x_g, x_o, h_prev, c_prev, c_ptr, gates_ptr, lengths_ptr, step, B,
                rows, offs_b, mask_b, offs_h, mask_h, H: tl.constexpr, HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr,
                cell_params_ptr, PEEPHOLE: tl.constexpr, CELL: tl.constexpr):
    """The update of the drivers' ``CELL``: "lstm" (``lstm_cell_update``; ``cell_params_ptr``: the peephole
    weights with PEEPHOLE) or "gru" (``gru_cell_update``: the first three gates, ``c_prev``/``c_ptr`` its fp32
    state, ``cell_params_ptr`` its b_hn). Returns (h, the fp32 state) of the tile."""
    if CELL == "gru":
        return gru_cell_update(acc_i, acc_f, acc_g, x_i, x_f, x_g, c_prev, c_ptr, gates_ptr, lengths_ptr, step, B, rows,
                               offs_b, mask_b, offs_h, mask_h, H, HAS_LENGTHS, SAVE, cell_params_ptr)
    else:
        return lstm_cell_update(acc_i, acc_f, acc_g, acc_o, x_i, x_f, x_g, x_o, h_prev, c_prev, c_ptr, gates_ptr,
                                lengths_ptr, step, B, rows, offs_b, mask_b, offs_h, mask_h, H, HAS_LENGTHS, SAVE,
                                cell_params_ptr, PEEPHOLE)


@triton.jit
def load_step_operands(gate_ptrs, state_ptrs, mask_bh, B, H: tl.constexpr, CELL: tl.constexpr):
    """What a step of the backward chain reads of the forward's saved tensors, as stored: the four gate
    tiles (``gate_ptrs``: the step's saved activations, input dtype) and the fp32 state at ``state_ptrs``
    — the LSTM's c_{t-1} and c_t (B·H after it), a GRU's h_{t-1} (returned twice: it has no second).
    Returns (four gate tiles, previous state, current state) for ``lstm_step_grads`` / ``gru_step_grads``."""
    x_a = tl.load(gate_ptrs, mask=mask_bh, other=0.0)
    x_b = tl.load(gate_ptrs + H, mask=mask_bh, other=0.0)
    x_c = tl.load(gate_ptrs + 2 * H, mask=mask_bh, other=0.0)
    x_d = tl.load(gate_ptrs + 3 * H, mask=mask_bh, other=0.0)
    if CELL == "gru":
        prev = tl.load(state_ptrs, mask=mask_bh, other=0.0)
        now = prev
    else:
        now = tl.load(state_ptrs + B * H, mask=mask_bh, other=0.0)
        prev = tl.load(state_ptrs, mask=mask_bh, other=0.0)
    return x_a, x_b, x_c, x_d, prev, now


@triton.jit
def lstm_step_grads(dh, dc, x_i, x_f, x_g, x_o, c_prev, c, w_ch_ptr, offs_h, mask_h, H: tl.constexpr,
                    PEEPHOLE: tl.constexpr):
    """The LSTM cell's step backward on one tile: from dh_t and the carried dc_t, the pre-activation gate
    gradients (dI, dF, dG, dO) and dc_{t-1}. ``x_*``: the step's saved activations (i, f, g, o), ``c_prev``
    and ``c``: c_{t-1} and c_t (``load_step_operands``)."""
    i = x_i.to(tl.float32)
    f = x_f.to(tl.float32)
    g = x_g.to(tl.float32)
    o = x_o.to(tl.float32)
    tanh_c = tanh(c)
    d_o = dh * tanh_c * o * (1.0 - o)
    dc_cell = dc + dh * o * (1.0 - tanh_c * tanh_c)
    if PEEPHOLE:
        # Loaded where used, every step (L1 hits): held across the loop they spilled (Triton 3.6, 64 × 64).
        dc_cell += d_o * tl.load(w_ch_ptr + 2 * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    d_i = dc_cell * g * i * (1.0 - i)
    d_f = dc_cell * c_prev * f * (1.0 - f)
    d_g = dc_cell * i * (1.0 - g * g)
    dc_prev = dc_cell * f
    if PEEPHOLE:
        dc_prev += (d_i * tl.load(w_ch_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
                    + d_f * tl.load(w_ch_ptr + H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :])
    return d_i, d_f, d_g, d_o, dc_prev


@triton.jit
def gru_step_grads(dh, x_r, x_z, x_n, x_hn, h_prev):
    """The GRU cell's step backward on one tile, h' = n + z ⊙ (h − n) with n = tanh(x_n + r ⊙ hn): from the
    whole gradient dh of h_t, the four dG columns (dR, dZ, dN, dN ⊙ r) — pre-activation gradients, the
    last one the n gate's on the recurrent side (what W_hn and b_hn see) — and z ⊙ dh, the gradient
    reaching h_{t-1} directly. ``x_*``: the step's saved (r, z, n, hn); ``h_prev``: fp32 h_{t-1}
    (``load_step_operands``)."""
    r = x_r.to(tl.float32)
    z = x_z.to(tl.float32)
    n = x_n.to(tl.float32)
    hn = x_hn.to(tl.float32)
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    d_z = dh * (h_prev - n) * z * (1.0 - z)
    d_r = d_n * hn * r * (1.0 - r)
    return d_r, d_z, d_n, d_n * r, dh * z
