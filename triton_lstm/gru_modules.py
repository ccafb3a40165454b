"""``GRU`` and ``GRUCell``: drop-ins for ``torch.nn.GRU`` and ``torch.nn.GRUCell``, as ``modules.py``'s
LSTM and LSTMCell are for theirs.

``GRU`` derives from ``nn.RNNBase`` in mode "GRU" exactly as ``nn.GRU`` does (so the constructor, its
validation, the parameters, their initialization and RNG draws and ``state_dict`` are nn.GRU's own);
``GRUCell`` derives from ``nn.GRUCell``. Only ``forward`` is ours: every layer and direction runs
``triton_lstm.gru_ops.gru_layer`` (the LSTM's fused kernels with the GRU cell), or all layers at once
(``gru_stack.py``), or both directions of a bidirectional layer at once (``gru_bidirectional.py``), except
on the CPU without Triton's interpreter, where ATen's GRU runs exactly as in nn.GRU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from triton_lstm.bidirectional import bidirectional_plan, reverse_index, reverse_time
from triton_lstm.gru_bidirectional import gru_bidirectional
from triton_lstm.gru_ops import gru_layer
from triton_lstm.gru_stack import gru_stack
from triton_lstm.module_inputs import (
    NOT_SCRIPTABLE,
    active_autocast_dtype,
    aten_without_autocast,
    check_cell_state,
    check_cell_weights,
    check_input_tensor,
    check_layer_weights,
    check_recurrence_arguments,
    check_state_tensor,
    dropout_between_layers,
    options_repr,
    refuse_jit_trace,
    runs_aten,
    time_major_input,
)
from triton_lstm.ops import check_backward_options
from triton_lstm.stack import stack_plan


class GRU(nn.RNNBase):
    r"""A multi-layer GRU, a drop-in replacement for :class:`torch.nn.GRU` whose recurrence runs the fused
    Triton kernels of :class:`triton_lstm.LSTM` with the GRU cell. PyTorch's equations, gates in its
    order (r, z, n)::

        r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
        z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))
        h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t-1}

    Everything nn.GRU takes, returns and raises is the same: arguments, parameter names, shapes, order
    and initialization (the same random draws), ``state_dict`` (load either into the other), inputs
    (``input``, ``h_0``; packed, batch_first, unbatched), outputs (``output``, ``h_n``) and exception types.
    Where it runs: the Triton kernels for CUDA tensors (fp32, fp16, bf16; one persistent launch per
    stack or per bidirectional layer, as :class:`triton_lstm.LSTM`, the fused backward likewise); on the CPU, ATen's GRU as nn.GRU does (the kernels through
    Triton's interpreter when ``TRITON_INTERPRET=1``); float64 runs the plain-PyTorch reference.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype:
            as :class:`torch.nn.GRU` (``proj_size`` > 0 raises nn.GRU's ValueError).
        backward (keyword only, ours): "fused" (default): the fused Triton backward where the kernels
            run; "reference": the plain-PyTorch backward.

    Example::

        >>> gru = triton_lstm.GRU(10, 20, num_layers=2).cuda()
        >>> output, h_n = gru(torch.randn(5, 3, 10, device="cuda"))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, backward: str = "fused") -> None:
        check_backward_options(backward, 0)
        # proj_size: nn.GRU takes RNNBase's arguments in RNNBase's order and refuses this one as a keyword, in
        # these words, whatever its value (here 0, its default, is let through: a signature cannot tell).
        if type(proj_size) is not int or proj_size != 0:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", input_size, hidden_size, num_layers=num_layers, bias=bias, batch_first=batch_first,
                         dropout=dropout, bidirectional=bidirectional, proj_size=proj_size, device=device, dtype=dtype)
        self.backward_mode = backward

    def _layer_weights(self, layer: int, direction: int):
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        biases = (getattr(self, "bias_ih" + suffix), getattr(self, "bias_hh" + suffix)) if self.bias else (None, None)
        return (getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix), *biases)

    def forward(self, input, hx=None):
        num_directions = 2 if self.bidirectional else 1
        x, packed, data, lengths, batch_sizes, sorted_indices, unsorted_indices, is_batched = time_major_input(
            input, self, "GRU")
        B = x.shape[1]
        state_shape = (self.num_layers * num_directions, B, self.hidden_size)
        if hx is None:
            h0 = x.new_zeros(state_shape)
        else:
            if not isinstance(hx, Tensor):
                # nn.GRU fails on ``hx.dim()`` with an AttributeError: the same type, in clear words.
                raise AttributeError(f"GRU: hx must be a Tensor (h_0), got {type(hx).__name__}")
            state_dims = 3 if is_batched else 2
            if hx.dim() != state_dims:
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                raise RuntimeError(f"For {kind} input, hx should also be {state_dims}-D but got {hx.dim()}-D tensor")
        check_input_tensor(x, self.weight_ih_l0, self.input_size, "GRU")  # after the state's dims, as nn.GRU
        if hx is not None:
            h0 = hx if is_batched else hx.unsqueeze(1)
            check_state_tensor("h_0", h0, x, state_shape, "GRU", "hidden")
            if sorted_indices is not None:
                h0 = h0.index_select(1, sorted_indices)
        check_recurrence_arguments(x, self, "GRU")

        weights = [[self._layer_weights(layer, d) for d in range(num_directions)] for layer in range(self.num_layers)]
        check_layer_weights(self, weights, None, x, 3)
        autocast_dtype = active_autocast_dtype(x)
        if autocast_dtype is not None:
            # As nn.GRU under autocast: compute in the autocast dtype; the fp32 weights get fp32 gradients.
            x, h0 = x.to(autocast_dtype), h0.to(autocast_dtype)
            weights = [[[None if w is None else w.to(autocast_dtype) for w in ws] for ws in layer] for layer in weights]

        if runs_aten(x):
            # Where our kernels do not run (runs_aten), or a complex input: the very ATen GRU that nn.GRU runs.
            flat_weights = [w for layer in weights for direction in layer for w in direction if w is not None]
            with aten_without_autocast(x, autocast_dtype):
                if packed:
                    output, h_n = torch._VF.gru(data.to(x.dtype), batch_sizes, h0, flat_weights, self.bias,
                                                self.num_layers, float(self.dropout), self.training, self.bidirectional)
                    return self._finish_packed(output, h_n, batch_sizes, sorted_indices, unsorted_indices)
                output, h_n = torch._VF.gru(x, h0, flat_weights, self.bias, self.num_layers, float(self.dropout),
                                            self.training, self.bidirectional, False)
            return self._finish(output, h_n, is_batched)

        refuse_jit_trace("GRU")
        lengths_on_device = None if lengths is None else lengths.to(x.device, non_blocking=True)
        backward = getattr(self, "backward_mode", "fused")
        if self._runs_as_stack(x):
            # All layers in one persistent launch each way (a wavefront across layers; triton_lstm/gru_stack.py).
            output, h_n = gru_stack(x, h0, [weights[layer][0] for layer in range(self.num_layers)], lengths_on_device,
                                    backward=backward, dropout=float(self.dropout) if self.training else 0.0)
            if packed:
                return self._finish_packed(pack_padded_sequence(output, lengths).data, h_n, batch_sizes,
                                           sorted_indices, unsorted_indices)
            return self._finish(output, h_n, is_batched)
        both_at_once = num_directions == 2 and bidirectional_plan(x, self.hidden_size, gates=3) is not None
        time_reversal = None  # the reverse direction on its own: each sequence reversed within its own length
        if num_directions == 2 and not both_at_once and lengths_on_device is not None:
            time_reversal = reverse_index(lengths_on_device, x.shape[0])
        layer_input, h_n = x, []
        for layer in range(self.num_layers):
            if both_at_once:
                # Both directions in one persistent launch each way (triton_lstm/gru_bidirectional.py).
                layer_input, h = gru_bidirectional(layer_input, h0[2 * layer:2 * layer + 2], *weights[layer],
                                                   lengths_on_device, backward=backward)
                h_n += [h[0], h[1]]
                layer_input = dropout_between_layers(self, layer_input, layer)
                continue
            outputs = []
            for direction in range(num_directions):
                index = layer * num_directions + direction
                layer_x = layer_input if direction == 0 else reverse_time(layer_input, time_reversal)
                out, h = gru_layer(layer_x, h0[index], *weights[layer][direction], lengths_on_device, backward=backward)
                outputs.append(out if direction == 0 else reverse_time(out, time_reversal))
                h_n.append(h)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            layer_input = dropout_between_layers(self, layer_input, layer)
        h_n = torch.stack(h_n)
        if packed:
            return self._finish_packed(pack_padded_sequence(layer_input, lengths).data, h_n, batch_sizes,
                                       sorted_indices, unsorted_indices)
        return self._finish(layer_input, h_n, is_batched)

    def _runs_as_stack(self, x: Tensor) -> bool:
        """Whether this forward runs all layers in one launch (dropout between layers included: in the
        kernels): unidirectional, and a stack plan for the input's device."""
        if self.num_layers < 2 or self.bidirectional:
            return False
        return stack_plan(x, self.hidden_size, self.num_layers) is not None

    @staticmethod
    def _finish_packed(data, h_n, batch_sizes, sorted_indices, unsorted_indices):
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
        return PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices), h_n

    def _finish(self, output, h_n, is_batched: bool):
        """The time-major (T, B, ·) output and h_n in the layout of the input."""
        if not is_batched:
            return output.squeeze(1), h_n.squeeze(1)
        return (output.transpose(0, 1) if self.batch_first else output), h_n

    def extra_repr(self) -> str:
        return super().extra_repr() + options_repr(self)

    def __prepare_scriptable__(self):
        raise RuntimeError(NOT_SCRIPTABLE.format(cls="GRU"))


class GRUCell(nn.GRUCell):
    r"""One GRU step, a drop-in replacement for :class:`torch.nn.GRUCell` running the fused Triton step
    (the equations of :class:`GRU` for one time step). Same arguments, parameters, ``state_dict``, inputs,
    outputs and errors as nn.GRUCell; on the CPU nn.GRUCell's own ATen cell (the kernels through Triton's
    interpreter with ``TRITON_INTERPRET=1``).

    Args:
        input_size, hidden_size, bias, device, dtype: as :class:`torch.nn.GRUCell`.
        backward (keyword only, ours): "fused" (default) or "reference", as for :class:`GRU`.

    Inputs: input (N, input_size) or (input_size); hx (N, hidden_size) or (hidden_size), zeros when not
    given. Output: h' of hx's shape.

    Example::

        >>> cell = triton_lstm.GRUCell(10, 20).cuda()
        >>> h = torch.zeros(3, 20, device="cuda")
        >>> for x_t in torch.randn(6, 3, 10, device="cuda"):
        ...     h = cell(x_t, h)
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backward: str = "fused") -> None:
        check_backward_options(backward, 0)
        super().__init__(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
        self.backward_mode = backward

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if not isinstance(input, Tensor):
            raise AttributeError(f"GRUCell: input must be a Tensor, got {type(input).__name__}")  # as nn's .dim()
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if isinstance(hx, Tensor) and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        check_input_tensor(input, self.weight_ih, self.input_size, "GRUCell")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        if hx is None:
            h0 = x.new_zeros(x.shape[0], self.hidden_size)
        else:
            h0 = hx if is_batched or not isinstance(hx, Tensor) else hx.unsqueeze(0)
            check_cell_state(0, h0, x, self.hidden_size, "GRUCell")
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        check_cell_weights(self, weights, None, x, 3)
        autocast_dtype = active_autocast_dtype(x)
        if autocast_dtype is not None:
            x, h0 = x.to(autocast_dtype), h0.to(autocast_dtype)
            weights = tuple(None if w is None else w.to(autocast_dtype) for w in weights)
        if runs_aten(x):
            with aten_without_autocast(x, autocast_dtype):
                h = torch._VF.gru_cell(x, h0, *weights)
        else:
            refuse_jit_trace("GRUCell")
            _, h = gru_layer(x.unsqueeze(0), h0, *weights, backward=getattr(self, "backward_mode", "fused"))
        return h if is_batched else h.squeeze(0)

    def extra_repr(self) -> str:
        return super().extra_repr() + options_repr(self)

    def __prepare_scriptable__(self):
        raise RuntimeError(NOT_SCRIPTABLE.format(cls="GRUCell"))
