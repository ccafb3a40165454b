"""``LSTM`` and ``LSTMCell``: drop-ins for ``torch.nn.LSTM`` and ``torch.nn.LSTMCell``.

``LSTM`` derives from ``nn.RNNBase`` exactly as ``nn.LSTM`` does, so the constructor, its validation,
the parameters (names, shapes, order), their initialization and RNG draws, ``state_dict`` and
``flatten_parameters`` are nn.LSTM's own. It does not derive from ``nn.LSTM`` itself: torch.compile
refuses to trace any instance of that class. ``LSTMCell`` derives from ``nn.LSTMCell``.
Only ``forward`` is ours: every layer and direction runs ``triton_lstm.ops.lstm_layer``, except on the
CPU without Triton's interpreter, where the modules run ATen's LSTM exactly as nn.LSTM does. The GRU's
modules are in ``gru_modules.py``, the input and state checks both share in ``module_inputs.py``;
``convert`` (``convert.py``) swaps nn's for ours.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from triton_lstm.bidirectional import bidirectional_plan, lstm_bidirectional, reverse_index, reverse_time
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
    hx_pair_expected,
    options_repr,
    refuse_complex_peepholes,
    refuse_jit_trace,
    runs_aten,
    time_major_input,
)
from triton_lstm.ops import check_backward_options, lstm_layer
from triton_lstm.stack import lstm_stack, stack_plan


def _check_peephole(peephole, proj_size: int, recompute_interval: int) -> None:
    """Validates ``peephole=`` (ValueError naming the argument), as nn validates its own arguments."""
    if not isinstance(peephole, bool):
        raise ValueError(f"peephole must be a bool, got {peephole!r}")
    if peephole and proj_size > 0:
        raise ValueError("peephole=True is not supported with proj_size > 0")
    if peephole and recompute_interval:
        raise ValueError("peephole=True is not supported with recompute_interval > 0")


def _init_like_lstm(weight: Tensor, hidden_size: int) -> None:
    """nn.LSTM's initialization of every parameter: U(-1/√hidden_size, 1/√hidden_size)."""
    bound = 1.0 / hidden_size**0.5 if hidden_size > 0 else 0.0
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def _stacked(peepholes: list) -> Tensor | None:
    """The peephole weights of a whole-module launch (a stack's layers, or a layer's two directions) as
    one tensor; None without peepholes."""
    return None if peepholes[0] is None else torch.stack(peepholes)


def _unpack_hx(hx, cls: str) -> tuple[Tensor, Tensor]:
    """(h_0, c_0) = hx[0], hx[1], refused as nn.LSTM's indexing refuses them, in clear words: TypeError
    for an object that cannot be indexed, IndexError short of two, AttributeError for an element that is
    not a Tensor (nn: its ``.dim()``). That ATen takes only a tuple or list of two is checked last, as
    there (``check_recurrence_arguments``)."""
    if isinstance(hx, (tuple, list)) and len(hx) == 2 and isinstance(hx[0], Tensor) and isinstance(hx[1], Tensor):
        return hx[0], hx[1]  # (the usual case first: no message formatted on every call)
    try:
        h0, c0 = hx[0], hx[1]
    except (TypeError, IndexError, KeyError) as error:
        raise type(error)(hx_pair_expected(hx, cls)) from None
    for name, value in (("h_0", h0), ("c_0", c0)):
        if not isinstance(value, Tensor):
            raise AttributeError(f"{cls}: {name} must be a Tensor, got {type(value).__name__}")
    return h0, c0


def _unpack_cell_hx(hx, is_batched: bool) -> tuple[Tensor, Tensor]:
    """``_unpack_hx`` for LSTMCell, in nn.LSTMCell's order: it iterates hx checking each element (TypeError
    where hx cannot be iterated, AttributeError for an element that is not a Tensor, ValueError for one
    not 1-D or 2-D), indexes hx[0] and hx[1] for an unbatched input (IndexError short of two), then ATen
    takes only a tuple or list of two (TypeError for anything else: a Tensor; RuntimeError for another count)."""
    try:
        values = list(hx)
    except TypeError:
        raise TypeError(hx_pair_expected(hx, "LSTMCell")) from None
    for index, value in enumerate(values):
        if not isinstance(value, Tensor):
            raise AttributeError(f"LSTMCell: hx[{index}] must be a Tensor, got {type(value).__name__}")
        if value.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got {value.dim()}D instead")
    if len(values) < 2 and not is_batched:
        raise IndexError(hx_pair_expected(hx, "LSTMCell"))
    if not isinstance(hx, (tuple, list)):
        raise TypeError(hx_pair_expected(hx, "LSTMCell"))
    if len(values) != 2:
        raise RuntimeError(hx_pair_expected(hx, "LSTMCell"))
    return values[0], values[1]


class LSTM(nn.RNNBase):
    r"""A multi-layer LSTM, a drop-in replacement for :class:`torch.nn.LSTM` whose recurrence runs fused
    Triton kernels on NVIDIA GPUs.

    For each element of the input sequence, each layer computes, in PyTorch's gate order (i, f, g, o)::

        i_t = σ(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)
        f_t = σ(W_if x_t + b_if + W_hf h_{t-1} + b_hf)
        g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)
        o_t = σ(W_io x_t + b_io + W_ho h_{t-1} + b_ho)
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
        h_t = o_t ⊙ tanh(c_t)            (then h_t = W_hr h_t when proj_size > 0)

    Everything nn.LSTM takes, returns and raises is the same: arguments, parameter names, shapes, order
    and initialization (the same random draws), ``state_dict`` (load either into the other), inputs,
    outputs, exception types and messages. Where it runs: the Triton kernels for CUDA tensors (fp32,
    fp16, bf16; one persistent launch per layer, per stack or per bidirectional layer); on the CPU,
    ATen's LSTM exactly as nn.LSTM does (or the kernels through Triton's interpreter when
    ``TRITON_INTERPRET=1``); float64 runs the plain-PyTorch reference.

    Args:
        input_size: the number of features of the input x.
        hidden_size: the number of features of the hidden state h.
        num_layers: the number of stacked layers. Default: 1.
        bias: if False, the layers use no b_ih and b_hh. Default: True.
        batch_first: if True, input and output are (batch, seq, feature) instead of (seq, batch,
            feature); the states keep their layout. Default: False.
        dropout: the probability of dropout on the outputs of every layer but the last, in training.
            Default: 0.
        bidirectional: if True, a bidirectional LSTM. Default: False.
        proj_size: if > 0, an LSTM with projections of that size. Default: 0.
        device, dtype: where and in which dtype the parameters are created.
        backward (keyword only, ours): "fused" (default): the fused Triton backward where the kernels
            run; "reference": the plain-PyTorch backward.
        recompute_interval (keyword only, ours): k > 0 saves (h, c) every k steps only and recomputes
            the gates segment by segment in the backward (less memory, one more forward); 0 (default)
            saves every activation. Neither applies on the CPU path (ATen's own backward).
        peephole (keyword only, ours): if True, peephole connections (Gers, Schraudolph & Schmidhuber
            2002): i_t and f_t also see w_ci ⊙ c_{t-1} and w_cf ⊙ c_{t-1}, o_t sees w_co ⊙ c_t, with one
            parameter ``weight_ch_l[k]`` (3·hidden_size: w_ci, w_cf, w_co) per layer and direction.
            Not with proj_size > 0 or recompute_interval. Default: False (nn.LSTM's parameters and
            state_dict exactly). On the CPU a peephole LSTM runs the plain-PyTorch recurrence.

    Inputs: input, (h_0, c_0)
        - **input**: (L, N, H_in), (N, L, H_in) with ``batch_first``, (L, H_in) unbatched, or a
          :class:`~torch.nn.utils.rnn.PackedSequence`.
        - **h_0**: (D·num_layers, N, H_out), or (D·num_layers, H_out) unbatched. Default: zeros.
        - **c_0**: (D·num_layers, N, H_cell), or (D·num_layers, H_cell) unbatched. Default: zeros.

        where L is the sequence length, N the batch size, D = 2 if bidirectional else 1, H_cell =
        hidden_size and H_out = proj_size if proj_size > 0 else hidden_size.

    Outputs: output, (h_n, c_n)
        - **output**: (L, N, D·H_out) (batch-first: (N, L, D·H_out); unbatched: (L, D·H_out)), the last
          layer's h_t for every t; a PackedSequence when the input is one.
        - **h_n**: (D·num_layers, N, H_out), every layer's final hidden state.
        - **c_n**: (D·num_layers, N, H_cell), every layer's final cell state.

    Attributes:
        weight_ih_l[k], weight_hh_l[k], bias_ih_l[k], bias_hh_l[k], weight_hr_l[k] (and the
        ``_reverse`` ones): exactly nn.LSTM's, initialized from U(-√k, √k) with k = 1/hidden_size.
        weight_ch_l[k] (and ``_reverse``), with ``peephole=True`` only: (3·hidden_size), the same
        initialization, drawn after nn.LSTM's parameters (so those match nn.LSTM's for the same seed).
        backward_mode, recompute_interval, peephole: our options, plain attributes outside the state_dict.

    Without a gradient to take (``torch.no_grad``, ``inference_mode``, nothing requiring grad) the
    forward keeps no per-step activations. ``torch.compile(fullgraph=True)``, autocast, CUDA graphs,
    DDP/FSDP, ``torch.func`` (grad, vjp, jacrev, vmap: through the plain-PyTorch recurrence) and double
    backward work; ``torch.jit.script`` does not (use ``torch.compile`` or ``torch.export``).

    Example::

        >>> lstm = triton_lstm.LSTM(10, 20, num_layers=2).cuda()
        >>> x = torch.randn(5, 3, 10, device="cuda")
        >>> output, (h_n, c_n) = lstm(x)
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
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
        peephole: bool = False,
    ) -> None:
        check_backward_options(backward, recompute_interval)
        _check_peephole(peephole, proj_size, recompute_interval)
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
        self.peephole = peephole
        if peephole:
            for layer in range(num_layers):
                for suffix in ("", "_reverse")[: 2 if bidirectional else 1]:
                    name = f"weight_ch_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(3 * hidden_size, device=device, dtype=dtype)))
                    _init_like_lstm(getattr(self, name), hidden_size)

    # nn.LSTM's own helpers beside RNNBase's (the state as a pair (h, c), the cell's size), for code that
    # calls them on an nn.LSTM, which ``convert`` may have swapped for this class. Our forward does its own
    # checks (module_inputs.py).
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def _peephole_weights(self, layer: int, direction: int) -> Tensor | None:
        if not getattr(self, "peephole", False):
            return None
        return getattr(self, f"weight_ch_l{layer}" + ("_reverse" if direction == 1 else ""))

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
        x, packed, data, lengths, batch_sizes, sorted_indices, unsorted_indices, is_batched = time_major_input(
            input, self, "LSTM")
        B = x.shape[1]

        state_shape = (self.num_layers * num_directions, B)
        if hx is None:
            h0 = x.new_zeros(*state_shape, out_size)
            c0 = x.new_zeros(*state_shape, self.hidden_size)
        else:
            h0, c0 = _unpack_hx(hx, "LSTM")
            state_dims = 3 if is_batched else 2
            if any(isinstance(value, Tensor) and value.dim() != state_dims for value in (h0, c0)):
                kind = "batched 3-D" if is_batched else "unbatched 2-D"
                dims = ", ".join(f"{value.dim()}-D" if isinstance(value, Tensor) else type(value).__name__ for value in (h0, c0))
                raise RuntimeError(f"For {kind} input, hx and cx should also be {state_dims}-D but got ({dims}) tensors")
        check_input_tensor(x, self.weight_ih_l0, self.input_size, "LSTM")  # after the state's dims, as nn.LSTM
        if hx is not None:
            if not is_batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            check_state_tensor("h_0", h0, x, (*state_shape, out_size), "LSTM", "hidden[0]")
            check_state_tensor("c_0", c0, x, (*state_shape, self.hidden_size), "LSTM", "hidden[1]")
            if sorted_indices is not None:
                h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
        check_recurrence_arguments(x, self, "LSTM", hx)

        weights = [[self._layer_weights(layer, d) for d in range(num_directions)] for layer in range(self.num_layers)]
        peepholes = [[self._peephole_weights(layer, d) for d in range(num_directions)] for layer in range(self.num_layers)]
        check_layer_weights(self, weights, peepholes if getattr(self, "peephole", False) else None, x, 4)
        autocast_dtype = active_autocast_dtype(x)
        if autocast_dtype is not None:
            # As nn.LSTM under autocast: compute in the autocast dtype; the fp32 weights get fp32 gradients.
            x, h0, c0 = x.to(autocast_dtype), h0.to(autocast_dtype), c0.to(autocast_dtype)
            weights = [[[None if w is None else w.to(autocast_dtype) for w in ws] for ws in layer] for layer in weights]
            peepholes = [[None if w is None else w.to(autocast_dtype) for w in layer] for layer in peepholes]

        peephole = getattr(self, "peephole", False)
        if peephole:
            refuse_complex_peepholes(x, "LSTM")
        if not peephole and runs_aten(x):
            # Where our kernels do not run (runs_aten: the CPU without Triton's interpreter, a GPU older than
            # Ampere), or a complex input: the very ATen LSTM that nn.LSTM runs (oneDNN's, cuDNN's kernels,
            # their backward), all layers and directions in one call.
            flat_weights = [w for layer in weights for direction in layer for w in direction if w is not None]
            with aten_without_autocast(x, autocast_dtype):
                if packed:
                    data_in = data.to(x.dtype)
                    output, h_n, c_n = torch._VF.lstm(data_in, batch_sizes, (h0, c0), flat_weights, self.bias,
                                                      self.num_layers, float(self.dropout), self.training, self.bidirectional)
                else:
                    output, h_n, c_n = torch._VF.lstm(x, (h0, c0), flat_weights, self.bias, self.num_layers,
                                                      float(self.dropout), self.training, self.bidirectional, False)
            hidden = (h_n, c_n)
            if packed:
                if unsorted_indices is not None:
                    hidden = (h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices))
                return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), hidden
            return self._finish(output, hidden, is_batched)

        refuse_jit_trace("LSTM")
        lengths_on_device = None if lengths is None else lengths.to(x.device, non_blocking=True)
        if self._runs_as_stack(x):
            # All layers in one persistent launch (a wavefront across layers; triton_lstm/stack.py).
            output, h_n, c_n = lstm_stack(
                x, h0, c0, [weights[layer][0] for layer in range(self.num_layers)], lengths_on_device,
                backward=getattr(self, "backward_mode", "fused"), w_ch=_stacked([directions[0] for directions in peepholes]),
                dropout=float(self.dropout) if self.training else 0.0,
            )
            return self._finish_from_time_major(output, (h_n, c_n), packed, lengths, batch_sizes, sorted_indices,
                                                unsorted_indices, is_batched)

        layer_input = x
        h_n, c_n = [], []
        both_at_once = num_directions == 2 and self._runs_both_directions_at_once(x)
        time_reversal = None  # for the reverse direction run on its own: each sequence reversed in its length
        if num_directions == 2 and not both_at_once and lengths_on_device is not None:
            time_reversal = reverse_index(lengths_on_device, x.shape[0])
        for layer in range(self.num_layers):
            if both_at_once:
                # Both directions in one persistent launch (triton_lstm/bidirectional.py).
                index = 2 * layer
                layer_input, h, c = lstm_bidirectional(
                    layer_input, h0[index:index + 2], c0[index:index + 2], weights[layer][0], weights[layer][1],
                    lengths_on_device, backward=getattr(self, "backward_mode", "fused"),
                    w_ch=_stacked(peepholes[layer]),
                )
                h_n += [h[0], h[1]]
                c_n += [c[0], c[1]]
                layer_input = dropout_between_layers(self, layer_input, layer)
                continue
            outputs = []
            for direction in range(num_directions):
                index = layer * num_directions + direction
                layer_x = layer_input if direction == 0 else reverse_time(layer_input, time_reversal)
                out, h, c = lstm_layer(
                    layer_x, h0[index], c0[index], *weights[layer][direction], lengths_on_device,
                    backward=getattr(self, "backward_mode", "fused"),  # getattr: modules pickled before the option
                    recompute_interval=getattr(self, "recompute_interval", 0), w_ch=peepholes[layer][direction],
                )
                outputs.append(out if direction == 0 else reverse_time(out, time_reversal))
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            layer_input = dropout_between_layers(self, layer_input, layer)
        return self._finish_from_time_major(layer_input, (torch.stack(h_n), torch.stack(c_n)), packed, lengths,
                                            batch_sizes, sorted_indices, unsorted_indices, is_batched)

    def _runs_both_directions_at_once(self, x: Tensor) -> bool:
        """Whether each bidirectional layer runs both directions in one launch: no recompute option, and a
        plan for the input's device."""
        if getattr(self, "recompute_interval", 0):
            return False
        return bidirectional_plan(x, self.hidden_size) is not None

    def _runs_as_stack(self, x: Tensor) -> bool:
        """Whether this forward runs all layers in one launch (dropout between layers included: in the
        kernels): unidirectional, no recompute option, no dropout in training with a projection (the
        projected stack runs in m_t, where h's mask does not apply), and a stack plan for the input's device."""
        if self.num_layers < 2 or self.bidirectional or getattr(self, "recompute_interval", 0):
            return False
        return stack_plan(x, self.hidden_size, self.num_layers, getattr(self, "peephole", False),
                          dropout=self.training and self.dropout > 0, projection=self.proj_size > 0) is not None

    def _finish_from_time_major(self, output, hidden, packed, lengths, batch_sizes, sorted_indices, unsorted_indices,
                                is_batched):
        """The module's outputs from the time-major output and (h_n, c_n): packed again, or in the layout
        of the input."""
        if packed:
            output = pack_padded_sequence(output, lengths).data
            if unsorted_indices is not None:
                hidden = (hidden[0].index_select(1, unsorted_indices), hidden[1].index_select(1, unsorted_indices))
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), hidden
        return self._finish(output, hidden, is_batched)

    def extra_repr(self) -> str:
        return super().extra_repr() + options_repr(self)

    def _finish(self, output, hidden, is_batched: bool):
        """The time-major (T, B, ·) output and (h_n, c_n) in the layout of the input."""
        if not is_batched:
            return output.squeeze(1), (hidden[0].squeeze(1), hidden[1].squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, hidden

    def __prepare_scriptable__(self):
        raise RuntimeError(NOT_SCRIPTABLE.format(cls="LSTM"))


class LSTMCell(nn.LSTMCell):
    r"""One LSTM step, a drop-in replacement for :class:`torch.nn.LSTMCell` running the fused Triton step
    kernel on NVIDIA GPUs (the equations of :class:`LSTM` for one time step).

    Same arguments, parameters, ``state_dict``, inputs, outputs and errors as nn.LSTMCell; on the CPU it
    runs nn.LSTMCell's own ATen cell (the kernels through Triton's interpreter with ``TRITON_INTERPRET=1``).

    Args:
        input_size: the number of features of the input x.
        hidden_size: the number of features of h and c.
        bias: if False, no b_ih and b_hh. Default: True.
        device, dtype: where and in which dtype the parameters are created.
        backward (keyword only, ours): "fused" (default) or "reference", as for :class:`LSTM`.
        peephole (keyword only, ours): if True, peephole connections as in :class:`LSTM`, with one
            parameter ``weight_ch`` (3·hidden_size: w_ci, w_cf, w_co). Default: False.

    Inputs: input, (h_0, c_0)
        - **input**: (N, input_size) or (input_size) unbatched.
        - **h_0**, **c_0**: (N, hidden_size) or (hidden_size); zeros when not given.

    Outputs: (h_1, c_1), each (N, hidden_size) or (hidden_size).

    Attributes:
        weight_ih (4·hidden_size, input_size), weight_hh (4·hidden_size, hidden_size), bias_ih, bias_hh
        (4·hidden_size): exactly nn.LSTMCell's. weight_ch (3·hidden_size) with ``peephole=True``.
        backward_mode, peephole: our options.

    Example::

        >>> cell = triton_lstm.LSTMCell(10, 20).cuda()
        >>> x = torch.randn(6, 3, 10, device="cuda")
        >>> h = c = torch.zeros(3, 20, device="cuda")
        >>> for x_t in x:
        ...     h, c = cell(x_t, (h, c))
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backward: str = "fused", peephole: bool = False) -> None:
        check_backward_options(backward, 0)
        _check_peephole(peephole, 0, 0)
        super().__init__(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
        self.backward_mode = backward
        self.peephole = peephole
        if peephole:
            self.weight_ch = nn.Parameter(torch.empty(3 * hidden_size, device=device, dtype=dtype))
            _init_like_lstm(self.weight_ch, hidden_size)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if not isinstance(input, Tensor):
            raise AttributeError(f"LSTMCell: input must be a Tensor, got {type(input).__name__}")  # as nn's .dim()
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)
        B = x.shape[0]
        if hx is None:
            h0 = c0 = x.new_zeros(B, self.hidden_size)  # (lstm_layer gives c0 its own tensor for torch.compile)
        else:
            h0, c0 = _unpack_cell_hx(hx, is_batched)
        check_input_tensor(input, self.weight_ih, self.input_size, "LSTMCell")  # after hx's dims, as nn's
        if hx is not None:
            if not is_batched:
                h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)
            check_cell_state(0, h0, x, self.hidden_size)
            check_cell_state(1, c0, x, self.hidden_size)
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        w_ch = self.weight_ch if getattr(self, "peephole", False) else None
        check_cell_weights(self, weights, w_ch, x, 4)
        autocast_dtype = active_autocast_dtype(x)
        if autocast_dtype is not None:
            x, h0, c0 = x.to(autocast_dtype), h0.to(autocast_dtype), c0.to(autocast_dtype)
            weights = tuple(None if w is None else w.to(autocast_dtype) for w in weights)
            w_ch = None if w_ch is None else w_ch.to(autocast_dtype)
        if w_ch is not None:
            refuse_complex_peepholes(x, "LSTMCell")
        if w_ch is None and runs_aten(x):
            # Where our kernels do not run (runs_aten), or a complex input: nn.LSTMCell's own ATen cell.
            with aten_without_autocast(x, autocast_dtype):
                h, c = torch._VF.lstm_cell(x, (h0, c0), *weights)
        else:
            refuse_jit_trace("LSTMCell")
            _, h, c = lstm_layer(x.unsqueeze(0), h0, c0, *weights, backward=getattr(self, "backward_mode", "fused"),
                                 w_ch=w_ch)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c

    def extra_repr(self) -> str:
        return super().extra_repr() + options_repr(self)

    def __prepare_scriptable__(self):
        raise RuntimeError(NOT_SCRIPTABLE.format(cls="LSTMCell"))
