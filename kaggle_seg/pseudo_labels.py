"""Pseudo-labels: test images labelled by a submission, added to a training table.

A Kaggle test set's images are public even where its truth is not. A model trained on them with
its own (or an ensemble's) predictions as labels sees the test set's image kinds; DSB 2018's
stage-1 test has kinds stage1_train lacks. The rows get `pseudo` True, and `kseg folds` gives
them fold -1: trained on in every fold, never validated, so the CV and the tuning stay on truth.

    kseg pseudo-label -c dsb2018 --table runs/t/table.csv --submission sub.csv \
        --test-dir ../input/stage1_test --out runs/pseudo/table.csv
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from kaggle_seg.data.folds import PSEUDO_COLUMN, pseudo_rows
from kaggle_seg.errors import InputError, KsegError


def labels_copy_path(out: Path) -> Path:
    """Where the submission is copied beside the table: the rows read their labels from it, so
    a later submission written over the original does not change the training set."""
    return out.with_name(f"{out.stem}_pseudo_labels.csv")


def add_pseudo_labels(
    competition: str, table_path: Path, submission: Path, test_dir: Path, out: Path
) -> dict[str, Any]:
    """Write `out`: the table at `table_path` plus one row per image of `test_dir`, labelled by
    `submission` (the competition's submission format, every test image listed). Returns a
    summary: labelled and pseudo-labelled image counts, and the copied labels file."""
    from kaggle_seg.competitions import get_competition
    from kaggle_seg.io import write_csv_atomic
    from kaggle_seg.prepare import check_table_fits, read_table
    from kaggle_seg.table_checks import check_prepared_table

    plugin = get_competition(competition)
    if not plugin.pseudo_labels:
        raise KsegError(
            f"-c {competition}: pseudo-labels are not supported (a hidden test set, or a "
            "submission that does not read back as training labels)"
        )
    table = read_table(table_path)
    check_table_fits(competition, table, table_path)
    if pseudo_rows(table).any():
        raise KsegError(
            f"{table_path}: already holds pseudo-labelled rows; start from the table "
            "`kseg prepare` wrote"
        )
    if not Path(submission).is_file():
        raise KsegError(f"--submission {submission}: file not found")
    if Path(out).resolve() == Path(table_path).resolve():
        raise KsegError(f"--out {out}: would overwrite --table; write the new table elsewhere")
    test = plugin.read_test_table(Path(test_dir))
    if test.empty:
        raise InputError(f"--test-dir {test_dir}: no test images")
    overlap = sorted(set(test["id"]) & set(table["id"].astype(str)))
    if overlap:
        raise InputError(f"--test-dir {test_dir}: {overlap[0]} is already a row of {table_path}")
    check_submission_lists(plugin, Path(submission), test, Path(test_dir))
    # The RLEs checked against each image's size in the user's file (errors name its lines)
    # before anything trains on them; the rows then read a copy kept beside the table.
    check_prepared_table(plugin, plugin.pseudo_label_rows(test, submission), test_dir, "headers")
    labels = labels_copy_path(Path(out))
    labels.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(submission, labels)
    rows = plugin.pseudo_label_rows(test, labels)
    rows[PSEUDO_COLUMN] = True
    joined = pd.concat([table.assign(**{PSEUDO_COLUMN: False}), rows], ignore_index=True)
    write_csv_atomic(joined[[*table.columns, PSEUDO_COLUMN]], out)
    return {"labelled": len(table), "pseudo": len(rows), "labels": labels}


def check_submission_lists(
    plugin: Any, submission: Path, test: pd.DataFrame, test_dir: Path
) -> None:
    """The submission's ids are the test folder's images, no more and no fewer: labels made on
    another test set would train on the wrong images, or leave some unlabelled."""
    from kaggle_seg.io import read_csv_checked

    columns = plugin.submission_columns
    key = columns[0]
    listed = set(read_csv_checked(submission, list(columns))[key].astype(str))
    ids = set(test["id"].astype(str))
    if ids - listed:
        missing = sorted(ids - listed)
        raise InputError(
            f"--submission {submission}: no rows for {len(missing)} image(s) of {test_dir}, "
            f"e.g. {missing[0]}; pass the submission made on this test folder"
        )
    if listed - ids:
        extra = sorted(listed - ids)
        raise InputError(
            f"--submission {submission}: {len(extra)} {key}(s) not in {test_dir}, e.g. "
            f"{extra[0]}; pass the submission made on this test folder"
        )
