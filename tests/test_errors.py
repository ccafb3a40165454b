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
    }


LSTM_CASES = _lstm_cases()


# Where nn's message misleads or comes from deep inside (a state's dtype: "get_mkldnn_dtype: unsupported
# data type"; an integer input; three states), ours differs; everywhere else it is nn's, word for word.
OWN_MESSAGES = {"integer input", "hx three states", "h0 dtype", "c0 dtype", "h dtype", "3-D hx", "hx tensor", "c0 None",
                "list input", "c None"}


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


def test_hx_not_a_tuple():
    # nn.LSTM fails with an IndexError deep inside here; ours says what is wrong, as a RuntimeError
    # (nn.LSTM's type for a wrong number of states).
    with pytest.raises(RuntimeError, match=r"hx must be a tuple \(h_0, c_0\).*Tensor"):
        triton_lstm.LSTM(4, 5)(torch.randn(3, 2, 4), torch.zeros(1, 2, 5))
    with pytest.raises(RuntimeError, match="hx must be a tuple"):
        triton_lstm.LSTM(4, 5)(torch.randn(3, 2, 4), (torch.zeros(1, 2, 5),))


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
}


@pytest.mark.parametrize("name", CELL_CASES)
def test_lstm_cell_bad_input(name):
    call, error, pattern = CELL_CASES[name]
    _raises_like_nn(name, call, triton_lstm.LSTMCell, nn.LSTMCell, error, pattern)
