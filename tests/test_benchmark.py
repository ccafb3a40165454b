"""The benchmark harness on the CPU (dry run, refusal without CUDA) and the README's generated speed table."""

import csv
import os
from pathlib import Path

import pytest
from helpers import HAS_CUDA, ROOT, benchmark_script

# The tuning sweeps run here through Triton's interpreter (device="cpu"); on a GPU host the interpreter is off
# and the launchers would be handed CPU tensors.
interpreter_only = pytest.mark.skipif(HAS_CUDA, reason="runs the sweep through the interpreter (device='cpu')")

EXPECTED_COLUMNS = ["device", "torch", "triton", "provider", "mode", "dtype", "T", "B", "I", "H", "layers", "bidirectional", "ms", "peak_mb"]


def test_benchmark_dry_run_writes_the_csv(tmp_path):
    from triton_lstm import benchmark

    assert benchmark.main(["--dry-run", "--out", str(tmp_path), "--no-plots"]) == 0
    (csv_path,) = tmp_path.rglob("results.csv")
    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == EXPECTED_COLUMNS
    assert len(rows) > 1
    providers = {row[3] for row in rows[1:]}
    modes = {row[4] for row in rows[1:]}
    assert providers == {"triton_lstm", "cudnn", "cell_loop"} and modes == {"fwd", "fwdbwd"}
    assert all(float(row[12]) > 0 for row in rows[1:])
    assert (csv_path.parent / "versions.txt").exists()


def test_a_benchmark_cut_short_still_writes_what_it_measured(tmp_path, monkeypatch):
    """A run stopped part way (gpu_check.sh's stage limit sends SIGTERM, which ``exit_on_sigterm`` turns into
    SystemExit; or an error) writes the rows measured so far, its summary marked as cut short, and stops
    with the same exit; the SIGTERM handler from before the run is back after it."""
    import signal

    from triton_lstm import benchmark

    calls, real = [], benchmark._workload

    def workload(*args):
        calls.append(args)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)  # the handler raises SystemExit here
        return real(*args)

    def unhandled(signum, frame):
        raise RuntimeError("the benchmark left SIGTERM to Python's default (exit at once, nothing written)")

    previous = signal.signal(signal.SIGTERM, unhandled)  # what main must replace
    monkeypatch.setattr(benchmark, "_workload", workload)
    try:
        with pytest.raises(SystemExit) as stopped:
            benchmark.main(["--dry-run", "--out", str(tmp_path), "--no-plots"])
        assert signal.getsignal(signal.SIGTERM) is unhandled, "the handler from before the run, restored"
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM
    (csv_path,) = tmp_path.rglob("results.csv")
    with open(csv_path, newline="") as handle:
        assert len(list(csv.reader(handle))) == 1 + 2, "the two measurements before the stop"
    assert "cut short after 2 of" in (csv_path.parent / "summary.md").read_text()


def test_benchmark_times_the_peephole_lstm_when_asked(tmp_path, capsys):
    from triton_lstm import benchmark

    argv = ["--dry-run", "--out", str(tmp_path), "--no-plots", "--provider", "triton_lstm", "triton_peephole"]
    assert benchmark.main(argv) == 0
    (csv_path,) = tmp_path.rglob("results.csv")
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["provider"] for row in rows} == {"triton_lstm", "triton_peephole"}
    assert "| triton_lstm | cudnn | cell_loop | triton_peephole |" in (csv_path.parent / "summary.md").read_text()
    quick = benchmark._plan(benchmark._parse_args(["--quick", "--provider", "triton_lstm", "cudnn", "triton_peephole"]))
    assert {(m, d) for m, d, _, providers in quick if "triton_peephole" in providers} == {("fwd", "bf16"), ("fwdbwd", "bf16")}
    assert all(providers for *_, providers in quick)


def test_benchmark_times_the_gru_against_cudnns_when_asked(tmp_path, capsys):
    from triton_lstm import benchmark

    argv = ["--dry-run", "--out", str(tmp_path), "--no-plots", "--mode", "fwdbwd", "--provider", "triton_gru", "cudnn_gru"]
    assert benchmark.main(argv) == 0
    (csv_path,) = tmp_path.rglob("results.csv")
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["provider"] for row in rows} == {"triton_gru", "cudnn_gru"}
    summary = (csv_path.parent / "summary.md").read_text()
    assert "| triton_lstm | cudnn | cell_loop | triton_gru | cudnn_gru |" in summary
    assert all(line.rstrip(" |").endswith("x") for line in summary.splitlines() if line.startswith("| fwdbwd"))
    quick = benchmark._plan(benchmark._parse_args(["--quick", "--provider", "triton_gru", "cudnn_gru"]))
    assert {(m, d, providers) for m, d, _, providers in quick} == {("fwd", "bf16", ("triton_gru", "cudnn_gru")),
                                                                  ("fwdbwd", "bf16", ("triton_gru", "cudnn_gru"))}
    assert len(quick) == 2 * (len(benchmark.ANCHOR_CASES) + 1)  # and a 2-layer bidirectional GRU


@pytest.mark.skipif(HAS_CUDA, reason="the refusal is for machines without CUDA")
def test_benchmark_refuses_without_cuda(capsys):
    from triton_lstm import benchmark

    assert benchmark.main(["--quick"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_readme_speed_table_is_the_committed_csv():
    """The README's table is rendered from a results CSV (benchmarks/update_readme.py), never typed."""
    update_readme = benchmark_script("update_readme")
    readme = (ROOT / "README.md").read_text()
    start = update_readme.START.search(readme)
    assert start, "README.md lost its speed-table markers"
    end = readme.index(update_readme.END) + len(update_readme.END)
    assert readme[start.start():end] == update_readme.rendered_section(Path(start.group(1))), (
        "README speed table differs from its CSV: run python benchmarks/update_readme.py"
    )


def test_cpu_benchmark_plans_the_cpu_cases():
    from triton_lstm import benchmark, benchmark_cases

    args = benchmark._parse_args(["--device", "cpu"])
    plan = benchmark._plan(args)
    assert {case for _, _, case, _ in plan} == set(benchmark_cases.CPU_CASES)
    assert all(dtype == "fp32" and "cell_loop" not in providers for _, dtype, _, providers in plan)


def test_plan_flag_describes_each_path(monkeypatch):
    """``--plan``: the words for the stacked launch, the per-layer launches and their fallbacks (the
    device limits of an H200, as a GPU machine would report them), and for a GPU the kernels do not run on."""
    import torch

    from triton_lstm import benchmark, benchmark_cases
    from triton_lstm.kernels import forward_plans

    from triton_lstm import ops

    monkeypatch.setattr(forward_plans, "_device_limits", lambda index: (132, 232448))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(ops, "kernels_run_on", lambda device: False)
    stacked = benchmark_cases.Case(512, 64, 512, 512, layers=4)
    assert benchmark.describe_path(stacked, torch.bfloat16, "cuda").startswith("ATen's LSTM"), "a GPU before Ampere"
    monkeypatch.setattr(ops, "kernels_run_on", lambda device: True)
    assert benchmark.describe_path(stacked, torch.bfloat16, "cuda").startswith("forward: stack of 4 layers in one launch")
    bidirectional = benchmark_cases.Case(512, 64, 512, 512, layers=2, bidirectional=True)
    assert benchmark.describe_path(bidirectional, torch.bfloat16, "cuda").startswith(
        "forward: 2 launch(es) of both directions in one launch")
    assert "layer launch" in benchmark.describe_path(stacked, torch.float32, "cuda"), "fp32 stacks run layer by layer"
    monkeypatch.setenv("TRITON_LSTM_STACK", "0")
    assert benchmark.describe_path(stacked, torch.bfloat16, "cuda").startswith("4 layer launch(es)")
    monkeypatch.setenv("TRITON_LSTM_BIDIRECTIONAL", "0")
    assert benchmark.describe_path(bidirectional, torch.bfloat16, "cuda").startswith("4 layer launch(es) of: persistent")


def test_tune_times_each_plan_with_its_variants(capsys):
    """``tune.py --variants``: each candidate followed by the same plan with every combination of the
    variants asked for (no gate dot in fp32), and each variant's time over the plain plan's."""
    import dataclasses

    import torch

    from triton_lstm.kernels.forward_plans import ForwardPlan

    tune = benchmark_script("tune")
    plans = [ForwardPlan(True, "a", False, 64, 16, 64, 8, 1, 8), ForwardPlan(True, "b", True, 16, 32, 512, 8, 1, 4)]
    gate_dot = [dataclasses.replace(plan, gate_dot=True) for plan in plans]
    assert tune._with_variants(plans, torch.bfloat16, ["gate_dot"]) == [plans[0], gate_dot[0], plans[1], gate_dot[1]]
    assert tune._with_variants(plans, torch.float32, ["gate_dot"]) == plans, "fp32 keeps four dots"
    assert tune._with_variants(plans, torch.bfloat16, []) == plans
    one_tile = tune._with_variants(plans, torch.bfloat16, ["streamed_one_tile"])
    assert one_tile == [plans[0], dataclasses.replace(plans[0], streamed_one_tile=True), plans[1]], "resident: n/a"
    both = tune._with_variants(plans[:1], torch.bfloat16, ["gate_dot", "input_ahead"])
    assert [(p.gate_dot, p.input_ahead) for p in both] == [(False, False), (True, False), (False, True), (True, True)]
    tune._print_variant_ratios({plans[0]: 10.0, gate_dot[0]: 8.0, both[2]: 9.0, both[3]: 7.0, plans[1]: 5.0,
                                gate_dot[1]: float("nan")})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    assert "gate dot / plain: 8.00 / 10.00 us/step = 0.800" in lines[0], lines
    assert "input ahead / plain: 9.00 / 10.00 us/step = 0.900" in lines[1], lines
    assert "gate dot + input ahead / plain: 7.00 / 10.00 us/step = 0.700" in lines[2], lines


def test_tune_times_the_one_tile_variants_only_where_they_run():
    """With the shape, the one-tile schedule and the input product ahead are asked only of plans whose
    programs own one tile each (elsewhere the launch runs the plain schedule: the "variant" would time the
    plain plan under its name); repeats of a plan that differ in their reason alone are timed once."""
    import dataclasses

    import torch

    from triton_lstm.kernels.forward_plans import ForwardPlan

    tune = benchmark_script("tune")
    owns_one = ForwardPlan(True, "a", False, 64, 16, 64, 32, 1, 8)  # B = 64, H = 512: 32 × 1 programs, one tile each
    owns_two = ForwardPlan(True, "b", False, 32, 16, 64, 32, 1, 4)  # two batch blocks per program
    variants = ["gate_dot", "streamed_one_tile", "input_ahead"]
    planned = tune._with_variants([owns_one, owns_two], torch.bfloat16, variants, shape=(64, 512))
    assert any(plan.streamed_one_tile for plan in planned) and any(plan.input_ahead for plan in planned)
    assert not any(plan.streamed_one_tile or plan.input_ahead for plan in planned if plan.block_b == 32)
    assert [plan for plan in planned if plan.block_b == 32] == [owns_two, dataclasses.replace(owns_two, gate_dot=True)]
    assert tune._unique([owns_one, dataclasses.replace(owns_one, reason="default"), owns_two]) == [owns_one, owns_two]


@interpreter_only
@pytest.mark.parametrize("cell,layers", [("lstm", 1), ("gru", 1), ("lstm", 2)])
def test_tune_sweeps_the_fused_input_variant_on_the_interpreter(cell, layers, monkeypatch, capsys):
    """``tune.py --variants fused_input …`` end to end, through the interpreter (one program per layer,
    ``do_bench`` replaced by a stub that still runs each candidate): the plans with the input product in
    the kernel give the planned plan's numbers ("ok"), and are set against the plain plan plus the
    projection GEMM. What a GPU session would otherwise find out by losing a stage."""
    import torch

    tune = benchmark_script("tune")
    monkeypatch.setattr(tune, "_bench", lambda fn: (fn(), 1.0)[1])
    rows = []
    variants = ["gate_dot", "input_ahead", "fused_input"]
    if layers == 1:
        tune.tune_forward(3, 4, 16, 16, torch.float16, 60.0, rows, cell, variants, device="cpu")
    else:
        tune.tune_stack_forward(3, 4, 16, 16, layers, torch.float16, 60.0, rows, variants, device="cpu")
    out = capsys.readouterr().out
    fused = [row for row in rows if "fused-input" in row["candidate"]]
    assert fused and all(row["status"] == "ok" for row in fused if "grid 1x1" in row["candidate"]), rows
    assert any(row["status"] == "ok" and "input-ahead" in row["candidate"] for row in fused), rows
    if layers == 1:
        inference = [row for row in rows if row["candidate"].endswith("(default) inference")]
        assert [row["status"] for row in inference] == ["ok"], rows
        assert "our module's whole no_grad call" in out, out
    assert "projection GEMM x·W_ihᵀ + b" in out and "fused input / plain + projection GEMM: 333.33 / 666.67" in out, out  # T = 3: 1 ms a call


@interpreter_only
def test_tune_sweeps_the_stack_one_tile_schedule_on_the_interpreter(monkeypatch, capsys):
    """``tune.py --layers 4 --variants gate_dot streamed_one_tile`` (gpu_check.sh's STACK_VARIANTS stage)
    end to end through the interpreter: the stack's one-tile builds give the planned plan's numbers ("ok")
    and are set against their plain builds."""
    import torch

    tune = benchmark_script("tune")
    monkeypatch.setattr(tune, "_bench", lambda fn: (fn(), 1.0)[1])
    rows = []
    tune.tune_stack_forward(3, 4, 16, 16, 4, torch.float16, 60.0, rows, ["gate_dot", "streamed_one_tile"], device="cpu")
    out = capsys.readouterr().out
    one_tile = [row for row in rows if "streamed-one-tile" in row["candidate"] and "grid 1x1" in row["candidate"]]
    assert one_tile and all(row["status"] == "ok" for row in one_tile), rows
    assert any("gate-dot" in row["candidate"] for row in one_tile), rows
    assert "gate dot + streamed one tile / plain:" in out, out


@interpreter_only
def test_tune_sweeps_the_stack_chain_variants_on_the_interpreter(monkeypatch, capsys):
    """``tune.py --layers 4 --mode bwd --variants prefetch one_loop`` (gpu_check.sh's STACK_VARIANTS stage):
    the planner's stacked chain plain, with the prefetch, in one loop and with both, each checked against
    the plain chain's dG ("ok") and set against it."""
    import torch

    from triton_lstm.kernels import backward_plans

    import types

    tune = benchmark_script("tune")
    clock = [0.0]  # each timing takes a second of a fake clock: the planner's four rows spend the 2.5-s budget

    def bench(fn):
        fn()
        clock[0] += 1.0
        return 1.0

    monkeypatch.setattr(tune, "_bench", bench)
    monkeypatch.setattr(tune, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    rows = []
    tune.tune_stack_backward(3, 4, 16, 16, 4, torch.float16, 2.5, rows, ["prefetch", "one_loop"], device="cpu")
    planner = [(row["candidate"], row["status"]) for row in rows if row["candidate"].startswith("planner")]
    assert planner == [("planner", "ok"), ("planner prefetch", "ok"), ("planner one loop", "ok"),
                       ("planner one loop + prefetch", "ok")], rows
    assert len(rows) == len(planner), "a budget spent by the planner's rows leaves the tile sweep out"
    assert "one loop + prefetch / plain: 1.000" in capsys.readouterr().out
    assert backward_plans.STACK_ONE_LOOP is False and backward_plans.PREFETCH is False


@interpreter_only
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_tune_sweeps_bidirectional_layers_with_the_gate_dot_on_the_interpreter(cell, monkeypatch, capsys):
    """``tune.py --bidirectional --variants gate_dot``: both directions in one launch, the planner's plan and
    its gate-dot build, each checked against the planned plan's output ("ok") and set against it."""
    import torch

    tune = benchmark_script("tune")
    monkeypatch.setattr(tune, "_bench", lambda fn: (fn(), 1.0)[1])
    rows = []
    tune.tune_bidirectional_forward(3, 4, 16, 16, torch.float16, 60.0, rows, cell, ["gate_dot", "input_ahead"],
                                    device="cpu")
    assert [("gate-dot" in row["candidate"], row["status"]) for row in rows] == [(False, "ok"), (True, "ok")], rows
    assert "gate dot / plain: 333.33 / 333.33 us/step = 1.000" in capsys.readouterr().out


@interpreter_only
def test_tune_reports_a_backward_tile_that_fell_back_to_per_step(monkeypatch):
    """A tile whose persistent launch was refused (or did not fit) runs per step; the sweep says so rather
    than time the per-step kernel under the tile's name."""
    import torch
    from helpers import refuse_cooperative_launches

    tune = benchmark_script("tune")
    monkeypatch.setattr(tune, "_bench", lambda fn: (fn(), 1.0)[1])
    refuse_cooperative_launches(monkeypatch, lambda launch: launch["BLOCK_K"] == 128)
    rows = []
    tune.tune_backward(3, 4, 16, 16, torch.float16, 60.0, rows, device="cpu")
    wide = [row for row in rows if " bk128 " in row["candidate"] + " "]
    assert wide and all(row["status"] == "did not fit or was refused (ran per step)" for row in wide), rows
    assert any(row["status"] == "ok" for row in rows if " bk64 " in row["candidate"] + " "), rows


@interpreter_only
def test_tune_times_the_backward_chain_with_and_without_the_prefetch(monkeypatch, capsys):
    """``tune.py --mode bwd --variants prefetch``: each tile of the chain plain and with its saved operands
    loaded a step ahead, each checked against the planner's result ("ok"), and prefetch / plain printed;
    the switch is restored after."""
    import torch

    from triton_lstm.kernels import backward_plans

    tune = benchmark_script("tune")
    monkeypatch.setattr(tune, "_bench", lambda fn: (fn(), 1.0)[1])
    rows = []
    tune.tune_backward(3, 4, 16, 16, torch.float16, 60.0, rows, ["prefetch"], device="cpu")
    assert [(row["candidate"].endswith("prefetch"), row["status"]) for row in rows][:2] == [(False, "ok"), (True, "ok")]
    assert all(row["status"] == "ok" for row in rows), rows
    assert "prefetch / plain: 333.33 / 333.33 us/step = 1.000" in capsys.readouterr().out
    assert backward_plans.PREFETCH is False


@interpreter_only
def test_tune_times_the_resident_gate_dot_twin_third(monkeypatch, capsys):
    """With the gate dot among ``--variants``, the planned plan's resident gate-dot twin
    (``forward_plans.resident_gate_dot``, which on a GPU applies from K = 513: forced here onto the tiny
    shape the interpreter runs) is timed right after the planned plan and its gate-dot build, checked like
    every candidate, set against the planned plan, and not timed twice."""
    import dataclasses

    import torch

    from triton_lstm.kernels import forward_plans

    tune = benchmark_script("tune")
    monkeypatch.setattr(tune, "_bench", lambda fn: (fn(), 1.0)[1])  # 1 ms a call: 333.33 us/step at T = 3
    streamed = {}

    def twin(plan, H, K, element_size, shared):
        streamed["plan"] = plan
        return dataclasses.replace(plan, resident=True, gate_dot=True, block_k=16, reason="twin")

    monkeypatch.setattr(forward_plans, "resident_gate_dot", twin)
    monkeypatch.setattr(tune, "_forward_candidates", lambda *args: [
        forward_plans.ForwardPlan(True, "default", False, 16, 16, 16, 1, 1, 4),
        forward_plans.ForwardPlan(True, "resident", True, 16, 16, 16, 1, 1, 4, gate_dot=True)])
    rows = []
    tune.tune_forward(3, 4, 16, 16, torch.float16, 60.0, rows, "lstm", ["gate_dot"], device="cpu")
    kernels = [row for row in rows if not row["candidate"].endswith("inference")]
    # (the sweep runs each candidate plain and with the gate dot: the resident one's gate-dot build is the
    # twin, timed third and not again)
    assert [(row["candidate"].split()[0], "gate-dot" in row["candidate"]) for row in kernels] == [
        ("streamed", False), ("streamed", True), ("resident", True), ("resident", False)], rows
    assert all(row["status"] == "ok" for row in rows), rows
    assert "W_hh resident + gate dot / plain (streamed): 333.33 / 333.33 us/step = 1.000" in capsys.readouterr().out
    assert streamed["plan"].reason == "default" and not streamed["plan"].resident


def test_tune_does_not_time_a_chain_variant_the_rules_leave_off(monkeypatch):
    """A chain variant that ``backward_plans.chain_variants`` leaves off for the launch (fp32 chains, Triton
    3.4, …) is reported as such, never timed under its name (it would time the plain chain); where the
    rules take it, the chain is timed with it on, and the switches are restored afterwards."""
    import math

    import torch

    from triton_lstm.kernels import backward_plans, forward_plans

    tune = benchmark_script("tune")
    monkeypatch.setattr(forward_plans, "TRITON_VERSION", (3, 6))
    ran = []

    def run():
        ran.append(backward_plans.chain_variants(2, 4, "lstm", False, False))
        return (torch.zeros(1),)

    monkeypatch.setattr(tune, "_timed_if_right", lambda run, *args: (run(), (1.0, "ok"))[1])
    us, status = tune._timed_chain(run, None, 3e-2, 8, torch.float32, 1, "cuda", True)
    assert math.isnan(us) and "left off" in status and not ran
    assert tune._timed_chain(run, None, 3e-2, 8, torch.bfloat16, 4, "cuda", True, True) == (1.0, "ok")
    assert ran == [(True, True)]
    monkeypatch.setattr(forward_plans, "TRITON_VERSION", (3, 4))
    assert "left off" in tune._timed_chain(run, None, 3e-2, 8, torch.bfloat16, 4, "cuda", True)[1]
    assert tune._timed_chain(run, None, 3e-2, 8, torch.float32, 1, "cpu", True) == (1.0, "ok"), "the interpreter"
    assert backward_plans.PREFETCH is False and backward_plans.STACK_ONE_LOOP is False


@interpreter_only
def test_projection_timing_reports_each_case_and_goes_on():
    """``gpu_smoke.py --projection-timing`` yields a line per case as it ends, and a case that fails (here:
    no CUDA) is reported and the next one still runs, so that a stage cut at its limit or one bad case
    keeps the lines measured before it."""
    gpu_smoke = benchmark_script("gpu_smoke")
    cases = ((8, 2, 4, 8, 4, False, 2), (8, 2, 4, 8, 4, True, 1))
    lines = list(gpu_smoke.projection_timing(cases))
    assert len(lines) == 2 and all(line.startswith(f"proj {case}: ") for line, case in zip(lines, cases)), lines


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the scripts would run, not stop at the missing CUDA")
def test_gpu_check_passes_each_script_arguments_it_accepts(tmp_path, capsys):
    """``DRY_RUN=1 bash benchmarks/gpu_check.sh`` with every stage switched on lists each stage's command:
    each script must accept its arguments (it then stops at the missing CUDA, exit 2, not at argparse),
    each test file named must exist: a typo would otherwise cost a stage of a GPU session's few minutes."""
    import importlib.util
    import shlex
    import subprocess
    import sys

    env = dict(os.environ, OUT=str(tmp_path), DRY_RUN="1", VARIANTS="1", FUSED="1", PROFILE="1", TUNE="1", DROPOUT="1",
               PROJECTION="1", STACK_VARIANTS="1", BIDIR_VARIANTS="1", BWD_VARIANTS="1", EXAMPLES="1", SUITE="1",
               PYTHON=sys.executable)
    listing = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                             text=True, timeout=120)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    commands = [shlex.split(line.split(" =>", 1)[1]) for line in listing.stdout.splitlines()
                if line.startswith("== dry-run ")]
    assert len(commands) >= 14, listing.stdout
    scripts = {"tune.py": benchmark_script("tune").main, "profile_step.py": benchmark_script("profile_step").main}
    from triton_lstm import benchmark

    scripts["bench.py"] = benchmark.main
    spec = importlib.util.spec_from_file_location("char_lm", ROOT / "examples" / "char_lm.py")
    char_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(char_lm)
    capsys.readouterr()
    for command in commands:
        while command[0] == "env" or "=" in command[0]:
            command = command[1:]  # the environment the stage sets
        assert command[0] == sys.executable, command
        if command[1:3] == ["-m", "pytest"]:
            for path in (arg for arg in command[3:] if arg.startswith("tests/")):
                file, _, test = path.partition("::")
                assert (ROOT / file).exists() and (not test or f"def {test}(" in (ROOT / file).read_text()), path
            continue
        script, args = Path(command[1]).name, command[2:]
        if script == "gpu_smoke.py":
            assert args in ([], ["--stack"], ["--single-step"], ["--dropout-timing"],
                            ["--projection-timing"]), args
        elif script == "char_lm.py":
            char_lm.parse_args(args)  # argparse exits on what it does not accept
        else:
            try:
                code = scripts[script](args)
            except SystemExit as stop:
                code = stop.code
            err = capsys.readouterr().err
            assert code == 2 and "CUDA" in err and "error:" not in err, (command, err)


def test_profile_step_pairs_the_peephole_lstm_with_the_plain_one():
    """``profile_step.py --peephole`` times the peephole LSTM against our plain LSTM with the same weights, so
    that the difference per kernel is the peepholes' (checked on the CPU: the same weights, and with zero
    peepholes the same outputs)."""
    import torch

    profile_step = benchmark_script("profile_step")
    pair = profile_step.models(5, 6, torch.float64, layers=2, peephole=True, device="cpu")
    assert list(pair) == ["triton_peephole", "triton_lstm"] and pair["triton_peephole"].peephole
    plain = pair["triton_lstm"].state_dict()
    with_peepholes = pair["triton_peephole"].state_dict()
    assert set(with_peepholes) - set(plain) == {"weight_ch_l0", "weight_ch_l1"}
    assert all(torch.equal(plain[name], with_peepholes[name]) for name in plain)
    with torch.no_grad():
        for name in ("weight_ch_l0", "weight_ch_l1"):
            getattr(pair["triton_peephole"], name).zero_()
        x = torch.randn(3, 2, 5, dtype=torch.float64)
        torch.testing.assert_close(pair["triton_peephole"](x)[0], pair["triton_lstm"](x)[0], rtol=0, atol=0)
    assert list(profile_step.models(5, 6, torch.float64, device="cpu")) == ["triton_lstm", "cudnn"]
    with pytest.raises(SystemExit):
        profile_step.main(["--peephole", "--cell", "gru"])


def test_profile_step_host_table_names_a_calls_ops():
    """``profile_step``'s host side: the issue time of back-to-back calls and the host's self time per call
    by event (checked on the CPU, where an nn.LSTM call's own op is the event to find)."""
    import torch

    profile_step = benchmark_script("profile_step")
    model = torch.nn.LSTM(4, 5)
    x = torch.randn(3, 2, 4)
    issue, self_time = profile_step.host_table(lambda: profile_step.step(model, x, None, forward_only=True), 4,
                                               lambda: None)
    assert issue > 0
    lstm_ops = [name for name in self_time if name == "aten::lstm"]
    assert lstm_ops, sorted(self_time)
