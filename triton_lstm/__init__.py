"""triton_lstm: a Triton fused-kernel LSTM, a drop-in replacement for torch.nn.LSTM."""

from triton_lstm.modules import LSTM, LSTMCell, convert
from triton_lstm.ops import lstm_layer
from triton_lstm.reference import lstm_recurrence_reference

__version__ = "0.1.0"
__all__ = ["LSTM", "LSTMCell", "convert", "lstm_layer", "lstm_recurrence_reference", "__version__"]
