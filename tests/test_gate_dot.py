"""The forward kernels' gate-interleaved product (``ForwardPlan.gate_dot``: one dot of N = 4·BLOCK_H for
the four gates instead of four of N = BLOCK_H; ``common.interleaved_gate_rows``): the same numbers as
nn.LSTM and nn.GRU in float64 on every path that runs it — one layer (resident and streamed W), a stack in
one launch (streamed and resident), both directions of a layer — for the gate bit the planner picks and
for others (any bit must compute the same product), and the planner's rule for that bit.

Not planned by default until a GPU measures it (benchmarks/NOTES.md): the tests force it by replacing
the launch's ``gate_bit``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
from helpers import STACK_DTYPE, requires_cuda
from test_modules import Case, check_against_nn

from triton_lstm import gru_stack, stack
from triton_lstm.kernels import forward_plans
from triton_lstm.kernels import lstm_fwd_persistent as persistent
from triton_lstm.kernels.forward_plans import ForwardPlan, gate_bit


def _force_gate_dot(monkeypatch, bit: str) -> list[int]:
    """Every persistent forward launch runs the gate-interleaved product: with the planner's bit for its
    tile (``bit`` "planned"), the lowest (1) or the highest the tile allows ("top"). Returns the list of
    bits launched, so a test can check the variant ran."""
    launched = []

    def forced(plan: ForwardPlan) -> int:
        if bit == "planned":
            chosen = gate_bit(dataclasses.replace(plan, gate_dot=True))
        else:
            chosen = 1 if bit == "low" else (4 * plan.block_h).bit_length() - 2
        launched.append(chosen)
        return chosen

    monkeypatch.setattr(persistent, "gate_bit", forced)
    return launched


MODULES = {
    # (case, cell, dtype): on the CPU fp32 plans stream W and 16-bit ones hold it resident (one program).
    "LSTM-streamed-lengths": (Case(T=6, B=5, I=4, H=33, packed=True), "LSTM", torch.float32),
    "LSTM-resident-B70": (Case(T=4, B=70, I=5, H=20, with_state=True), "LSTM", torch.float16),
    "GRU-streamed": (Case(T=5, B=3, I=7, H=17), "GRU", torch.float32),
    "GRU-resident": (Case(T=5, B=4, I=6, H=9, with_state=True), "GRU", torch.float16),
    "LSTM-stack-L3": (Case(T=5, B=3, I=4, H=17, num_layers=3), "LSTM", STACK_DTYPE),
    "GRU-stack-L2-packed": (Case(T=6, B=4, I=5, H=9, num_layers=2, packed=True), "GRU", STACK_DTYPE),
    "LSTM-bidirectional-packed": (Case(T=6, B=3, I=4, H=7, bidirectional=True, packed=True), "LSTM", torch.float32),
    "GRU-bidirectional": (Case(T=5, B=3, I=4, H=6, bidirectional=True, with_state=True), "GRU", torch.float32),
}


@pytest.mark.parametrize("bit", ["planned", "low", "top"])
@pytest.mark.parametrize("name", MODULES, ids=str)
def test_modules_with_the_gate_dot_match_nn(name, bit, monkeypatch):
    if bit != "planned" and name not in ("LSTM-streamed-lengths", "LSTM-resident-B70", "LSTM-stack-L3"):
        pytest.skip("other gate bits on one case per path (keeps the interpreter run short)")
    case, cell, dtype = MODULES[name]
    launched = _force_gate_dot(monkeypatch, bit)
    check_against_nn(case, dtype, cell=cell)
    assert launched and all(b > 0 for b in launched), f"the gate-dot kernels did not run: bits {launched}"


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_resident_stack_with_the_gate_dot_matches_nn(cell, monkeypatch):
    """The stack's resident variant (its slices of W_ih and W_hh held as one interleaved slice each)."""
    case = Case(T=5, B=3, I=4, H=20, num_layers=2, with_state=True)
    width = max(16, triton.next_power_of_2(case.H))
    plan = ForwardPlan(True, "resident (test)", True, 16, width, width, 1, 1, 4)
    for module in (stack, gru_stack):
        monkeypatch.setattr(module, "plan_stack_for", lambda *args, **kwargs: plan)
    launched = _force_gate_dot(monkeypatch, "planned")
    check_against_nn(case, STACK_DTYPE, cell=cell)
    assert launched and all(b > 0 for b in launched)


def test_gate_bit_rule():
    """The bit keeps the gates of one unit in a thread's registers for the sm_90 layouts of the planned
    tiles (benchmarks/compile_check.py --gate-dot compares each with its four-dot build)."""
    plan = ForwardPlan(True, "", False, 64, 16, 64, num_warps=8)
    assert gate_bit(plan) == 0, "the four-dot product unless the plan asks for the gate dot"
    assert gate_bit(dataclasses.replace(plan, gate_dot=True)) == 3  # wgmma: bit 3 of a warpgroup's columns
    assert gate_bit(ForwardPlan(True, "", False, 32, 16, 128, num_warps=4, gate_dot=True)) == 5  # mma.sync: top
    assert gate_bit(ForwardPlan(True, "", True, 16, 32, 512, num_warps=4, gate_dot=True)) == 6
    assert gate_bit(ForwardPlan(True, "", False, 64, 16, 64, num_warps=2, gate_dot=True)) == 5


def test_planner_leaves_the_variants_off_until_measured():
    """gate_dot and the stack's input_ahead wait for a GPU's measurement (benchmarks/NOTES.md)."""
    for H in (256, 512, 1024, 2048):
        for B in (8, 64, 256):
            for plan in (forward_plans.plan_persistent_fwd(128, B, H, H, 2, False, 132, 232448),
                         forward_plans.plan_stack_fwd(128, B, H, 4, 2, 132, 232448),
                         forward_plans.plan_bidirectional_fwd(128, B, H, 2, 132, 232448)):
                assert not plan.gate_dot and not plan.input_ahead, plan


GPU_CASES = {
    "LSTM-H1024-B64": (Case(T=64, B=64, I=256, H=1024), "LSTM"),
    "LSTM-H512-B256": (Case(T=32, B=256, I=128, H=512, with_state=True), "LSTM"),
    "LSTM-stack-L4-H512": (Case(T=48, B=64, I=512, H=512, num_layers=4), "LSTM"),
    "LSTM-bidirectional-L2-packed": (Case(T=40, B=64, I=256, H=1024, num_layers=2, bidirectional=True, packed=True),
                                     "LSTM"),
    "GRU-H1024-B64-packed": (Case(T=48, B=64, I=256, H=1024, packed=True), "GRU"),
    "GRU-stack-L2-H512": (Case(T=48, B=64, I=512, H=512, num_layers=2), "GRU"),
}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", GPU_CASES, ids=str)
def test_gpu_gate_dot_matches_nn(name, dtype, monkeypatch):
    """The GPU's own plans with the gate dot (many programs, the sm_90 MMA layouts the bit is chosen for)
    against nn in float64 on the same card."""
    case, cell = GPU_CASES[name]
    launched = _force_gate_dot(monkeypatch, "planned")
    check_against_nn(case, dtype, oracle_device="cuda", cell=cell)
    assert launched and all(b > 0 for b in launched)
