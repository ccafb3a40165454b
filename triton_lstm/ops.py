"""The LSTM recurrence of one layer and one direction as an autograd op.

Road to torch.compile: the kernel launches live inside two ``torch.library.custom_op``s
(``triton_lstm::recurrence_fwd`` / ``recurrence_bwd``), and a ``torch.autograd.Function`` ties them
together. Dynamo traces the Function and sees each custom op as one opaque node with a fake (shape-only)
implementation, so a whole sequence stays one node however many kernel launches it takes, and the CPU
reference is the same op's CPU path. ``triton_op`` + ``wrap_triton`` was the other road: it lets Inductor
look inside the kernels, but it traces the launcher, so the per-step Python loop would be unrolled into
the graph T times.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run the plain-PyTorch reference (the modules
send CPU inputs to ATen's LSTM before they get here), except under ``TRITON_INTERPRET=1``, where they run
the Triton kernels through Triton's interpreter (that is how CI tests the kernels). float64 always runs
the reference.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import Tensor

from triton_lstm.reference import (
    accumulate_dtype,
    both_biases,
    lstm_recurrence_backward_reference,
    lstm_recurrence_reference,
    projection_bias,
)

try:
    from triton_lstm.kernels.lstm_fwd_fused_input import lstm_fwd_from_input
    from triton_lstm.kernels.lstm_bwd import lstm_bwd
    from triton_lstm.kernels.lstm_projection import lstmp_fwd

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: str | None = None
except ImportError as error:  # triton ships for Linux only
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = str(error)

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def uses_kernels(x: Tensor) -> bool:
    """Whether the recurrence over ``x`` runs the Triton kernels (else the PyTorch reference): float16,
    bfloat16 or float32 on a device ``kernels_run_on``."""
    return x.dtype in KERNEL_DTYPES and kernels_run_on(x.device)


# Triton's own floor for NVIDIA GPUs (its README: "NVIDIA GPUs (Compute Capability 8.0+)"). Below it
# (Volta, Turing) an sm_75 build of our plans spills kilobytes per thread, and some fp32 builds stop on
# an LLVM assertion, which aborts the process (benchmarks/NOTES.md, "Other GPUs").
MIN_COMPUTE_CAPABILITY = (8, 0)


def unsupported_gpu(capability: tuple[int, int], hip_version: str | None) -> str | None:
    """Why the kernels do not run on a GPU of this compute capability (``hip_version``: torch.version.hip,
    set on ROCm builds), or None where they do."""
    if hip_version is not None:
        return f"an AMD GPU under ROCm {hip_version}: the kernels are built and tested for NVIDIA GPUs only"
    if tuple(capability) < MIN_COMPUTE_CAPABILITY:
        major, minor = MIN_COMPUTE_CAPABILITY
        return (f"compute capability {capability[0]}.{capability[1]}, below the {major}.{minor} (Ampere) that "
                "Triton and the kernels need")
    return None


# GPU index -> whether the kernels run there: asked once per device and process (a call's host time).
_gpus_running_kernels: dict[int, bool] = {}


def kernels_run_on(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device``: an NVIDIA GPU of compute capability 8.0 or newer, or
    the CPU under Triton's interpreter, with triton importable. Elsewhere the modules run ATen's
    recurrence, as nn's do, and the ops the plain-PyTorch reference; where the kernels would have run on
    a GPU but cannot, or triton is missing, a warning says so once."""
    if exporting_to_onnx():
        return False  # the exporters translate plain PyTorch ops; our custom ops they cannot
    if device.type == "cpu":
        wanted = interpreting()
    elif device.type != "cuda":
        return False
    elif torch.compiler.is_compiling():
        # A traced graph asks no device: the ops' bodies, opaque to Dynamo, ask again when they run.
        wanted = True
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        wanted = _gpus_running_kernels.get(index)
        if wanted is None:
            wanted = _gpus_running_kernels[index] = _gpu_runs_kernels(index)
    if wanted and not HAS_TRITON:
        _warn_without_triton(device)
        return False
    return wanted


def exporting_to_onnx() -> bool:
    """Whether torch.onnx.export is tracing this call. Both its exporters trace (Dynamo's, TorchScript's),
    so an untraced call skips the query (~0.9 µs: two imports inside it, each call)."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()) and torch.onnx.is_in_onnx_export()


def _gpu_runs_kernels(index: int) -> bool:
    why = unsupported_gpu(torch.cuda.get_device_capability(index), torch.version.hip)
    if why is not None:
        warnings.warn(
            f"triton_lstm: the fused kernels do not run on cuda:{index}, {torch.cuda.get_device_name(index)} "
            f"({why}). There the LSTM and GRU modules run ATen's recurrence, as nn.LSTM and nn.GRU do; the "
            "peephole LSTM, which ATen lacks, and the functional ops run the plain-PyTorch reference "
            "recurrence (same results, much slower).",
            RuntimeWarning,
            stacklevel=3,
        )
    return why is None


def kernel_device(x: Tensor):
    """Makes x's GPU the current device for the kernel launches inside: Triton launches on the current
    device (and its current stream), which need not be the tensors' (cuda:1 tensors, cuda:0 current)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


_warned_without_triton = False


def _warn_without_triton(device: torch.device) -> None:
    # At the first forward that wanted the kernels, not at import: on a CPU-only machine (macOS, Windows)
    # the reference is the CPU path with or without triton, so an import-time warning would be noise.
    global _warned_without_triton
    if _warned_without_triton:
        return
    _warned_without_triton = True
    warnings.warn(
        f"triton_lstm: triton could not be imported ({TRITON_IMPORT_ERROR}). On {device} the LSTM and GRU "
        "modules run ATen's recurrence, as nn.LSTM and nn.GRU do; the peephole LSTM, which ATen lacks, and the "
        "functional ops run the plain-PyTorch reference recurrence instead of the fused Triton kernels (same "
        "results, much slower). Install triton (Linux only) to use the kernels.",
        RuntimeWarning,
        stacklevel=2,
    )


@torch.library.custom_op("triton_lstm::recurrence_fwd", mutates_args=())
def recurrence_fwd(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    save: int = 1,
    w_ch: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward of one layer and direction: returns ``(h_all, c_all, gates)`` (layout in reference.py).

    ``save`` 0: an inference forward, whose outputs the backward cannot use: no per-step state is
    kept, c_all is (1, B, H) holding c_T and gates is (0, B, 4H). ``w_ch`` (3H,): peephole weights.
    """
    if uses_kernels(x):
        lengths = None if lengths is None else lengths.to(torch.int32)
        with kernel_device(x):
            # The input projection and the persistent kernel where its plan allows, else the per-step
            # lstm_fwd (lstm_fwd_fused_input.py, lstm_fwd_persistent.py, lstm_projection.py).
            return run_lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, save, True, w_ch, w_hr)
    h_all, c_all, gates = lstm_recurrence_reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, w_ch)
    if not save:
        return h_all, c_all[-1:].clone(), gates[:0].clone()
    return h_all, c_all, gates


@recurrence_fwd.register_fake
def _recurrence_fwd_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save=1, w_ch=None):
    T, B = x.shape[0], x.shape[1]
    H = w_hh.shape[0] // 4
    h_all = x.new_empty(T + 1, B, w_hh.shape[1])
    c_all = x.new_empty(T + 1 if save else 1, B, H, dtype=accumulate_dtype(x.dtype))
    gates = x.new_empty(T if save else 0, B, 4 * H)
    return h_all, c_all, gates


@torch.library.custom_op("triton_lstm::recurrence_bwd", mutates_args=())
def recurrence_bwd(
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
    use_reference: int = 0,
    w_ch: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of one layer and direction: gradients of x, h0, c0, W_ih, W_hh, the bias, W_hr and the
    peephole weights w_ch.

    Without a projection the W_hr gradient is an empty tensor (custom ops cannot return None), and so is
    the w_ch gradient without peepholes.
    Where the kernels run, the fused backward (kernels/lstm_bwd.py) unless ``use_reference`` is 1
    (``backward="reference"``).
    """
    backward = lstm_bwd if uses_kernels(x) and not use_reference else lstm_recurrence_backward_reference
    with kernel_device(x):
        grads = backward(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, gates, h_all, c_all, lengths, w_ch)
    return (*grads[:6], *(grad if grad is not None else x.new_empty(0) for grad in grads[6:]))


def backward_outputs_fake(x, grad_h_n, grad_c_n, w_ih, w_hh, w_hr, w_ch=None, *, peephole_output=True):
    """Shapes of the backward ops' outputs (this op's, and without ``peephole_output`` the recompute op's,
    which has no w_ch gradient): contiguous, as every
    implementation returns them whatever the inputs' strides (a batch_first x is a transposed view;
    Inductor checks the real strides against these)."""
    return (
        x.new_empty(x.shape),
        grad_h_n.new_empty(grad_h_n.shape),
        grad_c_n.new_empty(grad_c_n.shape),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_ih.new_empty(w_ih.shape[0]),
        w_hr.new_empty(w_hr.shape) if w_hr is not None else x.new_empty(0),
        *([w_ch.new_empty(w_ch.shape) if w_ch is not None else x.new_empty(0)] if peephole_output else []),
    )


@recurrence_bwd.register_fake
def _recurrence_bwd_fake(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, gates, h_all, c_all, lengths, use_reference=0,
                         w_ch=None):
    return backward_outputs_fake(x, grad_h_n, grad_c_n, w_ih, w_hh, w_hr, w_ch)


_autocast_library = torch.library.Library("triton_lstm", "FRAGMENT")


def run_without_autocast(op_name: str) -> None:
    """Makes ``triton_lstm::<op_name>`` run with autocast off, as PyTorch's own RNN ops do.

    The modules cast inputs and weights to the autocast dtype before the op (that is what autocast means
    for an LSTM); inside, the recurrence must keep its fp32 state arithmetic, which autocast would
    otherwise round to bf16/fp16 matmul by matmul on the reference path. Registered per autocast
    dispatch key so that it also holds inside torch.compile graphs and when backward runs under autocast.
    """
    op = getattr(torch.ops.triton_lstm, op_name).default
    for device_type, dispatch_key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):

        def kernel(*args, _op=op, _device_type=device_type):
            # Autocast off drops its dispatch key from the thread-local set: the call below goes to the
            # op's own kernel, not back here.
            with torch.autocast(_device_type, enabled=False):
                return _op(*args)

        _autocast_library.impl(op_name, kernel, dispatch_key)


run_without_autocast("recurrence_fwd")
run_without_autocast("recurrence_bwd")


class LSTMRecurrence(torch.autograd.Function):
    """out, h_n, c_n = LSTM(x) for one layer and direction, with the input projection inside."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, use_reference=0, w_ch=None):
        h_all, c_all, gates = torch.ops.triton_lstm.recurrence_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                                                   1, w_ch)
        # The inputs first (_differentiable_backward reads the first ten), then the activations.
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, w_ch, gates, h_all, c_all)
        ctx.use_reference = use_reference
        # detach(): the output shares h_all's storage and version counter without being a view made inside
        # the Function, which autograd would refuse to edit in place. An in-place edit of it then works as
        # on nn.LSTM's output, and the backward (which reads the saved h_all) refuses it as nn's does.
        return h_all[1:].detach(), h_all[-1].clone(), c_all[-1].to(x.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad_out, grad_h_n, grad_c_n):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, w_ch, gates, h_all, c_all = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: a second derivative will be taken, so differentiate the reference.
            return _differentiable_backward(ctx, grad_out, grad_h_n, grad_c_n)
        gates, overwrite = gates_for_backward(ctx, x, gates, lambda: torch.ops.triton_lstm.recurrence_fwd(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, 1, w_ch)[2])
        if overwrite:
            with kernel_device(x), torch.autocast(x.device.type, enabled=False):
                grads = lstm_bwd(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, gates, h_all, c_all, lengths,
                                 w_ch, overwrite_gates=True)
        else:
            grads = torch.ops.triton_lstm.recurrence_bwd(
                grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, gates, h_all, c_all, lengths, ctx.use_reference, w_ch
            )
        return (*input_gradients(grads[:7], b_ih is not None, w_hr is not None), None, None,
                grads[7] if w_ch is not None else None)


def gates_for_backward(ctx, x: Tensor, gates: Tensor, recompute) -> tuple[Tensor, bool]:
    """``(gates, overwrite)`` for a Function's backward: the gates to read, and whether the backward may
    write the gate gradients over them (the kernels' ``overwrite_gates``: dG has the gates' size, so the
    backward's peak memory drops by T·B·4H elements). Not for the reference backward (``ctx.use_reference``),
    outside the kernels, or in a traced backward (torch.compile), whose graph keeps the opaque op that
    leaves its inputs as it found them. Where it may, the caller runs the kernels as a plain call: a custom
    op that declared the write would bump the gates' version, and a second backward could not unpack
    them. That second backward through the same graph (``retain_graph=True``) finds the gates spent and
    gets them again from ``recompute()``, the forward's op (deterministic: the same gates bit for bit)."""
    if ctx.use_reference or not uses_kernels(x) or torch.compiler.is_compiling():
        return gates, False
    if getattr(ctx, "gates_spent", False):
        gates = recompute()
    ctx.gates_spent = True
    return gates, True


def input_gradients(grads, has_bias: bool, has_projection: bool) -> tuple:
    """The backward ops' first seven outputs as gradients of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)."""
    grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = grads
    return (
        grad_x,
        grad_h0,
        grad_c0,
        grad_w_ih,
        grad_w_hh,
        grad_bias if has_bias else None,
        grad_bias.clone() if has_bias else None,  # each bias owns its gradient tensor
        grad_w_hr if has_projection else None,
    )


def _differentiable_backward(ctx, grad_out, grad_h_n, grad_c_n):
    # The first ten saved tensors are the inputs (triton_lstm/recompute.py's Function saves them too, with
    # no w_ch); the Function's arguments after them are lengths, one or two options, then (here) w_ch.
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, w_ch = ctx.saved_tensors[:10]

    def outputs():
        h_all, c_all, _ = lstm_recurrence_reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, w_ch)
        return h_all[1:], h_all[-1], c_all[-1].to(x.dtype)

    inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    needed = ctx.needs_input_grad
    grads = differentiate(outputs, (*inputs, w_ch), (*needed[:len(inputs)], w_ch is not None and needed[-1]),
                          (grad_out, grad_h_n, grad_c_n))
    result = [*grads[:len(inputs)], *[None] * (len(needed) - len(inputs))]
    if w_ch is not None:
        result[-1] = grads[-1]
    return tuple(result)


def differentiate(outputs, inputs, needed, grad_outputs) -> list:
    """The gradients of ``outputs()`` (recomputed here under grad) against ``inputs``, for a backward with
    ``create_graph=True``: a list as long as ``inputs``, None where an input is None or not ``needed``."""
    wanted = [i for i, (tensor, need) in enumerate(zip(inputs, needed)) if need and tensor is not None]
    with torch.enable_grad():
        grads = torch.autograd.grad(outputs(), [inputs[i] for i in wanted], grad_outputs, create_graph=True,
                                    allow_unused=True)
    result = [None] * len(inputs)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return result


def traces_plain_pytorch() -> bool:
    """Whether the recurrence must be plain PyTorch code, which the caller traces: under torch.func
    transforms (grad, vjp, jacrev, vmap differentiate and batch PyTorch code; our autograd.Function and
    custom ops are opaque to them) and in an ONNX export (whose exporters translate PyTorch ops, not ours:
    the peephole LSTM, which ATen lacks, exports as this unrolled recurrence)."""
    if exporting_to_onnx():
        return True
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def grad_wanted(*tensors) -> bool:
    """Whether a backward can follow: grad mode on and one of ``tensors`` (None allowed) requiring grad.
    Where not (no_grad, inference_mode, nothing requiring grad), the ops run their inference forward."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run_lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, save, kernels: bool, w_ch=None, w_hr=None):
    """One layer and direction's forward outside the ops, for the whole-module ops' fallbacks (a stack layer
    by layer, a bidirectional layer direction by direction): ``(h_all, c_all, gates)``, or without ``save``
    the inference forward's. With ``kernels`` the Triton forward (``lengths`` int32), else the plain-PyTorch
    recurrence (differentiable: the double backward differentiates it). ``w_hr``: a projection (then no
    peepholes; ``kernels/lstm_projection.py``). ``gru_ops.run_gru_layer``'s twin."""
    if kernels and w_hr is not None:
        return lstmp_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, bool(save))
    if kernels:
        return lstm_fwd_from_input(x, h0.contiguous(), c0.contiguous(), w_ih, w_hh.contiguous(), projection_bias(b_ih, b_hh),
                                   lengths, bool(save), None if w_ch is None else w_ch.contiguous())
    h_all, c_all, gates = lstm_recurrence_reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, w_ch)
    return (h_all, c_all, gates) if save else (h_all, c_all[-1:], gates[:0])


def lstm_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
    lengths: Tensor | None = None,
    *,
    backward: str = "fused",
    recompute_interval: int = 0,
    w_ch: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one direction, over time-major ``x`` (T, B, I).

    Returns ``output`` (T, B, P), ``h_n`` (B, P) and ``c_n`` (B, H), P being ``w_hr``'s rows when a
    projection is given and H otherwise. ``lengths`` (B,) on x's device runs each sequence to its own
    length and carries its state past the end. Inputs are assumed checked (the modules check them).

    ``backward``: "fused" (the fused Triton backward where the kernels run) or "reference" (the
    plain-PyTorch backward). ``recompute_interval`` k > 0 saves only (h, c) every k steps for the
    backward, which recomputes the rest segment by segment (triton_lstm/recompute.py). ``w_ch`` (3H,):
    peephole weights (w_ci, w_cf, w_co), without a projection or recompute.
    """
    check_backward_options(backward, recompute_interval)
    b_ih, b_hh = both_biases(b_ih, b_hh)
    if c0 is h0:
        c0 = c0.clone()  # one tensor as both states: a duplicate input, which torch.compile refuses to trace
    if w_ch is not None and (w_hr is not None or recompute_interval > 0):
        raise ValueError("peephole weights work without proj_size and recompute_interval only")
    use_reference = int(backward == "reference")
    if traces_plain_pytorch():
        h_all, c_all, _ = lstm_recurrence_reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, w_ch)
        return h_all[1:], h_all[-1], c_all[-1].to(x.dtype)
    if not grad_wanted(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_ch):
        # Nothing will be differentiated (no_grad, inference_mode, or no input requiring grad): an
        # inference forward keeps no per-step gates or c, only the output and the final state.
        h_all, c_all, _ = torch.ops.triton_lstm.recurrence_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, 0, w_ch)
        return h_all[1:], h_all[-1].clone(), c_all[-1].to(x.dtype, copy=True)
    if recompute_interval > 0:
        from triton_lstm.recompute import LSTMRecurrenceRecompute  # imports this module

        return LSTMRecurrenceRecompute.apply(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, recompute_interval, use_reference
        )
    return LSTMRecurrence.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, use_reference, w_ch)


BACKWARDS = ("fused", "reference")


def check_backward_options(backward: str, recompute_interval: int) -> None:
    """Validates the ``backward=`` and ``recompute_interval=`` options (ValueError naming the argument)."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if isinstance(recompute_interval, bool) or not isinstance(recompute_interval, int) or recompute_interval < 0:
        raise ValueError(f"recompute_interval must be an int >= 0 (0: off), got {recompute_interval!r}")
