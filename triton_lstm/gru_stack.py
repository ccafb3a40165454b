"""A stack of unidirectional GRU layers as one op: ``stack.py``'s design with the GRU cell. The forward in
one persistent launch (the wavefront kernel with ``CELL="gru"``: layer l > 0 forms its input product in the
kernel, keeping the n gate's input and recurrent products apart), the backward's chain in one launch too
(``lstm_bwd_stack_gate_grads`` with ``cell="gru"``: layer l's gradient of h_t is dG^{l+1}_t's x side times
W_ih^{l+1}), then each layer's weight GEMMs. Where the launches cannot run (no plan, a grid that does not
fit, the reference backward) the layers run one after another through the one-layer GRU ops.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

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
from triton_lstm.stack import (
    _split_weights,
    dropout_masks,
    dropped_input,
    each_layer_backward,
    fused_input_stack,
    one_layer_at_a_time,
)

if HAS_TRITON:
    from triton_lstm.kernels.common import unless_refused
    from triton_lstm.kernels.gru import hidden_bias_n
    from triton_lstm.kernels.lstm_bwd_whole_module import lstm_bwd_stack_gate_grads
    from triton_lstm.kernels.lstm_fwd_stack import lstm_fwd_stack, plan_stack_for, projection_in_gates
    from triton_lstm.kernels.weight_grads import gru_weight_and_input_grads


def _layer_by_layer(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save, kernels: bool, dropout=None):
    """What the stacked kernel computes, one layer after another (``run_gru_layer``)."""

    def run_layer(layer, layer_input):
        bias = (b_ih[layer], b_hh[layer]) if b_ih else (None, None)
        return run_gru_layer(layer_input, h0[layer], w_ih[layer], w_hh[layer], *bias, lengths, save, kernels)

    return one_layer_at_a_time(x, len(w_hh), run_layer, dropout)


@torch.library.custom_op("triton_lstm::gru_stack_fwd", mutates_args=())
def gru_stack_fwd(
    x: Tensor,
    h0: Tensor,
    w_ih: list[Tensor],
    w_hh: list[Tensor],
    b_ih: list[Tensor],
    b_hh: list[Tensor],
    lengths: Tensor | None,
    save: int = 1,
    dropout_mask: Tensor | None = None,
    dropout_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of L unidirectional GRU layers: ``(h_all, state_all, gates)`` stacked over layers,
    (L, T+1, B, H), (L, T+1, B, H) fp32 and (L, T, B, 4H); ``save`` 0 (inference): state_all (L, 1, B, H),
    gates (L, 0, B, 4H). ``h0`` is (L, B, H); ``b_ih``/``b_hh`` empty lists without biases;
    ``dropout_mask`` and ``dropout_scale``: dropout between layers (``stack.dropout_masks``), or None."""
    dropout = None if dropout_mask is None else (dropout_mask, dropout_scale)
    if not uses_kernels(x):
        return _layer_by_layer(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save, kernels=False, dropout=dropout)
    lengths = None if lengths is None else lengths.to(torch.int32)
    plan = plan_stack_for(x, w_hh[0].shape[1], len(w_hh), dropout=dropout is not None)
    if plan.persistent:
        b_hn = torch.stack([hidden_bias_n(b_hh[layer] if b_hh else None, w_hh[layer]) for layer in range(len(w_hh))])
        # Per layer, what its input product adds: b_ih + (b_hr, b_hz, 0).
        bias = torch.stack([gru_projection_bias(b_ih[i], b_hh[i]) for i in range(len(b_ih))]) if b_ih else None
        if plan.fused_input and dropout is None:
            outputs = fused_input_stack(x, h0, h0, w_ih, w_hh, bias, lengths, plan, save, b_hn=b_hn)
            if outputs is not None:
                return outputs
            plan = dataclasses.replace(plan, fused_input=False)
        # Layer 0's projection where its gates go (no separate T·B·3H buffer while the launch runs).
        projected, buffers = projection_in_gates(x, w_ih[0], None if bias is None else bias[0], h0, h0, bool(save))
        bias_above = None if bias is None else bias[1:]
        with kernel_device(x):
            outputs = unless_refused(lambda: lstm_fwd_stack(projected, h0.contiguous(), h0.contiguous(),
                                                            torch.stack(w_hh), torch.stack(w_ih[1:]), bias_above,
                                                            lengths, plan, bool(save), b_hn=b_hn, dropout=dropout,
                                                            outputs=buffers))
        if outputs is not None:
            return outputs
    with kernel_device(x):  # no plan, or it did not run: the layers one by one
        return _layer_by_layer(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save, kernels=True, dropout=dropout)


@gru_stack_fwd.register_fake
def _gru_stack_fwd_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save=1, dropout_mask=None, dropout_scale=1.0):
    T, B = x.shape[0], x.shape[1]
    layers, H = len(w_hh), w_hh[0].shape[1]
    state_all = x.new_empty(layers, T + 1 if save else 1, B, H, dtype=accumulate_dtype(x.dtype))
    return x.new_empty(layers, T + 1, B, H), state_all, x.new_empty(layers, T if save else 0, B, 4 * H)


run_without_autocast("gru_stack_fwd")


class GRUStack(torch.autograd.Function):
    """out, h_n of L unidirectional GRU layers; ``weights`` are (w_ih, w_hh[, b_ih, b_hh]) per layer;
    ``dropout_mask``, ``dropout_scale``: dropout between layers (``stack.dropout_masks``), or None."""

    @staticmethod
    def forward(ctx, x, h0, lengths, use_reference, layers, has_bias, dropout_mask, dropout_scale, *weights):
        w_ih, w_hh, b_ih, b_hh, _ = _split_weights(layers, has_bias, weights)
        h_all, state_all, gates = torch.ops.triton_lstm.gru_stack_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, 1,
                                                                      dropout_mask, dropout_scale)
        ctx.save_for_backward(x, h0, lengths, h_all, state_all, gates, dropout_mask, *weights)
        ctx.use_reference, ctx.layers, ctx.has_bias, ctx.dropout_scale = use_reference, layers, has_bias, dropout_scale
        return h_all[-1, 1:].detach(), h_all[:, -1].clone()  # detach(): editable in place (ops.LSTMRecurrence)

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        x, h0, lengths, h_all, state_all, gates, dropout_mask, *weights = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad_out, grad_h_n)
        w_ih, w_hh, b_ih, b_hh, _ = _split_weights(ctx.layers, ctx.has_bias, weights)
        dropout = None if dropout_mask is None else (dropout_mask, ctx.dropout_scale)
        if uses_kernels(x) and not ctx.use_reference:
            gates, overwrite = gates_for_backward(ctx, x, gates, lambda: torch.ops.triton_lstm.gru_stack_fwd(
                x, h0, w_ih, w_hh, b_ih, b_hh, lengths, 1, dropout_mask, ctx.dropout_scale)[2])
            with kernel_device(x), torch.autocast(x.device.type, enabled=False):
                grads = _stacked_backward(x, lengths, h_all, state_all, gates, w_ih, w_hh, ctx.has_bias, grad_out,
                                          grad_h_n, dropout, overwrite_gates=overwrite)
            if grads is not None:
                return (grads[0], grads[1], None, None, None, None, None, None, *grads[2:])

        def backward_layer(layer, layer_x, grad_layer_out):
            return torch.ops.triton_lstm.gru_recurrence_bwd(grad_layer_out, grad_h_n[layer], layer_x, w_ih[layer],
                                                             w_hh[layer], gates[layer], h_all[layer], state_all[layer],
                                                             lengths, ctx.use_reference)

        grad_x, per_layer = each_layer_backward(x, h_all, grad_out, ctx.layers, backward_layer, dropout)
        grad_weights = [grad for grads in per_layer for grad in (grads[2:] if ctx.has_bias else grads[2:4])]
        return (grad_x, torch.stack([grads[1] for grads in per_layer]), None, None, None, None, None, None,
                *grad_weights)


def _stacked_backward(x, lengths, h_all, state_all, gates, w_ih, w_hh, has_bias, grad_out, grad_h_n, dropout=None,
                      overwrite_gates=False):
    """Every layer's chain in one launch (a reverse wavefront), then each layer's weight GEMMs; the input
    gradient of layer 0 only (the layers above took theirs in the kernel). None where the launch cannot
    run. Returns the gradients of x, h0 and the layers' weights. ``overwrite_gates``: dG takes the gates'
    place (as ``lstm_bwd_stack_gate_grads``'s)."""
    lengths = None if lengths is None else lengths.to(device=x.device, dtype=torch.int32)
    chain = lstm_bwd_stack_gate_grads(grad_out, grad_h_n, torch.zeros_like(grad_h_n), torch.stack(w_hh).contiguous(),
                                      torch.stack(w_ih[1:]).contiguous(), lengths, gates, state_all, cell="gru",
                                      dropout=dropout, overwrite_gates=overwrite_gates)
    if chain is None:
        return None
    grad_gates, grad_h0, _ = chain
    grad_x, grad_weights = None, []
    for layer in range(len(w_hh)):
        layer_x = x if layer == 0 else dropped_input(h_all[layer - 1, 1:], dropout, layer - 1)
        layer_grad_x, *weight_grads = gru_weight_and_input_grads(grad_gates[layer], layer_x, h_all[layer, :-1],
                                                                 w_ih[layer], w_hh[layer], input_grad=layer == 0)
        grad_x = layer_grad_x if layer == 0 else grad_x
        grad_weights += weight_grads if has_bias else weight_grads[:2]
    return (grad_x, grad_h0.to(x.dtype), *grad_weights)


def _differentiable_backward(ctx, grad_out, grad_h_n):
    x, h0, lengths, _, _, _, dropout_mask, *weights = ctx.saved_tensors
    dropout = None if dropout_mask is None else (dropout_mask, ctx.dropout_scale)

    def outputs():
        w_ih, w_hh, b_ih, b_hh, _ = _split_weights(ctx.layers, ctx.has_bias, weights)
        h_all, _, _ = _layer_by_layer(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, 1, kernels=False, dropout=dropout)
        return h_all[-1, 1:], h_all[:, -1]

    needed = (*ctx.needs_input_grad[:2], *ctx.needs_input_grad[8:])
    grads = differentiate(outputs, (x, h0, *weights), needed, (grad_out, grad_h_n))
    return (*grads[:2], None, None, None, None, None, None, *grads[2:])


def gru_stack(x: Tensor, h0: Tensor, layer_weights, lengths: Tensor | None, *, backward: str = "fused",
              dropout: float = 0.0):
    """L unidirectional GRU layers over time-major ``x``: returns (output of the top layer, h_n (L, B, H)).
    ``layer_weights``: per layer (w_ih, w_hh, b_ih, b_hh), biases None or both set; ``dropout``: the
    probability of dropout between layers (in training; the caller passes 0 otherwise)."""
    layers = len(layer_weights)
    has_bias = layer_weights[0][2] is not None
    weights = [w for ws in layer_weights for w in (ws if has_bias else ws[:2])]
    mask, scale = dropout_masks(x, layers, h0.shape[-1], dropout) or (None, 1.0)
    if not grad_wanted(x, h0, *weights):
        # An inference forward: no per-step gates or states are kept.
        w_ih, w_hh, b_ih, b_hh, _ = _split_weights(layers, has_bias, weights)
        h_all, _, _ = torch.ops.triton_lstm.gru_stack_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, 0, mask, scale)
        return h_all[-1, 1:], h_all[:, -1].clone()
    return GRUStack.apply(x, h0, lengths, int(backward == "reference"), layers, has_bias, mask, scale, *weights)
