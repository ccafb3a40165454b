"""What the LSTM and GRU modules (``modules.py``, ``gru_modules.py``) share about their inputs: the checks
nn.LSTM / nn.GRU and their cells make of the input, the state and the parameters (their exception types,
and their words where code may match on them), the input as a time-major tensor, the autocast dtype in
force, whether ATen's own recurrence runs, the refusals of TorchScript, dropout between layers, and the
repr of our options."""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from triton_lstm.ops import exporting_to_onnx, kernels_run_on


def _autocast_dtype_on(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force on ``device_type``, or None where autocast is off there."""
    # is_autocast_enabled raises for device types without autocast (meta: shape inference, deferred init).
    # Dynamo in torch <= 2.11 cannot trace is_autocast_available (a graph break, an error under
    # fullgraph); a traced module runs on real devices, so there the check is skipped.
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)
    if available and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def active_autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype that applies to ``x``: the one in force on its device, or None where autocast is
    off or leaves ``x`` as it is: complex and float64 tensors (autocast casts the other floating-point
    ones; a float64 model keeps float64 under autocast, as nn's does)."""
    if x.is_complex() or x.dtype == torch.float64:
        return None
    return _autocast_dtype_on(x.device.type)


def autocast_casts(tensor: Tensor, like: Tensor) -> bool:
    """Whether autocast, in force for ``like`` (the input), casts ``tensor`` (a weight, a state) to the same
    dtype, so that their dtypes may differ: a floating-point tensor other than float64."""
    return tensor.is_floating_point() and tensor.dtype != torch.float64 and active_autocast_dtype(like) is not None


NOT_SCRIPTABLE = (
    "triton_lstm.{cls} cannot be compiled by torch.jit.script: its recurrence runs Triton kernels, which "
    "TorchScript cannot call. Use torch.compile (fullgraph=True works) or torch.export instead; for a "
    "TorchScript deployment, load its state_dict into a torch.nn.{cls} (the same parameters) and script that."
)


NOT_TRACEABLE = (
    "triton_lstm.{cls} cannot be traced by torch.jit.trace where its Triton kernels run: the trace would hold "
    "Python custom ops that torch.jit.save cannot write, and trace's check, rerun without gradients, takes the "
    "inference forward's op. Use torch.export or torch.compile instead; for a TorchScript deployment, load its "
    "state_dict into a torch.nn.{cls} (the same parameters) and trace that."
)


def refuse_jit_trace(cls: str) -> None:
    """A clear error under torch.jit.trace on the kernels' path (ATen's path traces as nn's does, and so does
    the plain-PyTorch recurrence that an ONNX export runs: ``ops.traces_plain_pytorch``)."""
    if torch.jit.is_tracing() and not exporting_to_onnx():
        raise RuntimeError(NOT_TRACEABLE.format(cls=cls))


def aten_without_autocast(x: Tensor, autocast_dtype: torch.dtype | None):
    """The context ATen's recurrence runs in on our ATen path: autocast off on ``x``'s device where it is on
    (the inputs and weights are already in ``autocast_dtype``), else nothing: entering and leaving an
    autocast context costs ~3-4 µs of a call's host time (benchmarks/NOTES.md, "Host time per call")."""
    return torch.autocast(x.device.type, enabled=False) if autocast_dtype is not None else contextlib.nullcontext()


def runs_aten(x: Tensor) -> bool:
    """Whether the modules run ATen's own LSTM, as nn.LSTM does: on a device where our kernels do not run
    (``ops.kernels_run_on``: the CPU without Triton's interpreter, where the reference would be a Python
    loop; a GPU older than Ampere or an AMD one; no triton; MPS, XPU), except inside torch.compile and
    torch.func transforms, where our ops keep one graph node per recurrence and the reference respectively,
    and on "meta" (shape inference takes the kernels' path, as it would plan it); for complex inputs and
    under an ONNX export everywhere. A peephole LSTM, which ATen lacks, checks ``refuse_complex_peepholes``."""
    if x.is_complex():
        return True  # on every device: our kernels and reference are real-valued, ATen's recurrence is not
    if exporting_to_onnx():
        return True  # ATen's LSTM / GRU is what the ONNX exporters translate (ONNX's own ops); ours they cannot
    if x.device.type == "meta" or torch.compiler.is_compiling() or kernels_run_on(x.device):
        return False
    return not torch._C._are_functorch_transforms_active()


def refuse_complex_peepholes(x: Tensor, cls: str) -> None:
    """A peephole LSTM runs our kernels or reference, both real-valued, where nn's recurrences (and so
    ours without peepholes, ``runs_aten``) take complex inputs."""
    if x.is_complex():
        raise RuntimeError(f"{cls}: peephole=True takes real inputs only, got {x.dtype} (without peepholes "
                           "complex inputs run ATen's recurrence, as nn's do)")


# PyTorch's names of the dtypes, as in its own "mat1 and mat2 must have the same dtype" message.
_SCALAR_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16"}


def check_state_tensor(name: str, value, like: Tensor, expected_shape: tuple[int, ...], cls: str, nn_name: str) -> None:
    """h0 / c0 checks shared by LSTM and LSTMCell: type, shape, device and dtype against the input.
    ``nn_name`` is how nn.LSTM's messages call the state (hidden[0], hidden[1])."""
    if not isinstance(value, Tensor):
        # nn fails on ``value.dim()`` with an AttributeError: the same type, in clear words.
        raise AttributeError(f"{cls}: {name} must be a Tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(expected_shape):
        # nn.LSTM's own words, so that code matching on them keeps working.
        raise RuntimeError(f"Expected {nn_name} size {tuple(expected_shape)}, got {list(value.shape)}")
    if value.device != like.device:
        raise RuntimeError(f"{cls}: {name} is on {value.device} but the input is on {like.device}")
    # Under autocast nn.LSTM casts input and state alike, so a state returned by an earlier autocast call
    # (already in the autocast dtype) goes with a float32 input. (The autocast query, ~1.5 µs, only where
    # the dtypes differ.)
    if value.dtype != like.dtype and not autocast_casts(value, like):
        raise RuntimeError(
            f"{cls}: {name} has dtype {value.dtype} but the input has dtype {like.dtype}; "
            f"pass {name}.to({like.dtype})"
        )


def check_cell_state(index: int, value, x: Tensor, hidden_size: int, cls: str = "LSTMCell") -> None:
    """nn.LSTMCell's / nn.GRUCell's hx checks, in their words: hidden size, then batch size; then ours
    (device, dtype)."""
    name = f"hidden{index}"
    if not isinstance(value, Tensor):
        raise AttributeError(f"{cls}: hx[{index}] must be a Tensor, got {type(value).__name__}")  # as nn's .dim()
    if value.shape[-1] != hidden_size:
        raise RuntimeError(f"{name} has inconsistent hidden_size: got {value.shape[-1]}, expected {hidden_size}")
    if value.shape[0] != x.shape[0]:
        raise RuntimeError(f"Input batch size {x.shape[0]} doesn't match {name} batch size {value.shape[0]}")
    check_state_tensor(("h_0", "c_0")[index], value, x, (x.shape[0], hidden_size), cls, name)


def check_input_tensor(x: Tensor, weight: Tensor, input_size: int, cls: str) -> None:
    """Input checks shared by LSTM and LSTMCell: dtype, device, feature size, with nn's exception types
    and, where nn's words are clear, nn's words."""
    if weight is None:  # set to None after construction: nn.LSTM fails on its dtype, the cells' ops on its type
        error = TypeError if cls.endswith("Cell") else AttributeError
        raise error(f"{cls}: its first input weight (weight_ih) is None, expected a Tensor")
    if not (x.is_floating_point() or x.is_complex()):  # (complex: ATen's recurrence, as nn's; runs_aten)
        # nn.LSTM checks the dtype (ValueError); its cells fail in their matrix product (RuntimeError).
        error = RuntimeError if cls.endswith("Cell") else ValueError
        raise error(f"{cls}: expected a floating-point input, got dtype {x.dtype}")
    if x.dtype != weight.dtype and not autocast_casts(weight, x):
        advice = f"Convert input: input.to({weight.dtype}), or convert model: model.to({x.dtype})"
        if _autocast_dtype_on(x.device.type) is not None:
            # Under autocast nn skips its dtype check, and its product fails on the float64 side autocast left.
            raise RuntimeError(f"{cls}: input dtype {x.dtype} and weight dtype {weight.dtype} under autocast, which "
                               f"leaves float64 as it is. {advice}")
        if cls.endswith("Cell"):
            # nn.LSTMCell / nn.GRUCell fail in their matrix product, with a RuntimeError naming mat1 and mat2.
            raise RuntimeError(
                f"mat1 and mat2 must have the same dtype, but got {_SCALAR_NAMES.get(x.dtype, x.dtype)} and "
                f"{_SCALAR_NAMES.get(weight.dtype, weight.dtype)} ({cls}: input dtype {x.dtype}, weight dtype "
                f"{weight.dtype}. {advice})"
            )
        raise ValueError(f"RNN input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). {advice}")
    if x.device != weight.device:
        raise RuntimeError(f"{cls}: input is on {x.device} but the parameters are on {weight.device}")
    if x.shape[-1] != input_size:
        if cls.endswith("Cell"):
            raise RuntimeError(f"input has inconsistent input_size: got {x.shape[-1]} expected {input_size}")
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {input_size}, got {x.shape[-1]}")


_WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr", "weight_ch")


def check_layer_weights(module: nn.RNNBase, weights, peepholes, x: Tensor, gates: int) -> None:
    """The parameters an RNN module's forward gathered (``weights[layer][direction]``: w_ih, w_hh, b_ih,
    b_hh[, w_hr], None where absent; ``peepholes`` likewise, or None without them) still fit the module. A
    parameter reassigned after construction (``module.weight_hh_l0 = nn.Parameter(...)``) may not: nn's
    recurrences refuse a wrong shape, dtype or device with a RuntimeError, where our kernels would read
    past the end of a short weight. Comparisons only (no autocast query, no string) unless one fails."""
    H, out = module.hidden_size, module.proj_size or module.hidden_size
    directions = 2 if module.bidirectional else 1
    device, dtype = x.get_device(), x.dtype
    # Which of the names' tensors the module has (a None there was assigned after construction).
    required = (True, True, module.bias, module.bias, module.proj_size > 0, True)
    for layer, per_direction in enumerate(weights):
        width = module.input_size if layer == 0 else directions * out
        shapes = ((gates * H, width), (gates * H, out), (gates * H,), (gates * H,), (module.proj_size, H), (3 * H,))
        for direction, tensors in enumerate(per_direction):
            if peepholes is not None:  # (an LSTM's five, then its peepholes: the names' order)
                tensors = (*tensors, peepholes[layer][direction])
            for index, (tensor, shape) in enumerate(zip(tensors, shapes)):
                if tensor is None:
                    if required[index]:
                        _refuse_missing(module, _WEIGHT_NAMES[index], layer, direction, shape)
                elif tensor.shape != shape or tensor.get_device() != device or tensor.dtype != dtype:
                    _refuse_weight(module, _WEIGHT_NAMES[index], layer, direction, tensor, shape, x)


def check_cell_weights(cell: nn.Module, weights, w_ch, x: Tensor, gates: int) -> None:
    """``check_layer_weights`` for a cell: ``weights`` (w_ih, w_hh, b_ih, b_hh), ``w_ch`` or None."""
    H = cell.hidden_size
    shapes = ((gates * H, cell.input_size), (gates * H, H), (gates * H,), (gates * H,), (3 * H,))
    # A bias set to None runs as no bias, as nn's cell ops take it; a weight must be there.
    required = (True, True, False, False, getattr(cell, "peephole", False))
    device, dtype = x.get_device(), x.dtype
    for name, tensor, shape, needed in zip((*_WEIGHT_NAMES[:4], _WEIGHT_NAMES[5]), (*weights, w_ch), shapes, required):
        if tensor is None:
            if needed:
                _refuse_missing(cell, name, None, 0, shape)
        elif tensor.shape != shape or tensor.get_device() != device or tensor.dtype != dtype:
            _refuse_weight(cell, name, None, 0, tensor, shape, x)


def _refuse_missing(module: nn.Module, name: str, layer: int | None, direction: int, shape: tuple[int, ...]) -> None:
    """Raises for a parameter the module has, set to None after construction: nn's recurrences refuse it
    with a TypeError (an element of their weight list is not a Tensor), where our kernels would run without
    it (a bias) or read a placeholder."""
    if layer is not None:
        name += f"_l{layer}" + ("_reverse" if direction else "")
    raise TypeError(f"{type(module).__name__}: {name} is None, expected a Tensor of shape {shape}")


def _refuse_weight(module: nn.Module, name: str, layer: int | None, direction: int, weight: Tensor,
                   shape: tuple[int, ...], x: Tensor) -> None:
    """Raises for a parameter that does not fit, but one whose dtype alone differs under autocast (which
    casts them all but float64 ones)."""
    if layer is not None:
        name += f"_l{layer}" + ("_reverse" if direction else "")
    cls = type(module).__name__
    if weight.shape != shape:
        raise RuntimeError(f"{cls}: {name} has shape {tuple(weight.shape)}, expected {shape} for this module")
    if weight.device != x.device:
        raise RuntimeError(f"{cls}: {name} is on {weight.device} but the input is on {x.device}")
    if not autocast_casts(weight, x):
        raise RuntimeError(f"{cls}: {name} has dtype {weight.dtype} but the input and weight_ih have {x.dtype}")


class SequenceInput(NamedTuple):
    x: Tensor  # (T, B, I), time-major
    packed: bool
    data: Tensor | None  # a PackedSequence's own data
    lengths: Tensor | None  # on the CPU, as pad_packed_sequence gives them
    batch_sizes: Tensor | None
    sorted_indices: Tensor | None
    unsorted_indices: Tensor | None
    is_batched: bool


def check_batch_sizes(batch_sizes, rows: int, cls: str) -> None:
    """A PackedSequence's ``batch_sizes`` as pack_padded_sequence makes them (a 1-D int64 CPU tensor of
    positive, non-increasing sizes summing to the data's rows), checked before pad_packed_sequence reads
    them: a negative size made it free an invalid pointer (the process aborted). nn's own exception types
    for these (it checks nothing and fails where it trips): TypeError for a tensor not 1-D or not of
    integers, IndexError for an empty one, RuntimeError for the rest. Reads the CPU tensor: no device sync."""
    if not isinstance(batch_sizes, Tensor) or batch_sizes.dim() != 1 or batch_sizes.is_floating_point():
        raise TypeError(f"{cls}: a PackedSequence's batch_sizes must be a 1-D int64 tensor, got "
                        f"{batch_sizes!r:.60}")
    if batch_sizes.numel() == 0:
        raise IndexError(f"{cls}: a PackedSequence's batch_sizes is empty")
    if batch_sizes.dtype != torch.int64 or batch_sizes.device.type != "cpu":
        raise RuntimeError(f"{cls}: a PackedSequence's batch_sizes must be int64 on the CPU (as "
                           f"pack_padded_sequence makes them), got {batch_sizes.dtype} on {batch_sizes.device}")
    sizes = batch_sizes.tolist()
    if sizes[-1] < 1 or any(later > earlier for earlier, later in zip(sizes, sizes[1:])) or sum(sizes) != rows:
        raise RuntimeError(f"{cls}: a PackedSequence's batch_sizes must be positive, non-increasing and sum to "
                           f"its data's {rows} rows, got {sizes if len(sizes) <= 8 else str(sizes[:8])[:-1] + ', ...]'}")


def time_major_input(input, module: nn.RNNBase, cls: str) -> SequenceInput:
    """The checks nn.LSTM / nn.GRU make of their input's form (their exception types, their words where
    clear) and the input as a time-major (T, B, I) tensor: a PackedSequence padded (each sequence then runs
    to its own length), an unbatched one given a batch of one. Its dtype, device and width are checked
    after the state's dims, as nn checks them (``check_input_tensor`` on the result), and what ATen's
    recurrence checks last (``check_recurrence_arguments``): with two faults, the one nn names first."""
    packed = isinstance(input, PackedSequence)
    if packed:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        if data.dim() != 2:
            raise RuntimeError(f"{cls}: a PackedSequence's data must be 2-D, got {data.dim()}-D")
        check_batch_sizes(batch_sizes, data.shape[0], cls)
        # Run padded, each sequence to its own length (batch_sizes lives on the CPU: no device sync).
        x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
        is_batched = True
    else:
        if not isinstance(input, Tensor):
            # nn fails on ``input.dim()`` with an AttributeError: the same type, in clear words.
            raise AttributeError(f"{cls}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{cls}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        if not is_batched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if module.batch_first else input
        data = lengths = batch_sizes = sorted_indices = unsorted_indices = None
    return SequenceInput(x, packed, data, lengths, batch_sizes, sorted_indices, unsorted_indices, is_batched)


def hx_pair_expected(hx, cls: str) -> str:
    """The message for an LSTM's ``hx`` that is not a pair of tensors (formatted only when raising)."""
    got = f"a {type(hx).__name__} of length {len(hx)}" if isinstance(hx, (tuple, list)) else type(hx).__name__
    return f"{cls}: hx must be a tuple (h_0, c_0) of two tensors, got {got}"


def check_recurrence_arguments(x: Tensor, module: nn.RNNBase, cls: str, lstm_hx=None) -> None:
    """What ATen's recurrence checks of its arguments, after nn's own checks and in its order, which the
    kernels' path does not reach: its argument parser's types (an LSTM's ``hx`` a tuple or list, then
    ``bidirectional`` a bool and ``num_layers`` an int: nn checks bias and batch_first when built, these
    only here), then the number of states and a sequence of no steps (RuntimeError)."""
    if lstm_hx is not None and not isinstance(lstm_hx, (tuple, list)):
        raise TypeError(hx_pair_expected(lstm_hx, cls))
    if type(module.bidirectional) is not bool or isinstance(module.num_layers, bool):
        raise TypeError(f"{cls}: bidirectional must be a bool and num_layers an int, got "
                        f"{module.bidirectional!r} and {module.num_layers!r}")
    if lstm_hx is not None and len(lstm_hx) != 2:
        raise RuntimeError(hx_pair_expected(lstm_hx, cls))
    if x.shape[0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")


def dropout_between_layers(module: nn.RNNBase, layer_input: Tensor, layer: int) -> Tensor:
    """nn.LSTM's / nn.GRU's dropout on the output of every layer but the last, in training."""
    if module.dropout > 0 and module.training and layer < module.num_layers - 1:
        return F.dropout(layer_input, p=module.dropout, training=True)
    return layer_input


def options_repr(module: nn.Module) -> str:
    """Our keyword options that differ from their defaults, for the modules' ``extra_repr`` (getattr: modules
    pickled before an option existed, and the GRU's, which has only ``backward``)."""
    text = ""
    if getattr(module, "backward_mode", "fused") != "fused":
        text += f", backward={module.backward_mode!r}"
    if getattr(module, "recompute_interval", 0):
        text += f", recompute_interval={module.recompute_interval}"
    if getattr(module, "peephole", False):
        text += ", peephole=True"
    return text
