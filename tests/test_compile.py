"""The kernels as the GPU would build them, without a GPU: the planned configurations of the five anchor
shapes compiled for sm_90 (benchmarks/compile_check.py --quick; stacks of 4 layers and bidirectional layers in bf16; the one-layer kernels with peepholes too): they compile, fit shared memory, do not
spill beyond a few bytes, and their barrier compiles to a release add and an acquire spin."""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or not (TOOLS / "cuobjdump").exists(),
    reason="needs triton's bundled CUDA tools (Linux wheels ship them)",
)


def _compile_check():
    spec = importlib.util.spec_from_file_location("compile_check", ROOT / "benchmarks" / "compile_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kernel", ["persistent", "step", "bwd", "stack", "bidir", "persistent --peephole",
                                    "bwd --peephole", "stack --peephole"])
def test_planned_kernels_compile_for_sm90(kernel, capsys):
    status = _compile_check().main(["--quick", "--kernel", *kernel.split(), "--jobs", "2"])
    report = capsys.readouterr().out
    assert status == 0, report


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("H", [33, 512])
def test_peephole_weight_grads_kernel_compiles_without_spills(dtype, H):
    """The peephole weights' reduction (kernels/lstm_bwd.py) at the tile ``peephole_weight_grads`` takes on a GPU."""
    config = dict(kernel="peephole_grad", dtype=dtype, H=H, block_b=32, block_h=64, num_warps=4, arch=90)
    [(_, outcome)] = _compile_check()._run_batch([config])
    assert isinstance(outcome, dict), outcome
    assert 0 < outcome["registers"] <= 255 and outcome["spills"] == 0, outcome
