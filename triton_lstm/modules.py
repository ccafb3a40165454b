"""``LSTM`` and ``LSTMCell``: drop-ins for ``torch.nn.LSTM`` and ``torch.nn.LSTMCell``.

``LSTM`` derives from ``nn.RNNBase`` exactly as ``nn.LSTM`` does, so the constructor, its validation,
the parameters (names, shapes, order), their initialization and RNG draws, ``state_dict`` and
``flatten_parameters`` are nn.LSTM's own. It does not derive from ``nn.LSTM`` itself: torch.compile
refuses to trace any instance of that class. ``LSTMCell`` derives from ``nn.LSTMCell``.
Only ``forward`` is ours: every layer and direction runs ``triton_lstm.ops.lstm_layer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from triton_lstm.ops import check_backward_options, lstm_layer


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    # is_autocast_enabled raises for device types without autocast (meta: shape inference, deferred init).
    # Dynamo in torch <= 2.11 cannot trace is_autocast_available (a graph break, an error under
    # fullgraph); a traced module runs on real devices, so there the check is skipped.
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)
    if available and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _check_state_tensor(name: str, value, like: Tensor, expected_shape: tuple[int, ...], cls: str) -> None:
    """h0 / c0 checks shared by LSTM and LSTMCell: type, shape, device and dtype against the input."""
    if not isinstance(value, Tensor):
        raise RuntimeError(f"{cls}: {name} must be a Tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(expected_shape):
        raise RuntimeError(f"{cls}: expected {name} of size {tuple(expected_shape)}, got {list(value.shape)}")
    if value.device != like.device:
        raise RuntimeError(f"{cls}: {name} is on {value.device} but the input is on {like.device}")
    if value.dtype != like.dtype:
        raise RuntimeError(
            f"{cls}: {name} has dtype {value.dtype} but the input has dtype {like.dtype}; "
            f"pass {name}.to({like.dtype})"
        )


def _check_input_tensor(x: Tensor, weight: Tensor, input_size: int, cls: str) -> None:
    """Input checks shared by LSTM and LSTMCell: dtype, device, feature size."""
    if not x.is_floating_point():
        raise ValueError(f"{cls}: expected a floating-point input, got dtype {x.dtype}")
    if x.dtype != weight.dtype and _autocast_dtype(x.device.type) is None:
        raise ValueError(
            f"{cls}: input dtype ({x.dtype}) does not match weight dtype ({weight.dtype}). "
            f"Convert input: input.to({weight.dtype}), or convert model: model.to({x.dtype})"
        )
    if x.device != weight.device:
        raise RuntimeError(f"{cls}: input is on {x.device} but the parameters are on {weight.device}")
    if x.shape[-1] != input_size:
        raise RuntimeError(
            f"input.size(-1) must be equal to input_size. Expected {input_size}, got {x.shape[-1]}"
        )


def _unpack_hx(hx, cls: str) -> tuple[Tensor, Tensor]:
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        got = f"a {type(hx).__name__} of length {len(hx)}" if isinstance(hx, (tuple, list)) else type(hx).__name__
        raise RuntimeError(f"{cls}: hx must be a tuple (h_0, c_0) of two tensors, got {got}")
    return hx[0], hx[1]


def _reverse_time(x: Tensor, reverse_index: Tensor | None) -> Tensor:
    """Reverses each sequence in time, within its own length when the batch is packed."""
    if reverse_index is None:
        return x.flip(0)
    return x.gather(0, reverse_index[:, :, None].expand_as(x))


def _reverse_index(lengths: Tensor, T: int) -> Tensor:
    # step t of sequence b reads step lengths[b]-1-t; steps past the end stay where they are.
    steps = torch.arange(T, device=lengths.device)[:, None]
    reversed_steps = lengths[None, :] - 1 - steps
    return torch.where(reversed_steps >= 0, reversed_steps, steps)


class LSTM(nn.RNNBase):
    """Drop-in replacement for :class:`torch.nn.LSTM` whose recurrence runs fused Triton kernels.

    Same arguments, parameters, ``state_dict``, inputs, outputs and errors as ``nn.LSTM``. Keyword-only
    extras: ``backward`` ("fused": the fused Triton backward where the kernels run; "reference": the
    plain-PyTorch backward) and ``recompute_interval`` (k > 0: save (h, c) every k steps only and
    recompute the gates in the backward; 0: save every activation). Both are plain attributes
    (``backward_mode``, ``recompute_interval``), outside the ``state_dict``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        backward: str = "fused",
        recompute_interval: int = 0,
    ) -> None:
        check_backward_options(backward, recompute_interval)
        super().__init__(
            "LSTM",
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            proj_size=proj_size,
            device=device,
            dtype=dtype,
        )
        self.backward_mode = backward
        self.recompute_interval = recompute_interval

    def _layer_weights(self, layer: int, direction: int):
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        w_ih = getattr(self, "weight_ih" + suffix)
        w_hh = getattr(self, "weight_hh" + suffix)
        b_ih = getattr(self, "bias_ih" + suffix) if self.bias else None
        b_hh = getattr(self, "bias_hh" + suffix) if self.bias else None
        w_hr = getattr(self, "weight_hr" + suffix) if self.proj_size > 0 else None
        return w_ih, w_hh, b_ih, b_hh, w_hr

    def forward(self, input, hx=None):
        num_directions = 2 if self.bidirectional else 1
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        weight = self.weight_ih_l0
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if data.dim() != 2:
                raise RuntimeError(f"LSTM: a PackedSequence's data must be 2-D, got {data.dim()}-D")
            _check_input_tensor(data, weight, self.input_size, "LSTM")
            # Run padded, each sequence to its own length (batch_sizes lives on the CPU: no device sync).
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
            is_batched = True
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"LSTM: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            _check_input_tensor(input, weight, self.input_size, "LSTM")
            is_batched = input.dim() == 3
            if not is_batched:
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
            lengths = sorted_indices = unsorted_indices = None
        T, B = x.shape[0], x.shape[1]
        if T == 0:
            raise RuntimeError("LSTM: expected a sequence length larger than 0, got an empty sequence")

        state_shape = (self.num_layers * num_directions, B)
        if hx is None:
            h0 = x.new_zeros(*state_shape, out_size)
            c0 = x.new_zeros(*state_shape, self.hidden_size)
        else:
            h0, c0 = _unpack_hx(hx, "LSTM")
            state_dims = 3 if is_batched else 2
            for name, value in (("h_0", h0), ("c_0", c0)):
                if isinstance(value, Tensor) and value.dim() != state_dims:
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    raise RuntimeError(
                        f"LSTM: for {kind} input, {name} should be {state_dims}-D, got {value.dim()}-D"
                    )
            if not is_batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            _check_state_tensor("h_0", h0, x, (*state_shape, out_size), "LSTM")
            _check_state_tensor("c_0", c0, x, (*state_shape, self.hidden_size), "LSTM")
            if sorted_indices is not None:
                h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)

        weights = [[self._layer_weights(layer, d) for d in range(num_directions)] for layer in range(self.num_layers)]
        autocast_dtype = _autocast_dtype(x.device.type)
        if autocast_dtype is not None:
            # As nn.LSTM under autocast: compute in the autocast dtype; the fp32 weights get fp32 gradients.
            x, h0, c0 = x.to(autocast_dtype), h0.to(autocast_dtype), c0.to(autocast_dtype)
            weights = [[[None if w is None else w.to(autocast_dtype) for w in ws] for ws in layer] for layer in weights]

        lengths_on_device = None if lengths is None else lengths.to(x.device, non_blocking=True)
        reverse_index = None
        if self.bidirectional and lengths_on_device is not None:
            reverse_index = _reverse_index(lengths_on_device, T)

        layer_input = x
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                index = layer * num_directions + direction
                layer_x = layer_input if direction == 0 else _reverse_time(layer_input, reverse_index)
                out, h, c = lstm_layer(
                    layer_x, h0[index], c0[index], *weights[layer][direction], lengths_on_device,
                    backward=getattr(self, "backward_mode", "fused"),  # getattr: modules pickled before the option
                    recompute_interval=getattr(self, "recompute_interval", 0),
                )
                outputs.append(out if direction == 0 else _reverse_time(out, reverse_index))
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        output, hidden = layer_input, (torch.stack(h_n), torch.stack(c_n))

        if packed:
            output = pack_padded_sequence(output, lengths).data
            if unsorted_indices is not None:
                hidden = (hidden[0].index_select(1, unsorted_indices), hidden[1].index_select(1, unsorted_indices))
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), hidden
        if not is_batched:
            return output.squeeze(1), (hidden[0].squeeze(1), hidden[1].squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, hidden


class LSTMCell(nn.LSTMCell):
    """Drop-in replacement for :class:`torch.nn.LSTMCell` running the fused Triton step kernel.

    Keyword-only extra: ``backward`` ("fused" or "reference"), as for ``LSTM``.
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *, backward: str = "fused") -> None:
        check_backward_options(backward, 0)
        super().__init__(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
        self.backward_mode = backward

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if not isinstance(input, Tensor):
            raise TypeError(f"LSTMCell: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        _check_input_tensor(input, self.weight_ih, self.input_size, "LSTMCell")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        B = x.shape[0]
        if hx is None:
            h0 = c0 = x.new_zeros(B, self.hidden_size)
        else:
            if not isinstance(hx, (tuple, list)):
                raise TypeError(f"LSTMCell: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
            h0, c0 = _unpack_hx(hx, "LSTMCell")
            for index, value in enumerate((h0, c0)):
                if isinstance(value, Tensor) and value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got {value.dim()}D instead")
            if not is_batched:
                h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)
            _check_state_tensor("h_0", h0, x, (B, self.hidden_size), "LSTMCell")
            _check_state_tensor("c_0", c0, x, (B, self.hidden_size), "LSTMCell")
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        autocast_dtype = _autocast_dtype(x.device.type)
        if autocast_dtype is not None:
            x, h0, c0 = x.to(autocast_dtype), h0.to(autocast_dtype), c0.to(autocast_dtype)
            weights = tuple(None if w is None else w.to(autocast_dtype) for w in weights)
        _, h, c = lstm_layer(x.unsqueeze(0), h0, c0, *weights, backward=getattr(self, "backward_mode", "fused"))
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c


def _replacement(module: nn.Module) -> nn.Module | None:
    """Our module holding ``module``'s very Parameter objects, or None if it is not an nn.LSTM / LSTMCell."""
    if type(module) is nn.LSTM:
        with torch.device("meta"):
            new = LSTM(
                module.input_size,
                module.hidden_size,
                num_layers=module.num_layers,
                bias=module.bias,
                batch_first=module.batch_first,
                dropout=module.dropout,
                bidirectional=module.bidirectional,
                proj_size=module.proj_size,
            )
    elif type(module) is nn.LSTMCell:
        with torch.device("meta"):
            new = LSTMCell(module.input_size, module.hidden_size, bias=module.bias)
    else:
        return None
    # assign=True hands over the Parameter objects themselves: device, dtype, requires_grad and any
    # optimizer built on them are kept.
    new.load_state_dict(module.state_dict(keep_vars=True), strict=True, assign=True)
    new.train(module.training)
    return new


def convert(model: nn.Module) -> nn.Module:
    """Replaces every ``nn.LSTM`` / ``nn.LSTMCell`` inside ``model`` with ours, keeping the weights.

    Returns the model (a new module when ``model`` itself is an nn.LSTM / LSTMCell).
    """
    replacement = _replacement(model)
    if replacement is not None:
        return replacement
    for name, child in list(model.named_children()):
        new_child = convert(child)
        if new_child is not child:
            setattr(model, name, new_child)
    return model


