"""triton_lstm: a Triton fused-kernel LSTM, a drop-in replacement for torch.nn.LSTM."""

from triton_lstm.modules import LSTM, LSTMCell, convert
from triton_lstm.ops import lstm_layer
from triton_lstm.reference import lstm_recurrence_reference

# What torch.load(..., weights_only=True) must be allowed to rebuild for a pickled model holding our
# modules: the classes themselves (their state is plain tensors, Parameters, dicts and lists). Use it as
# ``with torch.serialization.safe_globals([*triton_lstm.SAFE_GLOBALS, <your own classes>]): torch.load(...)``.
SAFE_GLOBALS = [LSTM, LSTMCell]

__version__ = "0.1.0"
__all__ = ["LSTM", "LSTMCell", "SAFE_GLOBALS", "convert", "lstm_layer", "lstm_recurrence_reference", "__version__"]
