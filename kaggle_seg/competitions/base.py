"""What every competition offers: its raw layout read into one table, and image / mask readers.

The table has one row per image with at least these columns:
`id`, `group` (what folds group by: case, patient or image), `image_path`, `height`, `width`,
`empty` (no foreground at all). Each competition adds its own (RLE or mask paths, slice index...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from kaggle_seg.config import DataConfig

TABLE_COLUMNS = ("id", "group", "image_path", "height", "width", "empty")


@dataclass(frozen=True)
class Skipped:
    """An image left out or predicted empty under `--on-error skip`, and why."""

    id: str
    path: str
    reason: str


def skip_or_raise(error: Exception, image_id: str, path: Any, skipped: list[Skipped] | None):
    """Record `error` in `skipped` (--on-error skip) or raise it (no list: fail)."""
    if skipped is None:
        raise error
    skipped.append(Skipped(str(image_id), str(path), str(error)))


class Competition(Protocol):
    name: str
    classes: tuple[str, ...]
    channels: int  # image channels of one slice / image
    # RLE pixel order of the competition's CSVs; None where there is no RLE format.
    rle_order: Literal["C", "F"] | None
    kaggle_slug: str | None  # the competition's name in kaggle.com URLs; None for a dataset
    code_competition: bool  # submitted by a kernel (internet off), not by uploading a CSV

    def read_table(self, data_dir: Path, config: DataConfig) -> pd.DataFrame:
        """The raw Kaggle layout under `data_dir` as one table, one row per image."""
        ...

    def read_test_table(self, test_dir: Path, skipped: list[Skipped] | None = None) -> pd.DataFrame:
        """The unlabelled images under `test_dir` (as Kaggle mounts a test folder), one row each,
        with `id`, `group`, `image_path`, `height`, `width`; empty when the folder holds none.

        An image whose header cannot be read raises InputError; with a `skipped` list
        (`--on-error skip`) it is left out of the table and recorded there instead."""
        ...

    def read_image(self, row: Any) -> np.ndarray:
        """float32 [H, W, C] in [0, 1] for one table row."""
        ...

    def read_mask(self, row: Any) -> np.ndarray:
        """uint8 0/1 [H, W, K], K = len(classes), for one table row."""
        ...

    def stratify_labels(self, table: pd.DataFrame) -> pd.Series:
        """One label per row that folds keep balanced (empty vs not, organ combination...)."""
        ...


def summarize_table(table: pd.DataFrame) -> dict[str, Any]:
    """Counts, sizes and the empty fraction, as `kseg prepare` prints them."""
    sizes = (
        table.groupby(["width", "height"]).size().sort_values(ascending=False)
        if len(table)
        else pd.Series(dtype=int)
    )
    return {
        "images": len(table),
        "groups": int(table["group"].nunique()) if len(table) else 0,
        "empty_fraction": float(table["empty"].mean()) if len(table) else 0.0,
        "sizes": {f"{w}x{h}": int(n) for (w, h), n in sizes.items()},
    }
