"""A stack of unidirectional LSTM layers as one op: the forward in one persistent launch (a wavefront
across layers, ``kernels/lstm_fwd_stack.py``), the backward's chain in one launch too (a reverse
wavefront, ``lstm_bwd_stack_gate_grads``), then each layer's weight GEMMs.

``lstm_stack`` is what ``LSTM.forward`` calls for num_layers > 1 when ``stack_plan`` says the stacked
kernel applies; otherwise the module runs ``lstm_layer`` per layer as before. The op's outputs are every
layer's ``(h_all, c_all, gates)``, laid out per layer as the single-layer op's; where the stacked
backward cannot run (the reference backward, or a grid that does not fit), the backward is
``recurrence_bwd`` per layer from the top: the gradient of layer l's output is layer l + 1's input gradient.
Peephole weights, when given, are one (L, 3H) tensor, the layers' ``weight_ch`` stacked. Dropout between
layers (training) runs in the same launches, on masks drawn by torch before them (``dropout_masks``).
Projections (proj_size > 0) run in the same launches in m_t on merged weights (``kernels/lstm_projection.py``),
except with dropout, which masks the projected h: layer by layer then.
"""

from __future__ import annotations

import dataclasses

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
from triton_lstm.reference import accumulate_dtype

if HAS_TRITON:
    from triton_lstm.kernels.common import unless_refused
    from triton_lstm.kernels.lstm_bwd_whole_module import lstm_bwd_stack_gate_grads
    from triton_lstm.kernels.lstm_fwd_fused_input import fused_input_or_none, lstm_fwd_fused_input
    from triton_lstm.kernels.lstm_fwd_stack import lstm_fwd_stack, plan_stack_for, projection_in_gates
    from triton_lstm.kernels.lstm_projection import (
        cell_outputs,
        gradients_at_m,
        lstmp_fwd_stack,
        merged_recurrent_weight,
        projection_grads,
    )
    from triton_lstm.kernels.weight_grads import input_gradient, peephole_weight_grads, weight_and_input_grads


def stack_plan(x: Tensor, hidden_size: int, num_layers: int, peephole: bool = False, dropout: bool = False,
               projection: bool = False):
    """The stacked kernel's plan for this input (an LSTM's or a GRU's stack, ``gru_stack.py``), or None
    where the kernels do not run (the CPU path, torch.compile and torch.func, whose graphs keep one node per
    layer). "meta" tensors (shape inference, ``saved_activation_bytes``) take the kernels' path, as the
    interpreter would plan it."""
    if not HAS_TRITON or num_layers < 2 or not (uses_kernels(x) or x.device.type == "meta"):
        return None
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    plan = plan_stack_for(x, hidden_size, num_layers, peephole, dropout, projection)
    return plan if plan.persistent else None


def fused_input_stack(x, h0, c0, w_ih, w_hh, bias, lengths, plan, save, w_ch=None, b_hn=None):
    """The stack's launch with every layer's input product in the kernel (``plan.fused_input``), an LSTM's
    or a GRU's: its outputs, or None where x's size is not H or the launch did not fit (the caller then
    projects x first)."""
    if x.shape[-1] != w_hh[0].shape[1]:
        return None
    with kernel_device(x):
        return fused_input_or_none(plan, x, len(w_hh), lambda: lstm_fwd_fused_input(
            x.contiguous(), h0.contiguous(), c0.contiguous(), torch.stack(w_hh), torch.stack(w_ih), bias, lengths, plan,
            bool(save), w_ch, b_hn))


def dropout_masks(x: Tensor, layers: int, hidden_size: int, p: float):
    """Dropout between the layers of a stack over time-major ``x`` (training, ``p`` > 0): ``(mask, scale)``,
    the (L - 1, T, B, H) uint8 masks (1: the unit is kept) drawn from torch's generator on x's device, so
    ``torch.manual_seed`` reproduces them, and 1 / (1 - p) (0 for p = 1, where F.dropout gives zeros).
    The kernels apply them where the layer above reads h_t and to the gradient flowing back; the reference
    and fallback paths through ``dropped_input``. None for ``p`` = 0."""
    if p <= 0:
        return None
    mask = torch.empty((layers - 1, x.shape[0], x.shape[1], hidden_size), dtype=torch.uint8, device=x.device)
    return mask.bernoulli_(1 - p), (1 / (1 - p) if p < 1 else 0.0)


def dropped_input(h: Tensor, dropout, layer: int) -> Tensor:
    """Layer ``layer``'s output h (T, B, H) as the layer above reads it, masked and scaled by ``dropout``
    (``dropout_masks``), or as it is without; also the gradient of that output from the gradient of the
    dropped input (the same map)."""
    if dropout is None:
        return h
    mask, scale = dropout
    return torch.where(mask[layer].bool(), h * scale, torch.zeros((), dtype=h.dtype, device=h.device))


def one_layer_at_a_time(x: Tensor, layers: int, run_layer, dropout=None):
    """A stack's forward op run layer after layer: ``run_layer(layer, layer_input)`` returns that layer's
    (h_all, state, gates); each layer's input is the output of the one below (with ``dropout``, masked and
    scaled: ``dropped_input``). Returns them stacked."""
    outputs, layer_input = [], x
    for layer in range(layers):
        outputs.append(run_layer(layer, layer_input))
        if layer < layers - 1:
            layer_input = dropped_input(outputs[-1][0][1:], dropout, layer)
    return tuple(torch.stack(parts) for parts in zip(*outputs))


def each_layer_backward(x: Tensor, h_all: Tensor, grad_out: Tensor, layers: int, backward_layer, dropout=None):
    """A stack's backward layer after layer from the top: ``backward_layer(layer, layer_x, grad_layer_out)``
    returns that layer's gradients, its input's first, which is the output gradient of the layer below
    (with ``dropout``, through the same mask and scale). Returns (grad_x, each layer's gradients in layer
    order)."""
    per_layer, grad = [None] * layers, grad_out
    for layer in reversed(range(layers)):
        layer_x = x if layer == 0 else dropped_input(h_all[layer - 1, 1:], dropout, layer - 1)
        per_layer[layer] = backward_layer(layer, layer_x, grad)
        grad = per_layer[layer][0] if layer == 0 else dropped_input(per_layer[layer][0], dropout, layer - 1)
    return grad, per_layer


def _layer_by_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save, kernels: bool, w_ch=None, dropout=None):
    """What the stacked kernel computes, one layer after another: with ``kernels`` the single-layer Triton
    forward (the kernel's fallback), else the plain-PyTorch recurrence (the reference path, differentiable:
    the double backward differentiates it)."""

    def run_layer(layer, layer_input):
        bias = (b_ih[layer], b_hh[layer]) if b_ih else (None, None)
        return run_lstm_layer(layer_input, h0[layer], c0[layer], w_ih[layer], w_hh[layer], *bias, lengths, save,
                              kernels, None if w_ch is None else w_ch[layer], w_hr[layer] if w_hr else None)

    return one_layer_at_a_time(x, len(w_hh), run_layer, dropout)


@torch.library.custom_op("triton_lstm::stack_fwd", mutates_args=())
def stack_fwd(
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
    dropout_mask: Tensor | None = None,
    dropout_scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of L unidirectional layers: ``(h_all, c_all, gates)`` stacked over layers, (L, T+1, B, P),
    (L, T+1, B, H) and (L, T, B, 4H); ``save`` 0 (inference): c_all (L, 1, B, H), gates (L, 0, B, 4H).
    ``h0`` is (L, B, P), ``c0`` (L, B, H); ``b_ih``/``b_hh`` empty lists without biases, ``w_hr`` without a
    projection (P = H then); ``w_ch`` (L, 3H) or None; ``dropout_mask`` and ``dropout_scale``: dropout
    between layers (``dropout_masks``), or None."""
    dropout = None if dropout_mask is None else (dropout_mask, dropout_scale)
    if not uses_kernels(x):
        return _layer_by_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save, kernels=False, w_ch=w_ch,
                               dropout=dropout)
    lengths = None if lengths is None else lengths.to(torch.int32)
    plan = plan_stack_for(x, w_hh[0].shape[0] // 4, len(w_hh), w_ch is not None, dropout is not None, bool(w_hr))
    if plan.persistent:
        bias = torch.stack([b_ih[i] + b_hh[i] for i in range(len(b_ih))]) if b_ih else None  # per layer
        if plan.fused_input and dropout is None and not w_hr:
            # Every layer's input product in the kernel, layer 0's from x (lstm_fwd_fused_input.py).
            outputs = fused_input_stack(x, h0, c0, w_ih, w_hh, bias, lengths, plan, save,
                                        w_ch=None if w_ch is None else w_ch.contiguous())
            if outputs is not None:
                return outputs
        if plan.fused_input:  # not taken above (dropout, projections) or refused: the plain stacked kernel
            plan = dataclasses.replace(plan, fused_input=False)
        bias_above = None if bias is None else bias[1:]
        # Layer 0's projection where its gates go (no separate T·B·4H buffer while the launch runs); with
        # projections the recurrence runs in m from m_{-1} = 0.
        projected, buffers = projection_in_gates(x, w_ih[0], None if bias is None else bias[0],
                                                 c0.new_zeros(c0.shape) if w_hr else h0, c0, bool(save))
        if w_hr:
            # Projections: the same launch in m_t on merged weights (kernels/lstm_projection.py).
            launch = lambda: lstmp_fwd_stack(  # noqa: E731
                projected, h0.contiguous(), c0.contiguous(), torch.stack(w_hh), torch.stack(w_ih[1:]), bias_above,
                torch.stack(w_hr), lengths, plan, bool(save), outputs=buffers)
        else:
            launch = lambda: lstm_fwd_stack(  # noqa: E731
                projected, h0.contiguous(), c0.contiguous(), torch.stack(w_hh), torch.stack(w_ih[1:]), bias_above,
                lengths, plan, bool(save), None if w_ch is None else w_ch.contiguous(), dropout=dropout,
                outputs=buffers)
        with kernel_device(x):
            outputs = unless_refused(launch)
        if outputs is not None:
            return outputs
    with kernel_device(x):  # no plan, or it did not run: the layers one by one
        return _layer_by_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save, kernels=True, w_ch=w_ch,
                               dropout=dropout)


@stack_fwd.register_fake
def _stack_fwd_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save=1, w_ch=None, dropout_mask=None,
                    dropout_scale=1.0):
    T, B = x.shape[0], x.shape[1]
    layers, H = len(w_hh), w_hh[0].shape[0] // 4
    P = w_hr[0].shape[0] if w_hr else H
    h_all = x.new_empty(layers, T + 1, B, P)
    c_all = x.new_empty(layers, T + 1 if save else 1, B, H, dtype=accumulate_dtype(x.dtype))
    gates = x.new_empty(layers, T if save else 0, B, 4 * H)
    return h_all, c_all, gates


run_without_autocast("stack_fwd")


def _split_weights(layers: int, has_bias: bool, weights, has_projection: bool = False):
    """(w_ih, w_hh, b_ih, b_hh, w_hr), each a list over layers, from ``weights``: (w_ih, w_hh[, b_ih, b_hh][,
    w_hr]) per layer; the biases and w_hr empty lists where there are none."""
    per_layer = 2 + 2 * has_bias + has_projection
    groups = [weights[i * per_layer:(i + 1) * per_layer] for i in range(layers)]
    w_ih, w_hh = [g[0] for g in groups], [g[1] for g in groups]
    b_ih = [g[2] for g in groups] if has_bias else []
    b_hh = [g[3] for g in groups] if has_bias else []
    w_hr = [g[-1] for g in groups] if has_projection else []
    return w_ih, w_hh, b_ih, b_hh, w_hr


class LSTMStack(torch.autograd.Function):
    """out, h_n, c_n of L unidirectional layers; ``weights`` are (w_ih, w_hh[, b_ih, b_hh][, w_hr]) per
    layer, ``w_ch`` the (L, 3H) peephole weights or None; ``dropout_mask``, ``dropout_scale``: dropout between
    layers (``dropout_masks``), or None."""

    @staticmethod
    def forward(ctx, x, h0, c0, lengths, use_reference, layers, has_bias, has_projection, dropout_mask, dropout_scale,
                w_ch, *weights):
        w_ih, w_hh, b_ih, b_hh, w_hr = _split_weights(layers, has_bias, weights, has_projection)
        h_all, c_all, gates = torch.ops.triton_lstm.stack_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, 1, w_ch,
                                                              dropout_mask, dropout_scale)
        ctx.save_for_backward(x, h0, c0, lengths, h_all, c_all, gates, dropout_mask, w_ch, *weights)
        ctx.use_reference, ctx.layers, ctx.has_bias, ctx.dropout_scale = use_reference, layers, has_bias, dropout_scale
        ctx.has_projection = has_projection
        # detach(): editable in place (ops.LSTMRecurrence)
        return h_all[-1, 1:].detach(), h_all[:, -1].clone(), c_all[:, -1].to(x.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad_out, grad_h_n, grad_c_n):
        x, h0, c0, lengths, h_all, c_all, gates, dropout_mask, w_ch, *weights = ctx.saved_tensors
        w_ih, w_hh, b_ih, b_hh, w_hr = _split_weights(ctx.layers, ctx.has_bias, weights, ctx.has_projection)
        dropout = None if dropout_mask is None else (dropout_mask, ctx.dropout_scale)
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad_out, grad_h_n, grad_c_n)
        if uses_kernels(x) and not ctx.use_reference and not (w_hr and dropout is not None):
            gates, overwrite = gates_for_backward(ctx, x, gates, lambda: torch.ops.triton_lstm.stack_fwd(
                x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, 1, w_ch, dropout_mask, ctx.dropout_scale)[2])
            with kernel_device(x), torch.autocast(x.device.type, enabled=False):
                grads = _stacked_backward(x, lengths, h_all, c_all, gates, w_ih, w_hh, ctx.has_bias, grad_out, grad_h_n,
                                          grad_c_n, w_ch, dropout, w_hr, overwrite_gates=overwrite)
            if grads is not None:
                return (grads[0], grads[1], grads[2], None, None, None, None, None, None, None, grads[3], *grads[4:])

        def backward_layer(layer, layer_x, grad_layer_out):
            return torch.ops.triton_lstm.recurrence_bwd(
                grad_layer_out, grad_h_n[layer], grad_c_n[layer], layer_x, w_ih[layer], w_hh[layer],
                w_hr[layer] if w_hr else None, gates[layer], h_all[layer], c_all[layer], lengths, ctx.use_reference,
                None if w_ch is None else w_ch[layer],
            )

        grad_x, per_layer = each_layer_backward(x, h_all, grad_out, ctx.layers, backward_layer, dropout)
        grad_weights = []
        for grads in per_layer:
            grad_weights += [grads[3], grads[4]]
            if ctx.has_bias:
                grad_weights += [grads[5], grads[5].clone()]  # each bias owns its gradient tensor
            if ctx.has_projection:
                grad_weights += [grads[6]]
        grad_h0, grad_c0, grad_w_ch = (torch.stack([grads[i] for grads in per_layer]) for i in (1, 2, 7))
        return (grad_x, grad_h0, grad_c0, None, None, None, None, None, None, None,
                grad_w_ch if w_ch is not None else None, *grad_weights)


def _stacked_backward(x, lengths, h_all, c_all, gates, w_ih, w_hh, has_bias, grad_out, grad_h_n, grad_c_n, w_ch=None,
                      dropout=None, w_hr=(), overwrite_gates=False):
    """The fused backward of the whole stack: the gate gradients of every layer in one launch (a reverse
    wavefront), then each layer's weight GEMMs; the input gradient of layer 0 only (the layers above
    took theirs in the kernel). None where the launch cannot run (the caller goes layer by layer).
    Returns the gradients of x, h0, c0, the peephole weights (None without) and the layers' weights. With
    ``w_hr`` (projections, no dropout) the chain runs in m_t on merged weights (``kernels/lstm_projection.py``).
    ``overwrite_gates``: dG takes the gates' place (as ``lstm_bwd_stack_gate_grads``'s)."""
    lengths = None if lengths is None else lengths.to(device=x.device, dtype=torch.int32)
    chain_w_hh, chain_w_ih_above = torch.stack(w_hh), torch.stack(w_ih[1:])
    chain_grad_out, chain_grad_h_n = grad_out, grad_h_n
    if w_hr:
        chain_grad_out, _ = gradients_at_m(grad_out, grad_h_n[-1], w_hr[-1])
        acc = accumulate_dtype(x.dtype)
        chain_grad_h_n = torch.matmul(grad_h_n.to(acc), torch.stack(w_hr).to(acc))  # each layer's h_n·W_hr
        chain_w_hh = merged_recurrent_weight(chain_w_hh, torch.stack(w_hr))
        chain_w_ih_above = merged_recurrent_weight(chain_w_ih_above, torch.stack(w_hr[:-1]))
    m_all = cell_outputs(gates, c_all) if w_hr else None  # (W_hr's gradients, before dG may overwrite the gates)
    chain = lstm_bwd_stack_gate_grads(chain_grad_out, chain_grad_h_n, grad_c_n, chain_w_hh.contiguous(),
                                      chain_w_ih_above.contiguous(), lengths, gates, c_all,
                                      w_ch=None if w_ch is None else w_ch.contiguous(), dropout=dropout,
                                      overwrite_gates=overwrite_gates)
    if chain is None:
        return None
    grad_gates, grad_h0, grad_c0 = chain
    if w_hr:
        grad_h0 = torch.empty(*h_all[:, 0].shape, dtype=torch.float32, device=x.device)
    grad_x, grad_weights = None, []
    for layer in range(len(w_hh)):
        layer_x = x if layer == 0 else dropped_input(h_all[layer - 1, 1:], dropout, layer - 1)
        layer_grad_x, grad_w_ih, grad_w_hh, grad_bias = weight_and_input_grads(
            grad_gates[layer], layer_x, h_all[layer, :-1], w_ih[layer], input_grad=layer == 0)
        grad_x = layer_grad_x if layer == 0 else grad_x
        grad_weights += [grad_w_ih, grad_w_hh.to(w_hh[layer].dtype)]
        if has_bias:
            grad_weights += [grad_bias, grad_bias.clone()]  # each bias owns its gradient tensor
        if w_hr:
            # The gradient of this layer's output h: the top's given, a lower layer's through the input
            # product of the layer above.
            top = layer == len(w_hh) - 1
            layer_grad_out = grad_out if top else input_gradient(grad_gates[layer + 1], w_ih[layer + 1])
            grad_w_hr, grad_h0[layer] = projection_grads(layer_grad_out, grad_h_n[layer], grad_gates[layer], w_hh[layer],
                                                         w_hr[layer], m_all[layer], lengths)
            grad_weights.append(grad_w_hr)
    grad_w_ch = None
    if w_ch is not None:
        grad_w_ch = peephole_weight_grads(grad_gates, c_all).to(w_ch.dtype)
    return (grad_x, grad_h0.to(x.dtype), grad_c0.to(x.dtype), grad_w_ch, *grad_weights)


def _differentiable_backward(ctx, grad_out, grad_h_n, grad_c_n):
    x, h0, c0, lengths, _, _, _, dropout_mask, w_ch, *weights = ctx.saved_tensors
    dropout = None if dropout_mask is None else (dropout_mask, ctx.dropout_scale)

    def outputs():
        w_ih, w_hh, b_ih, b_hh, w_hr = _split_weights(ctx.layers, ctx.has_bias, weights, ctx.has_projection)
        h_all, c_all, _ = _layer_by_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, 1, kernels=False,
                                          w_ch=w_ch, dropout=dropout)
        return h_all[-1, 1:], h_all[:, -1], c_all[:, -1].to(x.dtype)

    needed = (*ctx.needs_input_grad[:3], *ctx.needs_input_grad[10:])
    grads = differentiate(outputs, (x, h0, c0, w_ch, *weights), needed, (grad_out, grad_h_n, grad_c_n))
    return (*grads[:3], None, None, None, None, None, None, None, *grads[3:])


def lstm_stack(x: Tensor, h0: Tensor, c0: Tensor, layer_weights, lengths: Tensor | None, *, backward: str = "fused",
               w_ch: Tensor | None = None, dropout: float = 0.0):
    """L unidirectional layers over time-major ``x``: returns (output of the top layer, h_n, c_n), h_n of
    shape (L, B, P), c_n (L, B, H). ``layer_weights``: per layer (w_ih, w_hh, b_ih, b_hh[, w_hr]), biases
    None or both set, w_hr None or absent without a projection (P = H); ``w_ch``: the layers' peephole
    weights stacked, (L, 3H), or None; ``dropout``: the probability of dropout between layers (in
    training; the caller passes 0 otherwise), in the same launches (with projections, layer by layer)."""
    layers = len(layer_weights)
    has_bias = layer_weights[0][2] is not None
    has_projection = len(layer_weights[0]) > 4 and layer_weights[0][4] is not None
    weights = [w for ws in layer_weights for w in (*ws[:4 if has_bias else 2], *ws[4:5 if has_projection else 4])]
    mask, scale = dropout_masks(x, layers, h0.shape[-1], dropout) or (None, 1.0)
    if not grad_wanted(x, h0, c0, w_ch, *weights):
        # An inference forward: no per-step gates or c are kept (c_all holds c_T only).
        w_ih, w_hh, b_ih, b_hh, w_hr = _split_weights(layers, has_bias, weights, has_projection)
        h_all, c_all, _ = torch.ops.triton_lstm.stack_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, 0, w_ch,
                                                          mask, scale)
        return h_all[-1, 1:], h_all[:, -1].clone(), c_all[:, -1].to(x.dtype, copy=True)
    return LSTMStack.apply(x, h0, c0, lengths, int(backward == "reference"), layers, has_bias, has_projection, mask,
                           scale, w_ch, *weights)
