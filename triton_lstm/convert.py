"""``convert``: turns every nn.LSTM / nn.LSTMCell / nn.GRU / nn.GRUCell inside a model into ours, in place
(the same module objects, Parameters, hooks and attributes)."""

from __future__ import annotations

import logging
import warnings

from torch import nn
from torch.nn.utils import parametrize

from triton_lstm.gru_modules import GRU, GRUCell
from triton_lstm.modules import LSTM, LSTMCell

_log = logging.getLogger("triton_lstm.modules")  # the logger's name since before the GRU moved this here

# nn's class -> ours, and the options of ours that a converted module takes at their defaults.
_OURS = {
    nn.LSTM: (LSTM, dict(backward_mode="fused", recompute_interval=0, peephole=False)),
    nn.LSTMCell: (LSTMCell, dict(backward_mode="fused", peephole=False)),
    nn.GRU: (GRU, dict(backward_mode="fused")),
    nn.GRUCell: (GRUCell, dict(backward_mode="fused")),
}


def _plain_class(module: nn.Module) -> type:
    """The module's class, seen through torch.nn.utils.parametrize's injected subclass."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _adopt(module: nn.Module, ours: type, **options) -> nn.Module:
    """Turns an nn module into ours in place: the same object, so its Parameters (requires_grad included),
    buffers, hooks, parametrizations and any other attribute stay as they were; only the class changes (to
    ours, or under parametrize's injected subclass, the way parametrize itself changes a module's class).
    nn's module and ours share every attribute but our keyword options, set here to their defaults."""
    if parametrize.is_parametrized(module):
        injected = {key: value for key, value in vars(type(module)).items()
                    if key not in ("__dict__", "__weakref__", "__module__")}
        module.__class__ = type(f"Parametrized{ours.__name__}", (ours,), injected)
    else:
        module.__class__ = ours
    for name, value in options.items():
        setattr(module, name, value)
    return module


def _replacement(module: nn.Module) -> nn.Module | None:
    """``module`` turned into ours in place, or None if it is not one of the nn classes we convert."""
    cls = _plain_class(module)
    if cls not in _OURS:
        return None
    ours, options = _OURS[cls]
    return _adopt(module, ours, **options)


def convert(model: nn.Module) -> nn.Module:
    """Turns every ``nn.LSTM`` / ``nn.LSTMCell`` / ``nn.GRU`` / ``nn.GRUCell`` inside ``model`` into
    ``triton_lstm.LSTM`` / ``LSTMCell`` / ``GRU`` / ``GRUCell``, in place: each stays the same object with
    the very same Parameters (an optimizer built before keeps training them; frozen ones stay frozen),
    buffers, hooks, parametrizations (``torch.nn.utils.parametrize``, e.g. weight drop on
    ``weight_hh_l0``) and attributes; only its class changes. Subclasses of those nn classes are left alone
    (their own forward may differ from nn's): a warning names each one skipped; the ones swapped are
    logged (``logging``, logger "triton_lstm.modules", level INFO).

    Args:
        model: any module; an nn.LSTM / nn.LSTMCell / nn.GRU / nn.GRUCell itself is converted too.

    Returns:
        ``model`` itself, its modules converted (``model`` too when it is one of those nn classes).

    Example::

        >>> model = nn.Sequential(nn.Embedding(100, 32), nn.LSTM(32, 64, batch_first=True))
        >>> model = triton_lstm.convert(model)
        >>> type(model[1]).__name__
        'LSTM'
    """
    swapped: list[str] = []
    skipped: list[str] = []
    _convert(model, "", swapped, skipped)
    if swapped:
        _log.info("triton_lstm.convert swapped: %s", ", ".join(swapped))
    if skipped:
        warnings.warn(
            "triton_lstm.convert left these subclasses of nn.LSTM / nn.LSTMCell / nn.GRU / nn.GRUCell as they are "
            f"(their own code may differ from nn's): {', '.join(skipped)}",
            UserWarning,
            stacklevel=2,
        )
    return model


def _convert(model: nn.Module, path: str, swapped: list[str], skipped: list[str]) -> None:
    if _replacement(model) is not None:
        swapped.append(path or "<model>")
        return
    cls = _plain_class(model)
    if isinstance(model, tuple(_OURS)) and cls not in tuple(ours for ours, _ in _OURS.values()):
        skipped.append(f"{path or '<model>'} ({cls.__name__})")
        return
    for name, child in model.named_children():
        _convert(child, f"{path}.{name}" if path else name, swapped, skipped)
