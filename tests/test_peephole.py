"""The peephole LSTM (``triton_lstm.LSTM(..., peephole=True)``, ``LSTMCell(..., peephole=True)``).

No PyTorch module has peepholes, so the oracle is ``PeepholeOracle`` below: the equations written out
step by step, one sequence at a time, with plain tensor operations (independent of triton_lstm's
reference and kernels). It runs in float64 for the expected values and in the tested dtype on the CPU
for "PyTorch's own error" in that dtype; our module runs in that dtype on the kernel device (the GPU, or
the CPU through Triton's interpreter), outputs and every gradient, the peephole weights' included.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DEVICE, KERNEL_DTYPES, STACK_DTYPE, assert_error_within_pytorch, count_calls
from test_modules import Case, _make_inputs, _run
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import triton_lstm
from triton_lstm import ops


class PeepholeOracle(nn.Module):
    """A peephole LSTM as the equations say: i = σ(W_ii x + b_ii + W_hi h + b_hi + w_ci ⊙ c_{t-1}),
    f likewise with w_cf, g = tanh(…), c_t = f ⊙ c_{t-1} + i ⊙ g, o = σ(… + w_co ⊙ c_t), h = o ⊙ tanh(c_t).
    Holds copies of ``like``'s parameters under the same names."""

    def __init__(self, like: nn.Module):
        super().__init__()
        for name, parameter in like.named_parameters():
            self.register_parameter(name, nn.Parameter(parameter.detach().clone()))
        self.layers, self.H = like.num_layers, like.hidden_size
        self.directions = 2 if like.bidirectional else 1
        self.batch_first, self.has_bias = like.batch_first, like.bias

    def _sequence(self, x, h, c, layer: int, direction: int):
        """One sequence (T, I) through one layer and direction: (T, H) and the final (h, c)."""
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        w_ih, w_hh = getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix)
        w_ci, w_cf, w_co = getattr(self, "weight_ch" + suffix).chunk(3)
        steps = x.flip(0) if direction else x
        hs = []
        for x_t in steps:
            pre = w_ih @ x_t + w_hh @ h
            if self.has_bias:
                pre = pre + getattr(self, "bias_ih" + suffix) + getattr(self, "bias_hh" + suffix)
            i, f, g, o = pre.chunk(4)
            i, f, g = torch.sigmoid(i + w_ci * c), torch.sigmoid(f + w_cf * c), torch.tanh(g)
            c = f * c + i * g
            h = torch.sigmoid(o + w_co * c) * torch.tanh(c)
            hs.append(h)
        out = torch.stack(hs)
        return (out.flip(0) if direction else out), h, c

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        unbatched = not packed and input.dim() == 2
        if packed:
            x, lengths = pad_packed_sequence(input)
        else:
            x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
            lengths = torch.full((x.shape[1],), x.shape[0])
        T, B = x.shape[0], x.shape[1]
        if hx is None:
            h0 = c0 = x.new_zeros(self.layers * self.directions, B, self.H)
        else:
            h0, c0 = (s.unsqueeze(1) for s in hx) if unbatched else hx
        h_n, c_n, layer_input = [], [], x
        for layer in range(self.layers):
            outputs = []
            for direction in range(self.directions):
                index = layer * self.directions + direction
                rows = []
                for b in range(B):
                    n = int(lengths[b])
                    out, h, c = self._sequence(layer_input[:n, b], h0[index, b], c0[index, b], layer, direction)
                    rows.append(torch.cat([out, out.new_zeros(T - n, self.H)]))
                    h_n.append(h)
                    c_n.append(c)
                outputs.append(torch.stack(rows, dim=1))
            layer_input = torch.cat(outputs, dim=2)
        shape = (self.layers * self.directions, B, self.H)
        h_n, c_n = torch.stack(h_n).reshape(shape), torch.stack(c_n).reshape(shape)
        if packed:
            output = pack_padded_sequence(layer_input, lengths, enforce_sorted=False)
            return output, (h_n, c_n)
        if unbatched:
            return layer_input.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (layer_input.transpose(0, 1) if self.batch_first else layer_input), (h_n, c_n)


CASES = {
    "single": Case(),
    "packed": Case(packed=True, B=4, T=6),
    "bidir-state": Case(bidirectional=True, with_state=True),
    "layers2-no-bias-batch-first": Case(num_layers=2, bias=False, batch_first=True, with_state=True),
    "packed-bidir-layers2": Case(packed=True, bidirectional=True, num_layers=2, with_state=True, B=5, T=6),
    "unbatched": Case(unbatched=True, with_state=True),
    "B17-H33-T7": Case(B=17, H=33, T=7, I=9),
}


def _check_against_oracle(case: Case, dtype: torch.dtype, seed: int = 0, **options):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ours_module = triton_lstm.LSTM(**case.module_kwargs(), peephole=True, **options)
    oracle = PeepholeOracle(ours_module)
    x, state = _make_inputs(case, generator)
    expected, _ = _run(oracle.double(), x, state, torch.float64, "cpu", grad_seed=seed + 1)
    theirs, _ = _run(PeepholeOracle(ours_module), x, state, dtype, "cpu", grad_seed=seed + 1)
    ours, _ = _run(ours_module, x, state, dtype, KERNEL_DEVICE, grad_seed=seed + 1)
    assert set(ours) == set(expected) and any(name.startswith("grad_weight_ch") for name in ours)
    for name in expected:
        terms = case.T * case.B if name.startswith(("grad_weight", "grad_bias")) else 1
        assert_error_within_pytorch(name, ours[name], theirs[name], expected[name], dtype, summed_terms=terms)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_peephole_lstm_matches_its_equations(case, dtype):
    _check_against_oracle(case, dtype)


@pytest.mark.parametrize("path", ["per-step", "reference-backward"])
def test_peephole_per_step_kernels_and_reference_backward(path, monkeypatch):
    """The per-step forward kernel with the per-step backward launches, and the plain-PyTorch backward."""
    options = {}
    if path == "per-step":
        monkeypatch.setenv("TRITON_LSTM_PERSISTENT", "0")
        monkeypatch.setenv("TRITON_LSTM_PERSISTENT_BWD", "0")
    else:
        options["backward"] = "reference"
    _check_against_oracle(CASES["packed-bidir-layers2"], torch.float32, **options)


@pytest.mark.parametrize("stack", ["1", "0"], ids=["stacked", "layer-by-layer"])
def test_zero_peepholes_give_the_plain_lstm_exactly(stack, monkeypatch):
    """With w_ch = 0 the peephole terms add exact zeros: the very numbers of the plain LSTM, through the
    same kernels (the stacked one, or one launch per layer)."""
    monkeypatch.setenv("TRITON_LSTM_STACK", stack)
    torch.manual_seed(0)
    plain = triton_lstm.LSTM(4, 6, num_layers=2, device=KERNEL_DEVICE)
    peephole = triton_lstm.LSTM(4, 6, num_layers=2, device=KERNEL_DEVICE, peephole=True)
    peephole.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for layer in range(2):
            getattr(peephole, f"weight_ch_l{layer}").zero_()
    x = torch.randn(5, 3, 4, device=KERNEL_DEVICE)
    out_plain, (h_plain, c_plain) = plain(x)
    out_peephole, (h_peephole, c_peephole) = peephole(x)
    if KERNEL_DEVICE == "cpu" and not ops.interpreting():
        # The CPU without the interpreter: ATen's LSTM against the plain-PyTorch recurrence.
        torch.testing.assert_close(out_peephole, out_plain)
        return
    assert torch.equal(out_peephole, out_plain) and torch.equal(h_peephole, h_plain) and torch.equal(c_peephole, c_plain)


def test_parameters_state_dict_and_initialization():
    torch.manual_seed(7)
    reference = nn.LSTM(3, 5, num_layers=2, bidirectional=True)
    torch.manual_seed(7)
    model = triton_lstm.LSTM(3, 5, num_layers=2, bidirectional=True, peephole=True)
    names = [name for name, _ in model.named_parameters()]
    extra = ["weight_ch_l0", "weight_ch_l0_reverse", "weight_ch_l1", "weight_ch_l1_reverse"]
    assert names == [name for name, _ in reference.named_parameters()] + extra
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), f"{name}: not nn.LSTM's draw for the same seed"
    bound = 5**-0.5
    for name in extra:
        weight = getattr(model, name)
        assert weight.shape == (15,) and weight.abs().max() <= bound and weight.std() > bound / 4
    again = triton_lstm.LSTM(3, 5, num_layers=2, bidirectional=True, peephole=True)
    again.load_state_dict(model.state_dict())
    with pytest.raises(RuntimeError, match="weight_ch_l0"):
        triton_lstm.LSTM(3, 5, num_layers=2, bidirectional=True).load_state_dict(model.state_dict())
    assert "peephole=True" in repr(model)
    plain = triton_lstm.LSTM(3, 5)
    assert not any("weight_ch" in name for name in plain.state_dict()), "without peepholes: nn.LSTM's state_dict"


def test_peephole_cell_matches_its_equations():
    torch.manual_seed(0)
    cell = triton_lstm.LSTMCell(4, 6, peephole=True)
    assert [name for name, _ in cell.named_parameters()] == ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ch"]
    layer = triton_lstm.LSTM(4, 6, peephole=True)
    layer.load_state_dict({name + "_l0": value for name, value in cell.state_dict().items()})
    oracle = PeepholeOracle(layer).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    h0, c0 = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    _, (h_expected, c_expected) = oracle(x.unsqueeze(0), (h0.unsqueeze(0), c0.unsqueeze(0)))
    cell = cell.to(KERNEL_DEVICE)
    h, c = cell(x.float().to(KERNEL_DEVICE), (h0.float().to(KERNEL_DEVICE), c0.float().to(KERNEL_DEVICE)))
    torch.testing.assert_close(h.double().cpu(), h_expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.double().cpu(), c_expected[0], rtol=1e-5, atol=1e-6)
    h.sum().backward()
    assert cell.weight_ch.grad is not None and cell.weight_ch.grad.abs().sum() > 0
    assert "peephole=True" in repr(cell)


def test_peephole_stacks_and_bidirectional_layers_run_the_whole_module_kernels(monkeypatch):
    """A peephole stack runs in one launch each way and a bidirectional layer both directions at once, as
    without peepholes (the kernels take each layer's or direction's w_ch)."""
    from triton_lstm import modules

    calls = count_calls(monkeypatch, modules, {"layer": "lstm_layer", "stack": "lstm_stack", "both": "lstm_bidirectional"})
    x = torch.randn(5, 2, 3, device=KERNEL_DEVICE, dtype=STACK_DTYPE)
    models = [triton_lstm.LSTM(3, 4, num_layers=2, bidirectional=True, peephole=True, device=KERNEL_DEVICE, dtype=STACK_DTYPE),
              triton_lstm.LSTM(3, 4, num_layers=3, peephole=True, device=KERNEL_DEVICE, dtype=STACK_DTYPE)]
    trained = [model(x) for model in models]
    kernels = KERNEL_DEVICE == "cuda" or ops.interpreting()
    assert calls == ({"layer": 0, "stack": 1, "both": 2} if kernels else {"layer": 7, "stack": 0, "both": 0})
    with torch.no_grad():  # the inference forward (no per-step state kept) gives the same numbers
        for model, (out, (h_n, c_n)) in zip(models, trained):
            inferred, (h_inferred, c_inferred) = model(x)
            assert torch.equal(inferred, out) and torch.equal(h_inferred, h_n) and torch.equal(c_inferred, c_n)


def test_stack_plan_with_peepholes_takes_narrower_chunks_for_16_row_tiles():
    from triton_lstm.kernels.forward_plans import plan_stack_fwd

    plain = plan_stack_fwd(512, 16, 1024, 2, 2, 132, 232448)
    peephole = plan_stack_fwd(512, 16, 1024, 2, 2, 132, 232448, peephole=True)
    assert (plain.block_b, plain.block_k, peephole.block_k) == (16, 64, 32), "64-wide chunks spilled with peepholes"
    assert plan_stack_fwd(512, 64, 512, 4, 2, 132, 232448, peephole=True) == plan_stack_fwd(512, 64, 512, 4, 2, 132, 232448)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("G, T, B, H", [(1, 7, 3, 5), (2, 5, 9, 40), (3, 2, 1, 17)])
def test_peephole_weight_grads_kernel_is_the_reference_contraction(G, T, B, H, dtype):
    """The one-pass reduction of dG and c (split rows, each split's sums added after) against
    ``reference.peephole_grad`` in float64, per layer or direction, on fresh random inputs."""
    from triton_lstm.kernels.weight_grads import peephole_weight_grads
    from triton_lstm.reference import peephole_grad

    generator = torch.Generator().manual_seed(G * 100 + H)
    grad_gates = torch.randn(G, T, B, 4 * H, generator=generator).to(dtype)
    c_all = torch.randn(G, T + 1, B, H, generator=generator)
    ours = peephole_weight_grads(grad_gates.to(KERNEL_DEVICE), c_all.to(KERNEL_DEVICE)).cpu()
    for g in range(G):
        expected = peephole_grad(grad_gates[g].double(), c_all[g].double())
        theirs = peephole_grad(grad_gates[g], c_all[g])  # PyTorch's fp32 contraction
        assert_error_within_pytorch(f"grad_w_ch[{g}]", ours[g], theirs, expected, torch.float32, summed_terms=T * B)


def test_double_backward_through_peepholes():
    """create_graph=True: the second derivative differentiates the plain-PyTorch recurrence, peepholes
    included (float64 gradgradcheck)."""
    torch.manual_seed(0)
    model = triton_lstm.LSTM(2, 3, peephole=True, dtype=torch.float64)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda inp, w_ch: torch.func.functional_call(model, {"weight_ch_l0": w_ch}, (inp,))[0],
                                 (x, model.weight_ch_l0.detach().clone().requires_grad_()))


@pytest.mark.parametrize("kwargs, message", [
    (dict(proj_size=2), "proj_size"),
    (dict(recompute_interval=4), "recompute_interval"),
    (dict(peephole="yes"), "peephole must be a bool"),
])
def test_peephole_refuses_what_it_does_not_support(kwargs, message):
    with pytest.raises(ValueError, match=message):
        triton_lstm.LSTM(3, 4, **{"peephole": True, **kwargs})
