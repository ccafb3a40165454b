"""The main job: ``python -m triton_lstm`` checks triton_lstm against nn.LSTM and prints a table."""

import torch

import triton_lstm.__main__ as cli


def test_main_prints_table_with_small_errors(monkeypatch, capsys):
    monkeypatch.setattr(cli, "INTERPRETER_SHAPES", [(3, 2, 4, 16, 1, False)])
    monkeypatch.setattr(cli, "CPU_SHAPES", [(3, 2, 4, 16, 1, False)])
    assert cli.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "interpreter" in out or "reference" in out
    assert "T=3 B=2 I=4 H=16" in out and "float32" in out


def test_check_reports_errors_against_float64():
    rows = cli.check([(4, 3, 5, 16, 1, False)], [torch.float32], "cpu")
    (row,) = rows
    assert row["err_ours"] < 1e-5 and row["err_theirs"] < 1e-5
    assert row["ms_ours"] > 0 and row["ms_theirs"] > 0
