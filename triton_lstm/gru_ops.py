"""The GRU recurrence of one layer and one direction as an autograd op: the LSTM's road (``ops.py``) for
the GRU — two custom ops (``triton_lstm::gru_recurrence_fwd`` / ``gru_recurrence_bwd``, one graph node
each under torch.compile) tied by a ``torch.autograd.Function``; the same dispatch (the Triton kernels
for CUDA tensors and under ``TRITON_INTERPRET=1``, else the plain-PyTorch reference), autocast rule,
inference forward, double backward through the reference and torch.func path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triton_lstm.ops import (
    HAS_TRITON,
    check_backward_options,
    differentiate,
    gates_for_backward,
    grad_wanted,
    kernel_device,
    run_without_autocast,
    traces_plain_pytorch,
    uses_kernels,
)
from triton_lstm.reference import (
    accumulate_dtype,
    both_biases,
    gru_projection_bias,
    gru_recurrence_backward_reference,
    gru_recurrence_reference,
)

if HAS_TRITON:
    from triton_lstm.kernels.gru import gru_bwd, gru_fwd_from_input, hidden_bias_n


@torch.library.custom_op("triton_lstm::gru_recurrence_fwd", mutates_args=())
def gru_recurrence_fwd(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None,
    save: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of one GRU layer and direction: returns ``(h_all, state_all, gates)`` (layout in
    reference.py). ``save`` 0: an inference forward, whose outputs the backward cannot use: state_all is
    (1, B, H) holding h_T in fp32 and gates is (0, B, 4H)."""
    if uses_kernels(x):
        with kernel_device(x):
            return run_gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, None if lengths is None else lengths.to(torch.int32), save,
                                 True)
    h_all, state_all, gates = gru_recurrence_reference(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
    if not save:
        return h_all, state_all[-1:].clone(), gates[:0].clone()
    return h_all, state_all, gates


@gru_recurrence_fwd.register_fake
def _gru_recurrence_fwd_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save=1):
    T, B = x.shape[0], x.shape[1]
    H = w_hh.shape[1]
    h_all = x.new_empty(T + 1, B, H)
    state_all = x.new_empty(T + 1 if save else 1, B, H, dtype=accumulate_dtype(x.dtype))
    gates = x.new_empty(T if save else 0, B, 4 * H)
    return h_all, state_all, gates


@torch.library.custom_op("triton_lstm::gru_recurrence_bwd", mutates_args=())
def gru_recurrence_bwd(
    grad_out: Tensor,
    grad_h_n: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    gates: Tensor,
    h_all: Tensor,
    state_all: Tensor,
    lengths: Tensor | None,
    use_reference: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of one GRU layer and direction: gradients of x, h0, W_ih, W_hh, b_ih and b_hh. Where the
    kernels run, the fused backward (kernels/gru.py) unless ``use_reference`` is 1."""
    backward = gru_bwd if uses_kernels(x) and not use_reference else gru_recurrence_backward_reference
    with kernel_device(x):
        return tuple(backward(grad_out, grad_h_n, x, w_ih, w_hh, gates, h_all, state_all, lengths))


@gru_recurrence_bwd.register_fake
def _gru_recurrence_bwd_fake(grad_out, grad_h_n, x, w_ih, w_hh, gates, h_all, state_all, lengths, use_reference=0):
    # Contiguous, as every implementation returns them (Inductor checks the real strides against these).
    return (x.new_empty(x.shape), grad_h_n.new_empty(grad_h_n.shape), w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), w_ih.new_empty(w_ih.shape[0]), w_hh.new_empty(w_hh.shape[0]))


run_without_autocast("gru_recurrence_fwd")
run_without_autocast("gru_recurrence_bwd")


class GRURecurrence(torch.autograd.Function):
    """out, h_n = GRU(x) for one layer and direction, with the input projection inside."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, use_reference=0):
        h_all, state_all, gates = torch.ops.triton_lstm.gru_recurrence_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, 1)
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, gates, h_all, state_all)
        ctx.use_reference = use_reference
        return h_all[1:].detach(), h_all[-1].clone()  # detach(): editable in place (ops.LSTMRecurrence)

    @staticmethod
    def backward(ctx, grad_out, grad_h_n):
        x, h0, w_ih, w_hh, b_ih, b_hh, lengths, gates, h_all, state_all = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: a second derivative will be taken, so differentiate the reference.
            inputs = (x, h0, w_ih, w_hh, b_ih, b_hh)
            grads = differentiate(lambda: _reference_outputs(*inputs, lengths), inputs, ctx.needs_input_grad[:6],
                                  (grad_out, grad_h_n))
            return (*grads, None, None)
        gates, overwrite = gates_for_backward(ctx, x, gates, lambda: torch.ops.triton_lstm.gru_recurrence_fwd(
            x, h0, w_ih, w_hh, b_ih, b_hh, lengths, 1)[2])
        if overwrite:
            with kernel_device(x), torch.autocast(x.device.type, enabled=False):
                grads = gru_bwd(grad_out, grad_h_n, x, w_ih, w_hh, gates, h_all, state_all, lengths,
                                overwrite_gates=True)
        else:
            grads = torch.ops.triton_lstm.gru_recurrence_bwd(grad_out, grad_h_n, x, w_ih, w_hh, gates, h_all, state_all,
                                                              lengths, ctx.use_reference)
        has_bias = b_ih is not None
        return (*grads[:4], grads[4] if has_bias else None, grads[5] if has_bias else None, None, None)


def run_gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save, kernels: bool):
    """One layer and direction's forward outside the ops, for the whole-module ops' fallbacks (a stack layer
    by layer, a bidirectional layer direction by direction): ``(h_all, state_all, gates)``, or without
    ``save`` the inference forward's. With ``kernels`` the Triton forward (``lengths`` int32), else the
    plain-PyTorch recurrence (differentiable: the double backward differentiates it)."""
    if kernels:
        bias = gru_projection_bias(b_ih, b_hh)
        return gru_fwd_from_input(x, h0.contiguous(), w_ih, w_hh.contiguous(), bias, hidden_bias_n(b_hh, w_hh), lengths,
                                  save=bool(save))
    h_all, state_all, gates = gru_recurrence_reference(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
    return (h_all, state_all, gates) if save else (h_all, state_all[-1:], gates[:0])


def _reference_outputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths):
    h_all, _, _ = gru_recurrence_reference(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
    return h_all[1:], h_all[-1]


def gru_layer(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    lengths: Tensor | None = None,
    *,
    backward: str = "fused",
) -> tuple[Tensor, Tensor]:
    """One GRU layer, one direction, over time-major ``x`` (T, B, I); returns ``output`` (T, B, H) and
    ``h_n`` (B, H). ``lengths`` (B,) on x's device runs each sequence to its own length and carries its
    state past the end. ``backward``: "fused" or "reference", as ``lstm_layer``'s. Inputs are assumed
    checked (the modules check them)."""
    check_backward_options(backward, 0)
    b_ih, b_hh = both_biases(b_ih, b_hh)
    if traces_plain_pytorch():
        return _reference_outputs(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
    if not grad_wanted(x, h0, w_ih, w_hh, b_ih, b_hh):
        # Nothing will be differentiated: an inference forward keeps no per-step gates or states.
        h_all, _, _ = torch.ops.triton_lstm.gru_recurrence_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, 0)
        return h_all[1:], h_all[-1].clone()
    return GRURecurrence.apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, int(backward == "reference"))
