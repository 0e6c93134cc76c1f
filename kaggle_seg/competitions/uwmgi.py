"""UW-Madison GI Tract: 16-bit PNG slices, three overlapping organ classes as row-major RLE.

Layout as Kaggle ships it::

    train.csv                                   id,class,segmentation (3 rows per slice)
    train/<case>/<case>_<day>/scans/slice_SSSS_W_H_PW_PH.png

W, H are the width and height in pixels (the 360x310 scans are not square), PW, PH the pixel
spacing in mm. Slice ids look like `case123_day20_slice_0065`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kaggle_seg.competitions.base import (
    BaseCompetition,
    DemoRecipe,
    KernelTarget,
    Skipped,
    StagedTest,
    Stream,
    TestSet,
)
from kaggle_seg.competitions.images import read_png
from kaggle_seg.competitions.uwmgi_files import (
    CLASSES,
    RLE_COLUMNS,
    RLE_ORDER,
    SLICE_COLUMNS,
    scan_slices,
    sort_slices,
)
from kaggle_seg.config import DataConfig
from kaggle_seg.errors import InputError
from kaggle_seg.io import read_csv_checked


def read_train_csv(path: str | Path) -> pd.DataFrame:
    """train.csv as one row per slice with columns `id` and `rle_<class>`."""
    labels = read_csv_checked(path, ["id", "class", "segmentation"])
    unknown = sorted(set(labels["class"]) - set(CLASSES))
    if unknown:
        row = int(np.flatnonzero(~labels["class"].isin(CLASSES))[0]) + 2
        raise InputError(f"{path}: line {row}: unknown class {unknown[0]!r}; expected {CLASSES}")
    duplicated = labels.duplicated(["id", "class"])
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0]) + 2
        raise InputError(f"{path}: line {row}: second row for {labels.loc[row - 2, 'id']}")
    # Kaggle's train.csv has a row per (slice, class), empty ones included: a slice with fewer
    # (a cut download) would otherwise read as organs absent, wrong truth without a word.
    counts = labels.groupby("id", sort=False)["class"].transform("size")
    if (counts < len(CLASSES)).any():
        row = int(np.flatnonzero(counts < len(CLASSES))[0])
        have = sorted(labels.loc[labels["id"] == labels.loc[row, "id"], "class"])
        raise InputError(
            f"{path}: line {row + 2}: {labels.loc[row, 'id']} has rows for {', '.join(have)} "
            f"only; every slice needs one per class {CLASSES} (empty segmentation: no organ)"
        )
    wide = labels.pivot(index="id", columns="class", values="segmentation")
    wide = wide.reindex(columns=list(CLASSES)).fillna("")
    wide.columns = list(RLE_COLUMNS)
    return wide.reset_index()


def check_label_rles(table: pd.DataFrame, source: Path) -> None:
    """Every RLE of the table decodes inside its slice; the error names the slice and class."""
    from kaggle_seg.data.rle import validate_rle

    sizes = list(zip(table["height"].astype(int), table["width"].astype(int), strict=True))
    for column in RLE_COLUMNS:
        for slice_name, rle, size in zip(table["id"], table[column], sizes, strict=True):
            if rle:
                try:
                    validate_rle(rle, size)
                except ValueError as exc:
                    line = _csv_line(source, slice_name, column[4:])
                    raise InputError(
                        f"{source}: line {line} ({slice_name}, {column[4:]}): {exc}"
                    ) from None


def _csv_line(path: Path, slice_name: str, organ: str) -> int | str:
    """The line of train.csv holding (id, class), found again only when an error names it."""
    labels = read_csv_checked(path, ["id", "class", "segmentation"])
    found = np.flatnonzero((labels["id"] == slice_name) & (labels["class"] == organ))
    return int(found[0]) + 2 if len(found) else "?"


class UWMGI(BaseCompetition):
    name = "uwmgi"
    classes = CLASSES
    channels = 1  # image channels before 2.5D stacking
    rle_order = RLE_ORDER
    kaggle_slug = "uw-madison-gi-tract-image-segmentation"  # on kaggle.com
    code_competition = True  # submitted by a kernel (internet off), not a CSV upload
    volume_key = "case_day"  # a case-day is one scan: slices stack and score within it
    slice_key = "slice_index"
    scoring = "volumes"  # 0.4 x Dice + 0.6 x (1 - 3D Hausdorff per case-day)
    submission_columns = ("id", "class", "predicted")
    table_columns = ("case_id", "case_day", "slice_index", *RLE_COLUMNS)

    @property
    def kernel(self) -> KernelTarget:  # type: ignore[override]
        from kaggle_seg.competitions.uwmgi_kaggle import KERNEL

        return self.kernel_target(KERNEL)

    @property
    def demo(self) -> DemoRecipe:  # type: ignore[override]
        from kaggle_seg.competitions.uwmgi_kaggle import DEMO

        return DEMO

    def read_table(self, data_dir: Path, config: DataConfig) -> pd.DataFrame:
        data_dir = Path(data_dir)
        slices = scan_slices(data_dir / "train")
        labels = read_train_csv(data_dir / "train.csv")
        table = labels.merge(slices, on="id", how="left", indicator=True)
        missing = table["_merge"] == "left_only"
        if missing.any():
            raise InputError(
                f"{data_dir / 'train.csv'}: {int(missing.sum())} slice(s) have no image under "
                f"{data_dir / 'train'}, first {table.loc[missing, 'id'].iloc[0]}"
            )
        table = table.drop(columns="_merge")
        table = table[~table["case_day"].isin(config.exclude_case_days)]
        check_label_rles(table, data_dir / "train.csv")
        table["empty"] = (table[list(RLE_COLUMNS)] == "").all(axis=1)
        return sort_slices(table[[*SLICE_COLUMNS, *RLE_COLUMNS, "empty"]])

    def read_test_table(self, test_dir: Path, skipped: list[Skipped] | None = None) -> pd.DataFrame:
        """`test/<case>/<case>_<day>/scans/*.png` in case-day, slice order (empty on Kaggle's
        public re-run, where the folder is empty). Sizes come from the file names, so no header
        is read and nothing is `skipped` here; unreadable slices are skipped when predicted."""
        return scan_slices(test_dir)

    def read_image(self, row: Any) -> np.ndarray:
        """float32 [H, W, 1], the 16-bit intensities divided by the slice's maximum."""
        image = read_png(row["image_path"])
        if image.ndim != 2:
            raise InputError(f"{row['image_path']}: expected a grayscale slice, got {image.shape}")
        image = image.astype(np.float32)
        peak = float(image.max())
        if peak > 0:
            image /= peak
        return image[..., None]

    def read_image_stack(self, table: pd.DataFrame, positions: np.ndarray) -> np.ndarray:
        """float32 [H, W, depth]: the slices at `positions` (one row of
        `data.stacks.stack_positions`)."""
        return np.concatenate([self.read_image(table.iloc[p]) for p in positions], axis=-1)

    def read_mask(self, row: Any) -> np.ndarray:
        from kaggle_seg.data.rle import decode_rle

        shape = (int(row["height"]), int(row["width"]))
        masks = np.zeros((len(RLE_COLUMNS), *shape), dtype=np.uint8)
        for k, column in enumerate(RLE_COLUMNS):
            try:
                decode_rle(row[column], shape, RLE_ORDER, out=masks[k])  # only the runs are written
            except ValueError as exc:
                raise InputError(f"slice {row['id']}, {column[4:]}: {exc}") from exc
        return np.ascontiguousarray(np.moveaxis(masks, 0, -1))

    def read_mask_volume(self, rows: Sequence[Any]) -> np.ndarray:
        """uint8 0/1 [K, N, H, W]: the masks of N slices of one size (a case-day), every RLE
        decoded in one call into one array; errors name the slice and class."""
        from kaggle_seg.data.rle import decode_rles

        shapes = {(int(r["height"]), int(r["width"])) for r in rows}
        if len(shapes) != 1:
            raise InputError(f"slices of different sizes {sorted(shapes)} in one stack")
        height, width = shapes.pop()
        n = len(rows)
        stack = np.zeros((len(RLE_COLUMNS), n, height, width), dtype=np.uint8)
        rles = [r[column] for column in RLE_COLUMNS for r in rows]
        names = [f"slice {r['id']}, {column[4:]}" for column in RLE_COLUMNS for r in rows]
        try:
            decode_rles(
                rles,
                (height, width),
                RLE_ORDER,
                labels=names,
                out=stack.reshape(-1, height, width),
            )
        except ValueError as exc:  # "row i (id=slice ..., class): ..." -> "slice ..., class: ..."
            message = str(exc)
            for i, name in enumerate(names):
                prefix = f"row {i} (id={name}): "
                if message.startswith(prefix):
                    raise InputError(f"{name}: {message[len(prefix) :]}") from exc
            raise InputError(message) from exc
        return stack

    def stratify_labels(self, table: pd.DataFrame) -> pd.Series:
        # The organ combination, e.g. "101" = large bowel and stomach present.
        present = (table[list(RLE_COLUMNS)] != "").astype(int).astype(str)
        return present.agg("".join, axis=1)

    def has_truth(self, row: Any) -> bool:
        # An empty RLE is a known empty mask; only missing columns mean unknown.
        return all(isinstance(row.get(column), str) for column in RLE_COLUMNS)

    def test_set(
        self,
        data_dir: Path,
        test_dir: Path | None,
        *,
        scratch: ExitStack,
        skipped: list[Skipped] | None,
        fallback_volumes: int = 2,
    ) -> TestSet:
        """`test/<case>/<case>_<day>/scans/*.png` (sizes from the file names, so nothing is
        `skipped` here); the first train case-days on the public re-run."""
        from kaggle_seg.competitions.uwmgi_kaggle import test_set

        return test_set(data_dir, test_dir, fallback_volumes)

    def write_submission(
        self,
        stream: Stream,
        test: TestSet,
        settings: Any,
        out: Path,
        skipped: list[Skipped] | None,
    ) -> tuple[int, int]:
        from kaggle_seg.competitions.uwmgi_kaggle import write_submission

        return write_submission(stream, test, settings, out)

    def score_submission(
        self, truth: Path, submission: Path, images_dir: Path | None, **modes: Any
    ) -> dict[str, Any]:
        from kaggle_seg.competitions.uwmgi_kaggle import score_submission

        return score_submission(truth, submission, images_dir, **modes)

    def stage_test(self, source: Path, dest: Path, holdout: int, scratch: Path) -> StagedTest:
        from kaggle_seg.competitions.uwmgi_kaggle import stage_test

        return stage_test(source, dest, holdout, scratch)

    def check_rerun_submission(self, submission: Path, staged: StagedTest) -> tuple[int, int]:
        from kaggle_seg.competitions.uwmgi_kaggle import check_rerun_submission

        return check_rerun_submission(submission, staged)

    def rehearsal_data(self, folder: Path) -> Path:
        from kaggle_seg.competitions.uwmgi_kaggle import rehearsal_data

        return rehearsal_data(folder)
