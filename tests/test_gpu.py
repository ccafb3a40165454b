"""Large shapes on the GPU, in fp32, fp16 and bf16, against nn.LSTM in float64 (cuDNN runs the float64
oracle on the same card). Skipped without CUDA: CI has no GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import requires_cuda
from test_modules import Case, check_against_nn

pytestmark = requires_cuda

LARGE = {
    "T512-B64-H256": Case(T=512, B=64, I=256, H=256),
    "T128-B16-H1024": Case(T=128, B=16, I=1024, H=1024, with_state=True),
    "T64-B3-H1024-bidir-layers2": Case(T=64, B=3, I=512, H=1024, num_layers=2, bidirectional=True),
    "T256-B17-H513-packed": Case(T=256, B=17, I=64, H=513, packed=True),
    "T96-B8-H512-proj": Case(T=96, B=8, I=128, H=512, proj_size=128),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LARGE.values(), ids=LARGE.keys())
def test_large_shapes_match_nn_lstm(case, dtype):
    check_against_nn(case, dtype, oracle_device="cuda")



@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_tensors_device_not_the_current_one():
    """Triton launches on the current device; the ops make the tensors' device current around them."""
    import triton_lstm

    torch.manual_seed(0)
    theirs = torch.nn.LSTM(16, 32, num_layers=2).to("cuda:1")
    ours = triton_lstm.LSTM(16, 32, num_layers=2).to("cuda:1")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(20, 4, 16, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0):
        out, _ = ours(x)
        out.sum().backward()
    expected, _ = theirs(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
