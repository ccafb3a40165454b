"""Bad input: the exception type nn.LSTM raises, with nn's own message where nn's is meaningful (code and
tests in the wild match on it), and one that names the argument where nn's misleads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import triton_lstm


def _lstm_cases():
    x = torch.randn(3, 2, 4)
    h = torch.zeros(1, 2, 5)
    return {
        # name: (call taking a module class, exception type, message pattern)
        "4-D input": (lambda M: M(4, 5)(torch.randn(3, 2, 4, 1)), ValueError, "2D or 3D, got 4D"),
        "1-D input": (lambda M: M(4, 5)(torch.randn(4)), ValueError, "2D or 3D, got 1D"),
        "feature size": (lambda M: M(4, 5)(torch.randn(3, 2, 3)), RuntimeError, "input_size. Expected 4, got 3"),
        "integer input": (lambda M: M(4, 5)(torch.randint(0, 3, (3, 2, 4))), ValueError, "int64"),
        "input dtype": (lambda M: M(4, 5)(x.double()), ValueError, "RNN input dtype .*float64.*float32"),
        "empty sequence": (lambda M: M(4, 5)(torch.randn(0, 2, 4)), RuntimeError, "sequence length"),
        "empty unbatched sequence": (lambda M: M(4, 5)(torch.randn(0, 4)), RuntimeError, "sequence length"),
        "hx three states": (lambda M: M(4, 5)(x, (h, h, h)), RuntimeError, "two"),
        "h0 shape": (lambda M: M(4, 5)(x, (torch.zeros(1, 3, 5), h)), RuntimeError, r"\(1, 2, 5\).*\[1, 3, 5\]"),
        "c0 shape": (lambda M: M(4, 5)(x, (h, torch.zeros(1, 2, 6))), RuntimeError, r"\(1, 2, 5\).*\[1, 2, 6\]"),
        "h0 layers": (lambda M: M(4, 5, num_layers=2)(x, (h, h)), RuntimeError, r"\(2, 2, 5\).*\[1, 2, 5\]"),
        "h0 dims": (lambda M: M(4, 5)(x, (torch.zeros(2, 5), torch.zeros(2, 5))), RuntimeError, "hx and cx should also be 3-D"),
        "unbatched h0 dims": (lambda M: M(4, 5)(torch.randn(3, 4), (h, h)), RuntimeError, "2-D"),
        "proj h0 size": (lambda M: M(4, 5, proj_size=2)(x, (h, h)), RuntimeError, r"\(1, 2, 2\)"),
        "h0 dtype": (lambda M: M(4, 5)(x, (h.double(), h)), RuntimeError, "h_0.*float64"),
        "c0 dtype": (lambda M: M(4, 5)(x, (h, h.half())), RuntimeError, "c_0.*float16"),
        "c0 None": (lambda M: M(4, 5)(x, (h, None)), AttributeError, "c_0 must be a Tensor"),
        "list input": (lambda M: M(4, 5)([[1.0] * 4] * 2), AttributeError, "must be a Tensor or a PackedSequence"),
        # hx as nn indexes it: hx[0], hx[1], then ATen takes a tuple or list of two.
        "hx int": (lambda M: M(4, 5)(x, 0), TypeError, "hx must be a tuple"),
        "hx str": (lambda M: M(4, 5)(x, "hx"), AttributeError, "h_0 must be a Tensor, got str"),
        "hx one state": (lambda M: M(4, 5)(x, (h,)), IndexError, "hx must be a tuple.*length 1"),
        "hx one tensor": (lambda M: M(4, 5)(x, h), IndexError, "hx must be a tuple.*Tensor"),
        "hx stacked tensor": (lambda M: M(4, 5)(x, torch.zeros(2, 1, 2, 5)), TypeError, "hx must be a tuple.*Tensor"),
        "hx h0 alone, two layers": (lambda M: M(4, 5, num_layers=2)(x, torch.zeros(2, 2, 5)), RuntimeError,
                                    "hx and cx should also be 3-D"),
        # Parameters set to None after construction: nn's recurrence refuses them (the kernels ran without).
        "weight_ih None": (lambda M: _set(M(4, 5), weight_ih_l0=None)(x), AttributeError, "weight_ih.* is None"),
        "weight_hh None": (lambda M: _set(M(4, 5), weight_hh_l0=None)(x), TypeError, "weight_hh_l0 is None"),
        "bias None": (lambda M: _set(M(4, 5, num_layers=2), bias_ih_l1=None)(x), TypeError, "bias_ih_l1 is None"),
        "weight_hr None": (lambda M: _set(M(4, 5, proj_size=2), weight_hr_l0=None)(x), TypeError, "weight_hr_l0 is None"),
        # nn checks these two only in ATen's argument parser, which the kernels' path does not reach.
        "bidirectional int": (lambda M: M(4, 5, bidirectional=1)(x), TypeError, "bidirectional must be a bool"),
        "num_layers bool": (lambda M: M(4, 5, num_layers=True)(x), TypeError, "num_layers an int"),
        # A PackedSequence's batch_sizes as pack_padded_sequence would never make them (a negative one
        # aborted the process in pad_packed_sequence).
        "negative batch size": (lambda M: M(1, 5)(_packed([2, -1])), RuntimeError, "non-increasing"),
        "float batch sizes": (lambda M: M(1, 5)(_packed([2.0, 1.0])), TypeError, "1-D int64"),
        "2-D batch sizes": (lambda M: M(1, 5)(_packed([[2, 1]])), TypeError, "1-D int64"),
        "empty batch sizes": (lambda M: M(1, 5)(_packed([], torch.int64)), IndexError, "empty"),
        "int32 batch sizes": (lambda M: M(1, 5)(_packed([2, 1], torch.int32)), RuntimeError, "int64 on the CPU"),
        "increasing batch sizes": (lambda M: M(1, 5)(_packed([1, 2])), RuntimeError, "non-increasing"),
        "batch sizes past the data": (lambda M: M(1, 5)(_packed([2, 2])), RuntimeError, "sum to its data's 3 rows"),
    }


def _set(module, **parameters):
    for name, value in parameters.items():
        setattr(module, name, value)
    return module


def _packed(batch_sizes, dtype=None):
    """A PackedSequence of three rows of one feature with these batch_sizes, valid or not."""
    return nn.utils.rnn.PackedSequence(torch.randn(3, 1), torch.tensor(batch_sizes, dtype=dtype))


LSTM_CASES = _lstm_cases()


# Where nn's message misleads or comes from deep inside (a state's dtype: "get_mkldnn_dtype: unsupported
# data type"; an integer input; three states), ours differs; everywhere else it is nn's, word for word.
OWN_MESSAGES = {"integer input", "hx three states", "h0 dtype", "c0 dtype", "h dtype", "3-D hx", "hx tensor", "c0 None",
                "list input", "c None", "hx int", "hx str", "hx one state", "hx one tensor", "hx stacked tensor",
                "weight_ih None", "weight_hh None", "bias None", "weight_hr None", "bidirectional int",
                "num_layers bool", "negative batch size", "float batch sizes", "2-D batch sizes", "empty batch sizes",
                "int32 batch sizes", "increasing batch sizes", "batch sizes past the data", "1-D hx",
                "hx one state unbatched"}


def _raises_like_nn(name, call, ours_cls, nn_cls, error, pattern):
    with pytest.raises(error, match=pattern) as ours:
        call(ours_cls)
    with pytest.raises(error) as theirs:
        call(nn_cls)
    if name not in OWN_MESSAGES:
        assert str(theirs.value) in str(ours.value), f"nn says {theirs.value!s}; we say {ours.value!s}"


@pytest.mark.parametrize("name", LSTM_CASES)
def test_lstm_bad_input(name):
    call, error, pattern = LSTM_CASES[name]
    _raises_like_nn(name, call, triton_lstm.LSTM, nn.LSTM, error, pattern)


def test_packed_sequence_batch_sizes_nn_accepts():
    # nn runs a PackedSequence whose batch_sizes sum to fewer rows than its data (it drops the rest);
    # ours refuses it, as it refuses every batch_sizes pack_padded_sequence would not make.
    packed = _packed([2, 0])
    nn.LSTM(1, 5)(packed)
    with pytest.raises(RuntimeError, match="positive, non-increasing and sum to its data's 3 rows"):
        triton_lstm.LSTM(1, 5)(packed)


def test_gru_proj_size_keyword_refused_like_nn():
    for value in (None, 2, 1.5):
        with pytest.raises(ValueError, match="only supported for LSTM") as theirs:
            nn.GRU(4, 5, proj_size=value)
        with pytest.raises(ValueError) as ours:
            triton_lstm.GRU(4, 5, proj_size=value)
        assert str(theirs.value) == str(ours.value)


def test_cell_bias_set_to_none_runs_without_it():
    # nn's cell ops take a missing bias as none; the kernels must then add none either.
    torch.manual_seed(0)
    for ours_cls, nn_cls in ((triton_lstm.LSTMCell, nn.LSTMCell), (triton_lstm.GRUCell, nn.GRUCell)):
        theirs = nn_cls(4, 5)
        ours = ours_cls(4, 5)
        ours.load_state_dict(theirs.state_dict())
        for module in (ours, theirs):
            module.bias_hh = None
        x = torch.randn(3, 4)
        expected, got = theirs(x), ours(x)
        expected, got = (expected[0], got[0]) if isinstance(expected, tuple) else (expected, got)
        torch.testing.assert_close(got, expected)


def test_packed_sequence_bad_state():
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 4), torch.randn(2, 4)])
    with pytest.raises(RuntimeError, match=r"\(1, 2, 5\)"):
        triton_lstm.LSTM(4, 5)(packed, (torch.zeros(1, 3, 5), torch.zeros(1, 3, 5)))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(hidden_size=0), ValueError),
        (dict(num_layers=0), ValueError),
        (dict(dropout=1.5), ValueError),
        (dict(proj_size=5), ValueError),
        (dict(proj_size=-1), ValueError),
        (dict(hidden_size=5.0), TypeError),
    ],
    ids=["hidden_size 0", "num_layers 0", "dropout 1.5", "proj_size = hidden", "proj_size -1", "float hidden_size"],
)
def test_constructor_validation_like_nn(kwargs, error):
    arguments = dict(input_size=4, hidden_size=5) | kwargs
    with pytest.raises(error) as ours:
        triton_lstm.LSTM(**arguments)
    with pytest.raises(error) as theirs:
        nn.LSTM(**arguments)
    assert str(ours.value) == str(theirs.value)


def test_device_mismatch():
    module = triton_lstm.LSTM(4, 5)
    with pytest.raises(RuntimeError, match="meta"):
        module(torch.randn(3, 2, 4, device="meta"))
    with pytest.raises(RuntimeError, match="h_0 is on meta"):
        module(torch.randn(3, 2, 4), (torch.zeros(1, 2, 5, device="meta"), torch.zeros(1, 2, 5)))


CELL_CASES = {
    "3-D input": (lambda M: M(4, 5)(torch.randn(1, 2, 4)), ValueError, "1D or 2D, got 3D"),
    "feature size": (lambda M: M(4, 5)(torch.randn(2, 3)), RuntimeError, "got 3 expected 4"),
    "h batch": (lambda M: M(4, 5)(torch.randn(2, 4), (torch.zeros(3, 5), torch.zeros(2, 5))), RuntimeError, "hidden0 batch size 3"),
    "h hidden size": (lambda M: M(4, 5)(torch.randn(2, 4), (torch.zeros(2, 6), torch.zeros(2, 5))), RuntimeError, "hidden0 .*got 6"),
    "c hidden size": (lambda M: M(4, 5)(torch.randn(2, 4), (torch.zeros(2, 5), torch.zeros(2, 7))), RuntimeError, "hidden1 .*got 7"),
    "input dtype": (lambda M: M(4, 5)(torch.randn(2, 4).double()), RuntimeError, "Double and Float"),
    "h dtype": (lambda M: M(4, 5)(torch.randn(2, 4), (torch.zeros(2, 5).double(), torch.zeros(2, 5))), RuntimeError, "h_0.*float64"),
    "hx tensor": (lambda M: M(4, 5)(torch.randn(2, 4), torch.zeros(2, 5)), TypeError, "tuple"),
    "3-D hx": (lambda M: M(4, 5)(torch.randn(2, 4), (torch.zeros(1, 2, 5), torch.zeros(2, 5))), ValueError, r"hx\[0\]"),
    "c None": (lambda M: M(4, 5)(torch.randn(2, 4), (torch.zeros(2, 5), None)), AttributeError, r"hx\[1\] must be a Tensor"),
    "integer input": (lambda M: M(4, 5)(torch.ones(2, 4, dtype=torch.long)), RuntimeError, "floating-point"),
    "list input": (lambda M: M(4, 5)([[1.0] * 4] * 2), AttributeError, "must be a Tensor"),
    # hx as nn.LSTMCell walks it: each element's dims, hx[0] and hx[1] when unbatched, then ATen's tuple of two.
    "hx str": (lambda M: M(4, 5)(torch.randn(2, 4), "hx"), AttributeError, r"hx\[0\] must be a Tensor, got str"),
    "1-D hx": (lambda M: M(4, 5)(torch.randn(4), torch.zeros(5)), ValueError, r"hx\[0\] to be 1D or 2D, got 0D"),
    "hx one state unbatched": (lambda M: M(4, 5)(torch.randn(4), (torch.zeros(5),)), IndexError, "length 1"),
    "hx three states": (lambda M: M(4, 5)(torch.randn(2, 4), (torch.zeros(2, 5),) * 3), RuntimeError, "length 3"),
    "weight_ih None": (lambda M: _set(M(4, 5), weight_ih=None)(torch.randn(2, 4)), TypeError, "weight_ih.* is None"),
    "weight_hh None": (lambda M: _set(M(4, 5), weight_hh=None)(torch.randn(2, 4)), TypeError, "weight_hh is None"),
}


@pytest.mark.parametrize("name", CELL_CASES)
def test_lstm_cell_bad_input(name):
    call, error, pattern = CELL_CASES[name]
    _raises_like_nn(name, call, triton_lstm.LSTMCell, nn.LSTMCell, error, pattern)


TWO_FAULTS = {
    # name: (call taking torch.nn or triton_lstm, exception type, the fault nn names first)
    "integer input, 2-D hx": (lambda M: M.LSTM(4, 5)(torch.ones(3, 2, 4, dtype=torch.long), (torch.zeros(2, 5),) * 2),
                              RuntimeError, "hx and cx should also be 3-D"),
    "GRU integer input, 2-D hx": (lambda M: M.GRU(4, 5)(torch.ones(3, 2, 4, dtype=torch.long), torch.zeros(2, 5)),
                                  RuntimeError, "hx should also be 3-D"),
    "cell float64 input, 3-D hx": (lambda M: M.LSTMCell(4, 5)(torch.randn(2, 4).double(), (torch.zeros(1, 2, 5), torch.zeros(2, 5))),
                                   ValueError, r"hx\[0\] to be 1D or 2D"),
    "no steps, h0 shape": (lambda M: M.LSTM(4, 5)(torch.randn(0, 2, 4), (torch.zeros(1, 3, 5), torch.zeros(1, 2, 5))),
                           RuntimeError, r"Expected hidden\[0\] size"),
    "GRU no steps, float64 input": (lambda M: M.GRU(4, 5)(torch.randn(0, 2, 4).double()), ValueError, "RNN input dtype"),
    "bidirectional int, input width": (lambda M: M.LSTM(4, 5, bidirectional=1)(torch.randn(3, 2, 3)), RuntimeError,
                                       "input.size"),
    "stacked-tensor hx, h0 shape": (lambda M: M.LSTM(4, 5)(torch.randn(3, 2, 4), torch.zeros(2, 1, 3, 5)), RuntimeError,
                                    r"Expected hidden\[0\] size"),
}


@pytest.mark.parametrize("name", TWO_FAULTS)
def test_two_faults_named_in_nn_order(name):
    # With two things wrong, the error nn raises first: the state's dims before the input's dtype and
    # width, the sequence's length after everything else.
    call, error, pattern = TWO_FAULTS[name]
    with pytest.raises(error, match=pattern):
        call(nn)
    with pytest.raises(error, match=pattern):
        call(triton_lstm)
