"""The forward kernels' variants (benchmarks/NOTES.md, "Since run 12" and "Run 13"), against nn.LSTM and
nn.GRU in float64 with every gradient on every path that runs it. Since run 13 the planner picks the gate
dot, the one-tile streamed schedule and W_hh resident past K = 512 where they were timed faster
(``forward_plans.with_measured_variants``); the input product ahead and in the kernel were slower and stay
off. Under the interpreter the planner's one-program plans keep four dots, so each variant is forced here:

- ``gate_dot``: one dot of N = 4·BLOCK_H for the four gates instead of four of N = BLOCK_H
  (``common.interleaved_gate_rows``) — one layer (resident and streamed W), stacks (streamed and
  resident), both directions of a layer; the column bit the planner picks and others (any bit must
  compute the same product);
- ``input_ahead``: a stack layer forms its next input product between its arrival at its barrier and
  its wait there (``stack_layer.py``), where each program owns one tile;
- ``streamed_one_tile``: a streamed plan whose programs own one tile each keeps h and c in registers and
  loads the next input before the barrier wait, as resident plans do; on a stack (and with the input product
  in the kernel) h and c in registers, and an LSTM's two products with the gate dot in one K loop;
- W_hh resident past K = 512 with the gate dot (``forward_plans.resident_gate_dot``): the plan rule, and on
  a GPU at H = 1024 (under the interpreter the resident gate-dot kernel is the gate_dot cases' own);
- ``fused_input``: layer 0 forms its input product from x in the kernel, as a stack's layers above do
  (no projection GEMM before the launch). The modules run it only where a plan asks for it, which the
  planner does not, so it is checked at the launcher, ``lstm_fwd_fused_input``: every layer's h, c and
  saved gates — all the backward reads — against the float64 reference.

The tests force each variant, and check from the launch's arguments that it ran."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
from helpers import KERNEL_DEVICE, STACK_DTYPE, assert_error_within_pytorch, record_launches, requires_cuda
from test_modules import Case, check_against_nn

from triton_lstm import gru_stack, stack
from triton_lstm.kernels import forward_plans
from triton_lstm.kernels import lstm_fwd_persistent as persistent
from triton_lstm.kernels.forward_plans import ForwardPlan, gate_bit, one_tile_each


def _spy_launches(monkeypatch, *names: str) -> list[dict]:
    """Records the named constexprs of every persistent forward launch."""
    return record_launches(monkeypatch, [persistent], "_lstm_persistent_fwd_kernel", *names)


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


def _plan_stacks(monkeypatch, plan_for, **variant):
    """The stack ops plan with ``plan_for(x, H, layers)``'s plan, ``variant`` (ForwardPlan fields) set."""
    def planned(x, hidden_size, num_layers, *args, **kwargs):
        return dataclasses.replace(plan_for(x, hidden_size, num_layers), **variant)

    for module in (stack, gru_stack):  # the module's choice of the stack op, and the op's plan
        monkeypatch.setattr(module, "plan_stack_for", planned)


def _one_tile_plan(case: Case, resident: bool = False) -> ForwardPlan:
    """One program whose single tile is the whole batch and H (the interpreter runs one program)."""
    width = max(16, triton.next_power_of_2(case.H))
    return ForwardPlan(True, "one tile (test)", resident, max(16, triton.next_power_of_2(case.B)), width,
                       width if resident else 16, 1, 1, 4)


# --- gate_dot ---------------------------------------------------------------------------------------

MODULES = {
    # (case, cell, dtype): on the CPU fp32 plans stream W and 16-bit ones hold it resident (one program).
    "LSTM-streamed-lengths": (Case(T=6, B=5, I=4, H=33, packed=True), "LSTM", torch.float32),
    "LSTM-resident-B70": (Case(T=4, B=70, I=5, H=20, with_state=True), "LSTM", torch.float16),
    "GRU-streamed": (Case(T=5, B=3, I=7, H=17), "GRU", torch.float32),
    "GRU-resident": (Case(T=5, B=4, I=6, H=9, with_state=True), "GRU", torch.float16),
    "LSTM-stack-L3": (Case(T=5, B=3, I=4, H=17, num_layers=3), "LSTM", STACK_DTYPE),
    "GRU-stack-L2-packed": (Case(T=6, B=4, I=5, H=9, num_layers=2, packed=True), "GRU", STACK_DTYPE),
    # Projections: the stacked launch in m_t, layer l > 0's h0 term added at its step 0 (HAS_INITIAL).
    "LSTM-stack-L3-proj-packed": (Case(T=5, B=3, I=4, H=17, num_layers=3, proj_size=5, packed=True, with_state=True),
                                  "LSTM", STACK_DTYPE),
    "LSTM-bidirectional-packed": (Case(T=6, B=3, I=4, H=7, bidirectional=True, packed=True), "LSTM", torch.float32),
    "GRU-bidirectional": (Case(T=5, B=3, I=4, H=6, bidirectional=True, with_state=True), "GRU", torch.float32),
}


@pytest.mark.parametrize("bit", ["planned", "low", "top"])
@pytest.mark.parametrize("name", MODULES, ids=str)
def test_modules_with_the_gate_dot_match_nn(name, bit, monkeypatch):
    if bit != "planned" and name not in ("LSTM-streamed-lengths", "LSTM-resident-B70", "LSTM-stack-L3",
                                         "LSTM-stack-L3-proj-packed"):
        pytest.skip("other gate bits on one case per path (keeps the interpreter run short)")
    case, cell, dtype = MODULES[name]
    launched = _force_gate_dot(monkeypatch, bit)
    check_against_nn(case, dtype, cell=cell)
    assert launched and all(b > 0 for b in launched), f"the gate-dot kernels did not run: bits {launched}"


@pytest.mark.parametrize("name", ["single", "packed-bidir-layers2"])
def test_peephole_lstm_with_the_gate_dot_matches_its_equations(name, monkeypatch):
    """Peepholes on the gate-dot kernels (the planner's 16-bit plans on a GPU since run 13): one layer, and
    a packed bidirectional stack, against the peephole equations in float64 with every gradient."""
    from test_peephole import CASES, _check_against_oracle

    launched = _force_gate_dot(monkeypatch, "planned")
    _check_against_oracle(CASES[name], torch.float16)
    assert launched and all(b > 0 for b in launched), launched


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_resident_stack_with_the_gate_dot_matches_nn(cell, monkeypatch):
    """The stack's resident variant (its slices of W_ih and W_hh held as one interleaved slice each)."""
    case = Case(T=5, B=3, I=4, H=20, num_layers=2, with_state=True)
    _plan_stacks(monkeypatch, lambda x, hidden_size, num_layers: _one_tile_plan(case, resident=True))
    launched = _force_gate_dot(monkeypatch, "planned")
    check_against_nn(case, STACK_DTYPE, cell=cell)
    assert launched and all(b > 0 for b in launched)


def test_gate_bit_rule():
    """The bit keeps the gates of one unit in a thread's registers for the sm_90 layouts of the planned
    tiles (benchmarks/compile_check.py --variant gate-dot compares each with its four-dot build)."""
    plan = ForwardPlan(True, "", False, 64, 16, 64, num_warps=8)
    assert gate_bit(plan) == 0, "the four-dot product unless the plan asks for the gate dot"
    assert gate_bit(dataclasses.replace(plan, gate_dot=True)) == 3  # wgmma: bit 3 of a warpgroup's columns
    assert gate_bit(ForwardPlan(True, "", False, 32, 16, 128, num_warps=4, gate_dot=True)) == 5  # mma.sync: top
    assert gate_bit(ForwardPlan(True, "", True, 16, 32, 512, num_warps=4, gate_dot=True)) == 6
    assert gate_bit(ForwardPlan(True, "", False, 64, 16, 64, num_warps=2, gate_dot=True)) == 5


# --- input_ahead --------------------------------------------------------------------------------------

STACKS = {
    "L3-state": Case(T=6, B=2, I=5, H=7, num_layers=3, with_state=True),
    "L4-packed": Case(T=7, B=4, I=3, H=5, num_layers=4, packed=True),
    "L2-no-bias-batch-first": Case(T=4, B=3, I=6, H=9, num_layers=2, bias=False, batch_first=True),
    "L3-odd-H17": Case(T=3, B=5, I=16, H=17, num_layers=3),
}


@pytest.mark.parametrize("cell,name", [("LSTM", "L3-state"), ("LSTM", "L4-packed"), ("LSTM", "L2-no-bias-batch-first"),
                                       ("LSTM", "L3-odd-H17"), ("GRU", "L3-state"), ("GRU", "L4-packed")])
def test_stack_with_the_input_product_ahead_matches_nn(cell, name, monkeypatch):
    case = STACKS[name]
    _plan_stacks(monkeypatch, lambda x, hidden_size, num_layers: _one_tile_plan(case), input_ahead=True)
    seen = _spy_launches(monkeypatch, "INPUT_AHEAD")
    check_against_nn(case, STACK_DTYPE, cell=cell)
    assert seen == [{"INPUT_AHEAD": True}], f"one stacked forward launch with the input product ahead, got {seen}"


@pytest.mark.parametrize("gate_dot", [False, True], ids=["four-dots", "gate-dot"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_resident_stack_with_the_input_product_ahead_matches_nn(cell, gate_dot, monkeypatch):
    """W_ih's and W_hh's slices held on chip (the 64 × 16 candidate tune.py times on a GPU), the next input
    product formed ahead of the barrier wait from the resident W_ih slice."""
    case = Case(T=5, B=3, I=4, H=20, num_layers=3, with_state=True)
    _plan_stacks(monkeypatch, lambda x, hidden_size, num_layers: _one_tile_plan(case, resident=True), input_ahead=True)
    launched = _force_gate_dot(monkeypatch, "planned") if gate_dot else []
    seen = _spy_launches(monkeypatch, "INPUT_AHEAD", "RESIDENT")
    check_against_nn(case, STACK_DTYPE, cell=cell)
    assert seen == [{"INPUT_AHEAD": True, "RESIDENT": True}], seen
    assert all(b > 0 for b in launched) and bool(launched) == gate_dot


def test_input_product_ahead_only_where_each_program_owns_one_tile(monkeypatch):
    """Programs with several tiles keep the plain schedule (their accumulators cannot wait at a barrier)."""
    case = Case(T=4, B=70, I=5, H=40, num_layers=2, packed=True)  # two batch blocks, three hidden blocks
    plan = ForwardPlan(True, "several tiles (test)", False, 64, 16, 16, 1, 1, 4)
    _plan_stacks(monkeypatch, lambda x, hidden_size, num_layers: plan, input_ahead=True)
    seen = _spy_launches(monkeypatch, "INPUT_AHEAD")
    check_against_nn(case, STACK_DTYPE)
    assert seen == [{"INPUT_AHEAD": False}]


# --- streamed_one_tile -------------------------------------------------------------------------------

ONE_TILE_CASES = {
    "LSTM-lengths": (Case(T=6, B=5, I=4, H=33, packed=True), "LSTM"),
    "LSTM-state-fp16": (Case(T=5, B=3, I=6, H=20, with_state=True), "LSTM"),
    "GRU-state": (Case(T=5, B=4, I=6, H=17, with_state=True), "GRU"),
    "LSTM-bidirectional-packed": (Case(T=6, B=3, I=4, H=7, bidirectional=True, packed=True), "LSTM"),
}


@pytest.mark.parametrize("gate_dot", [False, True], ids=["four-dots", "gate-dot"])
@pytest.mark.parametrize("name", ONE_TILE_CASES, ids=str)
def test_streamed_one_tile_schedule_matches_nn(name, gate_dot, monkeypatch):
    """A streamed plan (W read in 16-wide K chunks) whose one program owns the whole batch and H."""
    if gate_dot and name not in ("LSTM-lengths", "GRU-state"):
        pytest.skip("with the gate dot on one LSTM and one GRU case (keeps the interpreter run short)")
    case, cell = ONE_TILE_CASES[name]
    plan = dataclasses.replace(_one_tile_plan(case), streamed_one_tile=True, gate_dot=gate_dot)
    monkeypatch.setattr(persistent, "plan_for", lambda projected, w_hh: plan)
    from triton_lstm.kernels import lstm_fwd_bidirectional

    monkeypatch.setattr(lstm_fwd_bidirectional, "plan_bidirectional_fwd", lambda *args, **kwargs: plan)
    seen = _spy_launches(monkeypatch, "ONE_TILE", "RESIDENT", "GATE_BIT")
    dtype = torch.float16 if name.endswith("fp16") else torch.float32
    check_against_nn(case, dtype, cell=cell)
    assert seen and all(launch["ONE_TILE"] and not launch["RESIDENT"] for launch in seen), seen
    assert all((launch["GATE_BIT"] > 0) == gate_dot for launch in seen), seen


def test_streamed_one_tile_only_where_each_program_owns_one_tile(monkeypatch):
    case = Case(T=4, B=20, I=5, H=40)  # two batch blocks of 16, three hidden blocks of 16
    plan = ForwardPlan(True, "several tiles (test)", False, 16, 16, 16, 1, 1, 4, streamed_one_tile=True)
    monkeypatch.setattr(persistent, "plan_for", lambda projected, w_hh: plan)
    seen = _spy_launches(monkeypatch, "ONE_TILE")
    check_against_nn(case, torch.float32)
    assert seen == [{"ONE_TILE": False}]


# --- streamed_one_tile on a stack --------------------------------------------------------------------

STACK_ONE_TILE_CASES = {
    # name: (case, cell, gate dot). With the gate dot both products run in one K loop (a GRU's n gate
    # apart in the spare fourth gate column), with four dots in two; every one keeps h and c in registers.
    "LSTM-L3-state-gate-dot": (STACKS["L3-state"], "LSTM", True),
    "LSTM-L4-packed-gate-dot": (STACKS["L4-packed"], "LSTM", True),
    "LSTM-L2-no-bias-batch-first-four-dots": (STACKS["L2-no-bias-batch-first"], "LSTM", False),
    "LSTM-L3-odd-H17-gate-dot": (STACKS["L3-odd-H17"], "LSTM", True),
    "LSTM-L3-proj-packed-state-gate-dot": (Case(T=5, B=3, I=4, H=17, num_layers=3, proj_size=5, packed=True,
                                                with_state=True), "LSTM", True),
    "GRU-L3-state-gate-dot": (STACKS["L3-state"], "GRU", True),
    "GRU-L4-packed-four-dots": (STACKS["L4-packed"], "GRU", False),
    "GRU-L4-packed-gate-dot": (STACKS["L4-packed"], "GRU", True),
}


@pytest.mark.parametrize("name", STACK_ONE_TILE_CASES, ids=str)
def test_stack_one_tile_schedule_matches_nn(name, monkeypatch):
    """A stack's streamed plan whose programs own one tile each, with ``streamed_one_tile``: the stack's
    one-tile schedule (``stack_layer``'s ONE_TILE) against nn in float64, every output and gradient."""
    if KERNEL_DEVICE == "cuda":
        pytest.skip("one-program plans: on a GPU its own plans, test_gpu_stack_one_tile_schedule_matches_nn")
    case, cell, gate_dot = STACK_ONE_TILE_CASES[name]
    _plan_stacks(monkeypatch, lambda x, hidden_size, num_layers: _one_tile_plan(case), streamed_one_tile=True,
                 gate_dot=gate_dot)
    seen = _spy_launches(monkeypatch, "ONE_TILE", "INPUT_AHEAD", "GATE_BIT", "LAYERS")
    check_against_nn(case, STACK_DTYPE, cell=cell)
    assert seen == [{"ONE_TILE": True, "INPUT_AHEAD": False, "GATE_BIT": seen[0]["GATE_BIT"],
                     "LAYERS": case.num_layers}], f"one stacked launch on the one-tile schedule: {seen}"
    assert (seen[0]["GATE_BIT"] > 0) == gate_dot


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_stack_one_tile_schedule_with_dropout_matches_nn(cell, monkeypatch):
    """Dropout between layers on the stack's one-tile schedule: the masked copy of h_t stored from the
    registers' h (the dropout test of test_stack.py, its 3-layer packed case for a GRU)."""
    from test_stack import DROPOUT_CASES, test_dropout_between_layers_in_the_stacked_launches_matches_nn

    if KERNEL_DEVICE == "cuda":
        pytest.skip("one-program plans: on a GPU its own plans, test_gpu_stack_one_tile_schedule_matches_nn")
    name = "LSTM-L3" if cell == "LSTM" else "GRU-L3-packed"
    _, _, _, (T, B, I, H) = DROPOUT_CASES[name]
    case = Case(T=T, B=B, I=I, H=H)
    _plan_stacks(monkeypatch, lambda x, hidden_size, num_layers: _one_tile_plan(case), streamed_one_tile=True,
                 gate_dot=True)
    seen = _spy_launches(monkeypatch, "ONE_TILE", "DROPOUT")
    test_dropout_between_layers_in_the_stacked_launches_matches_nn(name, "stacked", monkeypatch)
    assert seen == [{"ONE_TILE": True, "DROPOUT": True}], seen


def test_stack_one_tile_schedule_only_where_each_program_owns_one_tile(monkeypatch):
    case = Case(T=4, B=70, I=5, H=40, num_layers=2, packed=True)  # two batch blocks, three hidden blocks
    plan = ForwardPlan(True, "several tiles (test)", False, 64, 16, 16, 1, 1, 4, gate_dot=True, streamed_one_tile=True)
    _plan_stacks(monkeypatch, lambda x, hidden_size, num_layers: plan)
    seen = _spy_launches(monkeypatch, "ONE_TILE")
    check_against_nn(case, STACK_DTYPE)
    assert seen == [{"ONE_TILE": False}]


def test_stack_one_tile_switch_plans_it_where_each_program_owns_one_tile(monkeypatch):
    """``forward_plans.STACK_ONE_TILE`` (off until a GPU times the schedule): on, the stack planner asks for
    the one-tile schedule exactly where its gate-dot plan's programs own one tile each, from Triton 3.6 on
    (3.4 spills 40 bytes with it at H = 17: ``WITHOUT_GPU_VARIANTS_SINCE_TRITON``)."""
    monkeypatch.setattr(forward_plans, "STACK_ONE_TILE", True)
    monkeypatch.setattr(forward_plans, "TRITON_VERSION", (3, 4))
    forward_plans.plan_stack_fwd.cache_clear()
    try:
        assert not any(forward_plans.plan_stack_fwd(128, B, H, 4, 2, 132, 232448).streamed_one_tile
                       for H in (17, 512) for B in (8, 64))
        monkeypatch.setattr(forward_plans, "TRITON_VERSION", (3, 6))
        forward_plans.plan_stack_fwd.cache_clear()
        asked = 0
        for H in (17, 256, 512, 1024, 2048):
            for B in (1, 8, 64, 100, 256):
                plan = forward_plans.plan_stack_fwd(128, B, H, 4, 2, 132, 232448)
                assert plan.streamed_one_tile == (plan.persistent and plan.gate_dot and one_tile_each(plan, B, H)), plan
                asked += plan.streamed_one_tile
        assert forward_plans.plan_stack_fwd(128, 64, 512, 4, 2, 132, 232448).streamed_one_tile  # the anchor
        assert 0 < asked < 25
    finally:
        monkeypatch.undo()
        forward_plans.plan_stack_fwd.cache_clear()
    assert not forward_plans.plan_stack_fwd(128, 64, 512, 4, 2, 132, 232448).streamed_one_tile


def test_one_tile_schedule_rule():
    """``ONE_TILE`` per kernel path: one layer's resident plans and streamed ones that ask; the kernels that
    form an input product (stacks, fused input) streamed plans that ask, unless the input product runs ahead."""
    streamed = ForwardPlan(True, "", False, 64, 16, 64, 32, 1, 8)
    resident = dataclasses.replace(streamed, resident=True, block_k=512)
    asks = dataclasses.replace(streamed, streamed_one_tile=True)
    rule = forward_plans.one_tile_schedule
    assert not any(rule(plan, layers, False) for plan in (streamed, resident, asks) for layers in (1, 4))
    assert rule(resident, 1, True) and rule(asks, 1, True) and not rule(streamed, 1, True)
    assert rule(asks, 4, True) and not rule(streamed, 4, True) and not rule(resident, 4, True)
    assert not rule(dataclasses.replace(asks, input_ahead=True), 4, True)
    assert rule(dataclasses.replace(asks, fused_input=True), 1, True)
    assert not rule(dataclasses.replace(resident, fused_input=True), 1, True)


def test_planner_picks_the_variants_where_run_13_timed_them_faster():
    """16-bit single layers and stacks on a GPU run the gate dot (``with_measured_variants``), streamed
    plans the one-tile schedule only on 32- and 64-row tiles that are one per program; the input product
    ahead and in the kernel, both slower, never; bidirectional layers (not timed with them yet), fp32 plans,
    the interpreter's plans and stacks with dropout on 16-row tiles (a GRU's spilled) keep four dots."""
    for H in (17, 256, 512, 768, 1024, 2048, 4096):
        for B in (1, 8, 64, 100, 256):
            for element_size in (2, 4):
                one = forward_plans.plan_persistent_fwd(128, B, H, H, element_size, 132, 232448)
                stack = forward_plans.plan_stack_fwd(128, B, H, 4, element_size, 132, 232448)
                both = forward_plans.plan_bidirectional_fwd(128, B, H, element_size, 132, 232448)
                for plan in (one, stack, both):
                    assert not (plan.input_ahead or plan.fused_input), plan
                    assert plan.gate_dot == (element_size == 2 and plan.persistent and plan is not both), plan
                    assert not plan.streamed_one_tile or (
                        plan is one and not plan.resident and plan.block_b >= 32 and one_tile_each(plan, B, H)), plan
                dropping = forward_plans.plan_stack_fwd(128, B, H, 4, element_size, 132, 232448, dropout=True)
                assert dropping.gate_dot == (stack.gate_dot and dropping.block_b > 16), dropping
                interpreted = forward_plans.plan_persistent_fwd(128, B, H, H, element_size, 1, 96 * 1024, True)
                assert not (interpreted.gate_dot or interpreted.streamed_one_tile), interpreted


# --- W_hh resident past K = 512, with the gate dot ----------------------------------------------------

H200 = (132, 232448)  # SMs, opt-in shared memory per block


def test_resident_gate_dot_applies_to_streamed_plans_past_k_512_that_fit():
    """``forward_plans.resident_gate_dot``: the planned streamed plan, same tiles and grid, with W_hh resident
    and the gate dot, only where its slice fits the budget and K is within RESIDENT_GATE_DOT_MAX_K (the sm_90
    builds: ``compile_check.py --variant resident-gate-dot``). The (256, 64, 1024, 1024) anchor's plan:"""
    plan = forward_plans.tile_persistent_fwd(128, 64, 1024, 1024, 2, *H200)
    assert plan.persistent and not plan.resident and (plan.block_b, plan.block_h, plan.grid_h) == (32, 16, 64)
    twin = forward_plans.resident_gate_dot(plan, 1024, 1024, 2, H200[1])
    assert twin == dataclasses.replace(plan, resident=True, gate_dot=True, block_k=1024, reason=twin.reason), twin
    if forward_plans.TRITON_VERSION >= forward_plans.RESIDENT_GATE_DOT_SINCE_TRITON:
        assert forward_plans.plan_persistent_fwd(128, 64, 1024, 1024, 2, *H200) == twin, "planned since run 13"
    assert forward_plans.resident_gate_dot(forward_plans.tile_persistent_fwd(128, 64, 768, 768, 2, *H200),
                                           768, 768, 2, H200[1]).block_k == 1024, "K padded to a power of two"

    def twin_of(B, H, element_size=2, num_sms=H200[0], shared=H200[1]):
        plan = forward_plans.tile_persistent_fwd(128, B, H, H, element_size, num_sms, shared)
        return forward_plans.resident_gate_dot(plan, H, H, element_size, shared)

    assert twin_of(64, 512) is None, "resident already (K <= RESIDENT_MAX_K)"
    assert twin_of(16, 2048) is None, "K past RESIDENT_GATE_DOT_MAX_K"
    assert twin_of(64, 1024, element_size=4) is None, "fp32 keeps four dots, streamed"
    assert twin_of(8, 1024) is None, "16 x 32 tiles: a 256 KiB slice does not fit"
    assert twin_of(64, 1024, num_sms=108, shared=166912) is None, "A100: 166,912 bytes"
    several = ForwardPlan(True, "default", False, 32, 16, 128, 32, 2, 4)  # two hidden blocks per program
    assert forward_plans.resident_gate_dot(several, 1024, 1024, 2, H200[1]) is None


def test_resident_gate_dot_is_planned_from_triton_3_6(monkeypatch):
    """Under Triton 3.4 the resident gate-dot slice spills (456-504 bytes at K = 1024): the plan at H = 1024
    streams there, with the gate dot and the one-tile schedule, and holds W_hh resident from 3.6 on."""
    tiled = forward_plans.tile_persistent_fwd(128, 64, 1024, 1024, 2, *H200)
    planned = lambda: forward_plans.with_measured_variants(tiled, 64, 1024, 1024, 2, *H200)  # noqa: E731
    monkeypatch.setattr(forward_plans, "TRITON_VERSION", (3, 4))
    old = planned()
    assert not old.resident and old.gate_dot and old.streamed_one_tile and old.block_k == tiled.block_k, old
    monkeypatch.setattr(forward_plans, "TRITON_VERSION", (3, 6))
    assert planned() == forward_plans.resident_gate_dot(tiled, 1024, 1024, 2, H200[1])


GPU_RESIDENT_CASES = {
    "LSTM-H1024-B64": (Case(T=64, B=64, I=256, H=1024, with_state=True), "LSTM"),
    "GRU-H1024-B48-packed": (Case(T=48, B=48, I=256, H=1024, packed=True), "GRU"),
}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", GPU_RESIDENT_CASES, ids=str)
def test_gpu_resident_gate_dot_matches_nn(name, dtype, monkeypatch):
    """The GPU's single-layer plans at H = 1024, W_hh resident with the gate dot (``resident_gate_dot``, as
    planned since run 13), against nn in float64 on the same card; every launch must have run resident (a
    launch that did not fit the device would have streamed instead)."""
    case, cell = GPU_RESIDENT_CASES[name]
    seen = _spy_launches(monkeypatch, "RESIDENT", "GATE_BIT")
    check_against_nn(case, dtype, oracle_device="cuda", cell=cell)
    assert seen and all(launch["RESIDENT"] and launch["GATE_BIT"] > 0 for launch in seen), seen


# --- fused_input -------------------------------------------------------------------------------------

FUSED_INPUT_CASES = {
    # name: (cell, layers, T, B, I, H, dtype, plan knobs, lengths, bias, peephole, save)
    "LSTM-L1-resident-ahead-lengths": ("LSTM", 1, 6, 5, 20, 20, torch.float32, dict(resident=True, input_ahead=True),
                                       True, True, False, True),
    "LSTM-L1-resident-ahead-fp16-narrow-x": ("LSTM", 1, 5, 3, 7, 17, torch.float16,
                                             dict(resident=True, input_ahead=True), False, True, False, True),
    "LSTM-L3-streamed-several-tiles": ("LSTM", 3, 5, 20, 20, 20, torch.float32, dict(block_b=16, block_h=16), False,
                                       True, False, True),
    "LSTM-L2-gate-dot-peephole-inference": ("LSTM", 2, 6, 4, 12, 12, torch.float32,
                                            dict(input_ahead=True, gate_dot=True), True, True, True, False),
    "GRU-L1-streamed-ahead-gate-dot-lengths-wide-x": ("GRU", 1, 6, 5, 30, 9, torch.float32,
                                                      dict(input_ahead=True, gate_dot=True), True, True, False, True),
    # (a resident plan holds one hidden block per program: its several tiles are batch blocks)
    "GRU-L1-resident-two-batch-blocks-wide-x": ("GRU", 1, 4, 20, 40, 16, torch.float32,
                                                dict(resident=True, block_b=16, block_h=16), False, True, False, True),
    "GRU-L2-resident-ahead-no-bias": ("GRU", 2, 5, 3, 20, 20, torch.float32, dict(resident=True, input_ahead=True),
                                      False, False, False, True),
    # The one-tile schedule of a stack (streamed_one_tile): one K loop over x's and h's chunks where x is
    # narrower or wider than H (their widths differ per chunk), a GRU's too.
    "LSTM-L1-one-tile-gate-dot-lengths-wide-x": ("LSTM", 1, 6, 5, 30, 9, torch.float32,
                                                 dict(streamed_one_tile=True, gate_dot=True), True, True, False, True),
    "LSTM-L1-one-tile-gate-dot-fp16-narrow-x": ("LSTM", 1, 5, 3, 7, 17, torch.float16,
                                                dict(streamed_one_tile=True, gate_dot=True), False, True, False, True),
    "LSTM-L2-one-tile-gate-dot-peephole-inference": ("LSTM", 2, 6, 4, 12, 12, torch.float32,
                                                     dict(streamed_one_tile=True, gate_dot=True), True, True, True,
                                                     False),
    "GRU-L2-one-tile-gate-dot-lengths": ("GRU", 2, 5, 4, 12, 12, torch.float32,
                                         dict(streamed_one_tile=True, gate_dot=True), True, True, False, True),
    "GRU-L1-one-tile-gate-dot-wide-x-no-bias": ("GRU", 1, 5, 3, 30, 9, torch.float32,
                                                dict(streamed_one_tile=True, gate_dot=True), False, False, False, True),
}


def _fused_input_reference(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_ch, lengths):
    """Every layer's (h_all, c_all, gates) from the plain-PyTorch recurrence, layer by layer."""
    from triton_lstm.reference import gru_recurrence_reference, lstm_recurrence_reference

    outputs, layer_input = [], x
    for layer in range(w_hh.shape[0]):
        biases = (b_ih[layer], b_hh[layer]) if b_ih is not None else (None, None)
        if cell == "GRU":
            out = gru_recurrence_reference(layer_input, h0[layer], w_ih[layer], w_hh[layer], *biases, lengths)
        else:
            out = lstm_recurrence_reference(layer_input, h0[layer], c0[layer], w_ih[layer], w_hh[layer], *biases, None,
                                            lengths, None if w_ch is None else w_ch[layer])
        outputs.append(out)
        layer_input = out[0][1:]
    return [torch.stack(parts) for parts in zip(*outputs)]


def _run_fused_input(cell, layers, T, B, I, H, dtype, knobs, with_lengths, bias, peephole, save, seed=0):
    """(ours, PyTorch's in ``dtype``, the float64 reference): each a list of every layer's h_all, c_all
    and gates, ours from ``lstm_fwd_fused_input`` under a one-program plan with ``knobs``."""
    from triton_lstm.kernels.lstm_fwd_fused_input import lstm_fwd_fused_input
    from triton_lstm.reference import gru_projection_bias

    torch.manual_seed(seed)
    gates = 3 if cell == "GRU" else 4
    def randn(*shape):
        return torch.randn(*shape, device=KERNEL_DEVICE)

    x = randn(T, B, I)
    h0, c0 = randn(layers, B, H), randn(layers, B, H)
    w_ih = randn(layers, gates * H, I) * I**-0.5 if layers == 1 else randn(layers, gates * H, H) * H**-0.5
    w_hh = randn(layers, gates * H, H) * H**-0.5
    b_ih, b_hh = (randn(layers, gates * H) * 0.3, randn(layers, gates * H) * 0.3) if bias else (None, None)
    w_ch = randn(layers, 3 * H) * 0.5 if peephole else None
    lengths = torch.randint(1, T + 1, (B,), dtype=torch.int32, device=KERNEL_DEVICE) if with_lengths else None
    if cell == "GRU":
        c0 = h0
    width = max(16, triton.next_power_of_2(H))
    plan = dataclasses.replace(ForwardPlan(True, "fused input (test)", False, max(16, triton.next_power_of_2(B)), width,
                                           16, 1, 1, 4), fused_input=True, **knobs)
    if plan.resident:
        plan = dataclasses.replace(plan, block_k=max(16, triton.next_power_of_2(H)))
    cast = [t.to(dtype) if t is not None else None for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_ch)]
    xd, h0d, c0d, w_ihd, w_hhd, b_ihd, b_hhd, w_chd = cast
    if cell == "GRU":
        fused_bias = None if b_ih is None else torch.stack([gru_projection_bias(b_ihd[i], b_hhd[i]) for i in range(layers)])
        b_hn = b_hhd[:, 2 * H:].contiguous() if b_ih is not None else torch.zeros(layers, H, dtype=dtype, device=KERNEL_DEVICE)
        ours = lstm_fwd_fused_input(xd, h0d, h0d, w_hhd, w_ihd, fused_bias, lengths, plan, save, b_hn=b_hn)
    else:
        fused_bias = None if b_ih is None else b_ihd + b_hhd
        ours = lstm_fwd_fused_input(xd, h0d, c0d, w_hhd, w_ihd, fused_bias, lengths, plan, save, w_ch=w_chd)
    lengths64 = None if lengths is None else lengths.long()
    torchs = _fused_input_reference(cell, *cast, lengths64)
    reference = _fused_input_reference(cell, *[t.double() if t is not None else None
                                               for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_ch)], lengths64)
    return ours, torchs, reference


@pytest.mark.parametrize("name", FUSED_INPUT_CASES, ids=str)
def test_fused_input_matches_the_reference(name, monkeypatch):
    """Every layer's h_all, c_all and saved gates (a training forward) — or an inference forward's h_all
    and c_n — from x in the kernel, against the float64 recurrence, within PyTorch's own error."""
    cell, layers, T, B, I, H, dtype, knobs, with_lengths, bias, peephole, save = FUSED_INPUT_CASES[name]
    if KERNEL_DEVICE == "cuda" and knobs.get("streamed_one_tile"):
        pytest.skip("the one-tile schedule's one-program cases: on a GPU its own plans (test_gpu_stack_one_tile_…)")
    seen = _spy_launches(monkeypatch, "FUSED_INPUT", "INPUT_AHEAD", "RESIDENT", "GATE_BIT", "ONE_TILE")
    ours, torchs, reference = _run_fused_input(cell, layers, T, B, I, H, dtype, knobs, with_lengths, bias, peephole,
                                               save)
    assert seen == [{"FUSED_INPUT": True, "INPUT_AHEAD": knobs.get("input_ahead", False),
                     "RESIDENT": knobs.get("resident", False), "GATE_BIT": seen[0]["GATE_BIT"],
                     "ONE_TILE": knobs.get("streamed_one_tile", False)}], seen
    assert (seen[0]["GATE_BIT"] > 0) == knobs.get("gate_dot", False)
    for what, index in (("h_all", 0), ("c_all", 1), ("gates", 2)):
        if save:
            assert_error_within_pytorch(f"{name} {what}", ours[index], torchs[index], reference[index], dtype, H)
    if not save:
        assert ours[2].shape[1] == 0 and ours[1].shape[1] == 1, "an inference forward keeps no per-step gates or c"
        assert_error_within_pytorch(f"{name} h_all", ours[0], torchs[0], reference[0], dtype, H)
        assert_error_within_pytorch(f"{name} c_n", ours[1][:, -1], torchs[1][:, -1], reference[1][:, -1], dtype, H)


FUSED_INPUT_MODULES = {
    # name: (case, cell, resident, stack): every plan one program owning the whole batch and H.
    "LSTM-resident-packed": (Case(T=6, B=5, I=20, H=20, packed=True), "LSTM", True),
    "GRU-streamed-state": (Case(T=5, B=4, I=17, H=17, with_state=True), "GRU", False),
    "LSTM-stack-L3-state": (Case(T=5, B=3, I=12, H=12, num_layers=3, with_state=True), "LSTM", True),
    "GRU-stack-L2-packed": (Case(T=6, B=4, I=9, H=9, num_layers=2, packed=True), "GRU", False),
    "LSTM-no-bias-batch-first": (Case(T=4, B=3, I=10, H=10, bias=False, batch_first=True), "LSTM", False),
    "LSTM-resident-narrow-x-state": (Case(T=5, B=3, I=7, H=12, with_state=True), "LSTM", True),
    "GRU-streamed-wide-x-packed": (Case(T=5, B=4, I=21, H=6, packed=True), "GRU", False),
}


@pytest.mark.parametrize("name", FUSED_INPUT_MODULES, ids=str)
def test_modules_with_the_input_product_in_the_kernel_match_nn(name, monkeypatch):
    """The modules where the plan asks for ``fused_input`` (one layer through the ops'
    ``lstm_fwd_from_input``, stacks through their whole-stack op): nn's outputs and every gradient; the
    backward is the plain one, on what the fused forward saved."""
    case, cell, resident = FUSED_INPUT_MODULES[name]
    plan = dataclasses.replace(_one_tile_plan(case, resident), fused_input=True, input_ahead=True)
    monkeypatch.setattr(persistent, "plan_for", lambda sequence, w_hh: plan)
    _plan_stacks(monkeypatch, lambda x, hidden_size, num_layers: plan)
    seen = _spy_launches(monkeypatch, "FUSED_INPUT", "INPUT_AHEAD")
    check_against_nn(case, STACK_DTYPE if case.num_layers > 1 else torch.float32, cell=cell)
    assert seen and all(launch == {"FUSED_INPUT": True, "INPUT_AHEAD": True} for launch in seen), seen


def test_stacks_project_x_first_where_its_size_is_not_h(monkeypatch):
    """A stack's plan with ``fused_input`` where input_size != hidden_size (its layers' input products share
    one K): the projection GEMM runs first, and the stack's launch on it."""
    case = Case(T=4, B=3, I=7, H=12, num_layers=2)
    plan = dataclasses.replace(_one_tile_plan(case), fused_input=True)
    _plan_stacks(monkeypatch, lambda x, hidden_size, num_layers: plan)
    seen = _spy_launches(monkeypatch, "FUSED_INPUT", "LAYERS")
    check_against_nn(case, STACK_DTYPE)
    assert seen == [{"FUSED_INPUT": False, "LAYERS": 2}], seen


def test_a_fused_launch_that_does_not_fit_is_tried_once(monkeypatch):
    """Where the fused launch does not fit the device (OutOfResources as its kernel loads, before anything
    ran), the call projects x first and gets nn's numbers, and later calls go straight to the projection."""
    from triton.runtime.errors import OutOfResources

    from triton_lstm.kernels import lstm_fwd_fused_input as fused

    monkeypatch.setattr(fused, "_refused", set())
    case = Case(T=4, B=3, I=5, H=8)
    plan = dataclasses.replace(_one_tile_plan(case), fused_input=True)
    monkeypatch.setattr(persistent, "plan_for", lambda sequence, w_hh: plan)
    tries = []

    def does_not_fit(*args, **kwargs):
        tries.append(args[0].shape)
        raise OutOfResources(300_000, 232_448, "shared memory")

    monkeypatch.setattr(fused, "lstm_fwd_fused_input", does_not_fit)
    seen = _spy_launches(monkeypatch, "FUSED_INPUT")
    check_against_nn(case, torch.float32)
    check_against_nn(case, torch.float32)
    assert len(tries) == 1, tries
    assert seen and not any(launch["FUSED_INPUT"] for launch in seen), seen


def test_a_projection_runs_a_fused_plan_without_forming_it_again(monkeypatch):
    """The launchers that are given a projection (``gru_fwd``, and proj_size > 0's path) plan for
    themselves: where the plan says ``fused_input`` they run its schedule on the projection."""
    from triton_lstm.kernels.gru import gru_fwd, hidden_bias_n
    from triton_lstm.reference import gru_input_projection, gru_recurrence_reference

    case = Case(T=4, B=3, I=5, H=8)
    plan = dataclasses.replace(_one_tile_plan(case), fused_input=True, input_ahead=True)
    monkeypatch.setattr(persistent, "plan_for", lambda sequence, w_hh: plan)
    seen = _spy_launches(monkeypatch, "FUSED_INPUT")
    torch.manual_seed(0)
    x, h0 = torch.randn(4, 3, 5, device=KERNEL_DEVICE), torch.randn(3, 8, device=KERNEL_DEVICE)
    w_ih, w_hh = torch.randn(24, 5, device=KERNEL_DEVICE) * 0.4, torch.randn(24, 8, device=KERNEL_DEVICE) * 0.4
    b_ih, b_hh = torch.randn(24, device=KERNEL_DEVICE) * 0.1, torch.randn(24, device=KERNEL_DEVICE) * 0.1
    ours = gru_fwd(gru_input_projection(x, w_ih, b_ih, b_hh).contiguous(), h0, w_hh, hidden_bias_n(b_hh, w_hh), None)
    expected = gru_recurrence_reference(*(t.double() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)))
    torch.testing.assert_close(ours[0].double(), expected[0], rtol=1e-5, atol=1e-5)
    assert seen == [{"FUSED_INPUT": False}], seen


def test_fused_input_is_refused_where_it_does_not_apply():
    """The launcher refuses a plan without the variant and a stack whose input size is not H, and the
    stack's and single layer's launchers (which take a projection) refuse a plan with it."""
    from triton_lstm.kernels.lstm_fwd_fused_input import lstm_fwd_fused_input
    from triton_lstm.kernels.lstm_fwd_stack import lstm_fwd_stack

    T, B, H = 3, 2, 8
    plan = ForwardPlan(True, "test", False, 16, 16, 16, 1, 1, 4)
    fused = dataclasses.replace(plan, fused_input=True)
    h0, w_hh, w_ih = torch.zeros(1, B, H), torch.randn(1, 4 * H, H), torch.randn(1, 4 * H, H)
    with pytest.raises(ValueError, match="fused_input"):
        lstm_fwd_fused_input(torch.randn(T, B, H), h0, h0, w_hh, w_ih, None, None, plan)
    h0_2, w_hh_2 = torch.zeros(2, B, H), torch.randn(2, 4 * H, H)
    with pytest.raises(ValueError, match="input_size == hidden_size"):
        lstm_fwd_fused_input(torch.randn(T, B, H + 1), h0_2, h0_2, w_hh_2, torch.randn(2, 4 * H, H), None, None, fused)
    with pytest.raises(ValueError, match="fused_input"):
        persistent.lstm_fwd_persistent(torch.randn(T, B, 4 * H), h0[0], h0[0], w_hh[0], None, fused)
    with pytest.raises(ValueError, match="fused_input"):
        lstm_fwd_stack(torch.randn(T, B, 4 * H), h0_2, h0_2, w_hh_2, w_ih, None, None, fused)


# --- on a GPU: the GPU's own plans with each variant ------------------------------------------------

GPU_CASES = {
    "LSTM-H1024-B64": (Case(T=64, B=64, I=256, H=1024), "LSTM"),
    "LSTM-H512-B256": (Case(T=32, B=256, I=512, H=512, with_state=True), "LSTM"),
    "GRU-H512-B256-packed": (Case(T=32, B=256, I=512, H=512, packed=True), "GRU"),
    "LSTM-H2048-B16-packed": (Case(T=32, B=16, I=128, H=2048, packed=True), "LSTM"),
    "LSTM-stack-L4-H512": (Case(T=48, B=64, I=512, H=512, num_layers=4), "LSTM"),
    "LSTM-bidirectional-L2-packed": (Case(T=40, B=64, I=256, H=1024, num_layers=2, bidirectional=True, packed=True),
                                     "LSTM"),
    "GRU-H1024-B64-packed": (Case(T=48, B=64, I=256, H=1024, packed=True), "GRU"),
    "GRU-stack-L2-H512": (Case(T=48, B=64, I=512, H=512, num_layers=2), "GRU"),
}


def _gpu_variants(monkeypatch):
    """Every plan the GPU's planners make, with the four variants on where they apply (the input product in
    the kernel: one layer, and stacks where I == H): each planner replaced in its own module and wherever
    it is imported."""
    from triton_lstm.kernels import lstm_fwd_bidirectional, lstm_fwd_stack

    for name in ("plan_persistent_fwd", "plan_stack_fwd", "plan_bidirectional_fwd"):
        planner = getattr(forward_plans, name)

        def with_variants(*args, _planner=planner, _fused=name != "plan_bidirectional_fwd", **kwargs):
            return dataclasses.replace(_planner(*args, **kwargs), gate_dot=True, input_ahead=True, streamed_one_tile=True,
                                       fused_input=_fused)

        for module in (forward_plans, persistent, lstm_fwd_bidirectional, lstm_fwd_stack):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, with_variants)


@requires_cuda
@pytest.mark.parametrize("name", ["LSTM-stack-L4-H512", "GRU-stack-L2-H512", "LSTM-stack-L3-H1024-proj-packed"])
def test_gpu_stack_one_tile_schedule_matches_nn(name, monkeypatch):
    """The GPU's stack plans (one tile per program at these shapes) on the stack's one-tile schedule, and the
    stacked backward's chain in one K loop (``backward_plans.STACK_ONE_LOOP``), in bf16 against nn in float64
    on the same card."""
    from triton_lstm.kernels import backward_plans, lstm_bwd_whole_module, lstm_fwd_stack

    # B = 16 at H = 1024 on 3 layers: 16 × 32 tiles, 32 programs per layer (B = 17 would leave each program
    # two batch blocks on an H200's 44 SMs per layer, and the plain schedule).
    cases = dict(GPU_CASES, **{"LSTM-stack-L3-H1024-proj-packed": (
        Case(T=40, B=16, I=256, H=1024, num_layers=3, proj_size=256, packed=True, with_state=True), "LSTM")})
    case, cell = cases[name]
    x = torch.empty(case.T, case.B, case.I, device="cuda", dtype=torch.bfloat16)
    planned = lstm_fwd_stack.plan_stack_for(x, case.H, case.num_layers, projection=case.proj_size > 0)
    if not forward_plans.one_tile_each(planned, case.B, case.H):
        pytest.skip(f"this card's SMs leave a program several tiles at this shape: {planned}")
    planner = forward_plans.plan_stack_fwd

    def one_tile(*args, **kwargs):
        return dataclasses.replace(planner(*args, **kwargs), streamed_one_tile=True)

    monkeypatch.setattr(lstm_fwd_stack, "plan_stack_fwd", one_tile)
    monkeypatch.setattr(backward_plans, "STACK_ONE_LOOP", True)
    seen = _spy_launches(monkeypatch, "ONE_TILE", "LAYERS")
    chains = record_launches(monkeypatch, [lstm_bwd_whole_module], "_lstm_bwd_kernel", "ONE_LOOP")
    check_against_nn(case, torch.bfloat16, oracle_device="cuda", cell=cell)
    assert {"ONE_TILE": True, "LAYERS": case.num_layers} in seen, seen
    assert chains == [{"ONE_LOOP": True}], f"one stacked backward chain, in one loop: {chains}"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", GPU_CASES, ids=str)
def test_gpu_variants_match_nn(name, dtype, monkeypatch):
    """The GPU's own plans with the variants (many programs, real barriers, the sm_90 MMA layouts the
    gate bit is chosen for) against nn in float64 on the same card."""
    case, cell = GPU_CASES[name]
    _gpu_variants(monkeypatch)
    seen = _spy_launches(monkeypatch, "GATE_BIT", "INPUT_AHEAD", "ONE_TILE", "FUSED_INPUT")
    check_against_nn(case, dtype, oracle_device="cuda", cell=cell)
    assert seen and all(launch["GATE_BIT"] > 0 for launch in seen), seen
    if case.num_layers > 1 and not case.bidirectional:
        assert any(launch["INPUT_AHEAD"] for launch in seen), f"the stack's tiles should be one per program: {seen}"
    if (case.num_layers == 1 or case.I == case.H) and not case.bidirectional:
        assert any(launch["FUSED_INPUT"] for launch in seen), f"x's input product should be formed in the kernel: {seen}"
