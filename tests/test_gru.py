"""triton_lstm.GRU / GRUCell against torch.nn.GRU / GRUCell: every output and every gradient, the kernels'
paths, parameters, state_dict, errors, convert, compile and double backward.

The oracle is nn.GRU itself in float64 on the CPU; our module runs in the tested dtype on the kernel
device (the GPU, or the CPU through Triton's interpreter) and must stay within twice nn.GRU's own error
in that dtype on that device (helpers.assert_error_within_pytorch). torch.empty is NaN-poisoned
(conftest.py), so an element a kernel leaves unwritten fails.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    KERNEL_DEVICE,
    KERNEL_DTYPES,
    STACK_DTYPE,
    assert_error_within_pytorch,
    check_double_backward,
    count_calls,
    requires_cuda,
)
from test_integrations import GraphCounter, _assert_all_close, _outputs_and_grads
from test_modules import Case, check_against_nn
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import triton_lstm
from triton_lstm import gru_ops
from triton_lstm.kernels import gru as gru_kernels
from triton_lstm.reference import gru_input_projection, gru_recurrence_backward_reference, gru_recurrence_reference


CASES = {
    "single": Case(),
    "layers2": Case(num_layers=2),
    "layers3-bidir": Case(num_layers=3, bidirectional=True),
    "bidir-state": Case(bidirectional=True, with_state=True),
    "batch_first": Case(batch_first=True, with_state=True),
    "no_bias": Case(bias=False, num_layers=2, with_state=True),
    "unbatched": Case(unbatched=True, with_state=True, num_layers=2),
    "packed": Case(packed=True, B=4, T=6, with_state=True),
    "packed-bidir-state": Case(packed=True, bidirectional=True, with_state=True, B=5, T=6, num_layers=2),
    "B1-T1": Case(B=1, T=1, with_state=True),
    "B17-H33-T7": Case(B=17, H=33, T=7, I=9, with_state=True),
    "H1": Case(H=1, B=3, T=7),
}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gru_matches_nn_gru(case, dtype):
    check_against_nn(case, dtype, cell="GRU")


LARGE = {
    "T512-B64-H256": Case(T=512, B=64, I=256, H=256),
    "T128-B16-H1024": Case(T=128, B=16, I=1024, H=1024, with_state=True),
    "T96-B32-H512-layers3": Case(T=96, B=32, I=256, H=512, num_layers=3),
    "T64-B3-H1024-bidir-layers2": Case(T=64, B=3, I=512, H=1024, num_layers=2, bidirectional=True),
    "T256-B17-H513-packed": Case(T=256, B=17, I=64, H=513, packed=True),
}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LARGE.values(), ids=LARGE.keys())
def test_gru_large_shapes_on_the_gpu(case, dtype):
    """The GPU's own plans (many programs, real barriers, resident and streamed W_hh, the whole-module
    launches) against cuDNN's nn.GRU in float64 on the same card."""
    check_against_nn(case, dtype, oracle_device="cuda", cell="GRU")


@pytest.mark.parametrize("case", [CASES["packed-bidir-state"], CASES["B17-H33-T7"]], ids=["packed-bidir", "B17-H33"])
def test_gru_reference_backward_matches_nn_gru(case):
    check_against_nn(case, torch.float32, backward="reference", cell="GRU")


def _layer_tensors(T, B, I, H, dtype, generator, lengths=None):
    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale)

    x, h0 = randn(T, B, I), randn(B, H)
    w_ih, w_hh, b_ih, b_hh = randn(3 * H, I, scale=0.5), randn(3 * H, H, scale=0.5), randn(3 * H), randn(3 * H)
    return x, h0, w_ih, w_hh, b_ih, b_hh


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per_step"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gru_kernels_against_reference(persistent, with_lengths, dtype, monkeypatch):
    """The forward kernels (persistent and per-step) and the backward chain (the same schedule) against
    the reference, which runs the same saved layout: every saved tensor and every gradient."""
    if not persistent:
        monkeypatch.setenv("TRITON_LSTM_PERSISTENT", "0")
    generator = torch.Generator().manual_seed(3)
    T, B, I, H = 6, 5, 7, 33
    x, h0, w_ih, w_hh, b_ih, b_hh = _layer_tensors(T, B, I, H, dtype, generator)
    lengths = torch.tensor([6, 1, 4, 6, 2]) if with_lengths else None
    expected = gru_recurrence_reference(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
    theirs = gru_recurrence_reference(*(t.to(dtype) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)), lengths)
    cast = [t.to(KERNEL_DEVICE, dtype) for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    projected = gru_input_projection(cast[0], cast[2], cast[4], cast[5]).contiguous()
    int_lengths = None if lengths is None else lengths.to(KERNEL_DEVICE, torch.int32)
    ours = gru_kernels.gru_fwd(projected, cast[1], cast[3], gru_kernels.hidden_bias_n(cast[5], cast[3]), int_lengths)
    for name, o, t, e in zip(("h_all", "state_all", "gates"), ours, theirs, expected):
        assert_error_within_pytorch(name, o.cpu(), t, e, dtype)

    grad_out = torch.randn(T, B, H, generator=generator, dtype=torch.float64)
    grad_h_n = torch.randn(B, H, generator=generator, dtype=torch.float64)
    expected_grads = gru_recurrence_backward_reference(grad_out, grad_h_n, x, w_ih, w_hh, expected[2], expected[0],
                                                       expected[1], lengths)
    on_cpu = [t.cpu() for t in cast]
    theirs_grads = gru_recurrence_backward_reference(grad_out.to(dtype), grad_h_n.to(dtype), on_cpu[0], on_cpu[2],
                                                     on_cpu[3], theirs[2], theirs[0], theirs[1], lengths)
    ours_grads = gru_kernels.gru_bwd(grad_out.to(KERNEL_DEVICE, dtype), grad_h_n.to(KERNEL_DEVICE, dtype), cast[0],
                                     cast[2], cast[3], ours[2], ours[0], ours[1], int_lengths,
                                     schedule="persistent" if persistent else "per_step")
    names = ("grad_x", "grad_h0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh")
    for name, o, t, e in zip(names, ours_grads, theirs_grads, expected_grads):
        assert_error_within_pytorch(name, o.cpu(), t, e, dtype,
                                    summed_terms=T * B if "_w_" in name or "_b_" in name else 1)


def test_gru_reference_is_nn_gru():
    """The reference forward, and its backward from the saved activations, are nn.GRU's in float64."""
    generator = torch.Generator().manual_seed(5)
    x, h0, w_ih, w_hh, b_ih, b_hh = _layer_tensors(5, 3, 4, 6, torch.float64, generator)
    leaves = [t.clone().requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    gru = nn.GRU(4, 6).double()
    with torch.no_grad():
        for parameter, value in zip(gru.parameters(), leaves[2:]):
            parameter.copy_(value)
    x_nn, h0_nn = x.clone().requires_grad_(), h0.clone().requires_grad_()
    out, h_n = gru(x_nn, h0_nn[None])
    h_all, state_all, gates = gru_recurrence_reference(*leaves)
    torch.testing.assert_close(h_all[1:], out, rtol=0, atol=1e-14)
    grad_out, grad_h_n = torch.randn_like(out), torch.randn_like(h0)
    torch.autograd.backward([out, h_n[0]], [grad_out, grad_h_n])
    grads = gru_recurrence_backward_reference(grad_out, grad_h_n, x, w_ih, w_hh, gates, h_all, state_all, None)
    for got, want in zip(grads, (x_nn.grad, h0_nn.grad, *(p.grad for p in gru.parameters()))):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("unbatched, with_state, bias", [(False, True, True), (True, True, False), (False, False, True)],
                         ids=["batched", "unbatched-no_bias", "no_state"])
def test_gru_cell_matches_nn(dtype, unbatched, with_state, bias):
    torch.manual_seed(0)
    oracle = nn.GRUCell(5, 7, bias=bias).double()
    ours = triton_lstm.GRUCell(5, 7, bias=bias)
    ours.load_state_dict(oracle.state_dict())
    theirs = nn.GRUCell(5, 7, bias=bias)
    theirs.load_state_dict(oracle.state_dict())
    batch = () if unbatched else (3,)
    x = torch.randn(*batch, 5, dtype=torch.float64)
    h = torch.randn(*batch, 7, dtype=torch.float64) if with_state else None
    grad = torch.randn(*batch, 7, dtype=torch.float64)
    results = []
    for module, run_dtype, device in ((oracle, torch.float64, "cpu"), (theirs, dtype, KERNEL_DEVICE), (ours, dtype, KERNEL_DEVICE)):
        module.to(device=device, dtype=run_dtype)
        xs = x.detach().to(device=device, dtype=run_dtype).requires_grad_()
        hs = None if h is None else h.detach().to(device=device, dtype=run_dtype).requires_grad_()
        out = module(xs, hs)
        out.backward(grad.to(device=device, dtype=run_dtype))
        found = {"h1": out, "grad_x": xs.grad, **{f"grad_{n}": p.grad for n, p in module.named_parameters()}}
        if hs is not None:
            found["grad_h0"] = hs.grad
        results.append({name: t.detach().double().cpu() for name, t in found.items()})
    expected, theirs_result, ours_result = results
    for name in expected:
        assert_error_within_pytorch(name, ours_result[name], theirs_result[name], expected[name], dtype)


def test_gru_parameters_init_and_state_dict_are_nn_grus():
    kwargs = dict(num_layers=2, bidirectional=True)
    torch.manual_seed(7)
    theirs = nn.GRU(4, 5, **kwargs)
    torch.manual_seed(7)
    ours = triton_lstm.GRU(4, 5, **kwargs)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    for (_, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a, b)  # the same random draws
    nn.GRU(4, 5, **kwargs).load_state_dict(ours.state_dict())  # strict, both ways
    triton_lstm.GRU(4, 5, **kwargs).load_state_dict(theirs.state_dict())
    torch.manual_seed(3)
    cell_theirs = nn.GRUCell(4, 5)
    torch.manual_seed(3)
    cell_ours = triton_lstm.GRUCell(4, 5)
    assert cell_ours.state_dict().keys() == cell_theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(cell_ours.parameters(), cell_theirs.parameters()))


def _error(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error)
    return None


@pytest.mark.parametrize("bad", ["input-4d", "input-size", "hx-2d", "hx-shape", "hx-dtype", "input-dtype", "hx-tuple",
                                 "empty-T", "input-list"])
def test_gru_errors_have_nn_grus_types(bad):
    ours, theirs = triton_lstm.GRU(4, 6), nn.GRU(4, 6)
    x, h = torch.randn(5, 3, 4), torch.randn(1, 3, 6)
    args = {
        "input-4d": (torch.randn(5, 3, 4, 1),),
        "input-size": (torch.randn(5, 3, 5),),
        "hx-2d": (x, torch.randn(3, 6)),
        "hx-shape": (x, torch.randn(1, 2, 6)),
        "hx-dtype": (x, h.double()),
        "input-dtype": (x.double(),),
        "hx-tuple": (x, (h,)),
        "empty-T": (torch.randn(0, 3, 4),),
        "input-list": ([[1.0] * 4] * 3,),
    }[bad]
    expected = _error(lambda: theirs(*args))
    assert expected is not None
    assert _error(lambda: ours(*args)) is expected


@pytest.mark.parametrize("bad", ["input-3d", "hx-3d", "input-size", "hx-size", "hx-batch", "input-dtype", "hx-tuple",
                                 "input-int", "input-list"])
def test_gru_cell_errors_have_nn_grus_types(bad):
    ours, theirs = triton_lstm.GRUCell(4, 6), nn.GRUCell(4, 6)
    x = torch.randn(3, 4)
    args = {
        "input-3d": (torch.randn(2, 3, 4),),
        "hx-3d": (x, torch.randn(1, 3, 6)),
        "input-size": (torch.randn(3, 5),),
        "hx-size": (x, torch.randn(3, 7)),
        "hx-batch": (x, torch.randn(2, 6)),
        "input-dtype": (x.double(),),
        "hx-tuple": (x, (torch.randn(3, 6),)),
        "input-int": (torch.ones(3, 4, dtype=torch.long),),
        "input-list": ([[1.0] * 4] * 3,),
    }[bad]
    expected = _error(lambda: theirs(*args))
    assert expected is not None
    assert _error(lambda: ours(*args)) is expected


def test_gru_constructor_errors_are_nn_grus():
    for kwargs in (dict(proj_size=2), dict(dropout=1.5), dict(num_layers=0)):
        expected = _error(lambda: nn.GRU(4, 6, **kwargs))
        assert expected is not None and _error(lambda: triton_lstm.GRU(4, 6, **kwargs)) is expected
    with pytest.raises(ValueError, match="backward"):
        triton_lstm.GRU(4, 6, backward="nope")


def test_convert_swaps_grus_keeping_parameters():
    model = nn.Sequential(nn.GRU(3, 4, num_layers=2), nn.Linear(4, 4), nn.GRUCell(4, 5))
    parameters = list(model.parameters())
    converted = triton_lstm.convert(model)
    assert type(converted[0]) is triton_lstm.GRU and type(converted[2]) is triton_lstm.GRUCell
    assert all(a is b for a, b in zip(converted.parameters(), parameters))
    assert type(triton_lstm.convert(nn.GRU(2, 3))) is triton_lstm.GRU


@pytest.mark.parametrize("layers", [1, 2], ids=["one-layer", "stack"])
def test_gru_inference_forward_keeps_no_gates(layers, monkeypatch):
    """Without a gradient to take, the kernels run with save=False (no per-step gates or states)."""
    from triton_lstm import gru_stack

    saves = []
    if layers == 1:
        original = gru_kernels.gru_fwd_from_input
        monkeypatch.setattr(gru_ops, "gru_fwd_from_input",
                            lambda *args, save=True: saves.append(save) or original(*args, save=save))
    else:
        original = gru_stack.lstm_fwd_stack
        monkeypatch.setattr(gru_stack, "lstm_fwd_stack", lambda *args, **kw: saves.append(args[8]) or original(*args, **kw))
    model = triton_lstm.GRU(3, 5, num_layers=layers).to(KERNEL_DEVICE, STACK_DTYPE)
    x = torch.randn(4, 2, 3, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    with torch.no_grad():
        out, h_n = model(x)
    expected, expected_h = model(x)  # a training forward: the same numbers
    assert saves == [False, True]
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)
    torch.testing.assert_close(h_n, expected_h.detach(), rtol=0, atol=0)


def test_gru_stack_runs_in_one_launch_each_way(monkeypatch):
    from triton_lstm import gru_stack

    counts = count_calls(monkeypatch, gru_stack, {"forward": "lstm_fwd_stack", "backward": "lstm_bwd_stack_gate_grads"})
    per_layer = count_calls(monkeypatch, gru_ops, {"forward": "gru_fwd_from_input", "backward": "gru_bwd"})
    model = triton_lstm.GRU(3, 5, num_layers=3).to(KERNEL_DEVICE, STACK_DTYPE)
    out, _ = model(torch.randn(4, 2, 3, device=KERNEL_DEVICE, dtype=STACK_DTYPE, requires_grad=True))
    out.sum().backward()
    assert counts == {"forward": 1, "backward": 1} and per_layer == {"forward": 0, "backward": 0}
    # Dropout between layers in training: in the same launches (masks drawn before them; test_stack.py).
    model = triton_lstm.GRU(3, 5, num_layers=3, dropout=0.5).to(KERNEL_DEVICE, STACK_DTYPE)
    out, _ = model(torch.randn(4, 2, 3, device=KERNEL_DEVICE, dtype=STACK_DTYPE, requires_grad=True))
    out.sum().backward()
    assert counts == {"forward": 2, "backward": 2} and per_layer == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("fallback", ["layer-by-layer-forward", "no-fit-backward", "reference-backward"])
def test_gru_stack_fallbacks_match_nn_gru(fallback, monkeypatch):
    """Where the stacked launches cannot run, the layers run one after the other (forward, or backward from
    the top through the one-layer ops), and backward="reference" differentiates nothing fused."""
    from triton_lstm import gru_stack

    kwargs = {}
    if fallback == "layer-by-layer-forward":
        monkeypatch.setenv("TRITON_LSTM_STACK", "0")
    elif fallback == "no-fit-backward":
        monkeypatch.setattr(gru_stack, "lstm_bwd_stack_gate_grads", lambda *args, **kw: None)
    else:
        kwargs["backward"] = "reference"
    check_against_nn(Case(num_layers=3, packed=True, with_state=True, B=5, T=6), torch.float32, cell="GRU", **kwargs)
    check_against_nn(Case(num_layers=2, bias=False, with_state=True, H=17, B=3, T=7), torch.float16, cell="GRU",
                     **kwargs)


@pytest.mark.parametrize("case", [Case(num_layers=2, H=20, I=7, T=6, B=3, with_state=True),
                                  Case(num_layers=4, packed=True, B=4, T=5)], ids=["L2", "L4-packed"])
def test_gru_stack_with_resident_weights_matches_nn_gru(case, monkeypatch):
    """The stack's resident variant (each program holds its slices of a layer's W_ih and W_hh): one
    program per layer, its hidden block the whole H, as the interpreter runs it."""
    import triton

    from triton_lstm import gru_stack, stack
    from triton_lstm.kernels.forward_plans import ForwardPlan

    width = max(16, triton.next_power_of_2(case.H))
    plan = ForwardPlan(True, "resident (test)", True, 16, width, width, 1, 1, 4)
    for module in (stack, gru_stack):  # the module's choice of the stack op, and the op's plan
        monkeypatch.setattr(module, "plan_stack_for", lambda *args, **kwargs: plan)
    counts = count_calls(monkeypatch, gru_stack, {"forward": "lstm_fwd_stack"})
    check_against_nn(case, STACK_DTYPE, cell="GRU")
    assert counts == {"forward": 1}


def test_bidirectional_gru_runs_both_directions_in_one_launch_each_way(monkeypatch):
    from triton_lstm import gru_bidirectional

    counts = count_calls(monkeypatch, gru_bidirectional, {"forward": "lstm_fwd_bidirectional",
                                                          "backward": "lstm_bwd_bidirectional_gate_grads"})
    one_direction = count_calls(monkeypatch, gru_ops, {"forward": "gru_fwd_from_input", "backward": "gru_bwd"})
    model = triton_lstm.GRU(3, 5, num_layers=2, bidirectional=True).to(KERNEL_DEVICE)
    out, _ = model(torch.randn(4, 2, 3, device=KERNEL_DEVICE, requires_grad=True))
    out.sum().backward()
    assert counts == {"forward": 2, "backward": 2} and one_direction == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("fallback", ["one-direction-forward", "no-fit-backward", "reference-backward"])
def test_bidirectional_gru_fallbacks_match_nn_gru(fallback, monkeypatch):
    """Where the both-directions launches cannot run, the directions run one after the other (forward, or
    backward through the one-direction ops), and backward="reference" differentiates nothing fused."""
    from triton_lstm import gru_bidirectional

    kwargs = {}
    if fallback == "one-direction-forward":
        monkeypatch.setenv("TRITON_LSTM_BIDIRECTIONAL", "0")
    elif fallback == "no-fit-backward":
        monkeypatch.setattr(gru_bidirectional, "lstm_bwd_bidirectional_gate_grads", lambda *args, **kw: None)
    else:
        kwargs["backward"] = "reference"
    check_against_nn(CASES["packed-bidir-state"], torch.float32, cell="GRU", **kwargs)
    check_against_nn(Case(bidirectional=True, bias=False, with_state=True, H=17, B=3, T=7), torch.float16,
                     cell="GRU", **kwargs)


def test_bidirectional_gru_inference_forward_keeps_no_gates(monkeypatch):
    from triton_lstm import gru_bidirectional

    saves = []
    original = gru_bidirectional.lstm_fwd_bidirectional
    monkeypatch.setattr(gru_bidirectional, "lstm_fwd_bidirectional",
                        lambda *args, **kw: saves.append(args[6]) or original(*args, **kw))
    model = triton_lstm.GRU(3, 5, bidirectional=True).to(KERNEL_DEVICE)
    x = pack_sequence([torch.randn(4, 3), torch.randn(2, 3)]).to(KERNEL_DEVICE)
    with torch.no_grad():
        out, h_n = model(x)
    expected, expected_h = model(x)
    assert saves == [False, True]
    torch.testing.assert_close(out.data, expected.data.detach(), rtol=0, atol=0)
    torch.testing.assert_close(h_n, expected_h.detach(), rtol=0, atol=0)


def test_gru_double_backward_matches_nn():
    check_double_backward("GRU", num_layers=2)


def test_gru_dropout_between_layers_in_training_only():
    torch.manual_seed(0)
    model = triton_lstm.GRU(3, 8, num_layers=2, dropout=0.5).to(KERNEL_DEVICE)
    x = torch.randn(5, 4, 3, device=KERNEL_DEVICE)
    model.eval()
    first, second = model(x)[0], model(x)[0]
    assert torch.equal(first, second)
    model.train()
    torch.manual_seed(1)
    a = model(x)[0]
    torch.manual_seed(1)
    b = model(x)[0]
    torch.manual_seed(2)
    c = model(x)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)  # torch's generator drives the masks


@pytest.mark.no_poison
def test_gru_compile_fullgraph_one_node_per_recurrence():
    torch.manual_seed(0)
    model = triton_lstm.GRU(5, 6, num_layers=2, batch_first=True, bidirectional=True).to(KERNEL_DEVICE)
    x = torch.randn(3, 4, 5, device=KERNEL_DEVICE, requires_grad=True)
    backend = GraphCounter()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    compiled_outputs, compiled_grads = _outputs_and_grads(model, compiled, x)
    eager_outputs, eager_grads = _outputs_and_grads(model, model, x)
    assert len(backend.dynamo_graphs) == 1
    assert GraphCounter.count(backend.forward_graphs, torch.ops.triton_lstm.gru_recurrence_fwd.default) == 4
    assert GraphCounter.count(backend.backward_graphs, torch.ops.triton_lstm.gru_recurrence_bwd.default) == 4
    _assert_all_close("outputs", compiled_outputs, eager_outputs)
    _assert_all_close("gradients", compiled_grads, eager_grads)


def test_gru_opcheck_custom_ops():
    generator = torch.Generator().manual_seed(0)
    x, h0, w_ih, w_hh, b_ih, b_hh = (t.float().to(KERNEL_DEVICE) for t in _layer_tensors(4, 3, 5, 6, torch.float32, generator))
    lengths = torch.tensor([4, 2, 3], device=KERNEL_DEVICE)
    forward_args = (x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
    torch.library.opcheck(torch.ops.triton_lstm.gru_recurrence_fwd.default, forward_args)
    h_all, state_all, gates = torch.ops.triton_lstm.gru_recurrence_fwd(*forward_args)
    backward_args = (torch.randn_like(h_all[1:]), torch.randn_like(h0), x, w_ih, w_hh, gates, h_all, state_all, lengths)
    torch.library.opcheck(torch.ops.triton_lstm.gru_recurrence_bwd.default, backward_args)


def test_gru_cpu_without_interpreter_runs_aten(monkeypatch):
    """On the CPU without the interpreter the module runs ATen's GRU, as nn.GRU does: the same numbers."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    ours, theirs = triton_lstm.GRU(3, 4, bidirectional=True), nn.GRU(3, 4, bidirectional=True)
    theirs.load_state_dict(ours.state_dict())
    x = pack_sequence([torch.randn(5, 3), torch.randn(2, 3)])
    (out, h), (out_nn, h_nn) = ours(x), theirs(x)
    assert torch.equal(out.data, out_nn.data) and torch.equal(h, h_nn)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gru_autocast_runs_in_autocast_dtype(dtype, monkeypatch):
    """Under CPU autocast the GRU computes in the autocast dtype, as the same module cast to it does (the
    ops keep autocast off inside; the fp32 weights get fp32 gradients). Our op's own road (the reference:
    bf16 is wrong in the interpreter), not ATen's."""
    from triton_lstm import gru_modules

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(gru_modules, "runs_aten", lambda x: False)
    torch.manual_seed(0)
    ours = triton_lstm.GRU(5, 6, num_layers=2, bidirectional=True)
    cast = triton_lstm.GRU(5, 6, num_layers=2, bidirectional=True).to(dtype)
    cast.load_state_dict(ours.state_dict())
    x, grad = torch.randn(4, 3, 5), torch.randn(4, 3, 12)
    with torch.autocast("cpu", dtype=dtype):
        out, h = ours(x)
        (out.float() * grad).sum().backward()
    cast_out, cast_h = cast(x.to(dtype))
    (cast_out.float() * grad).sum().backward()
    assert (out.dtype, h.dtype) == (dtype, dtype)
    assert torch.equal(out, cast_out) and torch.equal(h, cast_h), "autocast changed the arithmetic inside the recurrence"
    for (name, param), cast_param in zip(ours.named_parameters(), cast.parameters()):
        assert param.grad.dtype == torch.float32 and torch.equal(param.grad, cast_param.grad.float()), name


def test_gru_fp32_plan_takes_narrower_chunks_where_they_spill():
    """The GRU's fp32 32-row tiles take 32-wide K chunks above K = 1024 (64-wide spilled 48 bytes on sm_90);
    the LSTM's keep 64; plan_for reads the cell from the projection's width."""
    from triton_lstm.kernels.forward_plans import plan_persistent_fwd
    from triton_lstm.kernels.lstm_fwd_persistent import plan_for

    lstm = plan_persistent_fwd(256, 32, 2048, 2048, 4, 132, 232448)
    gru = plan_persistent_fwd(256, 32, 2048, 2048, 4, 132, 232448, gates=3)
    assert (lstm.block_b, lstm.block_k) == (32, 64) and (gru.block_b, gru.block_k) == (32, 32)
    assert plan_persistent_fwd(256, 32, 1024, 1024, 4, 132, 232448, gates=3).block_k == 64
    projected, w_hh = torch.empty(3, 2, 3 * 6), torch.empty(3 * 6, 6)
    assert plan_for(projected, w_hh) == plan_for(torch.empty(3, 2, 4 * 6), torch.empty(4 * 6, 6))


def test_gru_torch_func_grad_and_vmap_like_nn_gru():
    """torch.func transforms run the plain-PyTorch recurrence: their gradients are nn.GRU's."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    theirs = nn.GRU(3, 4, num_layers=2).double()
    ours = triton_lstm.GRU(3, 4, num_layers=2).to(KERNEL_DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    results = {}
    for name, module, inp in (("nn", theirs, x), ("ours", ours, x.to(KERNEL_DEVICE, torch.float32))):
        params = dict(module.named_parameters())
        results[name] = grad(lambda p: functional_call(module, p, (inp,))[0].pow(2).sum())(params)
    for param, value in results["nn"].items():
        torch.testing.assert_close(results["ours"][param].cpu().double(), value, rtol=1e-4, atol=1e-5, msg=param)
    batch = torch.randn(3, 5, 2, 3, device=KERNEL_DEVICE)
    torch.testing.assert_close(vmap(lambda inp: ours(inp)[0])(batch), torch.stack([ours(inp)[0] for inp in batch]),
                               rtol=1e-5, atol=1e-6)


def test_gru_torch_save_loads_with_weights_only():
    import io

    torch.manual_seed(0)
    saved = {"gru": triton_lstm.GRU(5, 6, bidirectional=True, backward="reference"), "cell": triton_lstm.GRUCell(5, 6)}
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals(triton_lstm.SAFE_GLOBALS):
        loaded = torch.load(buffer, weights_only=True)
    assert type(loaded["gru"]) is triton_lstm.GRU and loaded["gru"].backward_mode == "reference"
    x = torch.randn(4, 3, 5)
    torch.testing.assert_close(loaded["gru"](x), saved["gru"](x), rtol=0, atol=0)
    torch.testing.assert_close(loaded["cell"](x[0]), saved["cell"](x[0]), rtol=0, atol=0)


def test_gru_repr_is_nn_grus_plus_our_non_default_option():
    assert repr(triton_lstm.GRU(3, 4, num_layers=2)) == repr(nn.GRU(3, 4, num_layers=2))
    assert repr(triton_lstm.GRUCell(3, 4)) == repr(nn.GRUCell(3, 4))
    assert repr(triton_lstm.GRU(3, 4, backward="reference")) == "GRU(3, 4, backward='reference')"
    assert repr(triton_lstm.GRUCell(3, 4, backward="reference")) == "GRUCell(3, 4, backward='reference')"
