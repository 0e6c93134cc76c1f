"""`kseg kernel|dataset|model ...` wiring (cli_kernel.py), in-process through Typer's runner: the
commands and options exist, and bad input stops before anything is built or sent."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from kaggle_seg.cli import app

RUNNER = CliRunner()


def test_kernel_commands_are_listed() -> None:
    result = RUNNER.invoke(app, ["kernel", "--help"])
    assert result.exit_code == 0
    for command in ("build", "rehearse", "push", "status", "wait"):
        assert command in result.output
    for group in ("dataset", "model"):
        assert RUNNER.invoke(app, [group, "--help"]).exit_code == 0


def test_build_refuses_a_competition_without_a_kernel(tmp_path: Path) -> None:
    result = RUNNER.invoke(
        app, ["kernel", "build", "-c", "lgg", "-e", "x", "--runs-dir", str(tmp_path)]
    )
    assert result.exit_code != 0 and isinstance(result.exception, KeyError)
    assert "no Kaggle kernel for 'lgg'; choose one of uwmgi, dsb2018" in str(result.exception)
    assert not (tmp_path / "kernels").exists()


def test_build_refuses_bad_folds_before_building(tmp_path: Path) -> None:
    result = RUNNER.invoke(
        app,
        ["kernel", "build", "-c", "uwmgi", "-e", "x", "--folds", "0,a", "--out-dir", str(tmp_path)],
    )
    assert result.exit_code != 0
    assert "--folds '0,a': expected integers like 0,1,2" in str(result.exception)
    assert list(tmp_path.iterdir()) == []
