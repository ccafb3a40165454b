"""The reference itself, and the dispatch between it and the kernels.

The reference backward (hand-written BPTT) is checked against autograd through the reference forward in
float64, with projections and per-sequence lengths; the reference forward against nn.LSTM."""

from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA
from torch import nn

import triton_lstm.ops as ops
from triton_lstm.reference import lstm_recurrence_backward_reference, lstm_recurrence_reference


def _inputs(T, B, I, H, P, with_lengths, seed=0):  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    K = P or H

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    tensors = dict(
        x=rand(T, B, I),
        h0=rand(B, K),
        c0=rand(B, H),
        w_ih=rand(4 * H, I, scale=0.5),
        w_hh=rand(4 * H, K, scale=0.5),
        b_ih=rand(4 * H),
        b_hh=rand(4 * H),
        w_hr=rand(P, H, scale=0.5) if P else None,
    )
    lengths = None
    if with_lengths:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
    return tensors, lengths, g


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("P", [0, 3], ids=["no_proj", "proj3"])
def test_reference_backward_matches_autograd(P, with_lengths):
    T, B, I, H = 6, 4, 3, 5
    tensors, lengths, g = _inputs(T, B, I, H, P, with_lengths)
    h_all, c_all, gates = lstm_recurrence_reference(**tensors, lengths=lengths)
    grad_out = torch.randn(h_all[1:].shape, generator=g, dtype=torch.float64)
    grad_h_n = torch.randn(h_all[-1].shape, generator=g, dtype=torch.float64)
    grad_c_n = torch.randn(c_all[-1].shape, generator=g, dtype=torch.float64)
    names = [n for n, t in tensors.items() if t is not None]
    expected = torch.autograd.grad(
        (h_all[1:], h_all[-1], c_all[-1]), [tensors[n] for n in names], (grad_out, grad_h_n, grad_c_n)
    )
    grads = lstm_recurrence_backward_reference(
        grad_out, grad_h_n, grad_c_n, tensors["x"], tensors["w_ih"], tensors["w_hh"], tensors["w_hr"],
        gates.detach(), h_all.detach(), c_all.detach(), lengths,
    )
    ours = dict(zip(["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "w_hr"], grads))
    ours["b_hh"] = ours["b_ih"]
    for name, grad in zip(names, expected):
        torch.testing.assert_close(ours[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_reference_lengths_carry_state_past_the_end():
    tensors, lengths, _ = _inputs(5, 3, 2, 4, 0, with_lengths=False)
    lengths = torch.tensor([5, 2, 1])
    h_all, c_all, gates = lstm_recurrence_reference(**tensors, lengths=lengths)
    short = {k: (v[:2, 1:2] if k == "x" else v[1:2] if k in ("h0", "c0") else v) for k, v in tensors.items()}
    h_short, c_short, _ = lstm_recurrence_reference(**short)
    torch.testing.assert_close(h_all[-1, 1], h_short[-1, 0])
    torch.testing.assert_close(c_all[-1, 1], c_short[-1, 0])
    assert torch.equal(gates[2:, 1], torch.zeros_like(gates[2:, 1]))


def test_reference_forward_matches_nn_lstm():
    torch.manual_seed(0)
    module = nn.LSTM(3, 5, proj_size=2).double()
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    h0, c0 = torch.randn(1, 4, 2, dtype=torch.float64), torch.randn(1, 4, 5, dtype=torch.float64)
    output, (h_n, c_n) = module(x, (h0, c0))
    h_all, c_all, _ = lstm_recurrence_reference(
        x, h0[0], c0[0], module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0, module.weight_hr_l0
    )
    torch.testing.assert_close(h_all[1:], output)
    torch.testing.assert_close(h_all[-1], h_n[0])
    torch.testing.assert_close(c_all[-1], c_n[0])


def test_dispatch(monkeypatch):
    cpu32 = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.uses_kernels(cpu32) == ops.HAS_TRITON
    assert not ops.uses_kernels(cpu32.double()), "float64 always runs the reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not ops.uses_kernels(cpu32), "CPU tensors run the reference outside the interpreter"
    if HAS_CUDA:
        assert ops.uses_kernels(cpu32.cuda())


def test_cpu_path_runs_the_reference(monkeypatch):
    """Outside the interpreter a CPU forward never launches a kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []
    monkeypatch.setattr(ops, "lstm_recurrence_reference", lambda *a: calls.append(1) or lstm_recurrence_reference(*a))
    torch.ops.triton_lstm.recurrence_fwd(
        torch.randn(2, 1, 3), torch.zeros(1, 4), torch.zeros(1, 4), torch.randn(16, 3), torch.randn(16, 4),
        None, None, None, None,
    )
    assert calls == [1]


def test_fp32_dots_follow_pytorch_tf32_flag():
    from triton_lstm.kernels.common import dot_precision

    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.bfloat16) == "ieee", "the flag only concerns fp32 inputs"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("which", ["b_ih", "b_hh"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("function", ["layer", "reference"])
def test_one_bias_given_counts_like_a_zero_partner(function, cell, which):
    """The public functions take b_ih and b_hh separately: one given alone counts in full (as if its
    partner were zeros), in the output and its gradient, instead of being dropped or failing."""
    import triton_lstm

    torch.manual_seed(0)
    gates = 4 if cell == "lstm" else 3
    T, B, I, H = 3, 2, 4, 5
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(B, H, dtype=torch.float64)
    w_ih, w_hh = torch.randn(gates * H, I, dtype=torch.float64), torch.randn(gates * H, H, dtype=torch.float64)
    bias = torch.randn(gates * H, dtype=torch.float64, requires_grad=True)
    state = (h0, torch.randn(B, H, dtype=torch.float64)) if cell == "lstm" else (h0,)
    run = {("layer", "lstm"): triton_lstm.lstm_layer, ("layer", "gru"): triton_lstm.gru_layer,
           ("reference", "lstm"): triton_lstm.lstm_recurrence_reference,
           ("reference", "gru"): triton_lstm.gru_recurrence_reference}[function, cell]

    def output(b_ih, b_hh):
        result = run(x, *state, w_ih, w_hh, b_ih, b_hh)
        return result[0]

    zeros = torch.zeros_like(bias)
    alone = output(bias, None) if which == "b_ih" else output(None, bias)
    paired = output(bias, zeros) if which == "b_ih" else output(zeros, bias)
    torch.testing.assert_close(alone, paired)
    assert not torch.equal(alone, output(None, None)), "the bias given alone was dropped"
    grad = torch.randn_like(alone)
    torch.testing.assert_close(torch.autograd.grad(alone, bias, grad)[0], torch.autograd.grad(paired, bias, grad)[0])
