"""Fold assignment: grouped so no case / patient / image straddles two folds, stratified on labels.

Folds are written once and reused: retraining or tuning against re-drawn folds would leak
validation images into training.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.io import read_csv_checked, write_csv_atomic

PSEUDO_COLUMN = "pseudo"
PSEUDO_FOLD = -1  # in every fold's training rows, in no fold's validation


def pseudo_rows(table: pd.DataFrame) -> pd.Series:
    """True for the rows `kseg pseudo-label` added (a table without the column has none)."""
    if PSEUDO_COLUMN not in table.columns:
        return pd.Series(False, index=table.index)
    return table[PSEUDO_COLUMN].astype(str).str.strip().str.lower().isin(("true", "1"))


def make_folds(
    ids: pd.Series, groups: pd.Series, labels: pd.Series, n_folds: int, seed: int
) -> pd.DataFrame:
    """Assign each id a fold in [0, n_folds) with sklearn's StratifiedGroupKFold.

    Returns a frame with columns `id`, `fold`, `group` in the order of `ids`.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = groups.nunique()
    if n_folds < 2:
        raise InputError(f"--n-folds must be at least 2, got {n_folds}")
    if n_groups < 2:
        raise InputError(
            f"only {n_groups} group: folds need at least 2 (the table's group column; "
            "folder: data.options.group_pattern groups images)"
        )
    if n_groups < n_folds:
        raise InputError(f"only {n_groups} groups for {n_folds} folds: use --n-folds <= {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(ids), -1, dtype=np.int64)
    with warnings.catch_warnings():
        # Rare label combinations (fewer members than folds) are expected, not an error.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = splitter.split(np.zeros(len(ids)), labels.to_numpy(), groups.to_numpy())
        for k, (_, valid) in enumerate(splits):
            fold[valid] = k
    return pd.DataFrame({"id": ids.to_numpy(), "fold": fold, "group": groups.to_numpy()})


def split_folds(
    table: pd.DataFrame, groups: pd.Series, labels: pd.Series, n_folds: int, seed: int
) -> pd.DataFrame:
    """`make_folds` of the table's labelled rows; pseudo-labelled rows (`kseg pseudo-label`)
    get fold -1, so every fold trains on them and none validates on them, and the labelled
    rows split exactly as they would without them."""
    pseudo = pseudo_rows(table).to_numpy()
    folds = make_folds(table["id"][~pseudo], groups[~pseudo], labels[~pseudo], n_folds, seed)
    if not pseudo.any():
        return folds
    added = pd.DataFrame(
        {
            "id": table["id"][pseudo].to_numpy(),
            "fold": PSEUDO_FOLD,
            "group": groups[pseudo].to_numpy(),
        }
    )
    return pd.concat([folds, added], ignore_index=True)


def read_folds(path: str | Path) -> pd.DataFrame:
    """A folds file with integer folds; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise KsegError(f"{path}: folds file not found; create it with `kseg folds`")
    frame = read_csv_checked(path, ["id", "fold"])
    try:
        frame["fold"] = frame["fold"].astype(int)
    except ValueError as exc:
        raise InputError(f"{path}: column fold must hold integers ({exc})") from exc
    return frame


def fold_groups(table: pd.DataFrame, group_by: str | None, source: str) -> pd.Series:
    """What the folds keep together: the table's `group` column (case, patient, image), or
    the columns of `--group-by A,B` joined (DSB: `height,width` keeps each image kind, so a
    fold's score is on kinds its model never saw, as a test set's new kinds are)."""
    if not group_by:
        return table["group"]
    columns = [c.strip() for c in group_by.split(",") if c.strip()]
    missing = [c for c in columns if c not in table.columns]
    if not columns or missing:
        raise InputError(
            f"--group-by {group_by}: no column {', '.join(missing) or '(empty)'} in {source}; "
            f"it has {', '.join(table.columns)}"
        )
    values = table[columns]
    empty = (values.isna() | values.astype(str).apply(lambda c: c.str.strip() == "")).any(axis=1)
    if empty.any():
        i = int(empty.to_numpy().argmax())
        raise InputError(
            f"--group-by {group_by}: {source} line {i + 2} ({table['id'].iloc[i]}) has no value"
        )
    return table[columns].astype(str).agg("/".join, axis=1).rename("group")


def _check_reusable(
    existing: pd.DataFrame,
    table: pd.DataFrame,
    groups: pd.Series,
    labels: pd.Series,
    out: Path,
    n_folds: int,
    seed: int,
) -> None:
    """Refuse to reuse folds that are not what was asked for: reusing them silently would
    report a split the user did not get."""
    if set(existing["id"]) != set(table["id"]):
        raise KsegError(f"{out} exists with different ids; pass --force to overwrite it")
    held = int(existing.loc[existing["fold"] >= 0, "fold"].nunique())  # -1: pseudo-labels
    if held != n_folds:
        raise KsegError(
            f"{out} holds {held} folds, not the --n-folds {n_folds} asked for: pass --n-folds "
            f"{held} to reuse it, or --force to rewrite it"
        )
    # The CSV keeps no seed; the split is deterministic for a seed, so splitting again with the
    # asked one and comparing says whether the file is what was asked for (another seed, or a
    # table prepared again since, must not pass silently as the user's split).
    fresh = split_folds(table, groups, labels, n_folds, seed)
    both = fresh.merge(existing[["id", "fold"]], on="id", suffixes=("", "_written"))
    if len(both) != len(fresh) or (both["fold"] != both["fold_written"]).any():
        raise KsegError(
            f"{out} is not the split --seed {seed} gives (another seed or --group-by wrote it, "
            "or the table changed since): pass the options it was written with, or --force to "
            "rewrite it"
        )


def write_or_reuse_folds(
    table: pd.DataFrame,
    labels: pd.Series,
    out: str | Path,
    n_folds: int,
    seed: int,
    force: bool,
    groups: pd.Series | None = None,
) -> tuple[pd.DataFrame, bool]:
    """Write the folds file, or reuse an existing one of the same ids, fold count, seed and
    grouping (`groups`, default the table's `group` column).

    Returns (folds, reused). An existing file that disagrees is an error unless `force`.
    """
    out = Path(out)
    groups = table["group"] if groups is None else groups
    if out.exists() and not force:
        existing = read_folds(out)
        _check_reusable(existing, table, groups, labels, out, n_folds, seed)
        return existing, True
    folds = split_folds(table, groups, labels, n_folds, seed)
    write_csv_atomic(folds, out)
    return folds, False
