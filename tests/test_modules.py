"""triton_lstm.LSTM / LSTMCell against torch.nn: every output and every gradient.

The oracle is nn.LSTM itself in float64 on the CPU. Our module runs in the tested dtype on the kernel
device (the GPU, or the CPU through Triton's interpreter); its error against the oracle must stay within
twice nn.LSTM's own error in that dtype on that device (helpers.assert_error_within_pytorch).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from helpers import KERNEL_DEVICE, KERNEL_DTYPES, assert_error_within_pytorch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import triton_lstm


@dataclass(frozen=True)
class Case:
    T: int = 5
    B: int = 3
    I: int = 4  # noqa: E741
    H: int = 6
    num_layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    proj_size: int = 0
    with_state: bool = False
    unbatched: bool = False
    packed: bool = False

    def module_kwargs(self):
        return dict(
            input_size=self.I,
            hidden_size=self.H,
            num_layers=self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            bidirectional=self.bidirectional,
            proj_size=self.proj_size,
        )


CASES = {
    "single": Case(),
    "layers2": Case(num_layers=2),
    "layers3-bidir": Case(num_layers=3, bidirectional=True),
    "bidir-state": Case(bidirectional=True, with_state=True),
    "batch_first": Case(batch_first=True, with_state=True),
    "no_bias": Case(bias=False, num_layers=2),
    "proj": Case(proj_size=3, with_state=True),
    "proj-bidir-layers2": Case(proj_size=2, bidirectional=True, num_layers=2),
    "unbatched": Case(unbatched=True, with_state=True, num_layers=2),
    "unbatched-batch_first": Case(unbatched=True, batch_first=True),
    "packed": Case(packed=True, B=4, T=6),
    "packed-bidir-state": Case(packed=True, bidirectional=True, with_state=True, B=5, T=6, num_layers=2),
    "packed-proj-bidir": Case(packed=True, bidirectional=True, proj_size=3, B=3),
    "B1-T1": Case(B=1, T=1),
    "B17-H33-T7": Case(B=17, H=33, T=7, I=9),
    "H1": Case(H=1, B=3, T=7),
    "H17-bidir": Case(H=17, bidirectional=True, B=3, T=7),
}

SIZES = {f"B{B}-H{H}-T{T}": Case(B=B, H=H, T=T, I=5, with_state=True) for B in (1, 3, 17) for H in (1, 17, 33) for T in (1, 7)}


def _make_inputs(case: Case, generator: torch.Generator):
    """float64 inputs: (x or list of sequences, (h0, c0) or None, output-gradient seed)."""
    num_directions = 2 if case.bidirectional else 1
    out_size = case.proj_size or case.H
    if case.packed:
        lengths = torch.randint(1, case.T + 1, (case.B,), generator=generator)
        lengths[0] = case.T  # the longest sequence sets T
        x = [torch.randn(int(n), case.I, generator=generator, dtype=torch.float64) for n in lengths]
    elif case.unbatched:
        x = torch.randn(case.T, case.I, generator=generator, dtype=torch.float64)
    else:
        shape = (case.B, case.T, case.I) if case.batch_first else (case.T, case.B, case.I)
        x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    state = None
    if case.with_state:
        batch = () if case.unbatched else (case.B,)
        state = (
            torch.randn(case.num_layers * num_directions, *batch, out_size, generator=generator, dtype=torch.float64),
            torch.randn(case.num_layers * num_directions, *batch, case.H, generator=generator, dtype=torch.float64),
        )
    return x, state


def _run(module, x, state, dtype, device, grad_seed: int):
    """Runs ``module`` on copies of the inputs in ``dtype`` on ``device``; backprops random output
    gradients (the same for every run: drawn from ``grad_seed`` in float64, then cast) and returns
    {name: tensor} of outputs and gradients, in float64 on the CPU. ``state`` is (h0, c0), or h0 alone for
    a GRU (whose hidden output is h_n alone)."""
    module = module.to(device=device, dtype=dtype)
    if isinstance(x, list):
        leaves = [s.detach().to(device=device, dtype=dtype).requires_grad_() for s in x]
        model_input = pack_sequence(leaves, enforce_sorted=False)
    else:
        leaves = [x.detach().to(device=device, dtype=dtype).requires_grad_()]
        model_input = leaves[0]
    state_leaves = model_state = None
    if state is not None:
        state_leaves = tuple(s.detach().to(device=device, dtype=dtype).requires_grad_()
                             for s in (state if isinstance(state, tuple) else (state,)))
        model_state = state_leaves if isinstance(state, tuple) else state_leaves[0]
    output, hidden = module(model_input, model_state)
    out_tensor = output.data if isinstance(output, PackedSequence) else output
    generator = torch.Generator().manual_seed(grad_seed)
    outs = {"output": out_tensor, **dict(zip(("h_n", "c_n"), hidden if isinstance(hidden, tuple) else (hidden,)))}
    grads = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype) for t in outs.values()]
    torch.autograd.backward(list(outs.values()), grads)
    result = {name: t.detach().double().cpu() for name, t in outs.items()}
    result["grad_input"] = torch.cat([leaf.grad.double().cpu().flatten() for leaf in leaves])
    for name, leaf in zip(("grad_h0", "grad_c0"), state_leaves or ()):
        result[name] = leaf.grad.double().cpu()
    for name, parameter in module.named_parameters():
        result["grad_" + name] = parameter.grad.double().cpu()
    return result, out_tensor


def check_against_nn(case: Case, dtype: torch.dtype, seed: int = 0, oracle_device: str = "cpu", cell: str = "LSTM",
                     **ours_kwargs):
    """Ours (``triton_lstm.<cell>``, with ``ours_kwargs``) against nn's ``cell`` ("LSTM" or "GRU"): every
    output and gradient within twice nn's own error in ``dtype`` against nn in float64."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    kwargs = case.module_kwargs()
    if cell == "GRU":
        kwargs.pop("proj_size")  # nn.GRU refuses the argument itself
    oracle = getattr(nn, cell)(**kwargs).double()
    x, state = _make_inputs(case, generator)
    if cell == "GRU" and state is not None:
        state = state[0]  # h0 alone
    expected, _ = _run(oracle, x, state, torch.float64, oracle_device, grad_seed=seed + 1)
    oracle.cpu()

    theirs_module = getattr(nn, cell)(**kwargs)
    theirs_module.load_state_dict(oracle.state_dict())
    theirs, _ = _run(theirs_module, x, state, dtype, KERNEL_DEVICE, grad_seed=seed + 1)

    ours_module = getattr(triton_lstm, cell)(**kwargs, **ours_kwargs)
    ours_module.load_state_dict(oracle.state_dict())
    ours, ours_output = _run(ours_module, x, state, dtype, KERNEL_DEVICE, grad_seed=seed + 1)
    assert ours_output.dtype == dtype

    assert set(ours) == set(expected)
    summed = case.T * case.B
    for name in expected:
        terms = summed if name.startswith(("grad_weight", "grad_bias")) else 1
        assert_error_within_pytorch(name, ours[name], theirs[name], expected[name], dtype, summed_terms=terms)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_nn_lstm(case, dtype):
    check_against_nn(case, dtype)


@pytest.mark.parametrize("case", SIZES.values(), ids=SIZES.keys())
def test_matches_nn_lstm_odd_sizes(case):
    check_against_nn(case, torch.float32)


def test_same_initialization_as_nn_lstm():
    kwargs = dict(input_size=7, hidden_size=5, num_layers=2, bidirectional=True, proj_size=3)
    torch.manual_seed(123)
    theirs = nn.LSTM(**kwargs)
    next_draw_theirs = torch.rand(3)
    torch.manual_seed(123)
    ours = triton_lstm.LSTM(**kwargs)
    next_draw_ours = torch.rand(3)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert a.shape == b.shape and torch.equal(a, b), name
    assert torch.equal(next_draw_ours, next_draw_theirs), "the RNG must be left in the same state"


def test_same_initialization_lstm_cell():
    torch.manual_seed(5)
    theirs = nn.LSTMCell(4, 6)
    torch.manual_seed(5)
    ours = triton_lstm.LSTMCell(4, 6)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a, b), name


def test_state_dict_interchange_both_ways():
    kwargs = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, proj_size=2, bias=False)
    theirs, ours = nn.LSTM(**kwargs), triton_lstm.LSTM(**kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor)
    fresh = nn.LSTM(**kwargs)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    cell_theirs, cell_ours = nn.LSTMCell(3, 4), triton_lstm.LSTMCell(3, 4)
    cell_ours.load_state_dict(cell_theirs.state_dict(), strict=True)
    nn.LSTMCell(3, 4).load_state_dict(cell_ours.state_dict(), strict=True)


def test_repr_and_flatten_parameters():
    module = triton_lstm.LSTM(3, 4, num_layers=2, batch_first=True)
    assert repr(module) == repr(nn.LSTM(3, 4, num_layers=2, batch_first=True))
    module.flatten_parameters()  # accepted, as on nn.LSTM


def _lstm_cell_case(dtype, batched: bool, with_state: bool, bias: bool = True):
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    oracle = nn.LSTMCell(5, 17, bias=bias).double()
    batch = (3,) if batched else ()
    x = torch.randn(*batch, 5, generator=generator, dtype=torch.float64)
    state = tuple(torch.randn(*batch, 17, generator=generator, dtype=torch.float64) for _ in range(2)) if with_state else None
    grads = [torch.randn(*batch, 17, generator=generator, dtype=torch.float64) for _ in range(2)]

    def run(module, dtype, device):
        module = module.to(device=device, dtype=dtype)
        leaf = x.detach().to(device=device, dtype=dtype).requires_grad_()
        hx = None if state is None else tuple(s.detach().to(device=device, dtype=dtype).requires_grad_() for s in state)
        h, c = module(leaf, hx)
        torch.autograd.backward([h, c], [g.to(device=device, dtype=dtype) for g in grads])
        result = {"h": h, "c": c, "grad_input": leaf.grad}
        if hx is not None:
            result.update(grad_h0=hx[0].grad, grad_c0=hx[1].grad)
        result.update({"grad_" + n: p.grad for n, p in module.named_parameters()})
        return {k: v.detach().double().cpu() for k, v in result.items()}, h.dtype

    expected, _ = run(oracle, torch.float64, "cpu")
    theirs_module, ours_module = nn.LSTMCell(5, 17, bias=bias), triton_lstm.LSTMCell(5, 17, bias=bias)
    theirs_module.load_state_dict(oracle.state_dict())
    ours_module.load_state_dict(oracle.state_dict())
    theirs, _ = run(theirs_module, dtype, KERNEL_DEVICE)
    ours, ours_dtype = run(ours_module, dtype, KERNEL_DEVICE)
    assert ours_dtype == dtype
    for name in expected:
        terms = 3 if name.startswith(("grad_weight", "grad_bias")) else 1
        assert_error_within_pytorch(name, ours[name], theirs[name], expected[name], dtype, summed_terms=terms)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no_state"])
def test_lstm_cell_matches_nn(dtype, batched, with_state):
    _lstm_cell_case(dtype, batched, with_state)


def test_lstm_cell_without_bias():
    _lstm_cell_case(torch.float32, True, True, bias=False)


def test_dropout_identity_in_eval_random_in_train():
    torch.manual_seed(0)
    module = triton_lstm.LSTM(4, 8, num_layers=3, dropout=0.5).to(KERNEL_DEVICE)
    reference = nn.LSTM(4, 8, num_layers=3, dropout=0.5).to(KERNEL_DEVICE)
    reference.load_state_dict(module.state_dict())
    x = torch.randn(5, 3, 4, device=KERNEL_DEVICE)
    module.eval()
    reference.eval()
    eval_a, _ = module(x)
    eval_b, _ = module(x)
    assert torch.equal(eval_a, eval_b)
    torch.testing.assert_close(eval_a, reference(x)[0], rtol=1e-5, atol=1e-6)
    module.train()
    train_a, _ = module(x)
    train_b, _ = module(x)
    assert not torch.allclose(train_a, train_b), "dropout between layers must be random in training"
    assert not torch.allclose(train_a, eval_a)
    # Without dropout, training mode changes nothing.
    plain = triton_lstm.LSTM(4, 8, num_layers=3).to(KERNEL_DEVICE).train()
    assert torch.equal(plain(x)[0], plain(x)[0])


def test_dropout_last_layer_untouched():
    # Dropout applies between layers only: a single layer in training mode is deterministic.
    with pytest.warns(UserWarning):
        module = triton_lstm.LSTM(4, 8, num_layers=1, dropout=0.5).to(KERNEL_DEVICE).train()
    x = torch.randn(5, 3, 4, device=KERNEL_DEVICE)
    assert torch.equal(module(x)[0], module(x)[0])


@pytest.mark.parametrize("options", [dict(num_layers=2, bidirectional=True), dict(proj_size=3), dict(num_layers=2, proj_size=2)],
                         ids=["bidirectional-stack", "projection", "projected-stack"])
def test_empty_batch_like_nn_lstm(options):
    module = triton_lstm.LSTM(4, 6, **options).to(KERNEL_DEVICE)
    x = torch.randn(5, 0, 4, device=KERNEL_DEVICE, requires_grad=True)
    output, (h_n, c_n) = module(x)
    theirs, (h_t, c_t) = nn.LSTM(4, 6, **options).to(KERNEL_DEVICE)(x)
    assert output.shape == theirs.shape and h_n.shape == h_t.shape and c_n.shape == c_t.shape
    output.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize(
    "make, name, bad",
    [
        (lambda: triton_lstm.GRU(4, 5), "weight_hh_l0", torch.randn(14, 5)),  # one row short: read past its end
        (lambda: triton_lstm.LSTM(4, 5, num_layers=2, bidirectional=True), "weight_ih_l1_reverse", torch.randn(20, 9)),
        (lambda: triton_lstm.LSTM(4, 5, proj_size=2), "weight_hr_l0", torch.randn(2, 4)),
        (lambda: triton_lstm.LSTM(4, 5, peephole=True), "weight_ch_l0", torch.randn(14)),
        (lambda: triton_lstm.LSTM(4, 5, num_layers=2), "bias_hh_l1", torch.randn(20, dtype=torch.float64)),
        (lambda: triton_lstm.LSTMCell(4, 5), "weight_hh", torch.randn(19, 5)),
        (lambda: triton_lstm.GRUCell(4, 5), "bias_hh", torch.randn(15, dtype=torch.float16)),
    ],
    ids=["gru-short-w_hh", "lstm-w_ih-above", "lstm-w_hr", "peephole", "bias-dtype", "lstmcell", "grucell-dtype"],
)
def test_reassigned_parameter_that_does_not_fit_is_refused(make, name, bad):
    """A parameter reassigned after construction with a wrong shape or dtype: a RuntimeError naming it (as
    nn's recurrences refuse it), not kernels reading past the end of a short weight."""
    module = make().to(KERNEL_DEVICE)
    setattr(module, name, nn.Parameter(bad.to(KERNEL_DEVICE)))
    cell = isinstance(module, (nn.LSTMCell, nn.GRUCell))
    x = torch.randn(*(() if cell else (3,)), 2, 4, device=KERNEL_DEVICE)
    with pytest.raises(RuntimeError, match=name):
        module(x)


@pytest.mark.parametrize(
    "cls, options",
    [("LSTM", {}), ("LSTM", dict(proj_size=3)), ("LSTM", dict(num_layers=2)), ("LSTM", dict(recompute_interval=2)),
     ("LSTM", dict(batch_first=True)), ("LSTM", dict(bidirectional=True)), ("GRU", {}), ("GRU", dict(num_layers=2))],
    ids=["lstm", "projection", "stack", "recompute", "batch_first", "bidirectional", "gru", "gru-stack"],
)
def test_output_edited_in_place_like_nn(cls, options):
    """The output may be edited in place (``relu_``, ``mul_``), as nn.LSTM's may; a backward through the
    edit then either gives the gradient of the edited output or, where the backward reads the saved output
    (as cuDNN's does), refuses with autograd's in-place error. Never a silently wrong gradient."""
    torch.manual_seed(0)
    module = getattr(triton_lstm, cls)(4, 5, **options).to(KERNEL_DEVICE).double()
    x = torch.randn(3, 2, 4, device=KERNEL_DEVICE, dtype=torch.float64, requires_grad=True)
    expected = torch.autograd.grad((module(x)[0] * 2).sum(), x)[0]
    out = module(x)[0]
    out.mul_(2)
    try:
        got = torch.autograd.grad(out.sum(), x)[0]
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error)
    else:
        torch.testing.assert_close(got, expected)


def test_non_contiguous_input_and_state():
    torch.manual_seed(0)
    module = triton_lstm.LSTM(4, 6).to(KERNEL_DEVICE)
    reference = nn.LSTM(4, 6).to(KERNEL_DEVICE)
    reference.load_state_dict(module.state_dict())
    x = torch.randn(3, 5, 8, device=KERNEL_DEVICE)[:, :, ::2].transpose(0, 1)  # (5, 3, 4), strided
    h0 = torch.randn(3, 1, 12, device=KERNEL_DEVICE)[:, :, ::2].transpose(0, 1)
    c0 = torch.randn(6, 3, 1, device=KERNEL_DEVICE).permute(2, 1, 0)
    assert not x.is_contiguous() and not h0.is_contiguous() and not c0.is_contiguous()
    ours = module(x, (h0, c0))
    theirs = reference(x.contiguous(), (h0.contiguous(), c0.contiguous()))
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1][0], theirs[1][0], rtol=1e-5, atol=1e-6)


def test_packed_sequence_roundtrip_metadata():
    module = triton_lstm.LSTM(3, 4, bidirectional=True).to(KERNEL_DEVICE)
    sequences = [torch.randn(n, 3, device=KERNEL_DEVICE) for n in (2, 5, 3)]
    packed = pack_sequence(sequences, enforce_sorted=False)
    output, (h_n, _) = module(packed)
    assert isinstance(output, PackedSequence)
    assert torch.equal(output.batch_sizes, packed.batch_sizes)
    assert torch.equal(output.sorted_indices, packed.sorted_indices)
    assert torch.equal(output.unsorted_indices, packed.unsorted_indices)
    # h_n follows the caller's batch order: sequence b alone gives the same final state.
    for b, sequence in enumerate(sequences):
        _, (h_alone, _) = module(sequence.unsqueeze(1))
        torch.testing.assert_close(h_n[:, b], h_alone[:, 0], rtol=1e-5, atol=1e-6)


def test_convert_replaces_and_keeps_parameters():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.LSTM(4, 5, num_layers=2, proj_size=2)))
            self.cell = nn.LSTMCell(2, 3)
            self.head = nn.Linear(3, 1)

    torch.manual_seed(0)
    model = Model().double().eval()
    lstm_params = list(model.encoder[1][0].parameters())
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    before = model.encoder(x)[0]
    converted = triton_lstm.convert(model)
    assert converted is model
    assert type(model.encoder[1][0]) is triton_lstm.LSTM
    assert type(model.cell) is triton_lstm.LSTMCell
    # The very same Parameter objects: an optimizer built before convert() still trains the model.
    assert all(a is b for a, b in zip(model.encoder[1][0].parameters(), lstm_params))
    assert model.encoder[1][0].weight_ih_l0.dtype == torch.float64
    assert not model.encoder[1][0].training
    torch.testing.assert_close(model.encoder(x)[0], before)
    # A bare nn.LSTM is converted itself.
    bare = nn.LSTM(2, 3)
    assert triton_lstm.convert(bare) is bare and type(bare) is triton_lstm.LSTM


@pytest.mark.parametrize("nn_class", [nn.LSTM, nn.LSTMCell, nn.GRU, nn.GRUCell], ids=lambda c: c.__name__)
def test_convert_keeps_frozen_weights_hooks_and_attributes(nn_class):
    """convert changes the class only: a frozen weight stays frozen, hooks keep running, extra buffers and
    attributes stay (a fresh module loaded from the state_dict lost all of them)."""
    torch.manual_seed(0)
    module = nn_class(3, 4).double()
    frozen = "weight_hh_l0" if isinstance(module, nn.RNNBase) else "weight_hh"
    getattr(module, frozen).requires_grad_(False)
    module.register_buffer("running_scale", torch.full((1,), 2.0, dtype=torch.float64))
    module.note = "kept"
    calls = []
    module.register_forward_pre_hook(lambda mod, args: calls.append("pre"))
    module.register_forward_hook(lambda mod, args, out: calls.append("post"))
    x = torch.randn(5, 2, 3, dtype=torch.float64) if isinstance(module, nn.RNNBase) else torch.randn(2, 3, dtype=torch.float64)
    before = module(x)
    converted = triton_lstm.convert(module)
    assert converted is module and type(module).__name__ == nn_class.__name__ and type(module) is not nn_class
    assert not getattr(module, frozen).requires_grad
    assert module.running_scale.item() == 2.0 and module.note == "kept"
    calls.clear()
    after = module(x)
    assert calls == ["pre", "post"]
    torch.testing.assert_close(after, before)


def test_convert_keeps_old_style_weight_norm():
    """torch.nn.utils.weight_norm (the hook-based one) replaces weight_hh_l0 by weight_hh_l0_g / _v and a
    pre-hook; convert keeps both, so the converted module computes what nn's did."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
        lstm = torch.nn.utils.weight_norm(nn.LSTM(3, 4).double(), "weight_hh_l0")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    before = lstm(x)[0]
    triton_lstm.convert(lstm)
    assert type(lstm) is triton_lstm.LSTM and set(lstm.state_dict()) >= {"weight_hh_l0_g", "weight_hh_l0_v"}
    torch.testing.assert_close(lstm(x)[0], before)


def test_converted_lstm_keeps_nn_lstms_helpers():
    # Code written against nn.LSTM may call its helpers (the state as a pair (h, c)); after convert the
    # module is ours (not an nn.LSTM instance: torch.compile refuses to trace those), with the same helpers.
    model = nn.Sequential(nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2))
    triton_lstm.convert(model)
    lstm = model[0]
    assert isinstance(lstm, triton_lstm.LSTM) and isinstance(lstm, nn.RNNBase) and lstm.mode == "LSTM"
    x, h, c = torch.randn(5, 3, 3), torch.zeros(4, 3, 2), torch.zeros(4, 3, 4)
    lstm.check_forward_args(x, (h, c), None)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(4, 3, 4\)"):
        lstm.check_forward_args(x, (h, h), None)
    assert lstm.get_expected_cell_size(x, None) == (4, 3, 4)
    order = torch.tensor([2, 0, 1])
    permuted = lstm.permute_hidden((h + torch.arange(3.0)[:, None], c), order)
    assert torch.equal(permuted[0][:, :, 0], torch.tensor([2.0, 0.0, 1.0]).expand(4, 3))


def test_extra_repr_shows_our_non_default_options():
    assert repr(triton_lstm.LSTM(3, 4, backward="reference", recompute_interval=8)) == \
        "LSTM(3, 4, backward='reference', recompute_interval=8)"
    assert repr(triton_lstm.LSTMCell(3, 4, backward="reference")) == "LSTMCell(3, 4, backward='reference')"
    assert repr(triton_lstm.LSTMCell(3, 4)) == repr(nn.LSTMCell(3, 4))


def test_convert_keeps_parametrizations_and_skips_subclasses(caplog):
    from torch.nn.utils import parametrize

    class WeightDrop(nn.Module):  # AWD-LSTM's weight drop on W_hh, as a parametrization
        def forward(self, weight):
            return nn.functional.dropout(weight, p=0.5, training=self.training)

    class CustomLSTM(nn.LSTM):
        pass

    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2)
    parametrize.register_parametrization(lstm, "weight_hh_l0", WeightDrop())
    original = lstm.parametrizations.weight_hh_l0.original
    model = nn.Sequential(lstm, nn.Sequential(CustomLSTM(4, 4)), nn.LSTMCell(4, 2))
    model.eval()
    x = torch.randn(5, 2, 3, device="cpu")
    before = lstm(x)[0]
    with pytest.warns(UserWarning, match=r"1\.0 \(CustomLSTM\)"), caplog.at_level("INFO", logger="triton_lstm.modules"):
        triton_lstm.convert(model)
    assert "swapped: 0, 2" in caplog.text
    assert isinstance(model[0], triton_lstm.LSTM) and parametrize.is_parametrized(model[0], "weight_hh_l0")
    assert model[0].parametrizations.weight_hh_l0.original is original, "the same Parameter object"
    assert type(model[1][0]) is CustomLSTM and type(model[2]) is triton_lstm.LSTMCell
    torch.testing.assert_close(model[0](x)[0], before, rtol=1e-5, atol=1e-6)
    assert set(model[0].state_dict()) == set(lstm.state_dict())


# --- On the CPU without the interpreter: ATen's own LSTM, as nn.LSTM -------------------------------------

@pytest.mark.parametrize(
    "options, packed, batched",
    [
        (dict(num_layers=2, bidirectional=True, proj_size=3), False, True),
        (dict(batch_first=True, bias=False), False, True),
        (dict(num_layers=2, dropout=0.5), False, True),
        (dict(bidirectional=True), True, True),
        (dict(num_layers=2), False, False),
    ],
    ids=["bidir-proj", "batch_first-nobias", "dropout", "packed", "unbatched"],
)
def test_cpu_runs_aten_lstm_like_nn(monkeypatch, options, packed, batched):
    """Without the interpreter, CPU tensors run the very ATen op nn.LSTM runs: the same outputs and
    gradients, dropout draws included."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU outside the interpreter
    torch.manual_seed(0)
    theirs = nn.LSTM(4, 6, **options).train()
    ours = triton_lstm.LSTM(4, 6, **options).train()
    ours.load_state_dict(theirs.state_dict())
    if packed:
        x = pack_sequence([torch.randn(5, 4), torch.randn(3, 4), torch.randn(4, 4)], enforce_sorted=False)
    else:
        x = torch.randn(2, 5, 4) if options.get("batch_first") else torch.randn(5, 2, 4)
        x = x if batched else x[:, 0]
    results = []
    for module in (theirs, ours):
        torch.manual_seed(1)
        out, (h, c) = module(x)
        data = out.data if packed else out
        (data.sum() + h.sum() + c.sum()).backward()
        results.append((data, h, c, [p.grad.clone() for p in module.parameters()]))
    for a, b in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(results[0][3], results[1][3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpu_lstm_cell_runs_aten_like_nn(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU outside the interpreter
    torch.manual_seed(0)
    theirs, ours = nn.LSTMCell(4, 6), triton_lstm.LSTMCell(4, 6)
    ours.load_state_dict(theirs.state_dict())
    x, h, c = torch.randn(3, 4), torch.randn(3, 6), torch.randn(3, 6)
    for a, b in zip(theirs(x, (h, c)), ours(x, (h, c))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpu_aten_path_double_backward(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU outside the interpreter
    torch.manual_seed(0)
    module = triton_lstm.LSTM(2, 3, num_layers=2, bidirectional=True).double()
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda inp: module(inp)[0], (x,))


@pytest.mark.parametrize("cls", ["LSTM", "LSTM-proj-bidir-2", "GRU", "LSTMCell", "GRUCell"])
def test_complex_modules_run_aten_like_nn(cls):
    # nn's recurrences take complex dtypes (ATen's own recurrence, on every device); ours run it for them
    # (the kernels and the reference are real-valued): the same outputs and gradients, bit for bit.
    name, _, options = cls.partition("-")
    kwargs = dict(proj_size=3, bidirectional=True, num_layers=2) if options else {}
    torch.manual_seed(0)
    theirs = getattr(nn, name)(4, 5, dtype=torch.complex64, **kwargs)
    ours = getattr(triton_lstm, name)(4, 5, dtype=torch.complex64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 2, 4, dtype=torch.complex64)
    x = x[0] if name.endswith("Cell") else x
    results = []
    for module in (theirs, ours):
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        (out.abs() ** 2).sum().backward()
        results.append((out, [p.grad for p in module.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for ours_grad, their_grad in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(ours_grad, their_grad, rtol=0, atol=0)


def test_complex_peephole_refused():
    x = torch.randn(3, 2, 4, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="peephole=True takes real inputs only"):
        triton_lstm.LSTM(4, 5, peephole=True, dtype=torch.complex64)(x)
    with pytest.raises(RuntimeError, match="peephole=True takes real inputs only"):
        triton_lstm.LSTMCell(4, 5, peephole=True, dtype=torch.complex64)(x[0])
