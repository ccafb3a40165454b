"""The persistent forward kernel against the float64 reference, its plan (the persistent / per-step
choice), its numerics at the edges, and a CPU smoke run of the benchmark harness.

Without CUDA the kernel runs through Triton's interpreter with one program (conftest.py), so the
multi-program barrier is exercised by the GPU-only tests at the bottom.
"""

from __future__ import annotations


import pytest
import torch
import triton

from helpers import HAS_CUDA, KERNEL_DEVICE, KERNEL_DTYPES, assert_error_within_pytorch, requires_cuda
from triton_lstm.kernels import common
from triton_lstm.kernels import forward_plans as plans
from triton_lstm.kernels import lstm_fwd_persistent as persistent
from triton_lstm.kernels.forward_plans import ForwardPlan, plan_persistent_fwd, resident_bytes
from triton_lstm.kernels.lstm_fwd_persistent import lstm_fwd_persistent, plan_for
from triton_lstm.reference import input_projection, lstm_recurrence_reference

INTERPRETER_DTYPES = [torch.float32, torch.float16]
H100 = dict(num_sms=132, shared_memory=232448)


def _problem(T, B, I, H, dtype, with_lengths=False, seed=0, device=KERNEL_DEVICE):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device)

    bound = H**-0.5
    inputs = dict(
        x=rand(T, B, I),
        h0=rand(B, H, scale=0.5),
        c0=rand(B, H, scale=0.5),
        w_ih=rand(4 * H, I, scale=bound),
        w_hh=rand(4 * H, H, scale=bound),
        b_ih=rand(4 * H, scale=bound),
        b_hh=rand(4 * H, scale=bound),
    )
    lengths = None
    if with_lengths:
        # Every length from 0 to T appears when B allows; the longest runs the whole T.
        lengths = (torch.arange(B) * 7 % (T + 1)).to(torch.int32)
        lengths[0] = T
        lengths = lengths.to(device)
    return inputs, lengths


def _run(inputs, lengths, dtype, plan):
    cast = {name: tensor.to(dtype) for name, tensor in inputs.items()}
    projected = input_projection(cast["x"], cast["w_ih"], cast["b_ih"], cast["b_hh"]).contiguous()
    return lstm_fwd_persistent(projected, cast["h0"], cast["c0"], cast["w_hh"], lengths, plan)


def _reference(inputs, lengths, dtype):
    cast = {name: tensor.to(dtype) for name, tensor in inputs.items()}
    return lstm_recurrence_reference(
        cast["x"], cast["h0"], cast["c0"], cast["w_ih"], cast["w_hh"], cast["b_ih"], cast["b_hh"], None, lengths
    )


def _assert_matches_reference(ours, inputs, lengths, dtype):
    reference = _reference(inputs, lengths, torch.float64)
    torchs = _reference(inputs, lengths, dtype)
    for name, mine, theirs, exact in zip(("h_all", "c_all", "gates"), ours, torchs, reference):
        expected_dtype = torch.float32 if name == "c_all" else dtype
        assert mine.dtype == expected_dtype, f"{name}: dtype {mine.dtype}, expected {expected_dtype}"
        assert_error_within_pytorch(name, mine, theirs, exact, dtype=dtype)


def _forced(mode, B, H, K, dtype=torch.float32):
    """Plans that exercise each blocking mode.

    Interpreter (one program): ``resident`` holds all of H and K in one block; ``streamed`` uses the
    narrowest blocks, so several batch, hidden and K blocks run per step in the one program.
    GPU: several programs and batch groups, so the barrier is exercised; ``streamed`` gives some programs
    two hidden blocks. fp32 16×16 tiles use 2 warps, as plan_persistent_fwd does (Triton 3.9 note there).
    """
    hidden_blocks = triton.cdiv(H, 16)
    if not HAS_CUDA:
        if mode == "resident":
            return ForwardPlan(True, "test: resident", True, 16, max(16, triton.next_power_of_2(H)),
                               max(16, triton.next_power_of_2(K)), 1, 1)
        return ForwardPlan(True, "test: streamed", False, 16, 16, 16, 1, 1)
    warps = 2 if dtype == torch.float32 else 4
    if mode == "resident":
        return ForwardPlan(True, "test: resident", True, 16, 16, max(16, triton.next_power_of_2(K)), hidden_blocks,
                           triton.cdiv(B, 16), warps)
    return ForwardPlan(True, "test: streamed", False, 16, 16, 16, max(1, triton.cdiv(hidden_blocks, 2)), triton.cdiv(B, 16), warps)


CASES = [
    # (T, B, I, H, lengths)
    (1, 1, 3, 1, False),
    (7, 3, 5, 17, True),
    (7, 17, 4, 33, False),
    (7, 17, 4, 33, True),
]


@pytest.mark.parametrize("mode", ["resident", "streamed"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("T,B,I,H,with_lengths", CASES, ids=lambda v: str(v))
def test_matches_float64_reference(T, B, I, H, with_lengths, dtype, mode):
    if not HAS_CUDA and dtype == torch.float16 and (T, B, H) == (7, 17, 33) and not with_lengths:
        pytest.skip("covered by the same shape with lengths (keeps the interpreter run short)")
    inputs, lengths = _problem(T, B, I, H, dtype, with_lengths)
    plan = _forced(mode, B, H, H, dtype)
    ours = _run(inputs, lengths, dtype, plan)
    _assert_matches_reference(ours, inputs, lengths, dtype)


def test_default_plan_through_the_op_runs_persistent(monkeypatch):
    """recurrence_fwd reaches the persistent kernel (no fallback call) and matches the reference."""
    calls = []
    monkeypatch.setattr(persistent, "lstm_fwd", lambda *args, **kwargs: calls.append(args) or pytest.fail("fell back"))
    from triton_lstm.ops import lstm_layer

    inputs, lengths = _problem(5, 3, 4, 9, torch.float32, with_lengths=True, seed=1)
    cast = {name: tensor.float() for name, tensor in inputs.items()}
    out, h_n, c_n = lstm_layer(cast["x"], cast["h0"], cast["c0"], cast["w_ih"], cast["w_hh"], cast["b_ih"], cast["b_hh"], lengths=lengths)
    h_ref, c_ref, _ = _reference(inputs, lengths, torch.float64)
    h_torch, c_torch, _ = _reference(inputs, lengths, torch.float32)
    assert not calls
    assert_error_within_pytorch("output", out, h_torch[1:], h_ref[1:], dtype=torch.float32)
    assert_error_within_pytorch("c_n", c_n, c_torch[-1], c_ref[-1], dtype=torch.float32)


def test_resident_out_of_resources_retries_streamed(monkeypatch):
    from triton.runtime.errors import OutOfResources

    launched, buffers = [], []
    real_launch = persistent.launch_persistent

    def launch(plan, projected, w_hh, h_all, *args, **options):
        launched.append(plan.resident)
        buffers.append(h_all.data_ptr())
        if plan.resident:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return real_launch(plan, projected, w_hh, h_all, *args, **options)

    monkeypatch.setattr(persistent, "launch_persistent", launch)
    monkeypatch.setattr(persistent, "_downgrades", {})
    inputs, lengths = _problem(3, 2, 3, 5, torch.float32)
    plan = _forced("resident", 2, 5, 5, torch.float32)
    ours = _run(inputs, lengths, torch.float32, plan)
    assert launched == [True, False]
    assert buffers[0] == buffers[1], "the retry fills the outputs the first attempt allocated"
    _assert_matches_reference(ours, inputs, lengths, torch.float32)
    # The downgrade is remembered: the same plan goes straight to streaming the next time.
    _run(inputs, lengths, torch.float32, plan)
    assert launched == [True, False, False]


def test_refused_cooperative_launch_falls_back_to_per_step(monkeypatch):
    def refuse(*args):
        raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")

    calls, refused = [], []
    real = persistent.lstm_fwd
    monkeypatch.setattr(persistent, "launch_persistent", lambda *args, **kwargs: refused.append(1) or refuse())
    monkeypatch.setattr(persistent, "lstm_fwd", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    monkeypatch.setattr(persistent, "_downgrades", {})
    inputs, lengths = _problem(3, 2, 3, 5, torch.float32, with_lengths=True)
    ours = _run(inputs, lengths, torch.float32, None)
    assert calls == [1] and refused == [1]
    _assert_matches_reference(ours, inputs, lengths, torch.float32)
    _run(inputs, lengths, torch.float32, None)
    assert calls == [1, 1] and refused == [1], "a refused plan is not launched again"

    def fail(*args, **kwargs):
        raise RuntimeError("some other launch error")

    monkeypatch.setattr(persistent, "launch_persistent", fail)
    monkeypatch.setattr(persistent, "_downgrades", {})
    with pytest.raises(RuntimeError, match="other launch error"):
        _run(inputs, lengths, torch.float32, None)


# --- The plan: a pure function of shapes and device limits ------------------------------------------

def test_plan_empty_inputs_and_one_step_go_per_step():
    assert not plan_persistent_fwd(0, 4, 64, 64, 2, **H100).persistent
    assert not plan_persistent_fwd(8, 0, 64, 64, 2, **H100).persistent
    # One step: the per-step kernel on a GPU (less host work per call), persistent under the interpreter.
    assert not plan_persistent_fwd(1, 8, 512, 512, 2, **H100).persistent
    assert plan_persistent_fwd(1, 8, 512, 512, 2, num_sms=1, shared_memory=96 * 1024, interpret=True).persistent


@pytest.mark.parametrize("element_size", [2, 4])
@pytest.mark.parametrize("H", [1, 17, 64, 1000, 4096])
def test_plan_under_the_interpreter_is_one_program(H, element_size):
    plan = plan_persistent_fwd(5, 17, H, H, element_size, num_sms=1, shared_memory=96 * 1024, interpret=True)
    assert plan.persistent and plan.num_programs == 1
    if plan.resident:
        assert plan.block_h >= H and plan.block_k >= H


def test_plan_anchor_shapes_on_an_h100():
    # 16-bit: the plans run 13 timed fastest on an H200 (forward_plans.with_measured_variants): one dot for
    # the four gates everywhere, W_hh resident up to K = 1024 where a program's slice fits, streamed on the
    # one-tile schedule at B = 256 and at H = 2048. fp32 always streams, through tensor-core "tf32x3" dots
    # where the card has them and FMA dots where it has not, with four dots.
    # (T, B, I, H): (resident, block_b, block_h, block_k, grid_h, grid_b, warps, streamed_one_tile)
    resident_past_512 = plans.TRITON_VERSION >= plans.RESIDENT_GATE_DOT_SINCE_TRITON  # (else it streams)
    expected = {
        (512, 64, 256, 256): (True, 16, 16, 256, 16, 4, 4, False),
        (256, 64, 1024, 1024): (True, 32, 16, 1024, 64, 2, 4, False) if resident_past_512
        else (False, 32, 16, 128, 64, 2, 4, True),
        (1024, 8, 512, 512): (True, 16, 16, 512, 32, 1, 4, False),
        (128, 256, 512, 512): (False, 64, 16, 64, 32, 4, 8, True),
        (256, 16, 2048, 2048): (False, 16, 32, 128, 64, 1, 4, False),
    }
    for (T, B, I, H), tiles in expected.items():
        plan = plan_persistent_fwd(T, B, H, H, 2, **H100)
        assert plan.persistent and plan.gate_dot, plan
        assert (plan.resident, plan.block_b, plan.block_h, plan.block_k, plan.grid_h, plan.grid_b, plan.num_warps,
                plan.streamed_one_tile) == tiles, plan
        assert not (plan.input_ahead or plan.fused_input), plan
        fp32 = plan_persistent_fwd(T, B, H, H, 4, **H100)
        assert not fp32.resident and fp32.exact_fp32_dot == "tf32x3" and not fp32.gate_dot, fp32
        fma = plan_persistent_fwd(T, B, H, H, 4, **H100, fp32_tensor_cores=False)
        assert not fma.resident and fma.exact_fp32_dot == "ieee" and fma.block_k <= 32, fma
    # The four-dot tiling under them (what bidirectional layers run), measured before run 13: 16-row tiles
    # with 32-unit hidden blocks split the batch.
    plan = plans.tile_persistent_fwd(512, 64, 256, 256, 2, **H100)
    assert (plan.block_b, plan.block_h, plan.grid_h, plan.grid_b, plan.num_warps) == (16, 32, 8, 4, 4), plan
    assert not plan.gate_dot, plan


@pytest.mark.parametrize("num_sms,shared_memory", [(132, 232448), (114, 232448), (108, 166912), (16, 101376)])
def test_plan_invariants(num_sms, shared_memory):
    """Never more programs than SMs (the spin barrier would deadlock), resident only within budget,
    tl.dot's 16-wide minimum respected, and per-step only where the hidden blocks do not fit."""
    for H in [1, 16, 17, 33, 100, 256, 512, 1024, 2048, 4096, 8192, 65536]:
        for B in [1, 3, 16, 17, 64, 512]:
            for element_size in (2, 4):
                plan = plan_persistent_fwd(64, B, H, H, element_size, num_sms, shared_memory)
                if not plan.persistent:
                    assert triton.cdiv(H, 64) > plans.MAX_HIDDEN_BLOCKS_PER_PROGRAM * num_sms, (H, plan)
                    continue
                assert 1 <= plan.num_programs <= num_sms, (H, B, plan)
                assert min(plan.block_b, plan.block_h, plan.block_k) >= 16
                assert plan.grid_b <= triton.cdiv(B, plan.block_b)
                assert plan.grid_h <= triton.cdiv(H, plan.block_h)
                hidden_blocks_per_program = triton.cdiv(triton.cdiv(H, plan.block_h), plan.grid_h)
                assert hidden_blocks_per_program <= plans.MAX_HIDDEN_BLOCKS_PER_PROGRAM
                if plan.resident:
                    assert element_size == 2
                    assert plan.grid_h == triton.cdiv(H, plan.block_h)  # one hidden block per program
                    assert plan.block_k >= H
                    assert resident_bytes(plan.block_b, plan.block_h, H, element_size) <= shared_memory - plans.RESIDENT_HEADROOM
                if element_size == 4:
                    assert plan.exact_fp32_dot == "tf32x3"
                    fma = plan_persistent_fwd(64, B, H, H, 4, num_sms, shared_memory, fp32_tensor_cores=False)
                    assert fma.exact_fp32_dot == "ieee" and fma.block_k <= 32  # see the note in plan_persistent_fwd


@pytest.mark.parametrize("num_sms,shared_memory", [(132, 232448), (114, 232448), (108, 166912), (128, 101376)])
def test_streamed_plans_fit_the_cards_shared_memory(num_sms, shared_memory):
    """A streamed program's two K chunks in flight (``streamed_bytes``, Triton 3.9's allocation on sm_8x to
    within 2 KB) fit the card, for one layer, the four-dot tiling under it and both directions in one launch:
    on a 99-KB card (sm_86, sm_89, sm_120) the 16-row tiles at H >= 2048 read 128-wide chunks, where the
    256-wide ones (147,456 bytes) would not load; the H200's plans keep theirs."""
    for H in [1, 17, 256, 1024, 2048, 4096, 8192]:
        for B in [1, 16, 17, 64, 512]:
            for element_size in (2, 4):
                for plan in (plan_persistent_fwd(64, B, H, H, element_size, num_sms, shared_memory),
                             plans.tile_persistent_fwd(64, B, H, H, element_size, num_sms, shared_memory),
                             plans.plan_bidirectional_fwd(64, B, H, element_size, num_sms, shared_memory)):
                    if plan.persistent and not plan.resident:
                        chunks = plans.streamed_bytes(plan.block_b, plan.block_h, plan.block_k, element_size)
                        assert chunks <= shared_memory - plans.RESIDENT_HEADROOM, (H, B, element_size, plan)
    both_directions = plans.plan_bidirectional_fwd(256, 16, 2048, 2, num_sms, shared_memory)
    assert both_directions.block_k == (256 if shared_memory > 160 * 1024 else 128), both_directions


def test_plan_disabled_by_environment(monkeypatch):
    projected = torch.zeros(2, 1, 8)
    w_hh = torch.zeros(8, 2)
    assert plan_for(projected, w_hh).persistent or HAS_CUDA
    monkeypatch.setenv("TRITON_LSTM_PERSISTENT", "0")
    assert not plan_for(projected, w_hh).persistent


@pytest.mark.skipif(HAS_CUDA, reason="the one-program rule is the interpreter's")
def test_interpreter_refuses_a_multi_program_plan():
    inputs, lengths = _problem(2, 2, 2, 17, torch.float32)
    with pytest.raises(ValueError, match="one program"):
        _run(inputs, lengths, torch.float32, ForwardPlan(True, "test", False, 16, 16, 16, 2, 1))


# --- Numerics at the edges ---------------------------------------------------------------------------

def _identity_projection_problem(T, B, H, dtype, projected):
    """Inputs whose input projection is exactly ``projected`` (W_ih = I, no bias)."""
    generator = torch.Generator().manual_seed(3)
    w_hh = (torch.randn(4 * H, H, generator=generator) * H**-0.5).to(dtype).to(KERNEL_DEVICE)
    h0 = torch.randn(B, H, generator=generator).to(dtype).to(KERNEL_DEVICE)
    c0 = torch.randn(B, H, generator=generator).to(dtype).to(KERNEL_DEVICE)
    eye = torch.eye(4 * H, dtype=dtype, device=KERNEL_DEVICE)
    return projected.to(dtype).to(KERNEL_DEVICE).contiguous(), h0, c0, w_hh, eye


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy's exp(1e4) = inf, as meant
@pytest.mark.parametrize("mode", ["resident", "streamed"])
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
def test_saturating_pre_activations(dtype, mode):
    T, B, H = 4, 3, 17
    generator = torch.Generator().manual_seed(4)
    signs = torch.randint(0, 2, (T, B, 4 * H), generator=generator) * 2.0 - 1.0
    magnitudes = 10.0 ** torch.randint(1, 5, (T, B, 4 * H), generator=generator)  # 10 … 1e4
    projected, h0, c0, w_hh, eye = _identity_projection_problem(T, B, H, dtype, signs * magnitudes)
    ours = lstm_fwd_persistent(projected, h0, c0, w_hh, None, _forced(mode, B, H, H, dtype))
    reference = lstm_recurrence_reference(projected.double(), h0.double(), c0.double(), eye.double(), w_hh.double(), None, None)
    torchs = lstm_recurrence_reference(projected, h0, c0, eye, w_hh, None, None)
    for name, mine, theirs, exact in zip(("h_all", "c_all", "gates"), ours, torchs, reference):
        assert torch.isfinite(mine).all(), f"{name}: non-finite values under saturation"
        assert_error_within_pytorch(name, mine, theirs, exact, dtype=dtype)


@pytest.mark.parametrize("mode", ["resident", "streamed"])
def test_nan_in_one_batch_row_stays_in_that_row(mode):
    T, B, H, bad_row, bad_step = 5, 17, 17, 4, 1
    dtype = torch.float32
    generator = torch.Generator().manual_seed(5)
    clean = torch.randn(T, B, 4 * H, generator=generator)
    poisoned = clean.clone()
    poisoned[bad_step, bad_row, 3] = float("nan")
    plan = _forced(mode, B, H, H, dtype)
    args = _identity_projection_problem(T, B, H, dtype, clean)[1:4]
    ours_clean = lstm_fwd_persistent(clean.to(KERNEL_DEVICE).contiguous(), *args, None, plan)
    ours_bad = lstm_fwd_persistent(poisoned.to(KERNEL_DEVICE).contiguous(), *args, None, plan)
    others = [b for b in range(B) if b != bad_row]
    for name, good, bad in zip(("h_all", "c_all", "gates"), ours_clean, ours_bad):
        assert torch.equal(good[:, others], bad[:, others]), f"{name}: a NaN in row {bad_row} reached other rows"
        assert torch.isnan(bad[-1, bad_row]).any(), f"{name}: the NaN did not propagate in its own row"


# --- GPU only: many programs, long sequences, large tensors --------------------------------------------

def _check_steps(projected, w_hh, h_all, c_all, gates, steps, rows=None):
    """Recomputes the given steps (of the given batch rows) in float64 from the kernel's own state:
    checks the indexing of every buffer there (an int32 offset overflow lands elsewhere) without a
    full-length reference."""
    rows = slice(None) if rows is None else rows
    tol = 2e-2 if projected.dtype != torch.float32 else 1e-4
    for t in steps:
        pre = projected[t][rows].double() + h_all[t][rows].double() @ w_hh.double().t()
        i, f, g, o = pre.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c_all[t][rows].double() + i * g
        h = o * torch.tanh(c)
        assert (c_all[t + 1][rows].double() - c).abs().max().item() < tol * max(1.0, c.abs().max().item()), f"c at step {t}"
        assert (h_all[t + 1][rows].double() - h).abs().max().item() < tol, f"h at step {t}"
        assert (gates[t][rows].double() - torch.cat([i, f, g, o], 1)).abs().max().item() < tol, f"gates at step {t}"


@requires_cuda
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("T,B,I,H", [(33, 64, 256, 256), (9, 64, 1024, 1024), (33, 8, 512, 512), (9, 256, 512, 512), (9, 16, 2048, 2048), (17, 17, 33, 33)], ids=str)
def test_gpu_default_plans_match_reference(T, B, I, H, dtype):
    inputs, lengths = _problem(T, B, I, H, dtype, with_lengths=True)
    _assert_matches_reference(_run(inputs, lengths, dtype, None), inputs, lengths, dtype)


@requires_cuda
@pytest.mark.parametrize(
    "plan",
    [
        ForwardPlan(True, "resident, 4 batch groups", True, 16, 16, 256, 16, 4),
        ForwardPlan(True, "resident, 2 batch blocks per program", True, 16, 16, 256, 16, 2),
        ForwardPlan(True, "streamed, 3 hidden blocks per program", False, 16, 16, 64, 6, 2),
        ForwardPlan(True, "streamed, one program", False, 64, 64, 64, 1, 1),
    ],
    ids=lambda plan: plan.reason,
)
def test_gpu_forced_plans_match_reference(plan):
    inputs, lengths = _problem(21, 64, 64, 256 if plan.resident else 272, torch.float16, with_lengths=True)
    _assert_matches_reference(_run(inputs, lengths, torch.float16, plan), inputs, lengths, torch.float16)


@requires_cuda
def test_gpu_long_sequence_large_batch():
    T, B, H = 4096, 512, 128
    projected = torch.randn(T, B, 4 * H, device="cuda", dtype=torch.bfloat16)
    w_hh = (torch.randn(4 * H, H, device="cuda") * H**-0.5).to(torch.bfloat16)
    h0 = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)
    c0 = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)
    h_all, c_all, gates = lstm_fwd_persistent(projected, h0, c0, w_hh, None)
    assert torch.isfinite(h_all).all() and torch.isfinite(c_all).all()
    _check_steps(projected, w_hh, h_all, c_all, gates, [0, 1, T // 2, T - 1])


@requires_cuda
def test_gpu_tensor_over_2_31_elements():
    T, B, H = 1040, 512, 1024  # gates: T·B·4H = 2.18e9 elements
    assert T * B * 4 * H > 2**31
    projected = torch.randn(T, B, 4 * H, device="cuda", dtype=torch.bfloat16)
    w_hh = (torch.randn(4 * H, H, device="cuda") * H**-0.5).to(torch.bfloat16)
    h0 = torch.zeros(B, H, device="cuda", dtype=torch.bfloat16)
    c0 = torch.zeros(B, H, device="cuda", dtype=torch.bfloat16)
    lengths = torch.full((B,), T, dtype=torch.int32, device="cuda")
    lengths[::3] = T - 5
    h_all, c_all, gates = lstm_fwd_persistent(projected, h0, c0, w_hh, lengths)
    _check_steps(projected, w_hh, h_all, c_all, gates, [0, T - 6])
    full = lengths == T
    _check_steps(projected, w_hh, h_all, c_all, gates, [T - 1], rows=full)
    # Rows past their end carried the state of step T - 5 and stored zero gates at the last step.
    assert torch.equal(h_all[-1][~full], h_all[T - 5][~full])
    assert (gates[-1][~full] == 0).all()
    assert torch.isfinite(gates[-1]).all()


# --- A barrier that is never reached -----------------------------------------------------------------

def _run_and_report(run):
    """Runs a persistent launch and the check a later launch would make (on a GPU the failure flag is
    read after the launch has finished; under the interpreter at once)."""
    result = run()
    if HAS_CUDA:
        torch.cuda.synchronize()
        common.barrier_watch.check()
    return result


def test_barrier_watch_does_not_query_events_during_graph_capture(monkeypatch):
    """cudaEventQuery is refused while a stream captures (the GPU run's graph-capture tests failed so):
    during capture the earlier launches' flags stay pending, and are read after it."""
    class Finished:
        queries = 0

        def query(self):
            Finished.queries += 1
            return True

    watch = common.BarrierWatch()
    watch._pending.append((Finished(), torch.ones(1, dtype=torch.int32), "persistent forward kernel"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    watch.check()
    assert Finished.queries == 0 and len(watch._pending) == 1
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(RuntimeError, match="gave up"):
        watch.check()
    assert Finished.queries == 1


def test_barrier_watch_describes_a_launch_only_when_it_failed():
    """The launch's description (a plan's repr: microseconds of host time) is formatted for the error
    message alone: a launch whose flag is clear never asks for it."""
    described = []

    def describe():
        described.append(True)
        return "the test's launch"

    watch = common.BarrierWatch()
    watch.watch(torch.zeros(1, dtype=torch.int32), describe)  # a CPU flag: read at once, as the interpreter's
    assert described == []
    with pytest.raises(RuntimeError, match="the test's launch gave up"):
        watch.watch(torch.ones(1, dtype=torch.int32), describe)
    assert described == [True]


def test_barrier_that_is_never_reached_raises_instead_of_hanging(monkeypatch):
    # A spin limit of 0 gives up at the first barrier, as a grid that is not all resident would after
    # BARRIER_SPIN_LIMIT polls: the launch finishes, its h is NaN, and the launcher raises.
    monkeypatch.setattr(common, "BARRIER_SPIN_LIMIT", 0)
    inputs, lengths = _problem(4, 3, 5, 17, torch.float32, with_lengths=False)
    plan = _forced("resident", 3, 17, 17, torch.float16)
    with pytest.raises(RuntimeError, match=r"persistent forward kernel.*gave up.*TRITON_LSTM_PERSISTENT=0"):
        _run_and_report(lambda: _run(inputs, lengths, torch.float16, plan))
    monkeypatch.setattr(common, "BARRIER_SPIN_LIMIT", 1 << 25)
    h_all, _, _ = _run_and_report(lambda: _run(inputs, lengths, torch.float16, plan))
    assert torch.isfinite(h_all).all(), "a later launch with a reachable barrier runs normally"


# --- Inference forward: nothing kept per step ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["resident", "streamed", "per_step"])
@pytest.mark.parametrize("T", [1, 4, 7])
def test_inference_forward_keeps_no_per_step_state(T, mode):
    """save=False: the same h for every step and the same c_T, with c in two slots used in turn (T odd
    and even end in different slots) and no gates."""
    inputs, lengths = _problem(T, 19, 5, 17, torch.float32, with_lengths=True, seed=6)
    cast = {name: tensor.float() for name, tensor in inputs.items()}
    projected = input_projection(cast["x"], cast["w_ih"], cast["b_ih"], cast["b_hh"]).contiguous()
    args = (projected, cast["h0"], cast["c0"], cast["w_hh"], lengths)
    plan = ForwardPlan(False, "test: per-step") if mode == "per_step" else _forced(mode, 19, 17, 17)
    h_saved, c_saved, gates_saved = lstm_fwd_persistent(*args, plan)
    h_all, c_all, gates = lstm_fwd_persistent(*args, plan, save=False)
    assert gates.shape == (0, 19, 4 * 17) and gates_saved.shape == (T, 19, 4 * 17)
    assert c_all.shape == (1, 19, 17)
    torch.testing.assert_close(h_all, h_saved, rtol=0, atol=0)
    torch.testing.assert_close(c_all[-1], c_saved[-1], rtol=0, atol=0)


def test_module_forward_without_grad_saves_nothing():
    """Under no_grad (and for inputs that need no gradient) the module's op runs with save=0; with a
    gradient to take, save=1. Same outputs either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import triton_lstm

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.saves = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            # (the save argument's position, the gates output's position, the gates' steps axis)
            where = {"triton_lstm::recurrence_fwd": (9, 2, 0), "triton_lstm::bidirectional_fwd": (9, 3, 1),
                     "triton_lstm::stack_fwd": (9, 2, 1)}.get(func.name())
            if where is not None:
                save_at, gates_at, steps_axis = where
                self.saves.append((args[save_at] if len(args) > save_at else 1, result[gates_at].shape[steps_axis]))
            return result

    torch.manual_seed(0)
    for kwargs in (dict(bidirectional=True), dict(), dict(proj_size=4), dict(proj_size=4, bidirectional=True)):
        model = triton_lstm.LSTM(5, 17, num_layers=2, **kwargs).to(KERNEL_DEVICE)
        x = torch.randn(6, 3, 5, device=KERNEL_DEVICE)
        # Both directions in one op per layer, a stack in one op (not for fp32 on a GPU), projection or not.
        launches = 1 if model._runs_as_stack(x) else 2
        with torch.no_grad(), Calls() as calls:
            out_no_grad, (h_no_grad, c_no_grad) = model(x)
        assert calls.saves == [(0, 0)] * launches, kwargs
        with Calls() as calls:
            out, (h, c) = model(x)
        assert [save for save, _ in calls.saves] == [1] * launches and all(steps == 6 for _, steps in calls.saves)
        for ours, theirs in ((out_no_grad, out), (h_no_grad, h), (c_no_grad, c)):
            torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=0)
