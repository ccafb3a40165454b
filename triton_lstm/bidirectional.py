"""A bidirectional layer as one op: both directions' forward in one persistent launch
(``kernels/lstm_fwd_bidirectional.py``), and both directions' backward chain in one
(``lstm_bwd_bidirectional_gate_grads``), then each direction's GEMMs.

``lstm_bidirectional`` is what ``LSTM.forward`` calls for each bidirectional layer when
``bidirectional_plan`` says the kernel applies; otherwise the module runs each direction on its own as
before (``reverse_time`` flips the input and the output of the reverse direction). The op returns the
layer's output (T, B, 2H) in time order and each direction's ``(h_all, c_all, gates)`` step-indexed:
those of the reverse direction are a one-direction layer's over the reversed sequence, so where the
fused backward cannot run (the reference backward, a grid that does not fit) each direction's backward
is ``recurrence_bwd`` on reversed views of x and of the output gradient. With projections (proj_size > 0)
the same launches run in m_t on merged weights (``kernels/lstm_projection.py``): the output is then
(T, B, 2P) and h_all holds the projected h.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triton_lstm.ops import (
    HAS_TRITON,
    differentiate,
    gates_for_backward,
    grad_wanted,
    kernel_device,
    run_lstm_layer,
    run_without_autocast,
    uses_kernels,
)
from triton_lstm.reference import accumulate_dtype, input_projection, projection_bias

if HAS_TRITON:
    from triton_lstm.kernels.common import unless_refused
    from triton_lstm.kernels.lstm_bwd_whole_module import lstm_bwd_bidirectional_gate_grads
    from triton_lstm.kernels.lstm_fwd_bidirectional import lstm_fwd_bidirectional, plan_bidirectional_for
    from triton_lstm.kernels.lstm_projection import (
        cell_outputs,
        gradients_at_m,
        lstmp_fwd_bidirectional,
        merged_recurrent_weight,
        projection_grads,
    )
    from triton_lstm.kernels.weight_grads import input_gradient, peephole_weight_grads, weight_and_input_grads


def reverse_time(x: Tensor, reverse_index: Tensor | None) -> Tensor:
    """Reverses each sequence in time, within its own length when the batch is packed."""
    if reverse_index is None:
        return x.flip(0)
    return x.gather(0, reverse_index[:, :, None].expand_as(x))


def reverse_index(lengths: Tensor, T: int) -> Tensor:
    """For ``reverse_time``: step t of sequence b reads step lengths[b]-1-t; steps past the end stay."""
    steps = torch.arange(T, device=lengths.device)[:, None]
    reversed_steps = lengths[None, :] - 1 - steps
    return torch.where(reversed_steps >= 0, reversed_steps, steps)


def projections_in_step_order(x: Tensor, w_ih: list[Tensor], biases: list[Tensor | None], lengths: Tensor | None,
                              H: int, save: bool) -> Tensor:
    """Both directions' input projections x·W_ihᵀ + bias (``biases``: what each direction's adds, or None),
    (2, T, B, ·), as the bidirectional kernel reads them (``lstm_fwd_bidirectional``): each in the order its
    recurrence runs — the reverse direction's formed from x reversed within each sequence — and laid out
    as the forward kernels read a projection (``in_gate_layout``): in a training forward (``save``) in the
    directions' gate buffer (2, T, B, 4H), for the gates to take over. Two GEMMs rather than one over both
    directions' weights: no (T, B, 8H) projection in time order beside the gates, only x reversed
    (T·B·I) while the second runs."""
    T, B = x.shape[0], x.shape[1]
    width = 4 * H if save else w_ih[0].shape[0]
    projected = x.new_empty(2, T, B, width)
    index = None if lengths is None else reverse_index(lengths.to(x.device, torch.int64), T)
    for direction in range(2):
        layer_x = x if direction == 0 else reverse_time(x, index)
        input_projection(layer_x, w_ih[direction], biases[direction], None, out=projected[direction])
    return projected


def _valid_steps(lengths: Tensor | None, T: int, device) -> Tensor | None:
    """(T, B, 1) True where step t of sequence b exists; None without lengths."""
    if lengths is None:
        return None
    return (torch.arange(T, device=device)[:, None] < lengths.to(device)[None, :])[:, :, None]


def bidirectional_plan(x: Tensor, hidden_size: int, gates: int = 4):
    """The bidirectional kernel's plan for this input, or None where the kernels do not run (the CPU
    path, torch.compile and torch.func, whose graphs keep one node per direction). "meta" tensors (shape
    inference, ``saved_activation_bytes``) take the kernels' path, as the interpreter would plan it.
    ``gates`` 3: a GRU layer (``gru_bidirectional.py``)."""
    if not HAS_TRITON or not (uses_kernels(x) or x.device.type == "meta"):
        return None
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    plan = plan_bidirectional_for(x, hidden_size, gates)
    return plan if plan.persistent else None


def one_direction_at_a_time(x: Tensor, lengths: Tensor | None, run_direction):
    """A bidirectional layer's forward op run one direction after the other: ``run_direction(direction,
    layer_x)`` returns that direction's (h_all, state, gates) over ``layer_x`` (the reverse direction's
    input reversed within each sequence's length). Returns the op's outputs: the layer's output (T, B, 2H)
    in time order, zero past each sequence's end as the kernel leaves it, and the directions' stacked."""
    T = x.shape[0]
    index = None if lengths is None else reverse_index(lengths.to(x.device, torch.int64), T)
    results = [run_direction(direction, x if direction == 0 else reverse_time(x, index)) for direction in range(2)]
    out = torch.cat([results[0][0][1:], reverse_time(results[1][0][1:], index)], dim=2)
    valid = _valid_steps(lengths, T, x.device)
    if valid is not None:
        out = out * valid
    return (out, *(torch.stack(parts) for parts in zip(*results)))


def _one_by_one(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save, kernels: bool, w_ch=None):
    """What the kernel computes, one direction after the other: with ``kernels`` the one-direction Triton
    forward (the kernel's fallback), else the plain-PyTorch recurrence (the reference path, differentiable:
    the double backward differentiates it)."""

    def run_direction(direction, layer_x):
        bias = (b_ih[direction], b_hh[direction]) if b_ih else (None, None)
        return run_lstm_layer(layer_x, h0[direction], c0[direction], w_ih[direction], w_hh[direction], *bias, lengths,
                              save, kernels, None if w_ch is None else w_ch[direction],
                              w_hr[direction] if w_hr else None)

    return one_direction_at_a_time(x, lengths, run_direction)


@torch.library.custom_op("triton_lstm::bidirectional_fwd", mutates_args=())
def bidirectional_fwd(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: list[Tensor],
    w_hh: list[Tensor],
    b_ih: list[Tensor],
    b_hh: list[Tensor],
    w_hr: list[Tensor],
    lengths: Tensor | None,
    save: int = 1,
    w_ch: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward of both directions of a layer: ``(out, h_all, c_all, gates)``, out (T, B, 2P) in time order
    (zero past each sequence's end), the rest per direction and step-indexed: (2, T+1, B, P),
    (2, T+1, B, H) and (2, T, B, 4H); ``save`` 0: c_all (2, 1, B, H), gates (2, 0, B, 4H). ``h0`` is
    (2, B, P), ``c0`` (2, B, H); ``w_*``/``b_*`` (forward, reverse), the biases empty lists without them and
    so is ``w_hr`` without a projection (P = H then); ``w_ch`` (2, 3H) the peephole weights or None."""
    if not uses_kernels(x):
        return _one_by_one(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save, kernels=False, w_ch=w_ch)
    lengths = None if lengths is None else lengths.to(torch.int32)
    plan = plan_bidirectional_for(x, w_hh[0].shape[0] // 4)
    with kernel_device(x):
        if plan.persistent:
            biases = [projection_bias(b_ih[d], b_hh[d]) if b_ih else None for d in range(2)]
            projected = projections_in_step_order(x, w_ih, biases, lengths, c0.shape[-1], bool(save))
            if w_hr:
                # A projection: the same launch in m_t (kernels/lstm_projection.py).
                outputs = unless_refused(lambda: lstmp_fwd_bidirectional(
                    projected, h0.contiguous(), c0.contiguous(), torch.stack(w_hh), torch.stack(w_hr), lengths, plan,
                    bool(save)))
            else:
                outputs = unless_refused(lambda: lstm_fwd_bidirectional(
                    projected, h0.contiguous(), c0.contiguous(), torch.stack(w_hh), lengths, plan, bool(save),
                    None if w_ch is None else w_ch.contiguous(), reuse_projected=True))
            if outputs is not None:
                return outputs
        return _one_by_one(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save, kernels=True, w_ch=w_ch)


@bidirectional_fwd.register_fake
def _bidirectional_fwd_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save=1, w_ch=None):
    T, B = x.shape[0], x.shape[1]
    H = w_hh[0].shape[0] // 4
    P = w_hr[0].shape[0] if w_hr else H
    out = x.new_empty(T, B, 2 * P)
    h_all = x.new_empty(2, T + 1, B, P)
    c_all = x.new_empty(2, T + 1 if save else 1, B, H, dtype=accumulate_dtype(x.dtype))
    gates = x.new_empty(2, T if save else 0, B, 4 * H)
    return out, h_all, c_all, gates


run_without_autocast("bidirectional_fwd")


def _split(has_bias: bool, weights, has_projection: bool = False):
    """(w_ih, w_hh, b_ih, b_hh, w_hr), each a list (forward, reverse), from ``weights``: (w_ih, w_hh[, b_ih,
    b_hh][, w_hr]) per direction; the biases and w_hr empty lists where there are none."""
    per_direction = 2 + 2 * has_bias + has_projection
    forward, reverse = weights[:per_direction], weights[per_direction:]
    w_ih, w_hh = [forward[0], reverse[0]], [forward[1], reverse[1]]
    b_ih = [forward[2], reverse[2]] if has_bias else []
    b_hh = [forward[3], reverse[3]] if has_bias else []
    w_hr = [forward[-1], reverse[-1]] if has_projection else []
    return w_ih, w_hh, b_ih, b_hh, w_hr


class LSTMBidirectional(torch.autograd.Function):
    """out, h_n, c_n of a bidirectional layer; ``weights`` are (w_ih, w_hh[, b_ih, b_hh][, w_hr]) per
    direction, ``w_ch`` the (2, 3H) peephole weights or None."""

    @staticmethod
    def forward(ctx, x, h0, c0, lengths, use_reference, has_bias, has_projection, w_ch, *weights):
        w_ih, w_hh, b_ih, b_hh, w_hr = _split(has_bias, weights, has_projection)
        out, h_all, c_all, gates = torch.ops.triton_lstm.bidirectional_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                                                           lengths, 1, w_ch)
        ctx.save_for_backward(x, h0, c0, lengths, h_all, c_all, gates, w_ch, *weights)
        ctx.use_reference, ctx.has_bias, ctx.has_projection = use_reference, has_bias, has_projection
        return out, h_all[:, -1].clone(), c_all[:, -1].to(x.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad_out, grad_h_n, grad_c_n):
        x, h0, c0, lengths, h_all, c_all, gates, w_ch, *weights = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad_out, grad_h_n, grad_c_n)
        w_ih, w_hh, b_ih, b_hh, w_hr = _split(ctx.has_bias, weights, ctx.has_projection)
        grad_out, index = backward_inputs(x, lengths, grad_out)
        if uses_kernels(x) and not ctx.use_reference:
            gates, overwrite = gates_for_backward(ctx, x, gates, lambda: torch.ops.triton_lstm.bidirectional_fwd(
                x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, 1, w_ch)[3])
            with kernel_device(x), torch.autocast(x.device.type, enabled=False):
                grads = _fused_backward(x, lengths, index, h_all, c_all, gates, w_ih, w_hh, ctx.has_bias, grad_out,
                                        grad_h_n, grad_c_n, w_ch, w_hr, overwrite_gates=overwrite)
            if grads is not None:
                return (grads[0], grads[1], grads[2], None, None, None, None, grads[3], *grads[4:])

        def backward_direction(direction, layer_x, layer_grad):
            return torch.ops.triton_lstm.recurrence_bwd(
                layer_grad, grad_h_n[direction], grad_c_n[direction], layer_x, w_ih[direction], w_hh[direction],
                w_hr[direction] if w_hr else None, gates[direction], h_all[direction], c_all[direction], lengths,
                ctx.use_reference, None if w_ch is None else w_ch[direction],
            )

        grad_x, per_direction = each_direction_backward(x, grad_out, index, h_all.shape[-1], backward_direction)
        grad_weights = []
        for grads in per_direction:
            grad_weights += [grads[3], grads[4]]
            if ctx.has_bias:
                grad_weights += [grads[5], grads[5].clone()]  # each bias owns its gradient tensor
            if ctx.has_projection:
                grad_weights += [grads[6]]
        grad_h0, grad_c0, grad_w_ch = (torch.stack([grads[i] for grads in per_direction]) for i in (1, 2, 7))
        return (grad_x, grad_h0, grad_c0, None, None, None, None, grad_w_ch if w_ch is not None else None,
                *grad_weights)


def backward_inputs(x: Tensor, lengths: Tensor | None, grad_out: Tensor) -> tuple[Tensor, Tensor | None]:
    """What a bidirectional layer's backward starts from: the output gradient zeroed past each sequence's
    end (the output is 0 there: no gradient flows), and ``reverse_index`` for the reverse direction (None
    without lengths)."""
    T = x.shape[0]
    valid = _valid_steps(lengths, T, x.device)
    if valid is not None:
        grad_out = grad_out * valid
    return grad_out, None if lengths is None else reverse_index(lengths.to(x.device, torch.int64), T)


def each_direction_backward(x: Tensor, grad_out: Tensor, index: Tensor | None, width: int, backward_direction):
    """A bidirectional layer's backward one direction after the other, on reversed views (each direction's
    output ``width`` columns of ``grad_out``):
    ``backward_direction(direction, layer_x, layer_grad)`` returns that direction's gradients, grad_x first,
    as a one-direction layer's backward does over ``layer_x`` (the reverse direction's input reversed within
    each sequence's length) for its output gradient ``layer_grad``. Returns (grad_x in time order, summed
    over the directions, and each direction's gradients)."""
    grad_x, per_direction = None, []
    for direction in range(2):
        layer_x = x if direction == 0 else reverse_time(x, index)
        layer_grad = grad_out[..., direction * width:(direction + 1) * width]
        layer_grad = layer_grad if direction == 0 else reverse_time(layer_grad, index)
        grads = backward_direction(direction, layer_x, layer_grad.contiguous())
        direction_grad_x = grads[0] if direction == 0 else reverse_time(grads[0], index)
        grad_x = direction_grad_x if grad_x is None else grad_x + direction_grad_x
        per_direction.append(grads)
    return grad_x, per_direction


def _fused_backward(x, lengths, index, h_all, c_all, gates, w_ih, w_hh, has_bias, grad_out, grad_h_n, grad_c_n,
                    w_ch=None, w_hr=(), overwrite_gates=False):
    """Both directions' gate gradients in one launch (``lstm_bwd_bidirectional_gate_grads``), then each
    direction's GEMMs, the reverse direction's on its step-indexed dG against x reversed (``in_step_order``).
    None where the launch cannot run (the caller goes direction by direction). Returns the gradients of
    x, h0, c0, the peephole weights (None without) and the directions' weights. With ``w_hr`` (a
    projection) the chain runs in m_t on the merged weights (``kernels/lstm_projection.py``).
    ``overwrite_gates``: dG takes the gates' place (as ``lstm_bwd_bidirectional_gate_grads``'s)."""
    lengths32 = None if lengths is None else lengths.to(device=x.device, dtype=torch.int32)
    chain_w, chain_grad_out, chain_grad_h_n = torch.stack(w_hh), grad_out, grad_h_n
    if w_hr:
        P = w_hr[0].shape[0]
        at_m = [gradients_at_m(grad_out[..., d * P:(d + 1) * P], grad_h_n[d], w_hr[d]) for d in range(2)]
        chain_grad_out = torch.cat([grad_m for grad_m, _ in at_m], dim=2)
        chain_grad_h_n = torch.stack([grad_m_n for _, grad_m_n in at_m])
        chain_w = merged_recurrent_weight(chain_w, torch.stack(w_hr))
    m_all = cell_outputs(gates, c_all) if w_hr else None  # (W_hr's gradients, before dG may overwrite the gates)
    chain = lstm_bwd_bidirectional_gate_grads(chain_grad_out, chain_grad_h_n, grad_c_n, chain_w.contiguous(),
                                              lengths32, gates, c_all, None if w_ch is None else w_ch.contiguous(),
                                              overwrite_gates=overwrite_gates)
    if chain is None:
        return None
    grad_gates, grad_h0, grad_c0 = chain
    if w_hr:
        grad_h0 = torch.empty(2, *h_all.shape[-2:], dtype=torch.float32, device=x.device)
    grad_x, grad_weights = None, []
    for direction in range(2):
        # The input gradient first, then x in step order for W_ih's: one T·B·I buffer at a time beside grad_x.
        grad_x = add_in_time_order(grad_x, input_gradient(grad_gates[direction], w_ih[direction]), direction, index)
        layer_x, h_prev = in_step_order(x, h_all, direction, index)
        _, grad_w_ih, grad_w_hh, grad_bias = weight_and_input_grads(grad_gates[direction], layer_x, h_prev,
                                                                    w_ih[direction], input_grad=False)
        del layer_x
        grad_weights += [grad_w_ih, grad_w_hh.to(w_hh[direction].dtype)]
        if has_bias:
            grad_weights += [grad_bias, grad_bias.clone()]  # each bias owns its gradient tensor
        if w_hr:
            # Step-indexed, as the chain ran: the reverse direction's output gradient reversed in time.
            direction_grad_out = grad_out[..., direction * P:(direction + 1) * P]
            if direction == 1:
                direction_grad_out = reverse_time(direction_grad_out, index)
            grad_w_hr, grad_h0[direction] = projection_grads(
                direction_grad_out, grad_h_n[direction], grad_gates[direction], w_hh[direction], w_hr[direction],
                m_all[direction], lengths32)
            grad_weights.append(grad_w_hr)
    grad_w_ch = None
    if w_ch is not None:
        # Step-indexed dG and c of each direction pair up as they are: no reordering needed.
        grad_w_ch = peephole_weight_grads(grad_gates, c_all).to(w_ch.dtype)
    return (grad_x, grad_h0.to(x.dtype), grad_c0.to(x.dtype), grad_w_ch, *grad_weights)


def in_step_order(x: Tensor, h_all: Tensor, direction: int, index: Tensor | None) -> tuple[Tensor, Tensor]:
    """A direction's input in the order its chain ran, and its h_0 … h_{T-1} (step-indexed, stacked per
    direction), for the weight GEMMs against its step-indexed dG: the reverse direction's x reversed within
    each sequence (T·B·I), rather than its dG (T·B·4H) and h put in time order. Rows past a sequence's end
    stay where they are and meet dG = 0. The input gradient these rows give is step-ordered too
    (``add_in_time_order``)."""
    return (x if direction == 0 else reverse_time(x, index)), h_all[direction, :-1]


def add_in_time_order(grad_x: Tensor | None, direction_grad_x: Tensor, direction: int, index: Tensor | None) -> Tensor:
    """The input gradient summed over the directions so far: ``grad_x`` (None before the first) plus this
    direction's step-ordered one (``in_step_order``) in time order, added row by row where each row belongs
    (``index_add_``: no reversed copy; each row of ``grad_x`` receives one, so the sum is deterministic)."""
    if grad_x is None:
        return direction_grad_x if direction == 0 else reverse_time(direction_grad_x, index)
    if direction == 0:
        return grad_x.add_(direction_grad_x)
    T, B, width = grad_x.shape
    if index is None:  # every sequence T long
        index = reverse_index(torch.full((B,), T, device=grad_x.device), T)
    rows = (index * B + torch.arange(B, device=grad_x.device)).reshape(T * B)  # reverse_time is its own inverse
    grad_x.view(T * B, width).index_add_(0, rows, direction_grad_x.reshape(T * B, width))
    return grad_x


def _differentiable_backward(ctx, grad_out, grad_h_n, grad_c_n):
    x, h0, c0, lengths, _, _, _, w_ch, *weights = ctx.saved_tensors

    def outputs():
        w_ih, w_hh, b_ih, b_hh, w_hr = _split(ctx.has_bias, weights, ctx.has_projection)
        out, h_all, c_all, _ = _one_by_one(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, 1, kernels=False,
                                           w_ch=w_ch)
        return out, h_all[:, -1], c_all[:, -1].to(x.dtype)

    needed = (*ctx.needs_input_grad[:3], *ctx.needs_input_grad[7:])
    grads = differentiate(outputs, (x, h0, c0, w_ch, *weights), needed, (grad_out, grad_h_n, grad_c_n))
    return (*grads[:3], None, None, None, None, *grads[3:])


def lstm_bidirectional(x: Tensor, h0: Tensor, c0: Tensor, forward_weights, reverse_weights, lengths: Tensor | None, *,
                       backward: str = "fused", w_ch: Tensor | None = None):
    """A bidirectional layer over time-major ``x``: returns (out (T, B, 2P), h_n (2, B, P), c_n (2, B, H)).
    ``*_weights``: (w_ih, w_hh, b_ih, b_hh[, w_hr]) per direction, biases None or both set, w_hr None or
    absent without a projection (P = H); ``w_ch``: the directions' peephole weights stacked, (2, 3H), or
    None."""
    has_bias = forward_weights[2] is not None
    has_projection = len(forward_weights) > 4 and forward_weights[4] is not None
    weights = [w for ws in (forward_weights, reverse_weights)
               for w in (*ws[:4 if has_bias else 2], *ws[4:5 if has_projection else 4])]
    if not grad_wanted(x, h0, c0, w_ch, *weights):
        # An inference forward: no per-step gates or c are kept.
        w_ih, w_hh, b_ih, b_hh, w_hr = _split(has_bias, weights, has_projection)
        out, h_all, c_all, _ = torch.ops.triton_lstm.bidirectional_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                                                       lengths, 0, w_ch)
        return out, h_all[:, -1].clone(), c_all[:, -1].to(x.dtype, copy=True)
    return LSTMBidirectional.apply(x, h0, c0, lengths, int(backward == "reference"), has_bias, has_projection, w_ch,
                                   *weights)
