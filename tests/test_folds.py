"""Folds: grouped (no leaks), stratified, deterministic, written once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_seg.data.folds import make_folds, read_folds, write_or_reuse_folds
from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.prepare import folds_for_table, prepare_table


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
    one = _table(n_groups=1)
    with pytest.raises(InputError, match=r"only 1 group: folds need at least 2 .*group_pattern"):
        make_folds(one["id"], one["group"], one["label"], 2, seed=0)


def test_existing_folds_are_reused_and_never_silently_overwritten(tmp_path: Path):
    table = _table()
    out = tmp_path / "folds.csv"
    first, reused = write_or_reuse_folds(table, table["label"], out, 5, seed=1, force=False)
    assert not reused
    again, reused = write_or_reuse_folds(table, table["label"], out, 5, seed=1, force=False)
    assert reused and again["fold"].tolist() == first["fold"].tolist()
    with pytest.raises(KsegError, match="or --force to rewrite it"):
        write_or_reuse_folds(table, table["label"], out, 4, seed=1, force=False)
    _forced, reused = write_or_reuse_folds(table, table["label"], out, 4, seed=1, force=True)
    assert not reused and read_folds(out)["fold"].nunique() == 4


def test_missing_folds_file_says_how_to_make_it(tmp_path: Path):
    with pytest.raises(KsegError, match="kseg folds"):
        read_folds(tmp_path / "nope.csv")


# ---- reuse only what was asked for: the same seed and fold count ------------------------------


def test_another_seed_is_refused_and_nothing_rewritten(tmp_path: Path):
    table = _table()
    out = tmp_path / "folds.csv"
    write_or_reuse_folds(table, table["label"], out, 5, seed=42, force=False)
    written = out.read_bytes()
    with pytest.raises(KsegError) as refused:
        write_or_reuse_folds(table, table["label"], out, 5, seed=7, force=False)
    message = str(refused.value)
    assert f"{out} is not the split --seed 7 gives" in message
    assert "or --force to rewrite it" in message and "\n" not in message
    assert out.read_bytes() == written  # nothing rewritten
    _, reused = write_or_reuse_folds(table, table["label"], out, 5, seed=42, force=False)
    assert reused
    forced, reused = write_or_reuse_folds(table, table["label"], out, 5, seed=7, force=True)
    assert not reused
    again, reused = write_or_reuse_folds(table, table["label"], out, 5, seed=7, force=False)
    assert reused and again["fold"].tolist() == forced["fold"].tolist()


def test_another_fold_count_is_refused_naming_both_counts(tmp_path: Path):
    table = _table()
    out = tmp_path / "folds.csv"
    write_or_reuse_folds(table, table["label"], out, 5, seed=42, force=False)
    written = out.read_bytes()
    with pytest.raises(KsegError, match=r"holds 5 folds, not the --n-folds 4 asked for.*--force"):
        write_or_reuse_folds(table, table["label"], out, 4, seed=42, force=False)
    assert out.read_bytes() == written


# ---- a table of another competition is refused ----------------------------------------------


@pytest.fixture(scope="module")
def dsb_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A table `kseg prepare -c dsb2018` wrote, of the packaged DSB example."""
    from importlib import resources

    root = tmp_path_factory.mktemp("dsb_table")
    with resources.as_file(resources.files("kaggle_seg") / "examples" / "dsb2018") as folder:
        prepare_table("dsb2018", folder, root / "table.csv", check="none")
    return root / "table.csv"


def test_a_table_of_another_competition_is_refused_naming_both(dsb_table: Path, tmp_path: Path):
    out = tmp_path / "folds.csv"
    with pytest.raises(InputError) as refused:
        folds_for_table("lgg", dsb_table, out, 2, 42, force=False)
    message = str(refused.value)
    assert message.startswith(f"{dsb_table}: a `kseg prepare -c dsb2018` table, not a lgg one")
    assert "no patient, series, slice_index column(s)" in message
    assert "prepare it with -c lgg" in message and "\n" not in message
    assert not out.exists()
    with pytest.raises(InputError, match=r"`kseg prepare -c dsb2018` table, not a uwmgi one"):
        folds_for_table("uwmgi", dsb_table, out, 2, 42, force=False)
    assert not out.exists()
    folds, reused = folds_for_table("dsb2018", dsb_table, out, 2, 42, force=False)
    assert not reused and set(folds["fold"]) == {0, 1}


def test_folder_takes_a_table_of_the_common_columns(dsb_table: Path, tmp_path: Path):
    """folder is any images/ + masks/ table, a hand-made one too; lgg, which needs its own
    columns, refuses one of the common columns only and names what it lacks."""
    table = pd.read_csv(dsb_table)[["id", "group", "image_path", "height", "width", "empty"]]
    table.to_csv(tmp_path / "plain.csv", index=False)
    folds, _ = folds_for_table("folder", tmp_path / "plain.csv", tmp_path / "f.csv", 2, 0, False)
    assert len(folds) == len(table)
    with pytest.raises(InputError, match=r"plain\.csv: not a lgg one: no patient, series"):
        folds_for_table("lgg", tmp_path / "plain.csv", tmp_path / "g.csv", 2, 0, False)
    assert not (tmp_path / "g.csv").exists()


def test_table_columns_are_what_prepare_writes(
    dsb_table: Path, phantom_dir: Path, shared_data: Path, tmp_path: Path
):
    """Each competition's `table_columns` are written by its `prepare` and by no other's (a
    drift guard: a renamed column would otherwise refuse every table of that competition)."""
    from kaggle_seg.competitions import COMPETITIONS

    prepare_table("uwmgi", phantom_dir, tmp_path / "uw.csv", check="none")
    prepare_table("lgg", shared_data / "lgg", tmp_path / "lgg.csv", check="none")
    tables = {"dsb2018": dsb_table, "uwmgi": tmp_path / "uw.csv", "lgg": tmp_path / "lgg.csv"}
    for name, path in tables.items():
        columns = set(pd.read_csv(path, nrows=0).columns)
        fits = [c.name for c in COMPETITIONS.values() if set(c.table_columns) <= columns]
        assert sorted(fits) == sorted([name, "folder"]), name


def test_kseg_folds_refusals_are_one_line_errors(dsb_table: Path, tmp_path: Path):
    """As users see them: `error: <one line>`, no traceback, the folds file left as it was."""
    import subprocess
    import sys

    def kseg_folds(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "kaggle_seg", "folds", "--table", str(dsb_table), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    out = tmp_path / "folds.csv"
    wrong = kseg_folds("-c", "lgg", "--out", str(out))
    assert wrong.returncode != 0 and not out.exists()
    assert wrong.stderr.startswith(f"error: {dsb_table}: a `kseg prepare -c dsb2018` table")
    assert len(wrong.stderr.strip().splitlines()) == 1
    assert kseg_folds("-c", "dsb2018", "--out", str(out), "--n-folds", "2").returncode == 0
    written = out.read_bytes()
    seed = kseg_folds("-c", "dsb2018", "--out", str(out), "--n-folds", "2", "--seed", "7")
    assert seed.returncode != 0 and out.read_bytes() == written
    assert seed.stderr.startswith(f"error: {out} is not the split --seed 7 gives")
    assert len(seed.stderr.strip().splitlines()) == 1


def test_group_by_keeps_each_image_kind_in_one_fold(dsb_table: Path, tmp_path: Path):
    """`kseg folds --group-by height,width`: DSB's image kinds (by size) held out whole, so a
    fold scores kinds its model never saw; the file is reused only for the same grouping."""
    table = pd.read_csv(dsb_table)
    out = tmp_path / "folds.csv"
    folds, reused = folds_for_table("dsb2018", dsb_table, out, 2, 42, False, "height,width")
    assert not reused
    merged = table.merge(folds[["id", "fold"]], on="id")
    assert (merged.groupby(["height", "width"])["fold"].nunique() == 1).all()
    kinds = zip(table["height"], table["width"], strict=True)
    assert set(folds["group"]) == {f"{h}/{w}" for h, w in kinds}
    assert merged["fold"].nunique() == 2
    _, reused = folds_for_table("dsb2018", dsb_table, out, 2, 42, False, "height,width")
    assert reused
    with pytest.raises(KsegError, match=r"another seed or --group-by wrote it"):
        folds_for_table("dsb2018", dsb_table, out, 2, 42, False)
    with pytest.raises(InputError, match=r"^--group-by kind: no column kind in .*table\.csv"):
        folds_for_table("dsb2018", dsb_table, tmp_path / "k.csv", 2, 42, False, "kind")
    # A column of the user's own (a clustering's labels), with one row left blank.
    table["kind"] = np.where(table["height"] == 256, "fluorescence", "other")
    table.loc[3, "kind"] = None
    table.to_csv(tmp_path / "holes.csv", index=False)
    with pytest.raises(InputError, match=rf"holes\.csv line 5 \({table['id'][3]}\) has no value"):
        folds_for_table("dsb2018", tmp_path / "holes.csv", tmp_path / "h.csv", 2, 42, False, "kind")
