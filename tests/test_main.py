"""The main job: ``python -m triton_lstm`` checks triton_lstm against nn.LSTM and prints a table."""

import pytest
import torch

import triton_lstm.__main__ as cli


def test_main_prints_table_with_small_errors(monkeypatch, capsys):
    monkeypatch.setattr(cli, "INTERPRETER_SHAPES", [(3, 2, 4, 16, 1, False)])
    monkeypatch.setattr(cli, "CPU_SHAPES", [(3, 2, 4, 16, 1, False)])
    assert cli.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "interpreter" in out or "reference" in out
    assert "LSTM T=3 B=2 I=4 H=16" in out and "GRU T=3 B=2 I=4 H=16" in out and "float32" in out


def test_says_what_runs_on_a_gpu_the_kernels_do_not_run_on(monkeypatch):
    """A T4 (compute capability 7.5), faked: the check says that ATen's LSTM runs there, and why; an H200 runs the kernels."""
    from triton_lstm import ops

    monkeypatch.setattr(ops, "_gpus_running_kernels", {})
    monkeypatch.setattr(ops, "HAS_TRITON", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.warns(RuntimeWarning, match="do not run on cuda:0, Tesla T4"):
        where = cli._where_it_runs("cuda")
    assert where.startswith("ATen's LSTM on Tesla T4") and "compute capability 7.5" in where
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(ops, "_gpus_running_kernels", {})
    assert cli._where_it_runs("cuda") == "Triton kernels on NVIDIA H200"


def test_check_reports_errors_against_float64():
    for module in ("LSTM", "GRU"):
        rows = cli.check([(4, 3, 5, 16, 1, False)], [torch.float32], "cpu", module)
        (row,) = rows
        assert row["shape"].startswith(module)
        assert row["err_ours"] < 1e-5 and row["err_theirs"] < 1e-5
        assert row["ms_ours"] > 0 and row["ms_theirs"] > 0


def test_subcommands_and_their_options(capsys):
    # `bench --help` lists the bench options; `--device` belongs to check, never silently to bench.
    try:
        cli.main(["bench", "--help"])
    except SystemExit as exit_info:
        assert exit_info.code == 0
    assert "--quick" in capsys.readouterr().out
    try:
        cli.main(["--device", "cpu", "bench"])
        raise AssertionError("--device with bench must be refused")
    except SystemExit as exit_info:
        assert exit_info.code == 2
    assert "--device applies to check" in capsys.readouterr().err


def test_bench_dry_run_without_triton_and_default_out_in_the_working_directory(tmp_path):
    """The harness runs its CPU dry run without triton (a clear line in versions.txt, no traceback), and
    the default results folder is ./benchmarks/results where the command runs, not the installed package."""
    import subprocess
    import sys
    from pathlib import Path

    from triton_lstm import benchmark

    assert not benchmark.DEFAULT_OUT.is_absolute()
    root = Path(cli.__file__).resolve().parent.parent
    script = "import sys; sys.modules['triton'] = None; from triton_lstm.__main__ import main; " \
             "sys.exit(main(['bench', '--dry-run', '--no-plots', '--out', sys.argv[1]]))"
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    process = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=300)
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr
    (versions,) = tmp_path.rglob("versions.txt")
    assert "triton: not installed" in versions.read_text()
