"""Folds: grouped (no leaks), stratified, deterministic, written once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_seg.data.folds import make_folds, read_folds, write_or_reuse_folds
from kaggle_seg.errors import InputError, KsegError


def _table(n_groups: int = 20, per_group: int = 10, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"case{g}" for g in range(n_groups)], per_group)
    return pd.DataFrame(
        {
            "id": [
                f"{g}_slice_{i}"
                for g, i in zip(groups, np.tile(range(per_group), n_groups), strict=True)
            ],
            "group": groups,
            "label": rng.choice(["empty", "organ"], size=len(groups), p=[0.4, 0.6]),
        }
    )


def test_no_group_straddles_two_folds():
    table = _table()
    folds = make_folds(table["id"], table["group"], table["label"], 5, seed=1)
    assert folds.groupby("group")["fold"].nunique().max() == 1
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    assert folds["id"].tolist() == table["id"].tolist()


def test_folds_are_deterministic_for_a_seed():
    table = _table()
    a = make_folds(table["id"], table["group"], table["label"], 5, seed=7)
    b = make_folds(table["id"], table["group"], table["label"], 5, seed=7)
    c = make_folds(table["id"], table["group"], table["label"], 5, seed=8)
    assert a.equals(b)
    assert not a["fold"].equals(c["fold"])


def test_folds_keep_the_label_balance():
    table = _table(n_groups=40)
    folds = make_folds(table["id"], table["group"], table["label"], 4, seed=0)
    share = (
        table.assign(fold=folds["fold"])
        .groupby("fold")["label"]
        .apply(lambda s: (s == "empty").mean())
    )
    assert share.max() - share.min() < 0.1


def test_too_few_groups_is_an_error():
    table = _table(n_groups=3)
    with pytest.raises(InputError, match="only 3 groups for 5 folds"):
        make_folds(table["id"], table["group"], table["label"], 5, seed=0)


def test_existing_folds_are_reused_and_never_silently_overwritten(tmp_path: Path):
    table = _table()
    out = tmp_path / "folds.csv"
    first, reused = write_or_reuse_folds(table, table["label"], out, 5, seed=1, force=False)
    assert not reused
    again, reused = write_or_reuse_folds(table, table["label"], out, 5, seed=99, force=False)
    assert reused and again["fold"].tolist() == first["fold"].tolist()
    with pytest.raises(KsegError, match="pass --force"):
        write_or_reuse_folds(table, table["label"], out, 4, seed=1, force=False)
    _forced, reused = write_or_reuse_folds(table, table["label"], out, 4, seed=1, force=True)
    assert not reused and read_folds(out)["fold"].nunique() == 4


def test_missing_folds_file_says_how_to_make_it(tmp_path: Path):
    with pytest.raises(KsegError, match="kseg folds"):
        read_folds(tmp_path / "nope.csv")
