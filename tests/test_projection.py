"""An LSTM with projections (proj_size > 0) on the plain LSTM's kernels (triton_lstm/kernels/lstm_projection.py):
the recurrence in m_t = o_t ⊙ tanh(c_t) with the merged weight W_hh·W_hr, the projections as GEMMs.

One layer and direction at the op level, every output and gradient against autograd through the
reference in float64, within twice PyTorch's own error in the same dtype (the reference run in that
dtype); sequences of length 0, 1 and T; the kernels that run (one persistent launch each way, never the
per-step forward or the reference backward). The modules' projection cases against nn.LSTM are in
test_modules.py; large ones on a GPU in test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from helpers import HAS_CUDA, KERNEL_DEVICE, KERNEL_DTYPES, assert_error_within_pytorch, count_calls
from triton_lstm import ops
from triton_lstm.kernels import lstm_fwd_persistent as persistent
from triton_lstm.kernels import lstm_projection
from triton_lstm.ops import lstm_layer
from triton_lstm.reference import lstm_recurrence_reference

NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")

# (T, B, I, H, P): B = 1, 3, 17; H = 2, 17, 33 with P from 1 to H − 1.
SHAPES = [(1, 1, 3, 2, 1), (7, 3, 5, 17, 4), (6, 17, 4, 33, 16), (5, 4, 3, 8, 7)]


def _case(T, B, I, H, P, lengths_kind: str, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    inputs = dict(x=rand(T, B, I), h0=rand(B, P, scale=0.5), c0=rand(B, H, scale=0.5), w_ih=rand(4 * H, I, scale=0.4),
                  w_hh=rand(4 * H, P, scale=0.4), b_ih=rand(4 * H, scale=0.2), b_hh=rand(4 * H, scale=0.2),
                  w_hr=rand(P, H, scale=0.4))
    lengths = None
    if lengths_kind == "ragged":
        # Every kind of row: one that never runs (length 0: h0 carried to the end), one that runs one step,
        # one that runs all T, the rest at random.
        lengths = torch.randint(0, T + 1, (B,), generator=generator)
        lengths[: min(B, 3)] = torch.tensor([T, 0, 1])[: min(B, 3)]
    grads = dict(out=rand(T, B, P), h_n=rand(B, P), c_n=rand(B, H))
    return inputs, lengths, grads


def _run(run, inputs, lengths, grads, dtype, device):
    """``run`` (lstm_layer or the reference) on copies of the inputs in ``dtype`` on ``device``: the outputs
    and every input's gradient, in float64 on the CPU."""
    leaves = {name: value.to(device=device, dtype=dtype, copy=True).requires_grad_() for name, value in inputs.items()}
    out, h_n, c_n = run(*leaves.values(), None if lengths is None else lengths.to(device))
    torch.autograd.backward((out, h_n, c_n), tuple(grads[name].to(device=device, dtype=dtype)
                                                   for name in ("out", "h_n", "c_n")))
    result = dict(out=out, h_n=h_n, c_n=c_n, **{f"grad_{name}": leaf.grad for name, leaf in leaves.items()})
    return {name: value.detach().double().cpu() for name, value in result.items()}


def _reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths):
    h_all, c_all, _ = lstm_recurrence_reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    return h_all[1:], h_all[-1], c_all[-1].to(x.dtype)


@pytest.fixture
def launches(monkeypatch):
    """Counts the forward's persistent launches and per-step fallback, and the backward's fused chain and
    reference."""
    counted = [count_calls(monkeypatch, persistent, {"persistent": "launch_persistent", "per_step": "lstm_fwd"}),
               count_calls(monkeypatch, lstm_projection, {"chain": "lstm_bwd_gate_grads"}),
               count_calls(monkeypatch, ops, {"reference_bwd": "lstm_recurrence_backward_reference"})]
    return lambda: {label: count for counts in counted for label, count in counts.items()}


@pytest.mark.parametrize("lengths_kind", ["full", "ragged"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-I{}-H{}-P{}".format(*s))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_matches_float64_reference(shape, dtype, lengths_kind, launches):
    T, B, I, H, P = shape
    inputs, lengths, grads = _case(*shape, lengths_kind)
    ours = _run(lstm_layer, inputs, lengths, grads, dtype, KERNEL_DEVICE)
    # One persistent launch (on a GPU a single step runs the per-step kernel: no barrier to amortize).
    one_step = HAS_CUDA and T == 1
    assert launches() == dict(persistent=int(not one_step), per_step=int(one_step), chain=1, reference_bwd=0), launches()
    oracle = _run(_reference, inputs, lengths, grads, torch.float64, "cpu")
    torchs = _run(_reference, inputs, lengths, grads, dtype, "cpu")
    for name, reference in oracle.items():
        summed = T * B if name in ("grad_w_ih", "grad_w_hh", "grad_w_hr", "grad_b_ih", "grad_b_hh") else 1
        assert_error_within_pytorch(f"{name} ({lengths_kind})", ours[name], torchs[name], reference, dtype, summed)


def test_inference_forward_matches_training_forward():
    """No gradient wanted: the inference forward (no per-step gates or c kept) gives the same outputs."""
    inputs, lengths, _ = _case(6, 5, 3, 8, 3, "ragged", seed=1)
    args = [value.to(device=KERNEL_DEVICE, dtype=torch.float32) for value in inputs.values()]
    with torch.no_grad():
        inference = lstm_layer(*args, lengths.to(KERNEL_DEVICE))
    training = lstm_layer(*(arg.requires_grad_() for arg in args), lengths.to(KERNEL_DEVICE))
    for ours, theirs in zip(inference, training):
        torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=0)


def test_reference_backward_option_still_runs_the_reference(launches):
    """backward="reference" with a projection: the plain-PyTorch backward, with the same gradients."""
    inputs, lengths, grads = _case(5, 4, 3, 8, 7, "ragged", seed=2)
    fused = _run(lstm_layer, inputs, lengths, grads, torch.float32, KERNEL_DEVICE)
    reference = _run(lambda *args: lstm_layer(*args, backward="reference"), inputs, lengths, grads, torch.float32,
                     KERNEL_DEVICE)
    assert launches()["chain"] == 1 and launches()["reference_bwd"] == 1
    for name in fused:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-5, atol=1e-5, msg=name)
