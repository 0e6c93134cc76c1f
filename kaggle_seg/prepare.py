"""`kseg prepare` and `kseg folds`: raw files -> table -> folds, with files written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from kaggle_seg.competitions import competition_for, get_competition
from kaggle_seg.competitions.base import summarize_table
from kaggle_seg.config import build_data_config
from kaggle_seg.data.folds import write_or_reuse_folds
from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.io import read_csv_checked, write_csv_atomic
from kaggle_seg.table_checks import (
    CHECKS,
    DEFAULT_CHECK,
    TABLE_COLUMNS,
    check_prepared_table,
    check_table_columns,
)


def prepare_table(
    competition: str,
    data_dir: Path,
    out: Path,
    config_path: Path | None = None,
    overrides: list[str] | None = None,
    check: str | None = None,
) -> dict[str, Any]:
    """Write the competition's table to `out` once its files pass `check` (full, headers or
    none: see kaggle_seg.table_checks; default DEFAULT_CHECK); returns its summary."""
    check = check or DEFAULT_CHECK
    config = build_data_config(competition, config_path, overrides)
    if check not in CHECKS:
        raise KsegError(f"--check {check!r}: choose one of {', '.join(CHECKS)}")
    if not Path(data_dir).is_dir():
        raise KsegError(f"--data-dir {data_dir}: folder not found")
    plugin = competition_for(config)
    table = plugin.read_table(Path(data_dir), config)
    check_prepared_table(plugin, table, Path(data_dir), check)
    write_csv_atomic(table, out)
    summary = summarize_table(table)
    summary["notes"] = list(table.attrs.get("notes", []))  # what the reader left out, and why
    if plugin.volume_key is not None:  # data.exclude_case_days names volumes left out
        summary["excluded"] = list(config.exclude_case_days)
    return summary


def read_table(path: Path) -> pd.DataFrame:
    """A table written by `prepare`, with its typed columns restored."""
    table = read_csv_checked(path, TABLE_COLUMNS)
    return check_table_columns(table, Path(path))


def check_table_fits(competition: str, table: pd.DataFrame, path: Path) -> None:
    """Refuse a table that lacks the columns `kseg prepare -c competition` writes (its
    `table_columns`), naming them and the competition the table looks like it came from: folds
    would split it grouped and stratified on the wrong columns, and training fail only later."""
    from kaggle_seg.competitions import COMPETITIONS

    columns = set(table.columns)
    missing = [c for c in get_competition(competition).table_columns if c not in columns]
    if not missing:
        return
    looks_like = [
        plugin.name
        for plugin in COMPETITIONS.values()
        if plugin.table_columns and columns >= set(plugin.table_columns)
    ]
    hint = f"a `kseg prepare -c {looks_like[0]}` table, " if looks_like else ""
    raise InputError(
        f"{path}: {hint}not a {competition} one: no {', '.join(missing)} column(s); pass the "
        f"competition it was prepared for, or prepare it with -c {competition}"
    )


def folds_for_table(
    competition: str,
    table_path: Path,
    out: Path,
    n_folds: int,
    seed: int,
    force: bool,
    group_by: str | None = None,
) -> tuple[pd.DataFrame, bool]:
    """Folds of the table at `table_path` (written once to `out`, then reused); see
    `write_or_reuse_folds`, and `fold_groups` for `group_by`. A table of another competition is
    refused before anything is written."""
    from kaggle_seg.data.folds import fold_groups

    table = read_table(table_path)
    check_table_fits(competition, table, Path(table_path))
    groups = fold_groups(table, group_by, str(table_path))
    labels = get_competition(competition).stratify_labels(table)
    return write_or_reuse_folds(table, labels, out, n_folds, seed, force, groups)
