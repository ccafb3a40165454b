"""Activation recompute: keep only (h, c) every k steps for the backward, recompute the rest there.

``ops.LSTMRecurrence`` saves ``h_all``, ``c_all`` (fp32) and ``gates`` (4H wide) for every step: about
(2·P + 4·H + 8·H) bytes per step and batch row in bf16, most of the memory a training step holds
between forward and backward. With ``recompute_interval=k`` the forward keeps only h_t and c_t at
t = 0, k, 2k, …; the backward then walks the segments from the last to the first, reruns the forward
kernel over each one from its checkpoint to get its gates and c back, and pushes the gradient chain
through it. Cost: one more forward pass (the recurrence, not the input projection's GEMM, which the
recomputation redoes per segment too); memory held in between: O(T/k) states instead of O(T).

The fused path keeps the backward's structure: the gate gradients dG of every segment land in one
(T, B, 4H) buffer, the chain crosses segment boundaries as it crosses steps (so the gradients do not
depend on k beyond the forward's own rounding), and the weight and input gradients are still single
GEMMs over all steps. The reference path (``backward="reference"``, a projection, or no kernels) runs
the reference backward per segment and sums the weight gradients over segments in fp32.

This is a Function of its own, not a flag on ``LSTMRecurrence``, because it saves different tensors
and its backward is a different op (``triton_lstm::recurrence_bwd_recompute``); ``ops.lstm_layer``
picks it when ``recompute_interval > 0``.

``saved_activation_bytes`` measures what a forward saves for the backward, for the benchmark suite.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from triton_lstm.ops import (
    _differentiable_backward,
    backward_outputs_fake,
    input_gradients,
    kernel_device,
    run_without_autocast,
    uses_kernels,
)
from triton_lstm.reference import accumulate_dtype, lstm_recurrence_backward_reference


def _segments(T: int, interval: int) -> list[tuple[int, int]]:
    return [(t0, min(T, t0 + interval)) for t0 in range(0, T, interval)]


def _recompute_segment(x, h_checkpoints, c_checkpoints, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, index, t0, t1):
    """(h, c, gates) of steps t0 … t1 from checkpoint ``index``, through the same forward op."""
    # lengths count from step 0: within the segment a sequence has lengths - t0 steps left (none if < 0).
    segment_lengths = None if lengths is None else (lengths - t0).clamp(min=0)
    # c checkpoints are the fp32 c_t of the forward: fed back unrounded, the recomputation repeats the
    # forward's arithmetic.
    return torch.ops.triton_lstm.recurrence_fwd(
        x[t0:t1], h_checkpoints[index], c_checkpoints[index], w_ih, w_hh, b_ih, b_hh, w_hr, segment_lengths
    )


@torch.library.custom_op("triton_lstm::recurrence_bwd_recompute", mutates_args=())
def recurrence_bwd_recompute(
    grad_out: Tensor,
    grad_h_n: Tensor,
    grad_c_n: Tensor,
    x: Tensor,
    h_checkpoints: Tensor,
    c_checkpoints: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    interval: int,
    use_reference: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of one layer and direction from checkpoints (h, c at t = 0, k, 2k, …); the same outputs
    as ``triton_lstm::recurrence_bwd`` (an empty W_hr gradient without a projection)."""
    T, B = x.shape[0], x.shape[1]
    H = w_hh.shape[0] // 4
    segments = list(enumerate(_segments(T, interval)))[::-1]
    recompute_args = (x, h_checkpoints, c_checkpoints, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    if uses_kernels(x) and not use_reference and w_hr is None and B * H > 0:
        from triton_lstm.kernels.lstm_bwd import lstm_bwd_gate_grads
        from triton_lstm.kernels.weight_grads import weight_and_input_grads

        h_prev = torch.empty(T, B, H, dtype=x.dtype, device=x.device)

        def recomputed():
            for index, (t0, t1) in segments:
                h_seg, c_seg, gates_seg = _recompute_segment(*recompute_args, index, t0, t1)
                h_prev[t0:t1] = h_seg[:-1]
                del h_seg
                yield t0, gates_seg, c_seg

        lengths32 = None if lengths is None else lengths.to(torch.int32)
        with kernel_device(x):
            grad_gates, grad_h0, grad_c0 = lstm_bwd_gate_grads(grad_out, grad_h_n, grad_c_n, w_hh, lengths32, recomputed())
        grad_x, grad_w_ih, grad_w_hh, grad_bias = weight_and_input_grads(grad_gates, x, h_prev, w_ih)
        return grad_x, grad_h0.to(x.dtype), grad_c0.to(x.dtype), grad_w_ih, grad_w_hh, grad_bias, x.new_empty(0)

    acc = accumulate_dtype(x.dtype)
    grad_x = x.new_empty(x.shape)  # contiguous, as the op's fake says
    sums: list[Tensor | None] | None = None
    dh, dc = grad_h_n, grad_c_n
    for index, (t0, t1) in segments:
        h_seg, c_seg, gates_seg = _recompute_segment(*recompute_args, index, t0, t1)
        segment_lengths = None if lengths is None else (lengths - t0).clamp(min=0)
        grads = lstm_recurrence_backward_reference(
            grad_out[t0:t1], dh, dc, x[t0:t1], w_ih, w_hh, w_hr, gates_seg, h_seg, c_seg, segment_lengths
        )
        grad_x[t0:t1] = grads[0]
        dh, dc = grads[1], grads[2]
        weight_grads = [None if g is None else g.to(acc) for g in grads[3:]]
        sums = weight_grads if sums is None else [None if s is None else s + g for s, g in zip(sums, weight_grads)]
    grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = sums[:4]  # no peepholes here (the modules refuse them)
    return (
        grad_x,
        dh,
        dc,
        grad_w_ih.to(w_ih.dtype),
        grad_w_hh.to(w_hh.dtype),
        grad_bias.to(w_ih.dtype),
        grad_w_hr.to(w_hr.dtype) if w_hr is not None else x.new_empty(0),
    )


@recurrence_bwd_recompute.register_fake
def _recurrence_bwd_recompute_fake(
    grad_out, grad_h_n, grad_c_n, x, h_checkpoints, c_checkpoints, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, interval, use_reference
):
    return backward_outputs_fake(x, grad_h_n, grad_c_n, w_ih, w_hh, w_hr, peephole_output=False)


run_without_autocast("recurrence_bwd_recompute")


class LSTMRecurrenceRecompute(torch.autograd.Function):
    """``ops.LSTMRecurrence`` that saves (h, c) every ``interval`` steps instead of every activation."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, interval, use_reference):
        h_all, c_all, gates = torch.ops.triton_lstm.recurrence_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
        T = x.shape[0]
        # Copies, so that c_all and gates are freed when the forward returns (h_all lives on as the output).
        h_checkpoints = h_all[0:T:interval].clone()
        c_checkpoints = c_all[0:T:interval].clone()
        # The inputs first, in ops.LSTMRecurrence's order (no peephole weights: None in w_ch's place):
        # ops._differentiable_backward reads them.
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, None, h_checkpoints, c_checkpoints)
        ctx.interval = interval
        ctx.use_reference = use_reference
        return h_all[1:].detach(), h_all[-1].clone(), c_all[-1].to(x.dtype, copy=True)  # (ops.LSTMRecurrence)

    @staticmethod
    def backward(ctx, grad_out, grad_h_n, grad_c_n):
        if torch.is_grad_enabled():
            # create_graph=True: a second derivative will be taken, so differentiate the reference.
            return _differentiable_backward(ctx, grad_out, grad_h_n, grad_c_n)
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, _, h_checkpoints, c_checkpoints = ctx.saved_tensors
        grads = torch.ops.triton_lstm.recurrence_bwd_recompute(
            grad_out, grad_h_n, grad_c_n, x, h_checkpoints, c_checkpoints,
            w_ih, w_hh, b_ih, b_hh, w_hr, lengths, ctx.interval, ctx.use_reference,
        )
        return (*input_gradients(grads, b_ih is not None, w_hr is not None), None, None, None)


def _storage_key(tensor: Tensor) -> int:
    # The StorageImpl's address: unique while the storage lives (the hooks keep every saved one alive),
    # and, unlike data_ptr(), distinct for meta tensors.
    return tensor.untyped_storage()._cdata


def saved_tensor_bytes(run, exclude: tuple[Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``run()`` executes.

    A storage saved twice (or by two ops) counts once; the storages of ``exclude`` (parameters, the
    caller's input: memory held whatever the backward needs) do not count.
    """
    excluded = {_storage_key(t) for t in exclude}
    saved: dict[int, Tensor] = {}

    def pack(tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key not in excluded:
            saved[key] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = run()
    total = sum(t.untyped_storage().nbytes() for t in saved.values())
    del outputs
    return total


def saved_activation_bytes(
    provider: str,
    T: int,
    B: int,
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    proj_size: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    recompute_interval: int = 0,
    fake: bool | None = None,
) -> int:
    """Bytes one training forward of an LSTM saves for its backward, parameters and input excluded.

    ``provider``: "triton_lstm" (``triton_lstm.LSTM`` with ``recompute_interval``) or "torch"
    (``torch.nn.LSTM``; on a CUDA device, cuDNN's saved output, states and reserve space).
    ``fake`` runs the forward under ``FakeTensorMode``: nothing is computed or allocated, so any shape is
    measured instantly on any machine. It is the default for "triton_lstm", whose custom ops' fake
    implementations give the very shapes the kernels save. "torch" defaults to a real run (it needs the
    memory): the fake cuDNN op reports an empty reserve space, which would undercount it.
    """
    from triton_lstm.modules import LSTM

    if provider == "triton_lstm":
        make = lambda: LSTM(  # noqa: E731
            input_size, hidden_size, num_layers, bidirectional=bidirectional, proj_size=proj_size,
            device=device, dtype=dtype, recompute_interval=recompute_interval,
        )
    elif provider == "torch":
        if recompute_interval:
            raise ValueError("saved_activation_bytes: recompute_interval applies to provider='triton_lstm' only")
        make = lambda: nn.LSTM(  # noqa: E731
            input_size, hidden_size, num_layers, bidirectional=bidirectional, proj_size=proj_size,
            device=device, dtype=dtype,
        )
    else:
        raise ValueError(f"saved_activation_bytes: provider must be 'triton_lstm' or 'torch', got {provider!r}")
    if fake is None:
        fake = provider == "triton_lstm"
    if fake and provider == "triton_lstm":
        # The custom ops' fake implementations give the kernels' saved shapes on any device; on "meta" the
        # module takes that path even on a CPU-only machine, where a CPU tensor would run ATen's LSTM.
        device = "meta"
    with FakeTensorMode() if fake else contextlib.nullcontext():
        module = make()
        x = torch.randn(T, B, input_size, device=device, dtype=dtype)
        return saved_tensor_bytes(lambda: module(x), exclude=(x, *module.parameters()))
