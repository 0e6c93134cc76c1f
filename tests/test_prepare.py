"""`kseg prepare` and `kseg folds` (prepare.py): the table and its summary, the volumes left
out, folds written once and reused, one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kaggle_seg.errors import KsegError
from kaggle_seg.prepare import folds_for_table, prepare_table, read_table


def test_lgg_table_summary_and_folds_reused(shared_data: Path, tmp_path: Path) -> None:
    table_csv = tmp_path / "lgg.csv"
    summary = prepare_table("lgg", shared_data / "lgg", table_csv, check="headers")
    table = read_table(table_csv)
    assert summary["images"] == len(table) and summary["groups"] == table["group"].nunique()
    assert summary["empty_fraction"] == pytest.approx(table["empty"].mean())
    assert "excluded" not in summary  # no volumes to leave out
    folds, reused = folds_for_table("lgg", table_csv, tmp_path / "folds.csv", 3, 0, False)
    assert not reused and set(folds["fold"]) == {0, 1, 2}
    patients = table.merge(folds[["id", "fold"]], on="id").groupby("group")["fold"].nunique()
    assert (patients == 1).all()
    again, reused = folds_for_table("lgg", table_csv, tmp_path / "folds.csv", 3, 0, False)
    assert reused and again["fold"].tolist() == folds["fold"].tolist()  # written once
    with pytest.raises(KsegError):  # another fold count: refused without --force
        folds_for_table("lgg", table_csv, tmp_path / "folds.csv", 4, 0, False)
    forced, reused = folds_for_table("lgg", table_csv, tmp_path / "folds.csv", 4, 0, True)
    assert not reused and forced["fold"].nunique() == 4


def test_volumes_left_out_are_reported(phantom_dir: Path, tmp_path: Path) -> None:
    summary = prepare_table("uwmgi", phantom_dir, tmp_path / "uw.csv", check="none")
    assert summary["excluded"] == ["case7_day0", "case81_day30"]  # the packaged uwmgi config
    table = pd.read_csv(tmp_path / "uw.csv")
    assert "case7_day0" not in set(table["case_day"])


def test_refusals_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(KsegError, match=r"--data-dir .*nowhere: folder not found"):
        prepare_table("lgg", tmp_path / "nowhere", tmp_path / "t.csv")
    with pytest.raises(KsegError, match=r"--check 'most': choose one of full, headers, none"):
        prepare_table("lgg", tmp_path, tmp_path / "t.csv", check="most")
    assert not (tmp_path / "t.csv").exists()
