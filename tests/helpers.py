"""Shared test helpers: devices, dtypes and the error budget against a float64 reference."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from torch._library import custom_ops
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from triton_lstm.ops import interpreting

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# Where the Triton kernels run in this session: the GPU, or the CPU through Triton's interpreter.
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
assert HAS_CUDA or interpreting(), "tests on a machine without CUDA must run with TRITON_INTERPRET=1"

# bf16 arithmetic and bf16 tl.dot are wrong under the interpreter: bf16 is tested on the GPU only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
# The whole-module (stacked) kernels run 16-bit on a GPU (fp32 stacks spill on sm_90: layer by layer), any
# kernel dtype under the interpreter (where bf16 arithmetic is wrong).
STACK_DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32

ROOT = Path(__file__).resolve().parent.parent


def benchmark_script(name: str):
    """``benchmarks/<name>.py`` loaded as a module (the scripts live outside the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.double() - reference.double()).abs().max().item() if actual.numel() else 0.0


def assert_error_within_pytorch(
    name: str,
    ours: torch.Tensor,
    torchs: torch.Tensor,
    reference: torch.Tensor,
    dtype: torch.dtype,
    summed_terms: int = 1,
    factor: float = 2.0,
):
    """Our error against the float64 reference is at most ``factor`` × PyTorch's own error when it computes
    in the same ``dtype``, plus a floor for when PyTorch is exact by luck: two units of that dtype's
    rounding at the reference's scale, times √summed_terms for a quantity that sums that many rounded
    terms (a weight gradient sums T·B of them). ``ours`` and ``torchs`` may already be upcast."""
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    ours_err = max_error(ours, reference)
    torch_err = max_error(torchs, reference)
    magnitude = reference.abs().max().item() if reference.numel() else 0.0
    scale = max(1.0, magnitude)
    floor = 2 * torch.finfo(dtype).eps * scale * summed_terms**0.5
    assert ours_err == ours_err, f"{name}: NaN in our result (an element left unwritten?)"
    if ERROR_LOG:
        _log_comparison(name, dtype, summed_terms, factor, reference.numel(), magnitude, ours_err, torch_err, floor)
    assert ours_err <= factor * torch_err + floor, (
        f"{name}: error {ours_err:.3e} vs PyTorch's {torch_err:.3e} (allowed {factor} x that + {floor:.1e})"
    )


# TRITON_LSTM_ERROR_LOG=file: each comparison above appends its figures there (JSON lines), whether it
# passes or not. gpu_check.sh sets it for the GPU tests: the floor's sqrt(summed_terms) lets a bf16 weight
# gradient over T·B = 4096 rows be off by its whole scale, and a tighter floor needs the bf16 errors that
# only a GPU gives (benchmarks/NOTES.md, "The tests' error floor").
ERROR_LOG = os.environ.get("TRITON_LSTM_ERROR_LOG")


def _log_comparison(name, dtype, summed_terms, factor, numel, scale, ours_err, torch_err, floor) -> None:
    record = dict(test=os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0], name=name, dtype=str(dtype),
                  summed_terms=summed_terms, numel=numel, scale=scale, ours=ours_err, torch=torch_err,
                  floor=floor, factor=factor)
    with open(ERROR_LOG, "a") as log:  # one short line per write: whole lines from parallel workers
        log.write(json.dumps(record) + "\n")


def count_calls(monkeypatch, module, names: dict[str, str]) -> dict[str, int]:
    """Wraps ``module``'s functions so that their calls are counted: ``names`` maps a label to the
    function's name in the module; returns the counts by label (updated as the test runs)."""
    counts = dict.fromkeys(names, 0)
    for label, name in names.items():
        def wrapped(*args, _fn=getattr(module, name), _label=label, **kwargs):
            counts[_label] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)
    return counts


def record_launches(monkeypatch, modules, kernel_name: str, *options: str) -> list[dict]:
    """Records the named keyword arguments (the constexprs and launch options) of every launch of the jit
    kernel ``kernel_name``, as each of ``modules`` imports it; returns the list (filled as the test runs)."""
    kernel, seen = getattr(modules[0], kernel_name), []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append({option: kwargs[option] for option in options})
                return kernel[grid](*args, **kwargs)
            return launch

    for module in modules:
        monkeypatch.setattr(module, kernel_name, Spy())
    return seen


def refuse_cooperative_launches(monkeypatch, refuse=lambda launch: True) -> list[dict]:
    """Makes the driver "refuse" the backward chain's cooperative launches where ``refuse(keyword
    arguments)`` holds (the error a grid too large to be co-resident raises; the other launches run); returns
    the keyword arguments of every cooperative launch tried, filled as the test runs. Starts with no
    remembered fallbacks."""
    from triton_lstm.kernels import lstm_bwd

    real_kernel, tried = lstm_bwd._lstm_bwd_kernel, []

    class RefusingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs.get("launch_cooperative_grid"):
                    tried.append(kwargs)
                    if refuse(kwargs):
                        raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
                return real_kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(lstm_bwd, "_lstm_bwd_kernel", RefusingKernel())
    monkeypatch.setattr(lstm_bwd, "_per_step_after_failure", set())
    return tried


def break_fused_backward(monkeypatch, how: str, module, whole_module_chain: str) -> None:
    """Makes the modules skip a whole-module fused backward: ``how`` "reference" (backward="reference")
    or "no-fit" (``module.whole_module_chain`` reports that its launch cannot run)."""
    import functools

    import triton_lstm

    if how == "reference":
        monkeypatch.setattr(triton_lstm.LSTM, "__init__", functools.partialmethod(triton_lstm.LSTM.__init__,
                                                                                  backward="reference"))
    else:
        monkeypatch.setattr(module, whole_module_chain, lambda *args, **kwargs: None)


def check_double_backward(cell: str = "LSTM", **module_kwargs):
    """A second derivative through ``triton_lstm.LSTM(3, 4, **module_kwargs)`` (or ``GRU`` with ``cell``;
    create_graph=True, then a backward of the gradient's norm) against nn.LSTM's (nn.GRU's) in float64."""
    import triton_lstm

    torch.manual_seed(0)
    model = getattr(triton_lstm, cell)(3, 4, device=KERNEL_DEVICE, **module_kwargs)
    reference = getattr(torch.nn, cell)(3, 4, **module_kwargs).double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 2, 3, device=KERNEL_DEVICE, requires_grad=True)
    x64 = x.detach().cpu().double().requires_grad_()
    for module, inp in ((model, x), (reference, x64)):
        out, _ = module(inp)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), inp, create_graph=True)
        grad.pow(2).sum().backward()
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=1e-4, atol=1e-5)


class StorageBytes(TorchDispatchMode):
    """Bytes of the storages that ops create while active: ``live`` now and ``peak`` since entry. A
    storage counts from the op that returns it first (not an input's storage: views and in-place ops
    add nothing) until it is freed (a finalizer on the storage object, which PyTorch keeps while the
    storage lives). Our custom ops run their Python bodies under this mode, so that what they allocate
    inside counts too; the autograd engine's own buffers count where it runs them on this thread (the
    CPU). Memory of the CPU path: on a GPU, ``torch.cuda.max_memory_allocated`` says the same."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._counted = weakref.WeakSet()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = custom_ops.OPDEFS.get(func._schema.name) if func.namespace == "triton_lstm" else None
        if body is not None:
            with self:  # (this mode is off while it handles an op: back on for the op's inside)
                result = body._init_fn(*args, **(kwargs or {}))
        else:
            result = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in pytree.tree_leaves(result):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage in self._counted or storage.data_ptr() in inputs or storage.nbytes() == 0:
                continue
            # Triton's interpreter keeps each launch's arguments in reference cycles until a collection:
            # collect them (young: the two younger generations), so that a storage counts as live while
            # the code holds it, as on a GPU.
            gc.collect(1)
            self._counted.add(storage)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, storage.nbytes())
        return result

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __exit__(self, *exc):
        gc.collect()  # (the interpreter's cycles, as above: ``live`` is then what the code still holds)
        return super().__exit__(*exc)
