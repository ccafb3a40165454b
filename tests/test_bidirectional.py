"""Both directions of a bidirectional layer in one persistent launch each way (triton_lstm/bidirectional.py,
kernels/lstm_fwd_bidirectional.py, lstm_bwd_bidirectional_gate_grads): parity with nn.LSTM in float64
with every gradient, one launch per layer each way, each of the forward kernel's paths (streamed,
resident, one tile per program), the inference forward, the plan, and the cases that keep one launch per
direction."""

from __future__ import annotations


import pytest
import torch
from helpers import KERNEL_DEVICE, break_fused_backward, check_double_backward, count_calls, requires_cuda
from test_modules import Case, check_against_nn

import triton_lstm
from triton_lstm import bidirectional as bidirectional_module
from triton_lstm.kernels.forward_plans import ForwardPlan, plan_bidirectional_fwd
from triton_lstm.kernels.lstm_fwd_bidirectional import lstm_fwd_bidirectional
from triton_lstm.reference import lstm_recurrence_reference

CASES = {
    "L1": Case(T=5, B=3, I=4, H=6, bidirectional=True),
    "L2-packed": Case(T=7, B=4, I=3, H=5, num_layers=2, bidirectional=True, packed=True),
    "L2-state": Case(T=6, B=2, I=5, H=7, num_layers=2, bidirectional=True, with_state=True),
    "L1-no-bias-batch-first": Case(T=4, B=3, I=6, H=9, bidirectional=True, bias=False, batch_first=True),
    "L1-odd-H17-packed": Case(T=6, B=5, I=16, H=17, bidirectional=True, packed=True),
    "L1-unbatched": Case(T=5, B=1, I=4, H=6, bidirectional=True, unbatched=True),
    # Two batch blocks of 64 and three hidden blocks of 16 in each direction's interpreted program.
    "L1-B70-H40-packed": Case(T=4, B=70, I=5, H=40, bidirectional=True, packed=True),
    # Projections: the same launches in m_t (kernels/lstm_projection.py); the reverse direction's h0 enters
    # at each sequence's own last element.
    "L2-proj-packed-state": Case(T=6, B=5, I=4, H=7, num_layers=2, bidirectional=True, proj_size=3, packed=True,
                                 with_state=True),
    "L1-proj-no-bias-batch-first": Case(T=5, B=3, I=6, H=9, bidirectional=True, proj_size=8, bias=False,
                                        batch_first=True, with_state=True),
}


@pytest.fixture
def launches(monkeypatch):
    """Counts the bidirectional kernels' launches (forward: "both", or "both_projected" with a projection;
    backward) and the one-direction-at-a-time forward fallback's."""
    return count_calls(monkeypatch, bidirectional_module, {"both": "lstm_fwd_bidirectional", "one": "run_lstm_layer",
                                                           "both_projected": "lstmp_fwd_bidirectional",
                                                           "both_bwd": "lstm_bwd_bidirectional_gate_grads"})


def expected_launches(case: Case) -> dict[str, int]:
    """One launch per layer each way, both directions in it."""
    layers = case.num_layers
    return {"both": 0 if case.proj_size else layers, "both_projected": layers if case.proj_size else 0, "one": 0,
            "both_bwd": layers}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_nn_lstm(case, launches):
    check_against_nn(case, torch.float32)
    assert launches == expected_launches(case)


@pytest.mark.parametrize("case", ["L2-packed", "L2-proj-packed-state"])
@pytest.mark.parametrize("fallback", ["reference", "no-fit"])
def test_backward_direction_by_direction_where_the_fused_one_does_not_run(fallback, case, launches, monkeypatch):
    """backward="reference", or a fused backward that cannot launch: each direction's backward on its own
    (on reversed views for the reverse one), with the same gradients."""
    case = CASES[case]
    break_fused_backward(monkeypatch, fallback, bidirectional_module, "lstm_bwd_bidirectional_gate_grads")
    check_against_nn(case, torch.float32)
    assert launches["both"] + launches["both_projected"] == 2 and launches["both_bwd"] == 0


@pytest.mark.parametrize("case", ["L2-packed", "L2-proj-packed-state"])
def test_forward_direction_by_direction_where_the_launch_is_refused(case, launches, monkeypatch):
    """A both-directions launch the driver refuses (nothing ran): each direction's forward on its own, on
    the one-direction kernels, with the same results (the fused backward still runs both at once)."""
    def refused(*args, **kwargs):
        raise RuntimeError("too many blocks in cooperative launch")

    monkeypatch.setattr(bidirectional_module, "lstm_fwd_bidirectional", refused)
    monkeypatch.setattr(bidirectional_module, "lstmp_fwd_bidirectional", refused)
    check_against_nn(CASES[case], torch.float32)
    assert launches["one"] == 2 * 2 and launches["both_bwd"] == 2


def _layer(T, B, I, H, lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.4):
        return (torch.randn(*shape, generator=generator) * scale).to(KERNEL_DEVICE)

    x = rand(T, B, I, scale=1.0)
    w_ih, w_hh, bias = [rand(4 * H, I) for _ in range(2)], [rand(4 * H, H) for _ in range(2)], [rand(4 * H) for _ in range(2)]
    h0, c0 = rand(2, B, H, scale=1.0), rand(2, B, H, scale=1.0)
    lengths = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=KERNEL_DEVICE)
    return x, w_ih, w_hh, bias, h0, c0, lengths


def _expected(x, w_ih, w_hh, bias, h0, c0, lengths):
    """Each direction through the float64 reference, the reverse one on the reversed sequence."""
    T = x.shape[0]
    index = None if lengths is None else bidirectional_module.reverse_index(lengths.long(), T)
    results = []
    for d in range(2):
        layer_x = (x if d == 0 else bidirectional_module.reverse_time(x, index)).double()
        results.append(lstm_recurrence_reference(layer_x, h0[d].double(), c0[d].double(), w_ih[d].double(),
                                                 w_hh[d].double(), bias[d].double(), torch.zeros_like(bias[d]).double(),
                                                 None, lengths))
    out = torch.cat([results[0][0][1:], bidirectional_module.reverse_time(results[1][0][1:], index)], 2)
    return out, results


@pytest.mark.parametrize("path", ["streamed", "resident-one-tile", "resident-batch-blocks"])
@pytest.mark.parametrize("lengths", [None, [6, 2, 5]], ids=["full", "packed"])
def test_each_kernel_path_against_float64(path, lengths):
    """The kernel's three ways of running a direction, forced (the interpreter ignores resources)."""
    T, B, I, H = 6, 3, 4, 7
    x, w_ih, w_hh, bias, h0, c0, lengths = _layer(T, B, I, H, lengths)
    if path == "streamed":
        plan = ForwardPlan(True, path, False, 16, 16, 16, 1, 1, 2)
    elif path == "resident-one-tile":  # one batch block: c and h stay in registers across steps
        plan = ForwardPlan(True, path, True, 16, 16, 16, 1, 1)
    else:  # B = 3 rows in blocks of 2? tl.dot needs 16: two batch blocks need B > 16
        x, w_ih, w_hh, bias, h0, c0, lengths = _layer(T, 20, I, H, None if lengths is None else [6, 2, 5] + [4] * 17)
        plan = ForwardPlan(True, path, True, 16, 16, 16, 1, 1)
    projected = bidirectional_module.projections_in_step_order(x, w_ih, bias, lengths, H, True)
    out, h_all, c_all, gates = lstm_fwd_bidirectional(projected, h0, c0, torch.stack(w_hh), lengths, plan)
    expected_out, expected = _expected(x, w_ih, w_hh, bias, h0, c0, lengths)
    if lengths is not None:
        valid = (torch.arange(T, device=x.device)[:, None] < lengths[None, :].long())[:, :, None]
        expected_out = expected_out * valid
        assert (out[~valid.expand_as(out)] == 0).all(), "past each sequence's end the output is zero"
    tolerance = dict(rtol=1e-5, atol=1e-5)  # fp32 against float64: the plans above use exact fp32 dots
    torch.testing.assert_close(out.double(), expected_out, **tolerance)
    for d in range(2):
        torch.testing.assert_close(h_all[d].double(), expected[d][0], **tolerance)
        torch.testing.assert_close(c_all[d].double(), expected[d][1], **tolerance)
        torch.testing.assert_close(gates[d].double(), expected[d][2], **tolerance)


def test_inference_forward_keeps_no_per_step_state():
    torch.manual_seed(0)
    model = triton_lstm.LSTM(4, 5, bidirectional=True, device=KERNEL_DEVICE)
    x = torch.randn(6, 3, 4, device=KERNEL_DEVICE)
    weights = [model._layer_weights(0, d) for d in range(2)]
    w_ih, w_hh, b_ih, b_hh = ([w[i] for w in weights] for i in range(4))
    h0 = c0 = torch.zeros(2, 3, 5, device=KERNEL_DEVICE)
    with torch.no_grad():
        out, h_all, c_all, gates = torch.ops.triton_lstm.bidirectional_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, [], None, 0)
        trained = torch.ops.triton_lstm.bidirectional_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, [], None, 1)
    assert c_all.shape == (2, 1, 3, 5) and gates.shape == (2, 0, 3, 20)
    assert torch.equal(out, trained[0]) and torch.equal(c_all[:, 0], trained[2][:, -1])


def test_keeps_one_launch_per_direction_where_the_kernel_does_not_apply(monkeypatch):
    x = torch.randn(4, 2, 3, device=KERNEL_DEVICE)
    kwargs = dict(input_size=3, hidden_size=5, bidirectional=True, device=KERNEL_DEVICE)
    assert triton_lstm.LSTM(**kwargs)._runs_both_directions_at_once(x)
    assert triton_lstm.LSTM(proj_size=2, **kwargs)._runs_both_directions_at_once(x)
    assert not triton_lstm.LSTM(recompute_interval=2, **kwargs)._runs_both_directions_at_once(x)
    assert not triton_lstm.LSTM(dtype=torch.float64, **kwargs)._runs_both_directions_at_once(x.double())
    monkeypatch.setenv("TRITON_LSTM_BIDIRECTIONAL", "0")
    assert not triton_lstm.LSTM(**kwargs)._runs_both_directions_at_once(x)
    monkeypatch.setenv("TRITON_LSTM_BIDIRECTIONAL", "1")
    monkeypatch.setenv("TRITON_LSTM_PERSISTENT", "0")
    assert not triton_lstm.LSTM(**kwargs)._runs_both_directions_at_once(x)


def test_dropout_between_bidirectional_layers_is_reproducible():
    """Dropout between layers stays F.dropout on the layer output (torch's generator): the same seed
    gives the same result, another seed another one, and about p of the units are dropped."""
    model = triton_lstm.LSTM(3, 8, num_layers=2, bidirectional=True, dropout=0.5, device=KERNEL_DEVICE)
    x = torch.randn(5, 4, 3, device=KERNEL_DEVICE)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(model(x)[0])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_plan_gives_each_direction_half_the_sms():
    sms, shared = 132, 232448
    for B, H in [(64, 512), (64, 256), (8, 512), (64, 1024), (16, 2048), (256, 512)]:
        plan = plan_bidirectional_fwd(256, B, H, 2, sms, shared)
        assert plan.persistent and 2 * plan.num_programs <= sms, plan
    interpreted = plan_bidirectional_fwd(5, 3, 7, 4, 1, 96 * 1024, interpret=True)
    assert interpreted.persistent and interpreted.num_programs == 1


@pytest.mark.parametrize("proj_size", [0, 2], ids=["plain", "proj"])
def test_double_backward_through_both_directions(proj_size):
    check_double_backward(bidirectional=True, proj_size=proj_size)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [Case(T=128, B=64, I=256, H=512, num_layers=2, bidirectional=True),
                                  Case(T=96, B=17, I=64, H=1024, bidirectional=True, packed=True, with_state=True),
                                  Case(T=96, B=17, I=64, H=1024, bidirectional=True, packed=True, with_state=True,
                                       proj_size=256)],
                         ids=["T128-B64-H512-L2", "T96-B17-H1024-packed", "T96-B17-H1024-P256-packed"])
def test_gpu_bidirectional_matches_nn_lstm(case, dtype, launches):
    check_against_nn(case, dtype, oracle_device="cuda")
    assert launches == expected_launches(case)


@pytest.mark.parametrize("proj_size", [0, 2], ids=["plain", "proj"])
def test_opcheck_bidirectional_op(proj_size):
    """The forward op's schema, fake (shapes for torch.compile) and dispatch against its real outputs, with
    lengths, with and without a projection."""
    T, B, I, H = 4, 3, 5, 6
    P = proj_size or H
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(KERNEL_DEVICE)

    w_hr = [randn(P, H), randn(P, H)] if proj_size else []
    args = (randn(T, B, I), randn(2, B, P), randn(2, B, H), [randn(4 * H, I), randn(4 * H, I)],
            [randn(4 * H, P), randn(4 * H, P)], [randn(4 * H), randn(4 * H)], [randn(4 * H), randn(4 * H)], w_hr,
            torch.tensor([4, 1, 3], device=KERNEL_DEVICE), 1, None)
    torch.library.opcheck(torch.ops.triton_lstm.bidirectional_fwd.default, args)
