"""triton_lstm inside the standard PyTorch workflows: torch.compile, autocast, CUDA graphs, DDP / FSDP,
saving and loading, and an install without triton.

On a machine without a GPU the CPU tests run the kernels through Triton's interpreter (float32) and the
reference (float64, and whenever TRITON_INTERPRET is unset); the GPU tests skip with a reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import traceback
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, prune

import triton_lstm
from helpers import KERNEL_DEVICE, requires_cuda
from triton_lstm.ops import uses_kernels

REPO_ROOT = Path(__file__).resolve().parents[1]

# (device, dtype) of each road: the Triton kernels (GPU, or CPU through the interpreter) and the reference.
ROADS = {
    "kernels-float32": (KERNEL_DEVICE, torch.float32),
    "reference-float64": ("cpu", torch.float64),
}


class Tagger(nn.Module):
    """A small model around triton_lstm.LSTM: every layer and direction runs the op."""

    def __init__(self, proj_size: int = 0) -> None:
        super().__init__()
        self.lstm = triton_lstm.LSTM(5, 6, num_layers=2, batch_first=True, bidirectional=True, proj_size=proj_size)
        self.head = nn.Linear(2 * (proj_size or 6), 3)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return self.head(out), h, c


def _model_and_input(road: str, seed: int = 0, batch: int = 3, steps: int = 4):
    device, dtype = ROADS[road]
    torch.manual_seed(seed)
    model = Tagger().to(device=device, dtype=dtype)
    x = torch.randn(batch, steps, 5, device=device, dtype=dtype, requires_grad=True)
    return model, x


def _outputs_and_grads(model: nn.Module, run, x: torch.Tensor, seed: int = 1):
    """Outputs of ``run(x)`` and the gradients of x and every parameter for random output gradients."""
    outputs = run(x)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=generator, device=x.device, dtype=out.dtype)).sum() for out in outputs)
    grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return [out.detach() for out in outputs], grads


class GraphCounter:
    """A torch.compile backend (AOTAutograd, eager kernels) that keeps every graph it is handed."""

    def __init__(self) -> None:
        # Imported here: the distributed workers import this module and need none of the compiler.
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.dynamo_graphs, self.forward_graphs, self.backward_graphs = [], [], []

        def keep(graphs):
            def compiler(graph_module, example_inputs):
                graphs.append(graph_module)
                return make_boxed_func(graph_module.forward)

            return compiler

        self._aot = aot_autograd(fw_compiler=keep(self.forward_graphs), bw_compiler=keep(self.backward_graphs))

    def __call__(self, graph_module, example_inputs):
        self.dynamo_graphs.append(graph_module)
        return self._aot(graph_module, example_inputs)

    @staticmethod
    def count(graphs, op) -> int:
        return sum(node.target is op for graph in graphs for node in graph.graph.nodes)


def _assert_all_close(name: str, actual, expected, **tolerances) -> None:
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, msg=lambda message: f"{name}[{index}]: {message}", **tolerances)


# --------------------------------------------------------------------------------------------- compile


@pytest.mark.no_poison
@pytest.mark.parametrize(
    "road, recompute_interval",
    [("kernels-float32", 0), ("reference-float64", 0), ("reference-float64", 2)],
    ids=["kernels-float32", "reference-float64", "reference-float64-recompute"],
)
def test_compile_fullgraph_one_graph_same_outputs_and_gradients(road, recompute_interval):
    model, x = _model_and_input(road)
    model.lstm.recompute_interval = recompute_interval
    backend = GraphCounter()
    compiled = torch.compile(model, backend=backend, fullgraph=True)

    compiled_outputs, compiled_grads = _outputs_and_grads(model, compiled, x)
    eager_outputs, eager_grads = _outputs_and_grads(model, model, x)

    # fullgraph=True raises on a graph break; one Dynamo graph, and the recurrence of each of the
    # 2 layers x 2 directions is an op node of it, forward and backward, not a call outside it.
    assert len(backend.dynamo_graphs) == 1
    assert len(backend.forward_graphs) == 1 and len(backend.backward_graphs) == 1
    assert GraphCounter.count(backend.forward_graphs, torch.ops.triton_lstm.recurrence_fwd.default) == 4
    backward_op = "recurrence_bwd_recompute" if recompute_interval else "recurrence_bwd"
    assert GraphCounter.count(backend.backward_graphs, getattr(torch.ops.triton_lstm, backward_op).default) == 4
    _assert_all_close("outputs", compiled_outputs, eager_outputs)
    _assert_all_close("gradients", compiled_grads, eager_grads)


@pytest.mark.no_poison
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_compile_dynamic_shapes_one_graph_for_every_length_and_batch(cls):
    """Variable-length batches under torch.compile(dynamic=True): one compiled graph serves every (T, B), the
    ops' fake implementations taking symbolic sizes; each call matches the eager module."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = getattr(triton_lstm, cls)(5, 6, num_layers=2).to(KERNEL_DEVICE)
    compiled = torch.compile(model, backend=GraphCounter(), fullgraph=True, dynamic=True)
    counters.clear()
    for steps, batch in ((4, 3), (7, 2), (3, 5)):
        x = torch.randn(steps, batch, 5, device=KERNEL_DEVICE, requires_grad=True)
        compiled_outputs, compiled_grads = _outputs_and_grads(model, lambda inp: compiled(inp)[:1], x)
        eager_outputs, eager_grads = _outputs_and_grads(model, lambda inp: model(inp)[:1], x)
        _assert_all_close(f"outputs T={steps} B={batch}", compiled_outputs, eager_outputs)
        _assert_all_close(f"gradients T={steps} B={batch}", compiled_grads, eager_grads)
    # Dynamo's count of the graphs it compiled (a backend may be handed a first, empty attempt of the same
    # frame when Dynamo restarts its analysis: that is not a recompile).
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"], dict(counters["stats"])


@pytest.mark.no_poison
def test_compile_fullgraph_with_peepholes():
    """A peephole LSTM compiles to one graph too, the peephole weights an input of each recurrence op."""
    torch.manual_seed(0)
    model = triton_lstm.LSTM(5, 6, num_layers=2, batch_first=True, bidirectional=True, peephole=True).to(KERNEL_DEVICE)
    x = torch.randn(3, 4, 5, device=KERNEL_DEVICE, requires_grad=True)
    backend = GraphCounter()
    compiled = torch.compile(model, backend=backend, fullgraph=True)

    def flat(run):
        return lambda inp: (lambda out: (out[0], *out[1]))(run(inp))

    compiled_outputs, compiled_grads = _outputs_and_grads(model, flat(compiled), x)
    eager_outputs, eager_grads = _outputs_and_grads(model, flat(model), x)
    assert len(backend.dynamo_graphs) == 1
    assert GraphCounter.count(backend.forward_graphs, torch.ops.triton_lstm.recurrence_fwd.default) == 4
    assert GraphCounter.count(backend.backward_graphs, torch.ops.triton_lstm.recurrence_bwd.default) == 4
    _assert_all_close("outputs", compiled_outputs, eager_outputs)
    _assert_all_close("gradients", compiled_grads, eager_grads)


@pytest.mark.no_poison
@pytest.mark.parametrize("states", ["none", "one-tensor-twice"])
def test_compile_fullgraph_lstm_cell(states):
    """An LSTMCell called without hx, or given one tensor as both states (nn.LSTMCell takes either), compiles
    to one graph: its recurrence op never sees one tensor as two inputs, which Dynamo refuses to trace."""
    torch.manual_seed(0)
    cell = triton_lstm.LSTMCell(3, 4).to(KERNEL_DEVICE)
    x = torch.randn(2, 3, device=KERNEL_DEVICE)
    zeros = torch.zeros(2, 4, device=KERNEL_DEVICE)
    hx = None if states == "none" else (zeros, zeros)
    compiled = torch.compile(cell, backend=GraphCounter(), fullgraph=True)
    _assert_all_close("h, c", compiled(x, hx), cell(x, hx))


@pytest.mark.no_poison
def test_compile_fullgraph_under_cpu_autocast(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the reference: bf16 is wrong in the interpreter
    # Eager on the CPU would run ATen's LSTM (as nn.LSTM does); this test compares our op compiled and eager.
    monkeypatch.setattr(triton_lstm.modules, "runs_aten", lambda x: False)
    model, x = _model_and_input("reference-float64")
    model, x = model.float(), x.detach().float().requires_grad_()
    assert not uses_kernels(x)
    backend = GraphCounter()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled_outputs, compiled_grads = _outputs_and_grads(model, compiled, x)
        eager_outputs, eager_grads = _outputs_and_grads(model, model, x)
    assert len(backend.dynamo_graphs) == 1
    assert [out.dtype for out in compiled_outputs] == [torch.bfloat16] * 3
    _assert_all_close("outputs", compiled_outputs, eager_outputs, rtol=0, atol=0)
    _assert_all_close("gradients", compiled_grads, eager_grads)


@requires_cuda
@pytest.mark.no_poison
@pytest.mark.parametrize("mode", [None, "reduce-overhead"], ids=["default", "reduce-overhead"])
def test_compile_inductor_cuda(mode):
    # "reduce-overhead" replays the compiled step as a CUDA graph.
    model, x = _model_and_input("kernels-float32")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", mode=mode, fullgraph=True)
    for step in range(3):  # reduce-overhead records on the first calls, replays after
        compiled_outputs, compiled_grads = _outputs_and_grads(model, compiled, x, seed=step)
        eager_outputs, eager_grads = _outputs_and_grads(model, model, x, seed=step)
        _assert_all_close("outputs", compiled_outputs, eager_outputs)
        _assert_all_close("gradients", compiled_grads, eager_grads, rtol=1e-4, atol=1e-5)


def _op_inputs(device, dtype, project: bool, with_lengths: bool):
    T, B, I, H, P = 4, 3, 5, 6, 2
    K = P if project else H
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device)

    lengths = torch.tensor([4, 1, 3], device=device) if with_lengths else None
    forward_args = (
        randn(T, B, I), randn(B, K), randn(B, H), randn(4 * H, I), randn(4 * H, K), randn(4 * H), randn(4 * H),
        randn(P, H) if project else None, lengths,
    )
    return forward_args, (randn(T, B, K), randn(B, K), randn(B, H))


@pytest.mark.parametrize(
    "road, project, with_lengths",
    [("reference-float64", False, False), ("kernels-float32", True, True)],
    ids=["reference-float64-plain", "kernels-float32-projection-lengths"],
)
def test_opcheck_custom_ops(road, project, with_lengths):
    device, dtype = ROADS[road]
    forward_args, (grad_out, grad_h_n, grad_c_n) = _op_inputs(device, dtype, project, with_lengths)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths = forward_args
    torch.library.opcheck(torch.ops.triton_lstm.recurrence_fwd.default, forward_args)
    h_all, c_all, gates = torch.ops.triton_lstm.recurrence_fwd(*forward_args)
    backward_args = (grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, gates, h_all, c_all, lengths)
    torch.library.opcheck(torch.ops.triton_lstm.recurrence_bwd.default, backward_args)
    # A batch_first input reaches the ops as a transposed view: the fake outputs must still have the real
    # (contiguous) strides, which Inductor asserts on the GPU.
    x_view = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not x_view.is_contiguous()
    torch.library.opcheck(torch.ops.triton_lstm.recurrence_bwd.default, (*backward_args[:3], x_view, *backward_args[4:]))


# -------------------------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_cpu_runs_in_autocast_dtype(dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the reference: bf16 is wrong in the interpreter
    torch.manual_seed(0)
    ours = triton_lstm.LSTM(5, 6, num_layers=2, bidirectional=True)
    theirs = nn.LSTM(5, 6, num_layers=2, bidirectional=True)
    theirs.load_state_dict(ours.state_dict())
    # The same module cast to the autocast dtype, run without autocast: what autocast must amount to.
    cast = triton_lstm.LSTM(5, 6, num_layers=2, bidirectional=True).to(dtype)
    cast.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 5)
    assert not uses_kernels(x.to(dtype))
    grad = torch.randn(4, 3, 12)

    with torch.autocast("cpu", dtype=dtype):
        out, (h, c) = ours(x)
        (out.float() * grad).sum().backward()  # backward inside the region too: the ops keep autocast off
        if dtype == torch.bfloat16:  # nn.LSTM's CPU (oneDNN) path has no float16 LSTM
            their_out, (their_h, their_c) = theirs(x)
            assert (their_out.dtype, their_h.dtype, their_c.dtype) == (dtype,) * 3
    cast_out, (cast_h, cast_c) = cast(x.to(dtype))
    (cast_out.float() * grad).sum().backward()

    assert (out.dtype, h.dtype, c.dtype) == (dtype,) * 3
    for ours_tensor, cast_tensor in ((out, cast_out), (h, cast_h), (c, cast_c)):
        assert torch.equal(ours_tensor, cast_tensor), "autocast changed the arithmetic inside the recurrence"
    for (name, param), cast_param in zip(ours.named_parameters(), cast.parameters()):
        assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, name
        assert torch.equal(param.grad, cast_param.grad.float()), name


def test_autocast_cpu_lstm_cell(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    cell = triton_lstm.LSTMCell(5, 6)
    x = torch.randn(3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, c = cell(x)
    # nn.LSTMCell on CPU leaves lstm_cell to autocast's op-by-op casts and returns float32 (its CUDA
    # path returns the autocast dtype); ours runs in the autocast dtype on every device.
    assert h.dtype == c.dtype == torch.bfloat16
    (h.float().sum() + c.float().sum()).backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in cell.parameters())


@pytest.mark.parametrize("cls", ["LSTM", "LSTMCell"])
def test_autocast_state_carried_between_calls(cls, monkeypatch):
    """A state returned under autocast (bf16) fed back with a float32 input, as a sampling loop does:
    nn.LSTM casts both, so ours must too (the GPU run of char_lm's generation found this refused)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_lstm.modules, "runs_aten", lambda x: False)  # our op, not ATen's LSTM
    torch.manual_seed(0)
    ours = getattr(triton_lstm, cls)(5, 6)
    cast = getattr(triton_lstm, cls)(5, 6).to(torch.bfloat16)
    cast.load_state_dict(ours.state_dict())
    x1, x2 = torch.randn(2, 4, 3, 5) if cls == "LSTM" else torch.randn(2, 3, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = ours(x1) if cls == "LSTM" else (None, ours(x1))
        assert all(t.dtype == torch.bfloat16 for t in state)
        second = ours(x2, state)
    expected = cast(x2.to(torch.bfloat16), state)
    for got, want in zip(torch.utils._pytree.tree_leaves(second), torch.utils._pytree.tree_leaves(expected)):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="dtype"):  # outside autocast a mismatch is still an error
        ours(x2, state)


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_autocast_leaves_float64_alone(cls):
    """Autocast casts no float64 tensor: a float64 model under it runs in float64 as nn's does (ours cast it
    to the autocast dtype until the sixteenth session), and float64 beside float32 fails as nn's op does."""
    torch.manual_seed(0)
    ours = getattr(triton_lstm, cls)(3, 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    x = x[0] if cls.endswith("Cell") else x
    expected = ours(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(x)
    for got_tensor, expected_tensor in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        assert got_tensor.dtype == torch.float64
        torch.testing.assert_close(got_tensor, expected_tensor, rtol=0, atol=0)
    for module_dtype, input_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        inp = x.to(input_dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError):
            getattr(nn, cls)(3, 4, dtype=module_dtype)(inp)
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="leaves float64"):
            getattr(triton_lstm, cls)(3, 4, dtype=module_dtype)(inp)


def _nn_lstm_reference(theirs: nn.LSTM, x, lengths=None, dtype=torch.float64):
    """nn.LSTM in ``dtype`` on x: in float64 the oracle for the autocast comparison."""
    reference = nn.LSTM(theirs.input_size, theirs.hidden_size, num_layers=theirs.num_layers, proj_size=theirs.proj_size)
    reference = reference.to(device=x.device, dtype=dtype)
    reference.load_state_dict(theirs.state_dict())
    if lengths is not None:
        x = nn.utils.rnn.pack_padded_sequence(x.to(dtype), lengths, enforce_sorted=False)
        out, (h, c) = reference(x)
        return nn.utils.rnn.pad_packed_sequence(out)[0], h, c
    out, (h, c) = reference(x.to(dtype))
    return out, h, c


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", ["plain", "projection", "packed"])
def test_autocast_cuda_matches_nn_lstm(dtype, config):
    from helpers import assert_error_within_pytorch

    torch.manual_seed(0)
    proj_size = 4 if config == "projection" else 0
    theirs = nn.LSTM(16, 32, num_layers=2, proj_size=proj_size).cuda()
    ours = triton_lstm.LSTM(16, 32, num_layers=2, proj_size=proj_size).cuda()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(10, 8, 16, device="cuda")
    lengths = torch.tensor([10, 3, 7, 1, 10, 5, 2, 9]) if config == "packed" else None

    def run(module):
        inp = x if lengths is None else nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        with torch.autocast("cuda", dtype=dtype):
            out, (h, c) = module(inp)
        if lengths is not None:
            out = nn.utils.rnn.pad_packed_sequence(out)[0]
        return out, h, c

    ours_results, their_results = run(ours), run(theirs)
    reference = _nn_lstm_reference(theirs, x, lengths)
    for name, o, t, r in zip(("output", "h_n", "c_n"), ours_results, their_results, reference):
        # nn.LSTM's cuDNN autocast wrapper runs fp16 whatever the autocast dtype (seen on an H200, torch
        # 2.11: bf16 autocast returns fp16); ours follows the autocast dtype, as every other op does.
        assert o.dtype == dtype, f"{name}: {o.dtype} under {dtype} autocast"
        assert t.dtype in (dtype, torch.float16), f"{name}: nn.LSTM gave {t.dtype}"
        if t.dtype != dtype:
            # Then the yardstick is nn.LSTM computing in our dtype (its fp16 result is more precise).
            t = _nn_lstm_reference(theirs, x, lengths, dtype)[("output", "h_n", "c_n").index(name)]
        assert_error_within_pytorch(name, o.float(), t.float(), r, dtype, factor=3.0)
    ours_results[0].float().sum().backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in ours.parameters())

    cell = triton_lstm.LSTMCell(16, 32).cuda()
    their_cell = nn.LSTMCell(16, 32).cuda()
    with torch.autocast("cuda", dtype=dtype):
        assert cell(x[0])[0].dtype == their_cell(x[0])[0].dtype == dtype


# -------------------------------------------------------------------------- host syncs and CUDA graphs


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def _host_reads_forbidden():
    """Tensor methods that read a value back to the host raise (on a GPU each would be a sync)."""

    def forbidden(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")

        return method

    with contextlib.ExitStack() as stack:
        for name in HOST_READS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, forbidden(name)))
        yield


@pytest.mark.parametrize("road", list(ROADS))
def test_no_host_reads_in_forward_and_backward(road):
    device, dtype = ROADS[road]
    torch.manual_seed(0)
    model = triton_lstm.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3).to(device=device, dtype=dtype)
    cell = triton_lstm.LSTMCell(5, 6).to(device=device, dtype=dtype)
    x = torch.randn(4, 3, 5, device=device, dtype=dtype, requires_grad=True)
    hx = (torch.randn(4, 3, 3, device=device, dtype=dtype), torch.randn(4, 3, 6, device=device, dtype=dtype))
    with _host_reads_forbidden():
        with pytest.raises(AssertionError, match="host read"):
            x.sum().item()  # the guard is live
        out, (h, c) = model(x, hx)
        cell_h, cell_c = cell(x[0])
        (out.sum() + h.sum() + c.sum() + cell_h.sum() + cell_c.sum()).backward()


def _warm_up(run, *args):
    """Runs ``run`` on a side stream first, as capture requires (and so that the kernels are compiled)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run(*args)
    torch.cuda.current_stream().wait_stream(stream)


@requires_cuda
def test_forward_and_backward_do_not_sync_cuda():
    model, x = _model_and_input("kernels-float32")
    _outputs_and_grads(model, model, x)  # compiles the kernels, which may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        _outputs_and_grads(model, model, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
def test_cuda_graph_capture_forward():
    torch.manual_seed(0)
    model = triton_lstm.LSTM(16, 32, num_layers=2, bidirectional=True).cuda()
    static_x = torch.randn(6, 4, 16, device="cuda")
    with torch.no_grad():
        _warm_up(model, static_x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, (static_h, static_c) = model(static_x)
        for _ in range(3):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            out, (h, c) = model(x)
            _assert_all_close("replay", (static_out, static_h, static_c), (out, h, c))


@requires_cuda
def test_cuda_graph_make_graphed_callables_forward_backward():
    torch.manual_seed(0)
    model = Tagger(proj_size=3).cuda()
    eager = Tagger(proj_size=3).cuda()
    eager.load_state_dict(model.state_dict())
    sample = torch.randn(4, 6, 5, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(model, (sample,))
    for step in range(3):
        x = torch.randn(4, 6, 5, device="cuda", requires_grad=True)
        x_eager = x.detach().clone().requires_grad_()
        graphed_outputs, graphed_grads = _outputs_and_grads(model, graphed, x, seed=step)
        eager_outputs, eager_grads = _outputs_and_grads(eager, eager, x_eager, seed=step)
        _assert_all_close("outputs", graphed_outputs, eager_outputs)
        _assert_all_close("gradients", graphed_grads, eager_grads)


# ----------------------------------------------------------------------------------------- distributed


class Regressor(nn.Module):
    """float64: the reference road, which is quick; what DDP and FSDP exercise is the module, not the kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = triton_lstm.LSTM(3, 5, num_layers=2, batch_first=True, proj_size=2, dtype=torch.float64)
        self.head = nn.Linear(2, 1, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


def _regression_data():
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(4, 6, 3, generator=generator, dtype=torch.float64),
        torch.randn(4, 6, 1, generator=generator, dtype=torch.float64),
    )


def _sgd_step(model: nn.Module, x, y) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    F.mse_loss(model(x), y).backward()  # a mean: each rank's half-batch mean, averaged, is the full mean
    optimizer.step()


def _distributed_worker(rank: int, world_size: int, port: int, result_path: str) -> None:
    """One rank: an SGD step on its shard of the batch under DDP, then the same under FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        x, y = _regression_data()
        shard = slice(rank * 2, rank * 2 + 2)
        results = {}

        torch.manual_seed(0)
        model = Regressor()
        _sgd_step(nn.parallel.DistributedDataParallel(model), x[shard], y[shard])
        results["ddp"] = model.state_dict()

        torch.manual_seed(0)
        model = Regressor()
        mesh = init_device_mesh("cpu", (world_size,))
        with warnings.catch_warnings():
            # FSDP2 notes that the LSTM's output is a view (of the time-major buffer), as nn.LSTM's is.
            warnings.simplefilter("ignore", UserWarning)
            fully_shard(model.lstm, mesh=mesh)
            fully_shard(model, mesh=mesh)
            _sgd_step(model, x[shard], y[shard])
        results["fsdp"] = {name: value.full_tensor() for name, value in model.state_dict().items()}
        if rank == 0:
            torch.save(results, result_path)
        dist.barrier()  # both ranks done with every collective
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    # Leave without tearing gloo down: its worker threads, destroyed at exit, aborted a finished rank now
    # and then ("terminate called without an active exception", SIGABRT, about one full-suite run in
    # three on a 2-core machine, with or without destroy_process_group).
    sys.stdout.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """Parameters after one SGD step of two gloo processes (CPU), each on half the batch."""
    path = str(tmp_path_factory.mktemp("distributed") / "after_step.pt")
    torch.multiprocessing.spawn(_distributed_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    return torch.load(path, weights_only=True)


def _single_process_state():
    x, y = _regression_data()
    torch.manual_seed(0)
    model = Regressor()
    _sgd_step(model, x, y)
    return model.state_dict()


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_gloo_processes_step_like_one_process(two_process_results, wrapper):
    expected = _single_process_state()
    got = two_process_results[wrapper]
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, msg=lambda message: f"{wrapper} {name}: {message}")


@requires_cuda
def test_fsdp_cuda_single_rank():
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        x, y = (t.to("cuda", torch.float32) for t in _regression_data())  # float32: the kernels
        torch.manual_seed(0)
        plain = Regressor().to("cuda", torch.float32)
        torch.manual_seed(0)
        sharded = Regressor().to("cuda", torch.float32)
        fully_shard(sharded.lstm)
        fully_shard(sharded)
        _sgd_step(plain, x, y)
        _sgd_step(sharded, x, y)
        for name, value in plain.state_dict().items():
            torch.testing.assert_close(sharded.state_dict()[name].full_tensor(), value, msg=lambda m: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


def test_forward_on_meta_device_gives_shapes():
    # Deferred initialization (FSDP, shape inference) runs modules on the meta device.
    model = triton_lstm.LSTM(5, 6, num_layers=2, bidirectional=True, device="meta")
    out, (h, c) = model(torch.empty(4, 3, 5, device="meta"))
    assert (out.shape, h.shape, c.shape) == ((4, 3, 12), (4, 3, 6), (4, 3, 6))


# ------------------------------------------------------------------------------ weights computed per call


class WeightDrop(nn.Module):
    """AWD-LSTM's DropConnect on W_hh (Merity et al. 2017, as its code does it): the parameter leaves the
    module, and each forward sets a plain tensor, dropped out from it, in its place. The mask is drawn on
    the CPU from a fixed seed, so that every device and dtype compared gets the same one."""

    def __init__(self, module: nn.Module, name: str, p: float):
        super().__init__()
        self.module, self.name, self.p = module, name, p
        weight = getattr(module, name)
        del module._parameters[name]
        module.register_parameter(name + "_raw", nn.Parameter(weight.detach().clone()))

    def forward(self, x):
        raw = getattr(self.module, self.name + "_raw")
        keep = torch.rand(raw.shape, generator=torch.Generator().manual_seed(3)) >= self.p
        setattr(self.module, self.name, raw * keep.to(raw.device, raw.dtype) / (1 - self.p))
        return self.module(x)


# (Not spectral_norm in training: each read of the weight runs a power iteration, and nn.LSTM reads its
# weights twice per forward where ours reads them once: README, "Limitations".)
REPARAMETRIZED = {
    "weight_norm": lambda m: parametrizations.weight_norm(m, "weight_hh_l0"),
    "orthogonal": lambda m: parametrizations.orthogonal(m, "weight_ih_l1"),
    "pruned": lambda m: prune.l1_unstructured(m, "weight_ih_l0", amount=0.3),
    "weight_drop": lambda m: WeightDrop(m, "weight_hh_l1", 0.5),
}


@pytest.mark.parametrize("how", REPARAMETRIZED)
def test_weights_computed_per_call_train_as_nn_lstms(how):
    """Parametrizations, pruning and AWD-LSTM's weight drop hand the module a computed weight each call: ours
    takes it as nn.LSTM does, and its gradient reaches the leaves behind it (errors against nn.LSTM in
    float64 within twice nn.LSTM's own in float32)."""
    from helpers import assert_error_within_pytorch

    runs = {}
    for name, cls, dtype, device in (("nn64", nn.LSTM, torch.float64, "cpu"), ("nn32", nn.LSTM, torch.float32, "cpu"),
                                     ("ours", triton_lstm.LSTM, torch.float32, KERNEL_DEVICE)):
        torch.manual_seed(0)
        model = REPARAMETRIZED[how](cls(5, 6, num_layers=2).to(device, dtype))
        x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(2)).to(device, dtype)
        output, (h_n, _) = model(x)
        leaves = [p for _, p in sorted(model.named_parameters())]
        runs[name] = (output, *torch.autograd.grad(output.square().sum() + h_n.sum(), leaves))
    assert len(runs["ours"]) == len(runs["nn64"])
    for index, (ours, torchs, reference) in enumerate(zip(runs["ours"], runs["nn32"], runs["nn64"])):
        # the output, then the leaves' gradients (each a sum over the T·B = 12 rows)
        assert_error_within_pytorch(f"{how} {index}", ours.cpu(), torchs, reference, torch.float32,
                                    summed_terms=12 if index else 1)


# ---------------------------------------------------------------------------------- saving and loading


def test_torch_save_whole_model_loads_with_weights_only():
    torch.manual_seed(0)
    model = nn.Sequential(triton_lstm.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3, backward="reference"))
    cell = triton_lstm.LSTMCell(5, 6)
    buffer = io.BytesIO()
    torch.save({"model": model, "cell": cell}, buffer)

    buffer.seek(0)
    with torch.serialization.safe_globals([nn.Sequential]):
        with pytest.raises(pickle.UnpicklingError, match="triton_lstm.modules.LSTM"):
            torch.load(buffer, weights_only=True)  # not without allowing our classes

    buffer.seek(0)
    with torch.serialization.safe_globals([*triton_lstm.SAFE_GLOBALS, nn.Sequential]):
        loaded = torch.load(buffer, weights_only=True)
    lstm = loaded["model"][0]
    assert type(lstm) is triton_lstm.LSTM and type(loaded["cell"]) is triton_lstm.LSTMCell
    assert lstm.backward_mode == "reference"
    assert all(a is b for a, b in zip(lstm._flat_weights, lstm.parameters()))  # nn.RNNBase bookkeeping
    x = torch.randn(4, 3, 5)
    for name, a, b in (("LSTM", loaded["model"](x), model(x)), ("LSTMCell", loaded["cell"](x[0]), cell(x[0]))):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda message: f"{name}: {message}")


@pytest.mark.parametrize(
    "config",
    [dict(num_layers=2, bidirectional=True, proj_size=3), dict(bias=False, batch_first=True)],
    ids=["bidirectional-projection", "no-bias"],
)
def test_state_dict_interchange_with_nn_lstm(config):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    theirs = nn.LSTM(5, 6, **config).double()
    ours = triton_lstm.LSTM(5, 6, **config).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(ours(x), theirs(x))

    buffer = io.BytesIO()
    torch.save(triton_lstm.LSTM(5, 6, **config).double().state_dict(), buffer)  # ours -> file -> theirs
    buffer.seek(0)
    theirs.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    ours_again = triton_lstm.LSTM(5, 6, **config).double()
    ours_again.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(ours_again(x), theirs(x))

    cell, their_cell = triton_lstm.LSTMCell(5, 6).double(), nn.LSTMCell(5, 6).double()
    their_cell.load_state_dict(cell.state_dict(), strict=True)
    torch.testing.assert_close(cell(x[0]), their_cell(x[0]))


# ----------------------------------------------------------------------------------- install anywhere


WITHOUT_TRITON = textwrap.dedent(
    """
    import json, os, sys, warnings
    sys.modules["triton"] = None  # as if not installed: `import triton` raises ModuleNotFoundError
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton_lstm
    from triton_lstm import ops

    result = {"has_triton": ops.HAS_TRITON, "import_error": ops.TRITON_IMPORT_ERROR}
    torch.manual_seed(0)
    model = triton_lstm.LSTM(3, 4, num_layers=2, bidirectional=True)
    reference = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(5, 2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x)  # CPU, no interpreter: the reference is the CPU path with or without triton
        result["warnings_on_cpu"] = [str(w.message) for w in caught]
        del caught[:]
        os.environ["TRITON_INTERPRET"] = "1"  # now the kernels would run (as on a GPU)
        for _ in range(3):
            out, (h, c) = model(x)
            out.sum().backward()
        result["warnings_where_kernels_would_run"] = [(w.category.__name__, str(w.message)) for w in caught]
    result["error"] = (out.double() - reference(x.double())[0]).abs().max().item()
    result["triton_imported"] = sys.modules.get("triton") is not None
    print(json.dumps(result))
    """
)


def test_import_and_run_without_triton_warns_once():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    process = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON], env=env, capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["has_triton"] is False and "triton" in result["import_error"]
    assert result["triton_imported"] is False
    assert result["warnings_on_cpu"] == []
    caught = result["warnings_where_kernels_would_run"]
    assert len(caught) == 1, caught
    category, message = caught[0]
    assert category == "RuntimeWarning" and "triton" in message and "reference" in message
    assert result["error"] < 1e-5


# GPUs the kernels do not run on: older than Ampere (Triton's own floor) or AMD's. Faked here: no such GPU
# is at hand, and the decision is asked of torch.cuda, which the test answers.
@pytest.mark.parametrize("capability, hip, runs", [
    ((7, 0), None, False),  # V100
    ((7, 5), None, False),  # T4, RTX 20xx
    ((8, 0), None, True),  # A100
    ((8, 9), None, True),  # L4, RTX 40xx
    ((9, 0), None, True),  # H100, H200
    ((12, 0), None, True),  # RTX 50xx
    ((9, 4), "6.2.0", False),  # an AMD GPU under ROCm, whatever its gfx number torch reports
])
def test_kernels_run_on_ampere_or_newer_nvidia_gpus_and_warn_once_elsewhere(capability, hip, runs, monkeypatch):
    from triton_lstm import ops

    monkeypatch.setattr(ops, "_gpus_running_kernels", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "a faked GPU")
    monkeypatch.setattr(torch.version, "hip", hip)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answers = [ops.kernels_run_on(torch.device("cuda", 1)) for _ in range(3)]
    assert answers == [runs and ops.HAS_TRITON] * 3
    messages = [str(w.message) for w in caught]
    if runs:
        assert messages == [] or not ops.HAS_TRITON, messages
    else:
        assert len(messages) == 1, messages
        assert "cuda:1, a faked GPU" in messages[0] and "ATen's recurrence" in messages[0]
        assert ("ROCm 6.2.0" if hip else f"compute capability {capability[0]}.{capability[1]}") in messages[0]
    assert (ops.unsupported_gpu(capability, hip) is None) == runs


def test_where_the_kernels_do_not_run_the_modules_are_nn_itself(monkeypatch):
    """A GPU the kernels do not run on (``test_kernels_run_on_…``) takes the CPU's road: the modules run
    ATen's recurrence, nn's own call, so outputs and gradients equal nn's bit for bit. Played on the CPU
    under the interpreter, told that the kernels do not run there."""
    from triton_lstm import module_inputs, ops

    monkeypatch.setattr(module_inputs, "kernels_run_on", lambda device: False)
    monkeypatch.setattr(ops, "kernels_run_on", lambda device: False)  # the ops' reference, for the peepholes
    aten_calls = []
    for name in ("lstm", "gru", "lstm_cell", "gru_cell"):
        aten = getattr(torch._VF, name)
        monkeypatch.setattr(torch._VF, name, lambda *args, _aten=aten, _name=name: aten_calls.append(_name) or _aten(*args))
    torch.manual_seed(0)
    cases = [(nn.LSTM, triton_lstm.LSTM, dict(num_layers=2, bidirectional=True), (3, 2, 5)),
             (nn.GRU, triton_lstm.GRU, dict(num_layers=2), (3, 2, 5)),
             (nn.LSTMCell, triton_lstm.LSTMCell, {}, (2, 5)),
             (nn.GRUCell, triton_lstm.GRUCell, {}, (2, 5))]
    for theirs_class, ours_class, options, shape in cases:
        theirs = theirs_class(5, 6, **options)
        ours = ours_class(5, 6, **options)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(*shape, requires_grad=True)
        results = []
        for module in (theirs, ours):
            output = module(x)
            output = output[0] if isinstance(output, tuple) else output
            gradients = torch.autograd.grad(output.square().sum(), [x, *module.parameters()])
            results.append((output, gradients))
        assert torch.equal(results[0][0], results[1][0]), ours_class.__name__
        assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1])), ours_class.__name__
    assert aten_calls == ["lstm", "lstm", "gru", "gru", "lstm_cell", "lstm_cell", "gru_cell", "gru_cell"]
    # The peephole LSTM, which ATen lacks: our plain-PyTorch recurrence.
    from triton_lstm.reference import lstm_recurrence_reference

    peephole = triton_lstm.LSTM(5, 6, peephole=True)
    x, zeros = torch.randn(3, 2, 5), torch.zeros(2, 6)
    weights = [getattr(peephole, f"{name}_l0") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    expected, _, _ = lstm_recurrence_reference(x, zeros, zeros, *weights, None, None, peephole.weight_ch_l0)
    assert torch.equal(peephole(x)[0], expected[1:]) and len(aten_calls) == 8


def test_pyproject_triton_linux_only_and_nothing_compiled_at_install():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    triton_requirements = [d for d in project["project"]["dependencies"] if d.replace(" ", "").startswith("triton")]
    assert triton_requirements and all("sys_platform=='linux'" in d.replace(" ", "").replace('"', "'") for d in triton_requirements)
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    assert not (REPO_ROOT / "setup.py").exists()  # no extension modules: a pure-Python wheel
    native_sources = [p for p in (REPO_ROOT / "triton_lstm").rglob("*") if p.suffix in {".c", ".cc", ".cpp", ".cu", ".pyx"}]
    assert not native_sources, f"sources to compile at install time: {native_sources}"


# ------------------------------------------------------------------------------------- torch.export, ONNX

EXPORTED = {  # name: (the module, the input's shape, the ONNX op its recurrence exports as, if one)
    "LSTM-2-layers-bidirectional": (lambda: triton_lstm.LSTM(5, 6, num_layers=2, bidirectional=True), (4, 3, 5),
                                    "LSTM"),
    "GRU-2-layers-batch-first": (lambda: triton_lstm.GRU(5, 6, num_layers=2, batch_first=True), (3, 4, 5), "GRU"),
    "LSTMCell": (lambda: triton_lstm.LSTMCell(5, 6), (3, 5), None),
    "GRUCell": (lambda: triton_lstm.GRUCell(5, 6), (3, 5), None),
    "peephole-LSTM": (lambda: triton_lstm.LSTM(5, 6, peephole=True), (4, 3, 5), None),
}


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("name", EXPORTED)
def test_torch_export_keeps_our_ops_and_its_saved_program_runs_like_the_module(name):
    make, shape, _ = EXPORTED[name]
    torch.manual_seed(0)
    module = make().to(KERNEL_DEVICE)
    x = torch.randn(*shape, device=KERNEL_DEVICE)
    program = torch.export.export(module, (x,))
    assert any(str(node.target).startswith("triton_lstm.") for node in program.graph.nodes), "our recurrence ops"
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    torch.testing.assert_close(_first(torch.export.load(buffer).module()(x)), _first(module(x)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["exporter", "torchscript-exporter"])
@pytest.mark.parametrize("name", EXPORTED)
def test_onnx_export_runs_like_the_module(name, dynamo, tmp_path):
    """The ONNX exporters translate PyTorch's ops, ours not: under an export the modules run ATen's LSTM /
    GRU (ONNX's LSTM and GRU ops), as nn's do, and the peephole LSTM its plain-PyTorch recurrence, unrolled.
    ONNX's reference evaluator runs the file, compared with the module (on the CPU, where ONNX runs)."""
    onnx = pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")  # the exporter's own dependency
    from onnx.reference import ReferenceEvaluator

    make, shape, onnx_op = EXPORTED[name]
    torch.manual_seed(0)
    module = make().eval()
    x = torch.randn(*shape)
    torch.onnx.export(module, (x,), str(tmp_path / "model.onnx"), dynamo=dynamo)
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert onnx_op is None or onnx_op in {node.op_type for node in model.graph.node}
    (output, *_) = ReferenceEvaluator(model).run(None, {model.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(output), _first(module(x)), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- torch.func, TorchScript


def test_torch_func_grad_vjp_jacrev_vmap_like_nn_lstm():
    from torch.func import functional_call, grad, jacrev, vjp, vmap

    torch.manual_seed(0)
    theirs = nn.LSTM(3, 4, num_layers=2).double()  # nn.LSTM on the CPU in float64: the yardstick
    ours = triton_lstm.LSTM(3, 4, num_layers=2).to(KERNEL_DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    results = {}
    for name, module, inp in (("nn", theirs, x), ("ours", ours, x.to(KERNEL_DEVICE, torch.float32))):
        params = dict(module.named_parameters())
        results[name] = dict(
            grad=grad(lambda p: functional_call(module, p, (inp,))[0].pow(2).sum())(params),
            jacrev=jacrev(lambda p: functional_call(module, p, (inp,))[0][-1])(params),
            vjp=vjp(lambda v: module(v)[0], inp)[1](torch.ones(5, 2, 4, device=inp.device, dtype=inp.dtype))[0],
        )
    for key in ("grad", "jacrev"):
        for param, value in results["nn"][key].items():
            torch.testing.assert_close(results["ours"][key][param].cpu().double(), value, rtol=1e-4, atol=1e-5, msg=f"{key} {param}")
    torch.testing.assert_close(results["ours"]["vjp"].cpu().double(), results["nn"]["vjp"], rtol=1e-4, atol=1e-5)
    x = x.to(KERNEL_DEVICE, torch.float32)
    # vmap, which nn.LSTM does not support: the same as a loop.
    batch = torch.randn(3, 5, 2, 3, device=KERNEL_DEVICE)
    mapped = vmap(lambda inp: ours(inp)[0])(batch)
    looped = torch.stack([ours(inp)[0] for inp in batch])
    torch.testing.assert_close(mapped, looped, rtol=1e-5, atol=1e-6)


def test_torchscript_refuses_with_the_way_out():
    model = nn.Sequential(triton_lstm.LSTM(3, 4))
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*torch\.compile.*torch\.export"):
        torch.jit.script(model)
    assert type(model[0]) is triton_lstm.LSTM, "the eager model is left as it was"
    with pytest.raises(RuntimeError, match="LSTMCell cannot be compiled by torch.jit.script"):
        torch.jit.script(triton_lstm.LSTMCell(3, 4))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")  # trace's own, on the way
@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_jit_trace_refuses_with_the_way_out(cls):
    """Where the kernels run, torch.jit.trace gets a clear error instead of a trace it can neither check
    (its rerun without gradients takes the inference op) nor save (Python custom ops)."""
    module = getattr(triton_lstm, cls)(3, 4).to(KERNEL_DEVICE)
    x = torch.randn(*(() if cls.endswith("Cell") else (5,)), 2, 3, device=KERNEL_DEVICE)
    with pytest.raises(RuntimeError, match=rf"{cls} cannot be traced by torch\.jit\.trace.*torch\.export"):
        torch.jit.trace(module, (x,))
