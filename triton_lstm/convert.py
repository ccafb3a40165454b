"""``convert``: swaps every nn.LSTM / nn.LSTMCell / nn.GRU / nn.GRUCell inside a model for ours, holding
the very same Parameter objects."""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from triton_lstm.gru_modules import GRU, GRUCell
from triton_lstm.modules import LSTM, LSTMCell

_log = logging.getLogger("triton_lstm.modules")  # the logger's name since before the GRU moved this here

# nn's class -> ours, and the options of ours that a converted module takes at their defaults.
_OURS = {
    nn.LSTM: (LSTM, dict(backward_mode="fused", recompute_interval=0)),
    nn.LSTMCell: (LSTMCell, dict(backward_mode="fused")),
    nn.GRU: (GRU, dict(backward_mode="fused")),
    nn.GRUCell: (GRUCell, dict(backward_mode="fused")),
}


def _plain_class(module: nn.Module) -> type:
    """The module's class, seen through torch.nn.utils.parametrize's injected subclass."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _adopt_parametrized(module: nn.Module, ours: type, **extras) -> nn.Module:
    """Turns a parametrized nn module into ours in place: the same object, Parameters and
    parametrizations, with our class under parametrize's injected properties (the way parametrize itself
    changes a module's class). nn's module and ours share every attribute but our keyword options."""
    injected = {key: value for key, value in vars(type(module)).items() if key not in ("__dict__", "__weakref__", "__module__")}
    module.__class__ = type(f"Parametrized{ours.__name__}", (ours,), injected)
    for name, value in extras.items():
        setattr(module, name, value)
    return module


def _replacement(module: nn.Module) -> nn.Module | None:
    """Ours holding ``module``'s very Parameter objects (and parametrizations), or None if it is not one
    of the nn classes we replace."""
    cls = _plain_class(module)
    if cls not in _OURS:
        return None
    ours, options = _OURS[cls]
    if parametrize.is_parametrized(module):
        return _adopt_parametrized(module, ours, **options)
    with torch.device("meta"):
        if issubclass(cls, nn.RNNBase):
            rnn_options = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                               dropout=module.dropout, bidirectional=module.bidirectional)
            if cls is nn.LSTM:
                rnn_options["proj_size"] = module.proj_size
            new = ours(module.input_size, module.hidden_size, **rnn_options)
        else:
            new = ours(module.input_size, module.hidden_size, bias=module.bias)
    # assign=True hands over the Parameter objects themselves: device, dtype, requires_grad and any
    # optimizer built on them are kept.
    new.load_state_dict(module.state_dict(keep_vars=True), strict=True, assign=True)
    new.train(module.training)
    return new


def convert(model: nn.Module) -> nn.Module:
    """Replaces every ``nn.LSTM`` / ``nn.LSTMCell`` / ``nn.GRU`` / ``nn.GRUCell`` inside ``model`` with
    ``triton_lstm.LSTM`` / ``LSTMCell`` / ``GRU`` / ``GRUCell`` holding the very same Parameter objects (an
    optimizer built before keeps training them).

    Modules with parametrizations (``torch.nn.utils.parametrize``, e.g. weight drop on ``weight_hh_l0``)
    are converted in place, parametrizations included. Subclasses of those nn classes are left alone
    (their own forward may differ from nn's): a warning names each one skipped; the ones swapped are
    logged (``logging``, logger "triton_lstm.modules", level INFO).

    Args:
        model: any module; an nn.LSTM / nn.LSTMCell / nn.GRU / nn.GRUCell itself is replaced too.

    Returns:
        ``model`` with those modules replaced (a new module when ``model`` itself is a plain one of them).

    Example::

        >>> model = nn.Sequential(nn.Embedding(100, 32), nn.LSTM(32, 64, batch_first=True))
        >>> model = triton_lstm.convert(model)
        >>> type(model[1]).__name__
        'LSTM'
    """
    swapped: list[str] = []
    skipped: list[str] = []
    converted = _convert(model, "", swapped, skipped)
    if swapped:
        _log.info("triton_lstm.convert swapped: %s", ", ".join(swapped))
    if skipped:
        warnings.warn(
            "triton_lstm.convert left these subclasses of nn.LSTM / nn.LSTMCell / nn.GRU / nn.GRUCell as they are "
            f"(their own code may differ from nn's): {', '.join(skipped)}",
            UserWarning,
            stacklevel=2,
        )
    return converted


def _convert(model: nn.Module, path: str, swapped: list[str], skipped: list[str]) -> nn.Module:
    replacement = _replacement(model)
    if replacement is not None:
        swapped.append(path or "<model>")
        return replacement
    cls = _plain_class(model)
    if isinstance(model, tuple(_OURS)) and cls not in tuple(ours for ours, _ in _OURS.values()):
        skipped.append(f"{path or '<model>'} ({cls.__name__})")
        return model
    for name, child in list(model.named_children()):
        new_child = _convert(child, f"{path}.{name}" if path else name, swapped, skipped)
        if new_child is not child:
            setattr(model, name, new_child)
    return model
