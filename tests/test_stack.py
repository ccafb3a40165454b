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
    # Projections: the same launches in m_t on merged weights (kernels/lstm_projection.py); layer l > 0 gets
    # its h0 term at step 0 in the kernel.
    "L2-proj-state": Case(T=5, B=3, I=4, H=6, num_layers=2, proj_size=3, with_state=True),
    "L3-proj-packed-state": Case(T=6, B=5, I=3, H=7, num_layers=3, proj_size=5, packed=True, with_state=True),
    "L2-proj-no-bias-batch-first": Case(T=4, B=3, I=6, H=9, num_layers=2, proj_size=8, bias=False, batch_first=True,
                                        with_state=True),
}


@pytest.fixture
def launches(monkeypatch):
    """Counts the stacked kernels' launches (forward: "stack", or "stack_projected" with projections; backward)
    and the layer-by-layer fallback's."""
    return count_calls(monkeypatch, stack_module, {"stack": "lstm_fwd_stack", "stack_projected": "lstmp_fwd_stack",
                                                   "layer": "run_lstm_layer", "stack_bwd": "lstm_bwd_stack_gate_grads"})


def one_launch_each_way(case: Case) -> dict[str, int]:
    """check_against_nn runs one forward of ours and its backward: one stacked launch each, no per-layer one."""
    return {"stack": int(not case.proj_size), "stack_projected": int(bool(case.proj_size)), "layer": 0, "stack_bwd": 1}


@pytest.mark.parametrize("case", STACKS.values(), ids=STACKS.keys())
def test_stack_matches_nn_lstm(case, launches):
    check_against_nn(case, STACK_DTYPE)
    assert launches == one_launch_each_way(case)


@pytest.mark.parametrize("name", ["L3-state", "L4-packed", "L3-odd-H17", "L2-no-bias-batch-first",
                                  "L3-proj-packed-state"])
def test_stack_with_resident_weights_matches_nn_lstm(name, launches, monkeypatch):
    """The resident variant: each program loads its slices of a layer's W_ih and W_hh once, before the
    layer's time loop. One program per layer here (its hidden block the whole H), as the interpreter runs it."""
    case = STACKS[name]
    width = max(16, triton.next_power_of_2(case.H))
    plan = ForwardPlan(True, "resident (test)", True, 16, width, width, 1, 1, 4)
    monkeypatch.setattr(stack_module, "plan_stack_for", lambda *args, **kwargs: plan)
    check_against_nn(case, STACK_DTYPE)
    assert launches == one_launch_each_way(case)


@pytest.mark.parametrize("name", ["L3-state", "L3-proj-packed-state"])
@pytest.mark.parametrize("fallback", ["reference", "no-fit"])
def test_backward_layer_by_layer_where_the_stacked_one_does_not_run(fallback, name, launches, monkeypatch):
    """backward="reference", or a stacked backward that cannot launch (its tiles do not fit the SMs): the
    per-layer backward from the top, with the same gradients."""
    case = STACKS[name]
    break_fused_backward(monkeypatch, fallback, stack_module, "lstm_bwd_stack_gate_grads")
    check_against_nn(case, STACK_DTYPE)
    assert launches["stack"] + launches["stack_projected"] == 1 and launches["stack_bwd"] == 0


@pytest.mark.parametrize("name", ["L3-state", "L3-proj-packed-state"])
def test_forward_layer_by_layer_where_the_stacked_launch_is_refused(name, launches, monkeypatch):
    """A stacked launch the driver refuses (nothing ran): the layers one by one on the single-layer
    kernels, with the same results (the stacked backward still runs)."""
    def refused(*args, **kwargs):
        raise RuntimeError("too many blocks in cooperative launch")

    monkeypatch.setattr(stack_module, "lstm_fwd_stack", refused)
    monkeypatch.setattr(stack_module, "lstmp_fwd_stack", refused)
    case = STACKS[name]
    check_against_nn(case, STACK_DTYPE)
    assert launches["layer"] == case.num_layers and launches["stack_bwd"] == 1


@pytest.mark.parametrize("proj_size", [0, 2], ids=["plain", "proj"])
def test_inference_forward_keeps_no_per_step_state(proj_size, launches):
    torch.manual_seed(0)
    T, B, I, H, L = 6, 3, 4, 5, 3
    P = proj_size or H
    model = triton_lstm.LSTM(I, H, num_layers=L, proj_size=proj_size, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    x = torch.randn(T, B, I, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    weights = [model._layer_weights(layer, 0) for layer in range(L)]
    h0 = torch.zeros(L, B, P, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    c0 = torch.zeros(L, B, H, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    w_ih, w_hh, b_ih, b_hh = ([w[i] for w in weights] for i in range(4))
    w_hr = [w[4] for w in weights] if proj_size else []
    with torch.no_grad():
        h_all, c_all, gates = torch.ops.triton_lstm.stack_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, None, 0)
        trained = torch.ops.triton_lstm.stack_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, None, 1)
        out, (h_n, c_n) = model(x)
    assert c_all.shape == (L, 1, B, H) and gates.shape == (L, 0, B, 4 * H) and h_all.shape == (L, T + 1, B, P)
    assert torch.equal(h_all, trained[0]) and torch.equal(c_all[:, 0], trained[1][:, -1])
    # The module returns c_n in the input dtype (the kernels keep c in fp32).
    assert torch.equal(out, trained[0][-1, 1:]) and torch.equal(c_n, trained[1][:, -1].to(STACK_DTYPE))
    # Three forwards, each one stacked launch (with projections the launch in m_t), none layer by layer.
    assert launches == {"stack": 3 * int(not proj_size), "stack_projected": 3 * int(bool(proj_size)), "layer": 0,
                        "stack_bwd": 0}


def test_stays_layer_by_layer_where_the_kernel_does_not_apply():
    x = torch.randn(4, 2, 3, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    kwargs = dict(input_size=3, hidden_size=5, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    assert triton_lstm.LSTM(num_layers=2, **kwargs)._runs_as_stack(x)
    assert not triton_lstm.LSTM(num_layers=1, **kwargs)._runs_as_stack(x)
    assert not triton_lstm.LSTM(num_layers=2, bidirectional=True, **kwargs)._runs_as_stack(x)
    assert triton_lstm.LSTM(num_layers=2, proj_size=2, **kwargs)._runs_as_stack(x)
    assert triton_lstm.LSTM(num_layers=2, proj_size=2, dropout=0.5, **kwargs).eval()._runs_as_stack(x)
    # Dropout masks h = m·W_hrᵀ, which the projected stack never forms: layer by layer in training.
    assert not triton_lstm.LSTM(num_layers=2, proj_size=2, dropout=0.5, **kwargs).train()._runs_as_stack(x)
    assert not triton_lstm.LSTM(num_layers=2, recompute_interval=2, **kwargs)._runs_as_stack(x)
    assert triton_lstm.LSTM(num_layers=2, dropout=0.5, **kwargs).train()._runs_as_stack(x), "dropout: in the kernels"
    kwargs.pop("dtype")
    assert not triton_lstm.LSTM(num_layers=2, dtype=torch.float64, **kwargs)._runs_as_stack(x.double())


def _chained_nn(cell, model, x, lengths, h0, c0, masks, scale, dtype):
    """The oracle of a stack with dropout between layers: ``model``'s layers as one-layer nn.LSTM / nn.GRU
    modules in ``dtype``, one after another, each layer's output (but the top one's) masked by ``masks[l]``
    and scaled by ``scale`` before the next reads it. Returns (padded output, h_n, c_n or None, the modules)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    layers, layer_input, h_n, c_n, modules = model.num_layers, x, [], [], []
    for layer in range(layers):
        module = getattr(torch.nn, cell)(layer_input.shape[-1], model.hidden_size, bias=model.bias, dtype=dtype)
        with torch.no_grad():
            for name, _ in module.named_parameters():
                getattr(module, name).copy_(getattr(model, name.replace("_l0", f"_l{layer}")))
        modules.append(module)
        state = h0[layer:layer + 1] if cell == "GRU" else (h0[layer:layer + 1], c0[layer:layer + 1])
        if lengths is None:
            out, hidden = module(layer_input, state)
        else:
            packed, hidden = module(pack_padded_sequence(layer_input, lengths, enforce_sorted=False), state)
            out = pad_packed_sequence(packed, total_length=x.shape[0])[0]
        h_n.append(hidden if cell == "GRU" else hidden[0])
        if cell == "LSTM":
            c_n.append(hidden[1])
        layer_input = torch.where(masks[layer].bool(), out * scale, torch.zeros((), dtype=dtype)) if layer < layers - 1 else out
    return layer_input, torch.cat(h_n), torch.cat(c_n) if c_n else None, modules


DROPOUT_CASES = {
    # name: (cell, layers, packed, (T, B, I, H))
    "LSTM-L3": ("LSTM", 3, False, (6, 4, 5, 7)),
    "LSTM-L2-packed": ("LSTM", 2, True, (6, 4, 5, 7)),
    "GRU-L3-packed": ("GRU", 3, True, (6, 4, 5, 7)),
    "GRU-L2": ("GRU", 2, False, (6, 4, 5, 7)),
    # On a GPU: the planned tiles, many programs per layer, real barriers (skipped under the interpreter).
    "gpu-LSTM-L4-H512": ("LSTM", 4, False, (48, 64, 512, 512)),
    "gpu-GRU-L2-H256-packed": ("GRU", 2, True, (40, 24, 128, 256)),
}


DROPOUT_PATHS = {
    # path: (stacked forward launches, stacked backward launches)
    "stacked": (1, 1),
    "forward-layer-by-layer": (0, 1),  # the stacked launch refused (did not fit): the op runs the layers one by one
    "backward-layer-by-layer": (1, 1),  # the stacked backward, asked, cannot launch: the one-layer ones from the top
    "reference-backward": (1, 0),
}


@pytest.mark.parametrize("path", DROPOUT_PATHS)
@pytest.mark.parametrize("name", DROPOUT_CASES, ids=str)
def test_dropout_between_layers_in_the_stacked_launches_matches_nn(name, path, monkeypatch):
    """Dropout between layers in training runs in the stacked launches (one forward, one backward) and, with
    the same masks, on each path they fall back to: the masks recorded give nn's layers chained by hand in
    float64 — every output and every gradient, x, h0, c0 and each layer's weights — within PyTorch's own
    error in the same dtype."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    from helpers import assert_error_within_pytorch

    from triton_lstm import gru_stack

    cell, layers, packed, (T, B, I, H) = DROPOUT_CASES[name]
    if name.startswith("gpu-") and KERNEL_DEVICE != "cuda":
        pytest.skip("a GPU's plans")
    if path != "stacked" and name not in ("LSTM-L3", "GRU-L3-packed"):
        pytest.skip("the fallbacks on one case per cell (keeps the interpreter run short)")
    ops = gru_stack if cell == "GRU" else stack_module
    drawn = []
    real_masks = stack_module.dropout_masks

    def recorded(*args):
        drawn.append(real_masks(*args))
        return drawn[-1]

    monkeypatch.setattr(ops, "dropout_masks", recorded)
    if path == "forward-layer-by-layer":
        monkeypatch.setattr(ops, "unless_refused", lambda launch: None)
    elif path == "backward-layer-by-layer":
        monkeypatch.setattr(ops, "lstm_bwd_stack_gate_grads", lambda *args, **kwargs: None)
    launches = count_calls(monkeypatch, ops, {"stack": "lstm_fwd_stack", "stack_bwd": "lstm_bwd_stack_gate_grads"})
    torch.manual_seed(0)
    dtype = STACK_DTYPE
    model = getattr(triton_lstm, cell)(I, H, num_layers=layers, dropout=0.4, device=KERNEL_DEVICE, dtype=dtype,
                                       backward="reference" if path == "reference-backward" else "fused").train()
    x = torch.randn(T, B, I, device=KERNEL_DEVICE, dtype=dtype, requires_grad=True)
    h0 = torch.randn(layers, B, H, device=KERNEL_DEVICE, dtype=dtype, requires_grad=True)
    c0 = torch.randn(layers, B, H, device=KERNEL_DEVICE, dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,)).index_fill_(0, torch.tensor([1]), T) if packed else None  # one of length T
    state = h0 if cell == "GRU" else (h0, c0)
    if packed:
        out, hidden = model(pack_padded_sequence(x, lengths, enforce_sorted=False), state)
        out = pad_packed_sequence(out, total_length=T)[0]
    else:
        out, hidden = model(x, state)
    h_n, c_n = (hidden, None) if cell == "GRU" else hidden
    grad_out, grad_h, grad_c = torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(h_n)
    torch.autograd.backward([out, h_n] + ([c_n] if c_n is not None else []), [grad_out, grad_h] + ([grad_c] if c_n is not None else []))
    assert (launches["stack"], launches["stack_bwd"]) == DROPOUT_PATHS[path], launches
    assert len(drawn) == 1
    masks, scale = drawn[0]
    assert masks.shape == (layers - 1, T, B, H) and scale == pytest.approx(1 / 0.6)
    if packed:  # the module runs a packed batch sorted by length: the masks' batch axis is in that order
        masks = masks[:, :, torch.argsort(torch.sort(lengths, descending=True)[1]).to(masks.device)]

    results = {}
    for run_dtype in (torch.float64, dtype):  # the oracle, and PyTorch's own in our dtype
        leaves = [t.detach().cpu().to(run_dtype).requires_grad_() for t in (x, h0, c0)]
        theirs = _chained_nn(cell, model, leaves[0], lengths, leaves[1], leaves[2], masks.cpu(), scale, run_dtype)
        outputs = [theirs[0], theirs[1]] + ([theirs[2]] if cell == "LSTM" else [])
        grads = [grad_out, grad_h] + ([grad_c] if cell == "LSTM" else [])
        torch.autograd.backward(outputs, [g.cpu().to(run_dtype) for g in grads])
        weight_grads = {name.replace("_l0", f"_l{layer}"): p.grad for layer, module in enumerate(theirs[3])
                        for name, p in module.named_parameters()}
        results[run_dtype] = (outputs, [t.grad for t in leaves[:3 if cell == "LSTM" else 2]], weight_grads)
    ours = ([out, h_n] + ([c_n] if cell == "LSTM" else []), [x.grad, h0.grad, c0.grad][:3 if cell == "LSTM" else 2],
            {name: p.grad for name, p in model.named_parameters()})
    reference, torchs = results[torch.float64], results[dtype]
    for index, (a, b, c) in enumerate(zip(ours[0], torchs[0], reference[0])):
        assert_error_within_pytorch(f"output {index}", a.detach().double().cpu(), b.detach().double(), c.detach(), dtype)
    for index, (a, b, c) in enumerate(zip(ours[1], torchs[1], reference[1])):
        assert_error_within_pytorch(f"grad of input {index}", a.double().cpu(), b.double(), c, dtype)
    for weight_name, expected in reference[2].items():
        assert_error_within_pytorch(f"grad {weight_name}", ours[2][weight_name].double().cpu(),
                                    torchs[2][weight_name].double(), expected, dtype, summed_terms=T * B)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_double_backward_through_the_stack_with_dropout(cell, monkeypatch):
    """A second derivative (create_graph=True, then the backward of the gradient's norm) through a stack
    with dropout between layers: the reference backward differentiates the layers with the forward's masks,
    against nn's layers chained by hand with the same masks in float64, within PyTorch's own error in the
    stack's dtype (on a GPU 16-bit: fp32 stacks run layer by layer there, without the stacked launches)."""
    from helpers import assert_error_within_pytorch

    from triton_lstm import gru_stack

    ops = gru_stack if cell == "GRU" else stack_module
    drawn, real_masks = [], stack_module.dropout_masks
    monkeypatch.setattr(ops, "dropout_masks", lambda *args: drawn.append(real_masks(*args)) or drawn[-1])
    torch.manual_seed(0)
    dtype = STACK_DTYPE
    model = getattr(triton_lstm, cell)(3, 4, num_layers=3, dropout=0.5, device=KERNEL_DEVICE, dtype=dtype).train()
    x = torch.randn(4, 2, 3, device=KERNEL_DEVICE, dtype=dtype, requires_grad=True)
    out, _ = model(x)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    grad.pow(2).sum().backward()
    [(masks, scale)] = drawn
    second = {}
    for run_dtype in (torch.float64, dtype):  # the oracle, and PyTorch's own in our dtype
        x_run = x.detach().cpu().to(run_dtype).requires_grad_()
        h0 = torch.zeros(3, 2, 4, dtype=run_dtype)
        out_run = _chained_nn(cell, model, x_run, None, h0, h0, masks.cpu(), scale, run_dtype)[0]
        (grad_run,) = torch.autograd.grad(out_run.pow(2).sum(), x_run, create_graph=True)
        grad_run.pow(2).sum().backward()
        second[run_dtype] = x_run.grad
    # Relative to the second derivative's largest element (~1e-5 for the LSTM here, far under the bound's
    # floor of two units at scale 1, which would pass a zero result).
    scale = second[torch.float64].abs().max()
    assert_error_within_pytorch("second derivative", x.grad.double().cpu() / scale, second[dtype].double() / scale,
                                second[torch.float64] / scale, dtype)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_dropout_between_layers_masks_and_reproduces(cell):
    """The stacked launches' dropout draws its masks from torch's generator (``stack.dropout_masks``): the
    same seed gives the same run, another seed another; about p of the units dropped and the rest scaled by
    1 / (1 - p); eval mode drops nothing; p = 1 gives the layers above zeros, as F.dropout does."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 4, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    mask, scale = stack_module.dropout_masks(x, 3, 64, 0.3)
    assert mask.shape == (2, 8, 16, 64) and mask.dtype == torch.uint8 and scale == pytest.approx(1 / 0.7)
    assert abs(mask.float().mean().item() - 0.7) < 0.03
    h = torch.randn(8, 16, 64, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    dropped = stack_module.dropped_input(h, (mask, scale), 1)
    kept = mask[1].bool()
    assert torch.equal(dropped[~kept], torch.zeros_like(dropped[~kept]))
    torch.testing.assert_close(dropped[kept], h[kept] / 0.7)
    assert stack_module.dropout_masks(x, 3, 64, 0.0) is None
    assert stack_module.dropout_masks(x, 3, 64, 1.0)[1] == 0.0 and not stack_module.dropout_masks(x, 3, 64, 1.0)[0].any()

    x = x[:5, :3]  # the module runs: a smaller model keeps the interpreter quick
    model = getattr(triton_lstm, cell)(4, 8, num_layers=3, dropout=0.3, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outputs.append(model(x)[0])
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0]), "eval mode: no dropout"
    torch.manual_seed(5)
    all_dropped = getattr(triton_lstm, cell)(4, 8, num_layers=2, dropout=1.0, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    with torch.no_grad():
        top = all_dropped(x)[0]
        for name, parameter in all_dropped.named_parameters():
            if name.startswith("weight_ih_l1"):
                parameter.zero_()  # x's side of the top layer sees only zeros anyway with p = 1
        assert torch.equal(top, all_dropped(x)[0])


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
    assert not plan_stack_fwd(512, 64, 512, 2, 2, sms, shared, dropout=True, projection=True).persistent, (
        "dropout masks the projected h, which the stack in m_t never forms: layer by layer")
    assert not plan_stack_fwd(5, 3, 7, 2, 4, 1, 96 * 1024, interpret=True, dropout=True, projection=True).persistent
    interpreted = plan_stack_fwd(5, 3, 7, 3, 4, 1, 96 * 1024, interpret=True)
    assert interpreted.persistent and interpreted.num_programs == 1
    # Dropout between layers: 32-wide chunks where 64-wide ones spilled under Triton 3.6 (compile_check.py
    # --kernel stack --dropout), the planned 64 at the 4-layer anchor.
    assert plan_stack_fwd(512, 64, 512, 4, 2, sms, shared, dropout=True) == plan_stack_fwd(512, 64, 512, 4, 2, sms, shared)
    assert plan_stack_fwd(512, 64, 512, 4, 2, sms, shared).block_k == 64
    assert plan_stack_fwd(512, 64, 512, 2, 2, sms, shared, dropout=True).block_k == 32
    narrow = plan_stack_fwd(512, 16, 1024, 4, 2, sms, shared, dropout=True)
    assert (narrow.block_b, narrow.block_k, narrow.num_warps) == (16, 32, 4), narrow
    # Projections (the layers' step-0 term): the plain plan, except 32-wide chunks where one 64-wide chunk held
    # all of K on 16-row tiles (compile_check.py --kernel stack --projection: 40 bytes spilled under Triton 3.6).
    for B, H in ((16, 1024), (64, 512), (64, 64)):
        assert plan_stack_fwd(512, B, H, 4, 2, sms, shared, projection=True) == plan_stack_fwd(512, B, H, 4, 2, sms, shared)
    small = plan_stack_fwd(512, 16, 64, 3, 2, sms, shared, projection=True)
    assert (small.block_b, small.block_k, small.num_warps) == (16, 32, 8), small
    assert plan_stack_fwd(512, 16, 64, 3, 2, sms, shared).block_k == 64


@pytest.mark.parametrize("proj_size", [0, 2], ids=["plain", "proj"])
def test_double_backward_through_the_stack(proj_size):
    """A second derivative (create_graph=True, then the backward of the gradient's norm) through a stack
    that runs as one launch, in the stack's dtype (on a GPU 16-bit: fp32 stacks run layer by layer there),
    against nn.LSTM in float64 within PyTorch's own error in that dtype (on the CPU: cuDNN has no double
    backward), relative to the second derivative's largest element (~1e-5 here, far under the error
    bound's floor of two units at scale 1)."""
    from helpers import assert_error_within_pytorch

    torch.manual_seed(0)
    dtype = STACK_DTYPE
    model = triton_lstm.LSTM(3, 4, num_layers=2, proj_size=proj_size, device=KERNEL_DEVICE, dtype=dtype)
    x = torch.randn(4, 2, 3, device=KERNEL_DEVICE, dtype=dtype)
    assert stack_module.stack_plan(x, 4, 2, projection=proj_size > 0) is not None, "not the stacked launch"
    second = {}
    for run_dtype in ("ours", torch.float64, dtype):  # ours, the oracle, and PyTorch's own in our dtype
        module, x_run = model, x.clone().requires_grad_()
        if run_dtype != "ours":
            module = torch.nn.LSTM(3, 4, num_layers=2, proj_size=proj_size, dtype=run_dtype)
            module.load_state_dict(model.state_dict())
            x_run = x.cpu().to(run_dtype).requires_grad_()
        out, _ = module(x_run)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), x_run, create_graph=True)
        grad.pow(2).sum().backward()
        second[run_dtype] = x_run.grad.double().cpu()
    scale = second[torch.float64].abs().max()
    assert_error_within_pytorch("second derivative", second["ours"] / scale, second[dtype] / scale,
                                second[torch.float64] / scale, dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [Case(T=128, B=16, I=256, H=512, num_layers=4),
                                  Case(T=96, B=17, I=64, H=1024, num_layers=2, packed=True, with_state=True),
                                  Case(T=96, B=17, I=64, H=1024, num_layers=3, proj_size=256, packed=True,
                                       with_state=True)],
                         ids=["T128-B16-H512-L4", "T96-B17-H1024-L2-packed", "T96-B17-H1024-P256-L3-packed"])
def test_gpu_stack_matches_nn_lstm(case, dtype, launches):
    check_against_nn(case, dtype, oracle_device="cuda")
    assert launches == one_launch_each_way(case)


