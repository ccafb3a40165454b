"""A bidirectional GRU layer as one op: ``bidirectional.py``'s design with the GRU cell. Both directions'
forward in one persistent launch (``lstm_fwd_bidirectional`` with b_hn), both directions' backward chain in
one (``lstm_bwd_bidirectional_gate_grads`` with ``cell="gru"``), then each direction's GEMMs. Where the
launch cannot run (no plan, a grid that does not fit, the reference backward) the directions run one after
the other on reversed views, through the one-direction GRU ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triton_lstm.bidirectional import (
    _split,
    add_in_time_order,
    backward_inputs,
    each_direction_backward,
    in_step_order,
    one_direction_at_a_time,
    projections_in_step_order,
)
from triton_lstm.gru_ops import run_gru_layer
from triton_lstm.ops import (
    HAS_TRITON,
    differentiate,
    gates_for_backward,
    grad_wanted,
    kernel_device,
    run_without_autocast,
    uses_kernels,
)
from triton_lstm.reference import accumulate_dtype, gru_projection_bias

if HAS_TRITON:
    from triton_lstm.kernels.common import unless_refused
    from triton_lstm.kernels.gru import hidden_bias_n
    from triton_lstm.kernels.lstm_bwd_whole_module import lstm_bwd_bidirectional_gate_grads
    from triton_lstm.kernels.lstm_fwd_bidirectional import lstm_fwd_bidirectional, plan_bidirectional_for
    from triton_lstm.kernels.weight_grads import gru_weight_and_input_grads, input_gradient


def _one_by_one(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save, kernels: bool):
    """What the kernel computes, one direction after the other: the one-direction Triton forward with
    ``kernels``, else the plain-PyTorch recurrence (differentiable: the double backward differentiates it)."""

    def run_direction(direction, layer_x):
        bias = (b_ih[direction], b_hh[direction]) if b_ih else (None, None)
        return run_gru_layer(layer_x, h0[direction], w_ih[direction], w_hh[direction], *bias, lengths, save, kernels)

    return one_direction_at_a_time(x, lengths, run_direction)


@torch.library.custom_op("triton_lstm::gru_bidirectional_fwd", mutates_args=())
def gru_bidirectional_fwd(
    x: Tensor,
    h0: Tensor,
    w_ih: list[Tensor],
    w_hh: list[Tensor],
    b_ih: list[Tensor],
    b_hh: list[Tensor],
    lengths: Tensor | None,
    save: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward of both directions of a GRU layer: ``(out, h_all, state_all, gates)``, out (T, B, 2H) in time
    order (zero past each sequence's end), the rest per direction and step-indexed: (2, T+1, B, H),
    (2, T+1, B, H) fp32 and (2, T, B, 4H); ``save`` 0: state_all (2, 1, B, H), gates (2, 0, B, 4H). ``h0``
    is (2, B, H); ``w_*``/``b_*`` (forward, reverse), the biases empty lists without them."""
    if not uses_kernels(x):
        return _one_by_one(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save, kernels=False)
    lengths = None if lengths is None else lengths.to(torch.int32)
    plan = plan_bidirectional_for(x, w_hh[0].shape[1], gates=3)
    with kernel_device(x):
        if plan.persistent:
            biases = [gru_projection_bias(b_ih[d], b_hh[d]) if b_ih else None for d in range(2)]
            projected = projections_in_step_order(x, w_ih, biases, lengths, h0.shape[-1], bool(save))
            b_hn = torch.stack([hidden_bias_n(b_hh[d] if b_hh else None, w_hh[d]) for d in range(2)])
            outputs = unless_refused(lambda: lstm_fwd_bidirectional(projected, h0.contiguous(), h0.contiguous(),
                                                                    torch.stack(w_hh), lengths, plan, bool(save),
                                                                    b_hn=b_hn, reuse_projected=True))
            if outputs is not None:
                return outputs
        return _one_by_one(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save, kernels=True)


@gru_bidirectional_fwd.register_fake
def _gru_bidirectional_fwd_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save=1):
    T, B = x.shape[0], x.shape[1]
    H = w_hh[0].shape[1]
    state_all = x.new_empty(2, T + 1 if save else 1, B, H, dtype=accumulate_dtype(x.dtype))
    return x.new_empty(T, B, 2 * H), x.new_empty(2, T + 1, B, H), state_all, x.new_empty(2, T if save else 0, B, 4 * H)


run_without_autocast("gru_bidirectional_fwd")


class GRUBidirectional(torch.autograd.Function):
    """out, h_n of a bidirectional GRU layer; ``weights`` are (w_ih, w_hh[, b_ih, b_hh]) per direction."""

    @staticmethod
    def forward(ctx, x, h0, lengths, use_reference, has_bias, *weights):
        w_ih, w_hh, b_ih, b_hh, _ = _split(has_bias, weights)
        out, h_all, state_all, gates = torch.ops.triton_lstm.gru_bidirectional_fwd(x, h0, w_ih, w_hh, b_ih, b_hh,
                                                                                    lengths, 1)
        ctx.save_for_backward(x, h0, lengths, h_all, state_all, gates, *weights)
        ctx.use_reference, ctx.has_bias = use_reference, has_bias
        return out, h_all[:, -1].clone()

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        x, h0, lengths, h_all, state_all, gates, *weights = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad_out, grad_h_n)
        w_ih, w_hh, b_ih, b_hh, _ = _split(ctx.has_bias, weights)
        H = w_hh[0].shape[1]
        grad_out, index = backward_inputs(x, lengths, grad_out)
        if uses_kernels(x) and not ctx.use_reference:
            gates, overwrite = gates_for_backward(ctx, x, gates, lambda: torch.ops.triton_lstm.gru_bidirectional_fwd(
                x, h0, w_ih, w_hh, b_ih, b_hh, lengths, 1)[3])
            with kernel_device(x), torch.autocast(x.device.type, enabled=False):
                grads = _fused_backward(x, lengths, index, h_all, state_all, gates, w_ih, w_hh, ctx.has_bias, grad_out,
                                        grad_h_n, overwrite_gates=overwrite)
            if grads is not None:
                return (grads[0], grads[1], None, None, None, *grads[2:])

        def backward_direction(direction, layer_x, layer_grad):
            return torch.ops.triton_lstm.gru_recurrence_bwd(layer_grad, grad_h_n[direction], layer_x, w_ih[direction],
                                                             w_hh[direction], gates[direction], h_all[direction],
                                                             state_all[direction], lengths, ctx.use_reference)

        grad_x, per_direction = each_direction_backward(x, grad_out, index, H, backward_direction)
        grad_weights = [grad for grads in per_direction for grad in (grads[2:] if ctx.has_bias else grads[2:4])]
        return (grad_x, torch.stack([grads[1] for grads in per_direction]), None, None, None, *grad_weights)


def _fused_backward(x, lengths, index, h_all, state_all, gates, w_ih, w_hh, has_bias, grad_out, grad_h_n,
                    overwrite_gates=False):
    """Both directions' chains in one launch, then each direction's GEMMs (the reverse direction's against x
    reversed: ``bidirectional.in_step_order``). None where
    the launch cannot run. Returns the gradients of x, h0 and the directions' weights. ``overwrite_gates``:
    dG takes the gates' place (as ``lstm_bwd_bidirectional_gate_grads``'s)."""
    lengths32 = None if lengths is None else lengths.to(device=x.device, dtype=torch.int32)
    chain = lstm_bwd_bidirectional_gate_grads(grad_out, grad_h_n, torch.zeros_like(grad_h_n),
                                              torch.stack(w_hh).contiguous(), lengths32, gates, state_all, cell="gru",
                                              overwrite_gates=overwrite_gates)
    if chain is None:
        return None
    grad_gates, grad_h0, _ = chain
    grad_x, grad_weights = None, []
    for direction in range(2):
        # The input gradient first, then x in step order for W_ih's: one T·B·I buffer at a time beside grad_x.
        grad_x = add_in_time_order(grad_x, input_gradient(grad_gates[direction], w_ih[direction]), direction, index)
        layer_x, h_prev = in_step_order(x, h_all, direction, index)
        _, *weight_grads = gru_weight_and_input_grads(grad_gates[direction], layer_x, h_prev, w_ih[direction],
                                                      w_hh[direction], input_grad=False)
        del layer_x
        grad_weights += weight_grads if has_bias else weight_grads[:2]
    return (grad_x, grad_h0.to(x.dtype), *grad_weights)


def _differentiable_backward(ctx, grad_out, grad_h_n):
    x, h0, lengths, _, _, _, *weights = ctx.saved_tensors

    def outputs():
        w_ih, w_hh, b_ih, b_hh, _ = _split(ctx.has_bias, weights)
        out, h_all, _, _ = _one_by_one(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, 1, kernels=False)
        return out, h_all[:, -1]

    needed = (*ctx.needs_input_grad[:2], *ctx.needs_input_grad[5:])
    grads = differentiate(outputs, (x, h0, *weights), needed, (grad_out, grad_h_n))
    return (*grads[:2], None, None, None, *grads[2:])


def gru_bidirectional(x: Tensor, h0: Tensor, forward_weights, reverse_weights, lengths: Tensor | None, *,
                      backward: str = "fused"):
    """A bidirectional GRU layer over time-major ``x``: returns (out (T, B, 2H), h_n (2, B, H)).
    ``*_weights``: (w_ih, w_hh, b_ih, b_hh) per direction, biases None or both set."""
    has_bias = forward_weights[2] is not None
    weights = [w for ws in (forward_weights, reverse_weights) for w in (ws if has_bias else ws[:2])]
    if not grad_wanted(x, h0, *weights):
        # An inference forward: no per-step gates or states are kept.
        w_ih, w_hh, b_ih, b_hh, _ = _split(has_bias, weights)
        out, h_all, _, _ = torch.ops.triton_lstm.gru_bidirectional_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, 0)
        return out, h_all[:, -1].clone()
    return GRUBidirectional.apply(x, h0, lengths, int(backward == "reference"), has_bias, *weights)
