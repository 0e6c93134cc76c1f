"""What `kseg prepare` checks before it writes a table, and what reading a table back checks.

`prepare --check` levels:
- `none`: what reading the layout needs anyway (sizes, mask counts, uwmgi's label RLEs).
- `headers`: also every image and mask file's header (its size equals the image's) and every
  label RLE (it decodes inside its image).
- `full`: also decodes every image and every mask, so a truncated or corrupt file is found now,
  naming it, and not in the middle of training.

Errors name the file, and the CSV line where the data came from a CSV.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kaggle_seg.errors import InputError

CHECKS = ("full", "headers", "none")
# benchmarks/README.md, "prepare --check": full costs 8-14 s on the 570 DSB images (25,529 mask
# PNGs) and under 2 s on the LGG subset, against 3-4 s for reading the layout at all.
DEFAULT_CHECK = "full"
TABLE_COLUMNS = ("id", "group", "image_path", "height", "width", "empty")


# ---- a table being written ----------------------------------------------------------------------


def check_prepared_table(competition: Any, table: pd.DataFrame, source: Path, level: str) -> None:
    """Refuse an empty table or duplicate ids, then check the files at `level` (see above)."""
    if level not in CHECKS:
        raise InputError(f"--check {level!r}: choose one of {', '.join(CHECKS)}")
    if table.empty:
        raise InputError(f"{source}: no images found for {competition.name}; nothing to write")
    duplicated = table["id"].duplicated()
    if duplicated.any():
        image_id = table.loc[duplicated, "id"].iloc[0]
        paths = table.loc[table["id"] == image_id, "image_path"].tolist()
        raise InputError(f"{source}: two images with id {image_id}: {paths[0]} and {paths[1]}")
    if level == "none":
        return
    rows = table.to_dict("records")
    _run_rows(competition.check_headers, rows)
    if level == "full":
        _run_rows(lambda row: _check_decodes(competition, row), rows)


def _run_rows(check: Callable[[dict[str, Any]], None], rows: list[dict[str, Any]]) -> None:
    """`check` over every row on a few threads (image decoders release the GIL); the first
    failing row in table order raises."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(check, rows):
            pass


def _check_decodes(competition: Any, row: dict[str, Any]) -> None:
    image = competition.read_image(row)
    if image.shape[:2] != (int(row["height"]), int(row["width"])):
        raise InputError(
            f"{row['image_path']}: decodes to {image.shape[1]}x{image.shape[0]}, its header says "
            f"{row['width']}x{row['height']} (W x H)"
        )
    competition.read_truth(row)


# ---- a table read back --------------------------------------------------------------------------


def check_table_columns(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """A table written by `prepare`, read as strings: typed columns restored, every bad cell,
    duplicate id or empty table named by CSV line (the header is line 1)."""
    if table.empty:
        raise InputError(f"{path}: the table has no rows (run `kseg prepare` again)")
    for column in ("id", "image_path"):
        blank = table[column].str.strip() == ""
        if blank.any():
            raise InputError(f"{path}: line {_line(blank)}: empty {column}")
    duplicated = table["id"].duplicated()
    if duplicated.any():
        image_id = table.loc[duplicated, "id"].iloc[0]
        raise InputError(f"{path}: line {_line(duplicated)}: second row for id {image_id}")
    integers = ["height", "width", *(c for c in ("slice_index", "n_nuclei") if c in table)]
    for column in integers:
        values = pd.to_numeric(table[column], errors="coerce")
        bad = values.isna() | (values != values.round())
        if column in ("height", "width"):
            bad |= values < 1
        if bad.any():
            value = table.loc[bad, column].iloc[0]
            raise InputError(
                f"{path}: line {_line(bad)}: {column} {value!r} is not a positive integer"
                if column in ("height", "width")
                else f"{path}: line {_line(bad)}: {column} {value!r} is not an integer"
            )
        table[column] = values.astype(np.int64)
    empty = table["empty"].map({"True": True, "False": False})
    if empty.isna().any():
        raise InputError(f"{path}: line {_line(empty.isna())}: column empty must be True or False")
    table["empty"] = empty.astype(bool)
    return table


def _line(flags: pd.Series) -> int:
    return int(np.flatnonzero(flags.to_numpy())[0]) + 2
