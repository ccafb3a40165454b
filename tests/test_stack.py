"""A stack of unidirectional layers in one persistent launch (triton_lstm/stack.py,
kernels/lstm_fwd_stack.py): parity with nn.LSTM in float64 with every gradient, one launch per forward,
the inference forward, the plan, and the cases that stay layer by layer."""

from __future__ import annotations


import pytest
import torch
import triton
from helpers import (
    KERNEL_DEVICE,
    STACK_DTYPE,
    break_fused_backward,
    check_double_backward,
    count_calls,
    requires_cuda,
)
from test_modules import Case, check_against_nn

import triton_lstm
from triton_lstm import stack as stack_module
from triton_lstm.kernels.forward_plans import ForwardPlan, plan_stack_fwd


STACKS = {
    "L2": Case(T=5, B=3, I=4, H=6, num_layers=2),
    "L3-state": Case(T=6, B=2, I=5, H=7, num_layers=3, with_state=True),
    "L4-packed": Case(T=7, B=4, I=3, H=5, num_layers=4, packed=True),
    "L2-no-bias-batch-first": Case(T=4, B=3, I=6, H=9, num_layers=2, bias=False, batch_first=True),
    "L3-odd-H17": Case(T=3, B=5, I=16, H=17, num_layers=3),
    "L2-unbatched": Case(T=5, B=1, I=4, H=6, num_layers=2, unbatched=True),
    # Two batch blocks of 64 and three hidden blocks of 16 in the one interpreted program: the tile loops.
    "L2-B70-H40-packed": Case(T=4, B=70, I=5, H=40, num_layers=2, packed=True),
}


@pytest.fixture
def launches(monkeypatch):
    """Counts the stacked kernels' launches (forward and backward) and the layer-by-layer fallback's."""
    return count_calls(monkeypatch, stack_module, {"stack": "lstm_fwd_stack", "layer": "run_lstm_layer",
                                                   "stack_bwd": "lstm_bwd_stack_gate_grads"})


@pytest.mark.parametrize("case", STACKS.values(), ids=STACKS.keys())
def test_stack_matches_nn_lstm(case, launches):
    check_against_nn(case, STACK_DTYPE)
    # check_against_nn runs one forward of ours and its backward: one stacked launch each, no per-layer one.
    assert launches == {"stack": 1, "layer": 0, "stack_bwd": 1}


@pytest.mark.parametrize("name", ["L3-state", "L4-packed", "L3-odd-H17", "L2-no-bias-batch-first"])
def test_stack_with_resident_weights_matches_nn_lstm(name, launches, monkeypatch):
    """The resident variant: each program loads its slices of a layer's W_ih and W_hh once, before the
    layer's time loop. One program per layer here (its hidden block the whole H), as the interpreter runs it."""
    case = STACKS[name]
    width = max(16, triton.next_power_of_2(case.H))
    plan = ForwardPlan(True, "resident (test)", True, 16, width, width, 1, 1, 4)
    monkeypatch.setattr(stack_module, "plan_stack_for", lambda x, hidden_size, num_layers, peephole=False: plan)
    check_against_nn(case, STACK_DTYPE)
    assert launches == {"stack": 1, "layer": 0, "stack_bwd": 1}


@pytest.mark.parametrize("fallback", ["reference", "no-fit"])
def test_backward_layer_by_layer_where_the_stacked_one_does_not_run(fallback, launches, monkeypatch):
    """backward="reference", or a stacked backward that cannot launch (its tiles do not fit the SMs): the
    per-layer backward from the top, with the same gradients."""
    case = STACKS["L3-state"]
    break_fused_backward(monkeypatch, fallback, stack_module, "lstm_bwd_stack_gate_grads")
    check_against_nn(case, STACK_DTYPE)
    assert launches["stack"] == 1 and launches["stack_bwd"] == 0


def test_inference_forward_keeps_no_per_step_state():
    torch.manual_seed(0)
    T, B, I, H, L = 6, 3, 4, 5, 3
    model = triton_lstm.LSTM(I, H, num_layers=L, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    x = torch.randn(T, B, I, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    weights = [model._layer_weights(layer, 0) for layer in range(L)]
    h0 = c0 = torch.zeros(L, B, H, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    w_ih, w_hh, b_ih, b_hh = ([w[i] for w in weights] for i in range(4))
    with torch.no_grad():
        h_all, c_all, gates = torch.ops.triton_lstm.stack_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, 0)
        trained = torch.ops.triton_lstm.stack_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, 1)
        out, (h_n, c_n) = model(x)
    assert c_all.shape == (L, 1, B, H) and gates.shape == (L, 0, B, 4 * H)
    assert torch.equal(h_all, trained[0]) and torch.equal(c_all[:, 0], trained[1][:, -1])
    # The module returns c_n in the input dtype (the kernels keep c in fp32).
    assert torch.equal(out, trained[0][-1, 1:]) and torch.equal(c_n, trained[1][:, -1].to(STACK_DTYPE))


def test_stays_layer_by_layer_where_the_kernel_does_not_apply():
    x = torch.randn(4, 2, 3, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    kwargs = dict(input_size=3, hidden_size=5, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    assert triton_lstm.LSTM(num_layers=2, **kwargs)._runs_as_stack(x)
    assert not triton_lstm.LSTM(num_layers=1, **kwargs)._runs_as_stack(x)
    assert not triton_lstm.LSTM(num_layers=2, bidirectional=True, **kwargs)._runs_as_stack(x)
    assert not triton_lstm.LSTM(num_layers=2, proj_size=2, **kwargs)._runs_as_stack(x)
    assert not triton_lstm.LSTM(num_layers=2, recompute_interval=2, **kwargs)._runs_as_stack(x)
    with_dropout = triton_lstm.LSTM(num_layers=2, dropout=0.5, **kwargs)
    assert not with_dropout._runs_as_stack(x), "dropout between layers in training: layer by layer"
    assert with_dropout.eval()._runs_as_stack(x), "in eval mode dropout is off"
    kwargs.pop("dtype")
    assert not triton_lstm.LSTM(num_layers=2, dtype=torch.float64, **kwargs)._runs_as_stack(x.double())


def test_dropout_training_runs_layer_by_layer(launches):
    torch.manual_seed(0)
    model = triton_lstm.LSTM(3, 5, num_layers=2, dropout=0.5, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    x = torch.randn(4, 2, 3, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    model(x)
    assert launches["stack"] == 0
    model.eval()(x)
    assert launches["stack"] == 1, "in eval mode dropout is off: the stacked launch"



def test_dropout_between_layers_masks_and_reproduces(monkeypatch):
    """Dropout between layers in training is the documented fallback: the layers run one by one with
    F.dropout (torch's generator) on each layer's output but the last, so torch.manual_seed reproduces a
    run; the masks drop about p of the units and scale the rest by 1/(1 - p)."""
    import torch.nn.functional as F

    dropped = []
    real_dropout = F.dropout

    def spy(x, p, training, *args, **kwargs):
        out = real_dropout(x, p, training, *args, **kwargs)
        dropped.append((x, out, p, training))
        return out

    monkeypatch.setattr(F, "dropout", spy)  # the module dropout_between_layers calls
    model = triton_lstm.LSTM(4, 64, num_layers=3, dropout=0.3, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    x = torch.randn(8, 16, 4, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outputs.append(model(x)[0])
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    assert len(dropped) == 3 * 2 and all(p == 0.3 and training for _, _, p, training in dropped)
    kept = torch.cat([(out != 0).flatten() for _, out, _, _ in dropped]).float().mean().item()
    assert abs(kept - 0.7) < 0.03, kept
    for before, after, _, _ in dropped:
        mask = after != 0
        torch.testing.assert_close(after[mask], before[mask] / 0.7, rtol=1e-2, atol=1e-3)


def test_stack_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("TRITON_LSTM_STACK", "0")
    x = torch.randn(4, 2, 3, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    assert not triton_lstm.LSTM(3, 5, num_layers=2, device=KERNEL_DEVICE, dtype=STACK_DTYPE)._runs_as_stack(x)


def test_plan_gives_each_layer_its_share_of_the_sms():
    sms, shared = 132, 232448  # an H100 SXM / H200
    for layers, (B, H) in [(2, (64, 512)), (4, (64, 512)), (4, (64, 1024)), (3, (8, 2048)), (2, (256, 512))]:
        plan = plan_stack_fwd(512, B, H, layers, 2, sms, shared)
        assert plan.persistent and not plan.resident, plan
        assert layers * plan.num_programs <= sms, plan
        assert plan.block_k <= 64, "wider chunks spill with the stack's second product"
    assert not plan_stack_fwd(512, 64, 512, 1, 2, sms, shared).persistent, "one layer: the single-layer kernel"
    assert not plan_stack_fwd(512, 64, 512, 2, 4, sms, shared).persistent, "fp32 spills: layer by layer"
    assert not plan_stack_fwd(512, 64, 512, 200, 2, sms, shared).persistent, "more layers than SMs"
    assert not plan_stack_fwd(1, 8, 512, 2, 2, sms, shared).persistent, "one step: the per-step kernel"
    interpreted = plan_stack_fwd(5, 3, 7, 3, 4, 1, 96 * 1024, interpret=True)
    assert interpreted.persistent and interpreted.num_programs == 1


def test_double_backward_through_the_stack():
    check_double_backward(num_layers=2)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [Case(T=128, B=16, I=256, H=512, num_layers=4),
                                  Case(T=96, B=17, I=64, H=1024, num_layers=2, packed=True, with_state=True)],
                         ids=["T128-B16-H512-L4", "T96-B17-H1024-L2-packed"])
def test_gpu_stack_matches_nn_lstm(case, dtype, launches):
    check_against_nn(case, dtype, oracle_device="cuda")
    assert launches == {"stack": 1, "layer": 0, "stack_bwd": 1}


