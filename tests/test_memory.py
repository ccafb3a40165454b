"""Memory of a training step: the forward writes the gates where its input projection was, the backward
writes the gate gradients dG where the gates were, and a second backward through a retained graph,
finding the gates spent, recomputes them.

Peak bytes on the kernels' device: the GPU's allocator, or on the CPU (the interpreter)
``helpers.StorageBytes``, which counts every storage that ops create, inside our custom ops too.
"""

from __future__ import annotations

import pytest
import torch

import triton_lstm
from helpers import KERNEL_DEVICE, STACK_DTYPE, StorageBytes, assert_error_within_pytorch
from triton_lstm import bidirectional as bidirectional_module
from triton_lstm import ops, stack
from triton_lstm.ops import run_lstm_layer

# Small under the interpreter; on a GPU large enough that one gate-sized buffer (T·B·4H) outweighs
# ROUNDING, the room left for the allocator's rounding of the small tensors a step allocates (512-byte
# blocks; the CPU count is exact).
T, B = (128, 32) if KERNEL_DEVICE == "cuda" else (24, 8)
I, H = 16, 16
ROUNDING = 64 * 512 if KERNEL_DEVICE == "cuda" else 0


def _peak_and_kept(run):
    """(peak bytes above the start while ``run()`` executes, bytes still held after it), and its result."""
    if KERNEL_DEVICE == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, torch.cuda.memory_allocated() - start, result
    with StorageBytes() as counted:
        result = run()
    return counted.peak, counted.live, result


def _gate_bytes(dtype: torch.dtype) -> int:
    """One layer and direction's gates (or their gradients): T·B·4H elements."""
    return T * B * 4 * H * dtype.itemsize


@pytest.mark.parametrize("schedule", ["persistent", "per_step"])
@pytest.mark.parametrize("peephole", [False, True], ids=["lstm", "peephole"])
def test_forward_writes_the_gates_over_its_input_projection(schedule, peephole, monkeypatch):
    """What a training forward holds beyond what it keeps for the backward is less than one gate-sized
    buffer: the gates took the projection's place (before, the projection and the gates, each
    T·B·4H, were both alive while the kernel ran)."""
    if schedule == "per_step":
        monkeypatch.setenv("TRITON_LSTM_PERSISTENT", "0")
    dtype = STACK_DTYPE
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.3).to(KERNEL_DEVICE, dtype)

    x, h0, c0 = rand(T, B, I), rand(B, H), rand(B, H)
    w_ih, w_hh, b_ih, b_hh = rand(4 * H, I), rand(4 * H, H), rand(4 * H), rand(4 * H)
    w_ch = rand(3 * H) if peephole else None

    def forward():
        return run_lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, 1, True, w_ch)

    forward()  # (a GPU's first GEMM on a thread allocates cuBLAS's workspace: not this test's business)
    peak, kept, (h_all, c_all, gates) = _peak_and_kept(forward)
    assert gates.shape == (T, B, 4 * H)
    transient = peak - kept
    assert transient < _gate_bytes(dtype) / 2 + ROUNDING, f"{transient} bytes beyond what the forward keeps"
    # The gates hold the activations, not the projection they replaced: against float64 within the suite's
    # bound (twice PyTorch's own error in this dtype).
    inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, w_ch)
    upcast = [None if t is None else t.double() for t in inputs]
    torchs = triton_lstm.lstm_recurrence_reference(*inputs)[2]
    reference = triton_lstm.lstm_recurrence_reference(*upcast)[2]
    assert_error_within_pytorch("gates", gates.double(), torchs.double(), reference, dtype)


def test_stacked_forward_writes_layer_0s_projection_where_its_gates_go():
    """A stack's forward (all layers in one launch) holds no separate input projection of layer 0: the
    projection GEMM writes into layer 0's gates, which the kernel then overwrites tile by tile."""
    dtype, layers = STACK_DTYPE, 2
    model = triton_lstm.LSTM(I, H, num_layers=layers, device=KERNEL_DEVICE, dtype=dtype)
    x = torch.randn(T, B, I, device=KERNEL_DEVICE, dtype=dtype)
    h0 = torch.zeros(layers, B, H, device=KERNEL_DEVICE, dtype=dtype)
    weights = [[getattr(model, f"{name}_l{layer}") for layer in range(layers)]
               for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    with torch.no_grad():
        torch.ops.triton_lstm.stack_fwd(x, h0, h0, *weights, [], None)  # (cuBLAS's workspace, as above)
        peak, kept, (h_all, c_all, gates) = _peak_and_kept(
            lambda: torch.ops.triton_lstm.stack_fwd(x, h0, h0, *weights, [], None))
    assert gates.shape == (layers, T, B, 4 * H)
    transient = peak - kept
    assert transient < _gate_bytes(dtype) / 2 + ROUNDING, f"{transient} bytes beyond what the forward keeps"
    # And the launch computed what the module does.
    expected = model(x)[0]
    torch.testing.assert_close(h_all[-1, 1:], expected, rtol=0, atol=0)


# (module, layers, bidirectional): each autograd Function once (one layer, a stack, a bidirectional
# layer; a bidirectional stack runs the bidirectional one per layer).
CONFIGURATIONS = [
    ("LSTM", 1, False), ("LSTM", 2, False), ("LSTM", 1, True),
    ("GRU", 1, False), ("GRU", 2, False), ("GRU", 1, True),
]


def _model_and_input(name: str, layers: int, bidirectional: bool, dtype: torch.dtype, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = getattr(triton_lstm, name)(I, H, num_layers=layers, bidirectional=bidirectional, device=KERNEL_DEVICE,
                                       dtype=dtype, **kwargs)
    x = torch.randn(T, B, I, device=KERNEL_DEVICE, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(T, B, (2 if bidirectional else 1) * H, device=KERNEL_DEVICE, dtype=dtype)
    return model, x, grad_out


@pytest.mark.parametrize("name, layers, bidirectional, proj_size",
                         [(*configuration, 0) for configuration in CONFIGURATIONS]
                         + [("LSTM", layers, bidirectional, H // 2) for layers, bidirectional in ((1, False), (2, False),
                                                                                               (1, True))],
                         ids=lambda v: str(v))
def test_training_forward_holds_no_projection_beside_the_gates(name, layers, bidirectional, proj_size):
    """What a module's training forward holds beyond what it keeps is less than half a gate buffer: every
    layer's input projection lies where its gates go — a GRU's (3H wide) in the first 3H columns of its
    gate rows, a bidirectional layer's per direction in the order its recurrence runs (the reverse
    direction's formed from x reversed, ``bidirectional.projections_in_step_order``), a stack's layer 0's
    in its gates. Before, a GRU layer held its projection (T·B·3H) and a bidirectional layer both
    directions' (T·B·8H, in time order) next to the gates while the kernel ran, and so did a stack with
    projections (``proj_size``) its layer 0's."""
    dtype = STACK_DTYPE
    model, x, _ = _model_and_input(name, layers, bidirectional, dtype, **({"proj_size": proj_size} if proj_size else {}))
    model(x)  # (cuBLAS's workspace, as above)
    peak, kept, _ = _peak_and_kept(lambda: model(x))
    transient = peak - kept
    allowed = _gate_bytes(dtype) / 2 + ROUNDING
    if proj_size:
        # The recurrence runs in m (kernels/lstm_projection.py): m_t of every step and layer or direction,
        # and as much again for the buffers its projection to h passes through, live until h exists.
        groups = layers * (2 if bidirectional else 1)
        allowed += 2 * groups * (T + 1) * B * H * dtype.itemsize
    assert transient < allowed, f"{transient} bytes beyond what the forward keeps"


@pytest.mark.parametrize("name, layers, bidirectional", CONFIGURATIONS, ids=lambda v: str(v))
def test_backward_writes_the_gate_gradients_over_the_gates(name, layers, bidirectional):
    """The backward allocates no buffer for dG: what it adds at its peak is the input gradient and the
    weight gradients, and for a bidirectional layer one T·B·I buffer more — the reverse direction's input
    gradient, added into the input's in time order without a reversed copy, then its input reversed for
    W_ih's (``bidirectional.add_in_time_order``, ``in_step_order``). Before, each layer and direction also
    allocated its dG (T·B·4H), a bidirectional layer copied the reverse direction's dG and h into time
    order, and later held its reversed input, its input gradient and that gradient reversed at once."""
    dtype = STACK_DTYPE
    model, x, grad_out = _model_and_input(name, layers, bidirectional, dtype)
    model(x)[0].backward(grad_out)  # (the backward thread's cuBLAS workspace on a GPU, as above)
    model.zero_grad(set_to_none=True)
    x.grad = None
    out = model(x)[0]
    peak, _, _ = _peak_and_kept(lambda: out.backward(grad_out))
    widest_input = (2 * H if bidirectional else H) if layers > 1 else I
    input_bytes = T * B * widest_input * dtype.itemsize
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Twice the room each needs (a bidirectional layer's second T·B·I included); one dG more (T·B·4H), or
    # a bidirectional layer's third T·B·I, would not fit.
    allowed = 2 * input_bytes + 2 * parameter_bytes + ROUNDING
    assert allowed < peak + _gate_bytes(dtype)
    assert peak < allowed, f"the backward allocated {peak} bytes at its peak (one dG: {_gate_bytes(dtype)})"


@pytest.mark.parametrize("name, layers, bidirectional", CONFIGURATIONS, ids=lambda v: str(v))
def test_second_backward_through_a_retained_graph_recomputes_the_gates(name, layers, bidirectional):
    """The first backward overwrote the saved gates with dG; a second one through the same graph
    (``retain_graph=True``, as nn.LSTM allows) recomputes them and gives the same gradients bit for bit."""
    model, x, grad_out = _model_and_input(name, layers, bidirectional, STACK_DTYPE)
    leaves = [x, *model.parameters()]
    out = model(x)[0]
    first = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    second = torch.autograd.grad(out, leaves, grad_out)
    lone = torch.autograd.grad(model(x)[0], leaves, grad_out)  # (a new graph, no retain_graph)
    for index, (a, b, c) in enumerate(zip(first, second, lone)):
        assert torch.equal(a, b), f"gradient {index} differs in the second backward"
        assert torch.equal(a, c), f"gradient {index} differs from a lone backward's"


@pytest.mark.parametrize("name, kwargs", [
    ("LSTM", dict(num_layers=2, dropout=0.4)),
    ("LSTM", dict(num_layers=2, bidirectional=True, peephole=True)),
    ("GRU", dict(num_layers=2, dropout=0.4)),
    ("LSTM", dict(num_layers=2, proj_size=H // 2)),
    ("LSTM", dict(bidirectional=True, proj_size=H // 2)),
], ids=["lstm-dropout", "lstm-peephole-bidirectional", "gru-dropout", "lstm-projection", "lstm-projection-bidirectional"])
def test_retained_graph_with_dropout_peepholes_projections_and_packed_sequences(name, kwargs):
    """The recomputed gates of a second backward are the first forward's: the same dropout masks (saved,
    not drawn again), the same peepholes, projections and sequence lengths."""
    torch.manual_seed(0)
    model = getattr(triton_lstm, name)(I, H, device=KERNEL_DEVICE, dtype=STACK_DTYPE, **kwargs).train()
    x = torch.randn(T, B, I, device=KERNEL_DEVICE, dtype=STACK_DTYPE, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(1))
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(model(packed)[0])
    grad_out = torch.randn_like(out)
    leaves = [x, *model.parameters()]
    first = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    second = torch.autograd.grad(out, leaves, grad_out)
    for index, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"gradient {index} differs in the second backward"


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, False), (1, True)],
                         ids=["one-layer", "stack", "bidirectional"])
def test_backward_with_projections_writes_the_gate_gradients_over_the_gates(layers, bidirectional, monkeypatch):
    """With ``proj_size > 0`` too: W_hr's gradient takes m_t = o ⊙ tanh(c_t) from the gates before the
    chain overwrites them (``lstm_projection.cell_outputs``). Against the same backward made to keep the
    gates (``gates_for_backward`` answering "keep them"), the peak is at least one dG (T·B·4H) lower, and the
    gradients are the same."""
    dtype = STACK_DTYPE
    torch.manual_seed(0)
    model = triton_lstm.LSTM(I, H, num_layers=layers, bidirectional=bidirectional, proj_size=H // 2,
                             device=KERNEL_DEVICE, dtype=dtype)
    x = torch.randn(T, B, I, device=KERNEL_DEVICE, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(T, B, (2 if bidirectional else 1) * (H // 2), device=KERNEL_DEVICE, dtype=dtype)
    leaves = [x, *model.parameters()]
    torch.autograd.grad(model(x)[0], leaves, grad_out)  # (cuBLAS's workspace, as above)

    def backward_peak():
        out = model(x)[0]
        peak, _, grads = _peak_and_kept(lambda: torch.autograd.grad(out, leaves, grad_out))
        return peak, grads

    overwriting, grads = backward_peak()
    for module in (ops, stack, bidirectional_module):
        monkeypatch.setattr(module, "gates_for_backward", lambda ctx, x, gates, recompute: (gates, False))
    keeping, kept_grads = backward_peak()
    assert keeping - overwriting >= _gate_bytes(dtype), f"peak {overwriting} bytes, {keeping} keeping the gates"
    for index, (a, b) in enumerate(zip(grads, kept_grads)):
        assert torch.equal(a, b), f"gradient {index} differs from the backward that keeps the gates"
