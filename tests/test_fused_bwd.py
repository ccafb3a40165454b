"""The fused backward (triton_lstm/kernels/lstm_bwd.py), its ``backward=`` option, activation recompute
(triton_lstm/recompute.py) and double backward.

Gradient parity runs one layer and direction at the op level: the forward kernel saves its activations,
then the fused backward and the reference backward (``lstm_recurrence_backward_reference``) both run on
those very activations. Every gradient (x, h0, c0, W_ih, W_hh, bias) is compared with the reference
backward in the same dtype and with a float64 autograd oracle, where the budget is twice PyTorch's own
error when it runs the same recurrence in that dtype (autograd through ``lstm_recurrence_reference``).
"""

from __future__ import annotations

import functools

import pytest
import torch

import triton_lstm
from helpers import (
    KERNEL_DEVICE,
    KERNEL_DTYPES,
    STACK_DTYPE,
    assert_error_within_pytorch,
    max_error,
    record_launches,
    refuse_cooperative_launches,
    requires_cuda,
)
from test_modules import Case
from triton_lstm.kernels import common
from triton_lstm.kernels import lstm_bwd as lstm_bwd_module
from triton_lstm.kernels.backward_plans import plan_bwd, tile_count
from triton_lstm.kernels.lstm_bwd import lstm_bwd
from triton_lstm.ops import lstm_layer
from triton_lstm.recompute import saved_activation_bytes, saved_tensor_bytes
from triton_lstm.reference import lstm_recurrence_backward_reference, lstm_recurrence_reference

GRAD_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "bias")


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """These tests run thousands of tiny CPU ops (the interpreter, the step-by-step references): on a
    loaded machine, intra-op threads waiting for each other cost more than the ops. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# (T, B, I, H): B = 1, 3, 17; H = 1, 17, 33; T = 1, 7.
SHAPES = [(1, 1, 3, 1), (7, 3, 5, 17), (7, 17, 4, 33), (1, 3, 2, 33)]


def _case(T, B, I, H, dtype, device, ragged, seed=0, weight_scale=0.4):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    inputs = dict(
        x=rand(T, B, I),
        h0=rand(B, H, scale=0.5),
        c0=rand(B, H, scale=0.5),
        w_ih=rand(4 * H, I, scale=weight_scale),
        w_hh=rand(4 * H, H, scale=weight_scale),
        b_ih=rand(4 * H, scale=0.2),
        b_hh=rand(4 * H, scale=0.2),
    )
    lengths = None
    if ragged:
        lengths = torch.randint(1, T + 1, (B,), generator=generator)
        lengths[0] = T
        lengths = lengths.to(device)
    grads = dict(out=rand(T, B, H), h_n=rand(B, H), c_n=rand(B, H))
    return inputs, lengths, grads


def _autograd_grads(inputs, lengths, grads, dtype):
    """Gradients of x, h0, c0, W_ih, W_hh and the bias by autograd through the reference in ``dtype``."""
    leaves = {name: value.to(dtype).detach().requires_grad_() for name, value in inputs.items()}
    h_all, c_all, _ = lstm_recurrence_reference(*leaves.values(), None, lengths)
    torch.autograd.backward(
        (h_all[1:], h_all[-1], c_all[-1].to(dtype)),
        (grads["out"].to(dtype), grads["h_n"].to(dtype), grads["c_n"].to(dtype)),
    )
    found = {name: leaves[name].grad for name in ("x", "h0", "c0", "w_ih", "w_hh")}
    found["bias"] = leaves["b_ih"].grad
    return found


def _saved_activations(inputs, lengths):
    """The forward kernel's (h_all, c_all, gates), through the forward op."""
    return torch.ops.triton_lstm.recurrence_fwd(*inputs.values(), None, lengths)


def _both_backwards(inputs, lengths, grads, schedule="auto"):
    h_all, c_all, gates = _saved_activations(inputs, lengths)
    args = (grads["out"], grads["h_n"], grads["c_n"], inputs["x"], inputs["w_ih"], inputs["w_hh"], None, gates, h_all, c_all, lengths)
    fused = lstm_bwd(*args, schedule=schedule)
    reference = lstm_recurrence_backward_reference(*args)
    return dict(zip(GRAD_NAMES, fused[:6])), dict(zip(GRAD_NAMES, reference[:6])), fused[6]


def _shape_id(shape):
    return "T{}-B{}-I{}-H{}".format(*shape)


@pytest.mark.parametrize("ragged", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_matches_reference_and_float64(dtype, shape, ragged):
    T, B, I, H = shape
    inputs, lengths, grads = _case(T, B, I, H, dtype, KERNEL_DEVICE, ragged)
    fused, reference, grad_w_hr = _both_backwards(inputs, lengths, grads)
    assert grad_w_hr is None
    expected = _autograd_grads(inputs, lengths, grads, torch.float64)
    pytorchs = _autograd_grads(inputs, lengths, grads, dtype)
    eps = torch.finfo(dtype).eps
    for name in GRAD_NAMES:
        assert fused[name].dtype == reference[name].dtype == dtype, name
        # Weight and bias gradients sum T·B terms, each carrying dG's rounding to the input dtype.
        terms = T * B if name in ("w_ih", "w_hh", "bias") else 1
        assert_error_within_pytorch(name, fused[name], pytorchs[name], expected[name], dtype, summed_terms=terms)
        scale = max(1.0, reference[name].abs().max().item())
        allowed = (1e-5 if dtype == torch.float32 else 8 * eps) * scale * terms**0.5
        error = max_error(fused[name], reference[name])
        assert error <= allowed, f"{name}: fused vs reference backward {error:.3e} > {allowed:.1e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_per_step_fallback_matches_persistent(dtype):
    """The per-step schedule (several programs per launch, the launch as the barrier) and the persistent
    one (one program under the interpreter) give the same gradients."""
    inputs, lengths, grads = _case(5, 17, 4, 20, dtype, KERNEL_DEVICE, ragged=True, seed=1)
    persistent, reference, _ = _both_backwards(inputs, lengths, grads, schedule="persistent")
    per_step, _, _ = _both_backwards(inputs, lengths, grads, schedule="per_step")
    for name in GRAD_NAMES:
        scale = max(1.0, reference[name].abs().max().item())
        error = max_error(per_step[name], persistent[name])
        assert error <= 2 * torch.finfo(dtype).eps * scale * 17**0.5, f"{name}: per-step vs persistent {error:.3e}"


def test_bad_schedule_is_rejected():
    inputs, lengths, grads = _case(2, 1, 2, 3, torch.float32, KERNEL_DEVICE, ragged=False)
    with pytest.raises(ValueError, match="schedule"):
        _both_backwards(inputs, lengths, grads, schedule="sometimes")


def _layer_grads(inputs, lengths, grads, **options):
    """Outputs and gradients of ``lstm_layer`` (the autograd Function and the backward op)."""
    leaves = {name: value.detach().clone().requires_grad_() for name, value in inputs.items()}
    out, h_n, c_n = lstm_layer(*leaves.values(), None, lengths, **options)
    torch.autograd.backward((out, h_n, c_n), (grads["out"], grads["h_n"], grads["c_n"]))
    result = {name: leaf.grad for name, leaf in leaves.items()}
    result["out"] = out.detach()
    return result


def test_deterministic_bitwise():
    inputs, lengths, grads = _case(5, 3, 4, 17, torch.float32, KERNEL_DEVICE, ragged=True, seed=2)
    first = _layer_grads(inputs, lengths, grads)
    second = _layer_grads(inputs, lengths, grads)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two identical runs"


class _CallCounter:
    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def test_backward_option_selects_the_backward(monkeypatch):
    import triton_lstm.ops as ops

    counter = _CallCounter(ops.lstm_bwd)
    monkeypatch.setattr(ops, "lstm_bwd", counter)
    inputs, lengths, grads = _case(3, 3, 4, 5, torch.float32, KERNEL_DEVICE, ragged=False, seed=3)
    fused = _layer_grads(inputs, lengths, grads)
    assert counter.calls == 1
    reference = _layer_grads(inputs, lengths, grads, backward="reference")
    assert counter.calls == 1, "backward='reference' ran the fused backward"
    for name in inputs:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-5, atol=1e-5, msg=name)


def test_module_backward_option_and_validation():
    for module in (triton_lstm.LSTM(3, 4), triton_lstm.LSTMCell(3, 4)):
        assert module.backward_mode == "fused"
    lstm = triton_lstm.LSTM(3, 4, 2, backward="reference", recompute_interval=5)
    assert (lstm.backward_mode, lstm.recompute_interval) == ("reference", 5)
    assert list(lstm.state_dict()) == list(torch.nn.LSTM(3, 4, 2).state_dict())
    assert triton_lstm.LSTMCell(3, 4, backward="reference").backward_mode == "reference"
    with pytest.raises(ValueError, match="backward"):
        triton_lstm.LSTM(3, 4, backward="cudnn")
    with pytest.raises(ValueError, match="backward"):
        triton_lstm.LSTMCell(3, 4, backward="fast")
    with pytest.raises(ValueError, match="recompute_interval"):
        triton_lstm.LSTM(3, 4, recompute_interval=-1)
    with pytest.raises(TypeError):
        triton_lstm.LSTM(3, 4, 1, True, False, 0.0, False, 0, None, None, "reference")  # keyword-only
    inputs, lengths, grads = _case(2, 1, 2, 3, torch.float32, "cpu", ragged=False)
    with pytest.raises(ValueError, match="backward"):
        lstm_layer(*inputs.values(), backward="Fused")
    converted = triton_lstm.convert(torch.nn.Sequential(torch.nn.LSTM(3, 4)))
    assert isinstance(converted[0], triton_lstm.LSTM) and converted[0].backward_mode == "fused"


def _module_grads(module, x, hx, grad_out):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out, _ = module(x, hx)
    data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    data.backward(grad_out)
    return [x.grad] + [p.grad for p in module.parameters()]


def test_module_fused_matches_reference_packed_bidirectional():
    """Through triton_lstm.LSTM: packed (ragged) input, two layers, both directions."""
    torch.manual_seed(4)
    module = triton_lstm.LSTM(4, 9, num_layers=2, bidirectional=True).to(KERNEL_DEVICE)
    lengths = torch.tensor([6, 5, 2])
    padded = torch.randn(6, 3, 4, device=KERNEL_DEVICE)
    packed = torch.nn.utils.rnn.pack_padded_sequence(padded, lengths)
    grad_out = torch.randn(int(lengths.sum()), 18, device=KERNEL_DEVICE)
    grads = {}
    for backward in ("fused", "reference"):
        module.backward_mode = backward
        x = packed.data.detach().clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        out, _ = module(torch.nn.utils.rnn.PackedSequence(x, packed.batch_sizes))
        out.data.backward(grad_out)
        grads[backward] = [x.grad] + [p.grad for p in module.parameters()]
    for index, (fused, reference) in enumerate(zip(grads["fused"], grads["reference"])):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5, msg=f"gradient {index}")


def test_lstm_cell_fused_matches_reference():
    torch.manual_seed(5)
    cell = triton_lstm.LSTMCell(5, 17).to(KERNEL_DEVICE)
    x = torch.randn(3, 5, device=KERNEL_DEVICE)
    hx = (torch.randn(3, 17, device=KERNEL_DEVICE), torch.randn(3, 17, device=KERNEL_DEVICE))
    gh, gc = torch.randn(3, 17, device=KERNEL_DEVICE), torch.randn(3, 17, device=KERNEL_DEVICE)
    grads = {}
    for backward in ("fused", "reference"):
        cell.backward_mode = backward
        cell.zero_grad(set_to_none=True)
        leaves = [t.detach().clone().requires_grad_() for t in (x, *hx)]
        h, c = cell(leaves[0], (leaves[1], leaves[2]))
        torch.autograd.backward((h, c), (gh, gc))
        grads[backward] = [t.grad for t in leaves] + [p.grad for p in cell.parameters()]
    for index, (fused, reference) in enumerate(zip(grads["fused"], grads["reference"])):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5, msg=f"gradient {index}")


@functools.lru_cache(maxsize=None)
def _saved_everything_grads(backward):
    inputs, lengths, grads = _case(7, 3, 4, 17, torch.float32, KERNEL_DEVICE, ragged=True, seed=6)
    return _layer_grads(inputs, lengths, grads, backward=backward)


@pytest.mark.parametrize("interval, backward", [(1, "fused"), (3, "fused"), (8, "fused"), (3, "reference")])
def test_recompute_matches_saving_everything(interval, backward, monkeypatch):
    inputs, lengths, grads = _case(7, 3, 4, 17, torch.float32, KERNEL_DEVICE, ragged=True, seed=6)
    saved_all = _saved_everything_grads(backward)
    counter = _CallCounter(lstm_bwd_module.lstm_bwd_gate_grads)
    monkeypatch.setattr(lstm_bwd_module, "lstm_bwd_gate_grads", counter)
    recomputed = _layer_grads(inputs, lengths, grads, backward=backward, recompute_interval=interval)
    assert counter.calls == (1 if backward == "fused" else 0), "the recompute backward took the wrong path"
    # Not bitwise: the recomputed input projection is a GEMM over a segment, not over the whole sequence.
    for name in saved_all:
        torch.testing.assert_close(recomputed[name], saved_all[name], rtol=1e-5, atol=1e-5, msg=name)


# On a GPU the prefetch runs on 16-bit chains only (backward_plans.chain_variants): bf16 there, fp32 here.
PREFETCH_DTYPE = STACK_DTYPE
PREFETCH_CASES = {
    # name: (case, cell, dtype, module kwargs): every path of the chain that runs the prefetch
    "LSTM-packed-state": (Case(T=6, B=5, I=4, H=17, packed=True, with_state=True), "LSTM", PREFETCH_DTYPE, {}),
    "LSTM-recompute-segments": (Case(T=7, B=3, I=4, H=17, packed=True), "LSTM", PREFETCH_DTYPE,
                                dict(recompute_interval=3)),
    "LSTM-peephole-fp16": (Case(T=5, B=3, I=4, H=9, with_state=True), "LSTM", torch.float16, dict(peephole=True)),
    "LSTM-peephole-bidirectional-L2-packed": (None, "LSTM", PREFETCH_DTYPE, dict(peephole=True)),
    "GRU-packed": (Case(T=6, B=4, I=5, H=9, packed=True), "GRU", PREFETCH_DTYPE, {}),
    "LSTM-bidirectional-packed": (Case(T=6, B=4, I=4, H=7, bidirectional=True, packed=True), "LSTM", PREFETCH_DTYPE,
                                  {}),
    "GRU-bidirectional-state": (Case(T=5, B=3, I=4, H=6, bidirectional=True, with_state=True), "GRU", PREFETCH_DTYPE,
                                {}),
    "LSTM-stack-L3-packed": (Case(T=6, B=4, I=5, H=7, num_layers=3, packed=True), "LSTM", STACK_DTYPE, {}),
    "GRU-stack-L2-state": (Case(T=5, B=3, I=4, H=6, num_layers=2, with_state=True), "GRU", STACK_DTYPE, {}),
}


@pytest.mark.parametrize("schedule", ["persistent", "per_step"])
@pytest.mark.parametrize("name", PREFETCH_CASES, ids=str)
def test_chain_with_its_operands_prefetched_matches_nn(name, schedule, monkeypatch):
    """``backward_plans.PREFETCH``: each step's saved gates, state and output gradient loaded during the step
    before — one layer (lengths, recompute segments, peepholes, the GRU), both directions of a layer, stacks
    (whose lower layers take their gradient from above instead) — against nn in float64 with every
    gradient; each backward launch ran with it."""
    from test_modules import check_against_nn

    from triton_lstm.kernels import backward_plans, lstm_bwd_whole_module

    case, cell, dtype, kwargs = PREFETCH_CASES[name]
    if schedule == "per_step" and name not in ("LSTM-packed-state", "GRU-packed"):
        pytest.skip("per-step launches (one step each: nothing to prefetch ahead) on one case per cell")
    if schedule == "per_step":  # (the environment's switch is the GPU's: the interpreter's plan is its own)
        real_plan = lstm_bwd_module.plan_bwd
        monkeypatch.setattr(lstm_bwd_module, "plan_bwd", lambda B, H, num_sms, _: real_plan(B, H, num_sms, "per_step"))
    monkeypatch.setattr(backward_plans, "PREFETCH", True)
    if KERNEL_DEVICE == "cuda" and cell == "GRU" and case is not None and case.num_layers > 1:
        monkeypatch.setattr(backward_plans, "STACK_ONE_LOOP", True)  # a GPU's GRU stack prefetches in one loop only
    launched = record_launches(monkeypatch, [lstm_bwd_module, lstm_bwd_whole_module], "_lstm_bwd_kernel", "PREFETCH")
    if kwargs.get("peephole"):  # against the peephole equations (nn has none)
        from test_peephole import CASES, _check_against_oracle

        _check_against_oracle(case or CASES["packed-bidir-layers2"], dtype)
    else:
        check_against_nn(case, dtype, cell=cell, **kwargs)
    assert launched and all(launch["PREFETCH"] for launch in launched), launched


STACK_ONE_LOOP_CASES = {
    # name: (case, cell, with the prefetch too)
    "LSTM-L3-packed": (Case(T=6, B=4, I=5, H=7, num_layers=3, packed=True), "LSTM", False),
    "LSTM-L4-state-H17-prefetch": (Case(T=5, B=3, I=4, H=17, num_layers=4, with_state=True), "LSTM", True),
    "LSTM-L2-proj-packed": (Case(T=5, B=3, I=4, H=9, num_layers=2, proj_size=4, packed=True, with_state=True), "LSTM",
                            False),
    "LSTM-L2-peephole-packed": (None, "LSTM", False),
    "GRU-L3-packed": (Case(T=6, B=4, I=5, H=9, num_layers=3, packed=True), "GRU", False),
    "GRU-L2-state-prefetch": (Case(T=5, B=3, I=4, H=6, num_layers=2, with_state=True), "GRU", True),
}


@pytest.mark.parametrize("name", STACK_ONE_LOOP_CASES, ids=str)
def test_stack_chain_in_one_loop_matches_nn(name, monkeypatch):
    """``backward_plans.STACK_ONE_LOOP``: a stack's chain forms each layer's two products in one K loop after
    its wait for the layer above (the carried gradient added where step t+1 did not run) — LSTM and GRU
    stacks, packed, given states, projections, peepholes, with the prefetch — against nn (or the peephole
    equations) in float64 with every gradient; the stacked backward launch ran with it."""
    from test_modules import check_against_nn

    from triton_lstm.kernels import backward_plans, lstm_bwd_whole_module

    if KERNEL_DEVICE == "cuda":
        pytest.skip("one-program plans: on a GPU its own plans, test_variants.py::test_gpu_stack_one_tile_…")
    case, cell, prefetch = STACK_ONE_LOOP_CASES[name]
    monkeypatch.setattr(backward_plans, "STACK_ONE_LOOP", True)
    monkeypatch.setattr(backward_plans, "PREFETCH", prefetch)
    launched = record_launches(monkeypatch, [lstm_bwd_whole_module], "_lstm_bwd_kernel", "LAYERS", "ONE_LOOP",
                               "PREFETCH")
    if case is None:  # against the peephole equations (nn has none)
        from test_peephole import _check_against_oracle

        _check_against_oracle(Case(T=5, B=3, I=4, H=7, num_layers=2, packed=True), STACK_DTYPE)
        layers = 2
    else:
        check_against_nn(case, STACK_DTYPE, cell=cell)
        layers = case.num_layers
    assert launched == [{"LAYERS": layers, "ONE_LOOP": True, "PREFETCH": prefetch}], launched


def test_stack_chain_with_dropout_keeps_two_loops(monkeypatch):
    """With dropout between layers the product from above is masked alone: the chain keeps two loops even
    with ``STACK_ONE_LOOP`` on."""
    from triton_lstm.kernels import backward_plans, lstm_bwd_whole_module

    monkeypatch.setattr(backward_plans, "STACK_ONE_LOOP", True)
    launched = record_launches(monkeypatch, [lstm_bwd_whole_module], "_lstm_bwd_kernel", "DROPOUT", "ONE_LOOP")
    import triton_lstm

    model = triton_lstm.LSTM(4, 6, num_layers=2, dropout=0.5, device=KERNEL_DEVICE, dtype=STACK_DTYPE).train()
    x = torch.randn(5, 3, 4, device=KERNEL_DEVICE, dtype=STACK_DTYPE, requires_grad=True)
    model(x)[0].sum().backward()
    assert launched == [{"DROPOUT": True, "ONE_LOOP": False}], launched


def test_chain_variants_apply_where_they_compile_clean(monkeypatch):
    """``backward_plans.chain_variants``, the (PREFETCH, ONE_LOOP) the launchers pass the kernel: off while
    their switches are; once switched on, on a GPU only where compile_check.py found every build clean
    (Triton 3.6 on; the prefetch on 16-bit chains without dropout, on GRU stacks with the one loop only; the
    one loop on stacks without dropout), under the interpreter wherever switched on (dropout aside for the
    one loop: its mask needs two)."""
    from triton_lstm.kernels import backward_plans, forward_plans

    variants = backward_plans.chain_variants  # (element_size, layers, cell, dropout, interpret)
    for interpret in (False, True):
        assert variants(2, 3, "lstm", False, interpret) == (False, False)
    monkeypatch.setattr(backward_plans, "PREFETCH", True)
    monkeypatch.setattr(backward_plans, "STACK_ONE_LOOP", True)
    monkeypatch.setattr(forward_plans, "TRITON_VERSION", (3, 6))
    for cell in ("lstm", "gru"):
        assert variants(2, 1, cell, False, False) == (True, False)
        assert variants(2, 3, cell, False, False) == (True, True)
        assert variants(4, 3, cell, False, False) == (False, True), "fp32 chains: no prefetch"
        assert variants(2, 3, cell, True, False) == (False, False), "dropout between layers"
        assert variants(4, 3, cell, True, True) == (True, False), "the interpreter: the switches (dropout aside)"
    monkeypatch.setattr(backward_plans, "STACK_ONE_LOOP", False)
    assert variants(2, 3, "lstm", False, False) == (True, False)
    assert variants(2, 3, "gru", False, False) == (False, False), "a GRU stack prefetches only in one loop"
    assert variants(2, 1, "gru", False, False) == (True, False)
    monkeypatch.setattr(backward_plans, "STACK_ONE_LOOP", True)
    monkeypatch.setattr(forward_plans, "TRITON_VERSION", (3, 4))
    assert variants(2, 3, "lstm", False, False) == (False, False), "Triton 3.4 spills them"
    assert variants(2, 3, "lstm", False, True) == (True, True)


def test_recompute_with_projection_matches_saving_everything():
    """With a projection the backward is the reference one, run per recomputed segment."""
    inputs, lengths, grads = _case(5, 2, 3, 5, torch.float32, KERNEL_DEVICE, ragged=True, seed=11)
    w_hr = torch.randn(3, 5, device=KERNEL_DEVICE) * 0.5
    # h is projected to P = 3 units: h0, W_hh's columns and h's gradients are 3 wide.
    inputs["h0"] = inputs["h0"][:, :3].contiguous()
    inputs["w_hh"] = inputs["w_hh"][:, :3].contiguous()
    grads["out"], grads["h_n"] = grads["out"][..., :3].contiguous(), grads["h_n"][:, :3].contiguous()
    results = []
    for interval in (0, 2):
        leaves = [t.detach().clone().requires_grad_() for t in (*inputs.values(), w_hr)]
        outputs = lstm_layer(*leaves, lengths, recompute_interval=interval)
        torch.autograd.backward(outputs, (grads["out"], grads["h_n"], grads["c_n"]))
        results.append([leaf.grad for leaf in leaves])
    for index, (saved_all, recomputed) in enumerate(zip(*results)):
        torch.testing.assert_close(recomputed, saved_all, rtol=1e-5, atol=1e-5, msg=f"gradient {index}")


def test_recompute_saves_less_memory():
    args = dict(provider="triton_lstm", T=512, B=64, input_size=256, hidden_size=256, dtype=torch.bfloat16)
    everything = saved_activation_bytes(**args)
    # h_all (T+1)·B·H bf16 + c_all (T+1)·B·H fp32 + gates T·B·4H bf16 (+ h0, c0).
    T, B, H = 512, 64, 256
    activations = (T + 1) * B * H * 2 + (T + 1) * B * H * 4 + T * B * 4 * H * 2
    assert activations <= everything <= activations + 2 * B * H * 2
    for interval, checkpoints in ((4, 128), (32, 16)):
        recomputed = saved_activation_bytes(**args, recompute_interval=interval)
        assert recomputed <= checkpoints * B * H * (2 + 4) + 2 * B * H * 2
        assert recomputed * 8 < everything
    # The fake (shape-only) measurement agrees with a real run, kernels included.
    small = dict(provider="triton_lstm", T=5, B=3, input_size=5, hidden_size=7, num_layers=2, bidirectional=True)
    for interval in (0, 3):
        fake = saved_activation_bytes(**small, recompute_interval=interval)
        real = saved_activation_bytes(**small, recompute_interval=interval, device=KERNEL_DEVICE, fake=False)
        assert fake == real


def test_saved_tensor_bytes_counts_each_storage_once():
    x = torch.randn(10, requires_grad=True)
    y = torch.randn(10, requires_grad=True)

    def run():
        return (x * y) * y  # saves x, y, then x·y and y again

    assert saved_tensor_bytes(run, exclude=(x,)) == 2 * 10 * 4  # y once, x·y; x excluded


@pytest.mark.parametrize("recompute_interval", [0, 2], ids=["saved", "recompute"])
def test_gradgradcheck_float64(recompute_interval):
    torch.manual_seed(7)
    module = triton_lstm.LSTM(2, 3, batch_first=True, recompute_interval=recompute_interval).double()
    names = [name for name, _ in module.named_parameters()]
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]

    def run(x, h0, c0, *params):
        out, (h, c) = torch.func.functional_call(module, dict(zip(names, params)), (x, (h0, c0)))
        return out, h, c

    assert torch.autograd.gradcheck(run, (x, h0, c0, *params))
    assert torch.autograd.gradgradcheck(run, (x, h0, c0, *params))


# ---- GPU only -------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("schedule", ["auto", "per_step"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_gpu_long_sequence_matches_float64(dtype, schedule):
    T, B, I, H = 4096, 4, 32, 64
    inputs, lengths, grads = _case(T, B, I, H, dtype, "cuda", ragged=True, seed=8)
    fused, reference, _ = _both_backwards(inputs, lengths, grads, schedule=schedule)
    expected = _autograd_grads(inputs, lengths, grads, torch.float64)
    pytorchs = _autograd_grads(inputs, lengths, grads, dtype)
    for name in GRAD_NAMES:
        terms = T * B if name in ("w_ih", "w_hh", "bias") else 1
        assert_error_within_pytorch(name, fused[name], pytorchs[name], expected[name], dtype, summed_terms=terms)


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4096, 8, 64, 128), (64, 256, 128, 1024), (16, 256, 64, 4096)], ids=_shape_id)
def test_gpu_deterministic_bitwise(dtype, shape):
    """Same inputs, same gradients, bit for bit: persistent grids, and (last shape) more tiles than SMs,
    which takes the per-step fallback."""
    T, B, I, H = shape
    # Weights at nn.LSTM's scale (1/√H): at 0.4 the gradient of a 1024-wide fp16 layer overflows to NaN
    # within 64 steps, and NaN never compares equal.
    inputs, lengths, grads = _case(T, B, I, H, dtype, "cuda", ragged=True, seed=9, weight_scale=H**-0.5)
    first = _layer_grads(inputs, lengths, grads)
    assert all(torch.isfinite(value).all() for value in first.values())
    for _ in range(2):
        again = _layer_grads(inputs, lengths, grads)
        for name in first:
            assert torch.equal(first[name], again[name]), f"{name} differs between two identical runs"


def test_plan_is_persistent_within_the_sms_and_falls_back_beyond():
    sms = 132  # an H100 SXM / H200
    schedule, block_b, block_h = plan_bwd(64, 512, sms, "auto")
    assert schedule == "persistent" and tile_count(64, 512, block_b, block_h) <= sms
    assert plan_bwd(256, 8192, sms, "auto")[0] == "per_step"
    with pytest.raises(ValueError, match="SMs"):
        plan_bwd(256, 8192, sms, "persistent")
    assert plan_bwd(5, 7, None, "auto")[0] == "persistent", "one program under the interpreter"
    # The tiles measured fastest on an H200 (benchmarks/NOTES.md, run 4).
    assert plan_bwd(64, 1024, sms, "auto") == ("persistent", 16, 32)
    assert plan_bwd(16, 2048, sms, "auto") == ("persistent", 16, 32)
    assert plan_bwd(64, 256, sms, "auto") == ("persistent", 64, 16)



def test_barrier_that_is_never_reached_raises_instead_of_hanging(monkeypatch):
    """A spin limit of 0 gives up at the first barrier, as a grid that is not all resident would after
    BARRIER_SPIN_LIMIT polls: the launch finishes with NaN gate gradients and the launcher raises (on a
    GPU at the next persistent launch's check, made here by hand)."""
    inputs, lengths, grads = _case(4, 3, 5, 17, torch.float32, KERNEL_DEVICE, ragged=False)
    h_all, c_all, gates = _saved_activations(inputs, lengths)
    monkeypatch.setattr(common, "BARRIER_SPIN_LIMIT", 0)
    with pytest.raises(RuntimeError, match=r"persistent backward kernel.*gave up.*TRITON_LSTM_PERSISTENT_BWD=0"):
        lstm_bwd_module.lstm_bwd_gate_grads(grads["out"], grads["h_n"], grads["c_n"], inputs["w_hh"], None,
                                            [(0, gates, c_all)], "persistent")
        if KERNEL_DEVICE == "cuda":
            torch.cuda.synchronize()
            common.barrier_watch.check()


def test_a_refused_build_is_remembered_alone(monkeypatch):
    """The per-step fallback after a refused (or too large) build is kept for that build only: another build
    of the same tile (other K chunks) still tries its persistent launch (the tuning sweep times it)."""
    tried = refuse_cooperative_launches(monkeypatch, lambda launch: launch["BLOCK_K"] == 64)
    T, B, H = 4, 3, 17
    gates = torch.rand(T, B, 4 * H, device=KERNEL_DEVICE)
    c_all = torch.randn(T + 1, B, H, device=KERNEL_DEVICE)
    w_hh = torch.randn(4 * H, H, device=KERNEL_DEVICE) * 0.3
    grads = [torch.randn(*shape, device=KERNEL_DEVICE) for shape in ((T, B, H), (B, H), (B, H))]
    results = [lstm_bwd_module.lstm_bwd_gate_grads(*grads, w_hh, None, [(0, gates, c_all)], "persistent",
                                                   (16, 32, block_k, 4))[0]
               for block_k in (64, 32, 64, 32)]
    assert [launch["BLOCK_K"] for launch in tried] == [64, 32, 32], \
        "the refused build runs per step from then on, the other build as planned"
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=1e-5, atol=1e-6)


def test_refused_cooperative_launch_runs_per_step_and_is_remembered(monkeypatch):
    tried = refuse_cooperative_launches(monkeypatch)
    inputs, lengths, grads = _case(5, 3, 4, 17, torch.float32, KERNEL_DEVICE, ragged=True, seed=4)
    for _ in range(2):
        fused, reference, _ = _both_backwards(inputs, lengths, grads, schedule="persistent")
        for name in GRAD_NAMES:
            torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-5)
    assert len(tried) == 1, "the refused grid is not launched again"
