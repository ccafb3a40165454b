"""Test setup: kernels run through Triton's interpreter on a machine without CUDA, and torch.empty is
poisoned with NaN so that a kernel that forgets to write an element fails its comparison."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton_lstm (and so triton.jit) is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _poisoned(factory):
    def make(*args, **kwargs):
        tensor = factory(*args, **kwargs)
        if tensor.is_floating_point() and tensor.device.type != "meta":
            tensor.fill_(float("nan"))
        return tensor

    return make


@pytest.fixture(autouse=True)
def poison_empty(request, monkeypatch):
    """Every torch.empty / empty_like / new_empty of a floating dtype starts as NaN.

    Tests that trace code (torch.compile) opt out with ``@pytest.mark.no_poison``.
    """
    if request.node.get_closest_marker("no_poison"):
        yield
        return
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    yield


@pytest.fixture(autouse=True)
def exact_fp32_on_cuda():
    """nn.LSTM's cuDNN path computes fp32 in TF32 by default (torch.backends.cudnn.allow_tf32), which
    would make it a 1e-4-accurate yardstick: the tests compare against exact fp32, as the kernels compute
    with TF32 off (matmul.allow_tf32 is already off by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def pytest_configure(config):
    config.addinivalue_line("markers", "no_poison: do not poison torch.empty with NaN in this test")


def pytest_report_header(config):
    """Which triton_lstm the session tests (the checkout, or an installed wheel: .ci/run's second pass)."""
    import triton  # noqa: F401 (after TRITON_INTERPRET is set above)

    import triton_lstm

    return f"triton_lstm {triton_lstm.__version__} from {os.path.dirname(triton_lstm.__file__)}, triton {triton.__version__}"
