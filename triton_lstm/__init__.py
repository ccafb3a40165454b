"""triton_lstm: a Triton fused-kernel LSTM (and GRU), drop-in replacements for torch.nn.LSTM (and nn.GRU)."""

from triton_lstm.convert import convert
from triton_lstm.gru_modules import GRU, GRUCell
from triton_lstm.gru_ops import gru_layer
from triton_lstm.modules import LSTM, LSTMCell
from triton_lstm.ops import lstm_layer
from triton_lstm.reference import gru_recurrence_reference, lstm_recurrence_reference

# What torch.load(..., weights_only=True) must be allowed to rebuild for a pickled model holding our
# modules: the classes themselves (their state is plain tensors, Parameters, dicts and lists). Use it as
# ``with torch.serialization.safe_globals([*triton_lstm.SAFE_GLOBALS, <your own classes>]): torch.load(...)``.
SAFE_GLOBALS = [LSTM, LSTMCell, GRU, GRUCell]

__version__ = "0.1.0"
__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "SAFE_GLOBALS", "convert", "gru_layer", "gru_recurrence_reference",
           "lstm_layer", "lstm_recurrence_reference", "__version__"]
