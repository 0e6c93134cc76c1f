"""The README's main job on a small embedded example (until training lands):

phantom uwmgi data -> `prepare` -> `folds` -> a stand-in prediction for fold 0 -> `score`.
The stand-in is the truth shifted by 3 px and eroded by 1 px: it exercises the whole scoring path
with a result that is good but not perfect, as a model's would be.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_seg.io import write_csv_atomic


def stand_in_prediction(mask: np.ndarray) -> np.ndarray:
    """[H, W] 0/1 -> the same mask shifted 3 px right and down, eroded by 1 px."""
    from scipy.ndimage import binary_erosion, shift

    moved = shift(mask.astype(np.uint8), (3, 3), order=0, mode="constant")
    return binary_erosion(moved).astype(np.uint8)


def stand_in_submission(table: pd.DataFrame) -> pd.DataFrame:
    """`id,class,predicted` for every row of a uwmgi table."""
    from kaggle_seg.competitions.uwmgi import CLASSES, RLE_COLUMNS
    from kaggle_seg.data.rle import decode_rle, encode_rle

    rows = []
    for row in table.itertuples(index=False):
        shape = (row.height, row.width)
        for organ, column in zip(CLASSES, RLE_COLUMNS, strict=True):
            mask = decode_rle(getattr(row, column), shape, "C")
            predicted = encode_rle(stand_in_prediction(mask), "C")
            rows.append({"id": row.id, "class": organ, "predicted": predicted})
    return pd.DataFrame(rows)


def run_demo(out: Path, data_dir: Path | None = None) -> Iterator[str]:
    """Run the pipeline under `out`, yielding one progress line per step."""
    from kaggle_seg.competitions.uwmgi import RLE_COLUMNS
    from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom
    from kaggle_seg.prepare import folds_for_table, prepare_table, read_table
    from kaggle_seg.scoring import score_submission

    out = Path(out)
    if data_dir is None:
        data_dir = make_uwmgi_phantom(out / "data")
        yield f"phantom uwmgi data written to {data_dir} (Kaggle layout: train.csv + train/)"
    summary = prepare_table("uwmgi", data_dir, out / "table.csv")
    yield (
        f"kseg prepare: {summary['images']} slices, {summary['groups']} cases, "
        f"{summary['empty_fraction']:.1%} empty, excluded {summary['excluded']}"
    )
    n_folds = min(5, summary["groups"])
    folds, _reused = folds_for_table(
        "uwmgi", out / "table.csv", out / "folds.csv", n_folds, 42, force=True
    )
    yield f"kseg folds: {n_folds} folds, sizes {folds.groupby('fold').size().tolist()}"

    table = read_table(out / "table.csv").merge(folds[["id", "fold"]], on="id")
    valid = table[table["fold"] == 0]
    truth = valid.melt(
        id_vars="id", value_vars=list(RLE_COLUMNS), var_name="class", value_name="segmentation"
    )
    truth["class"] = truth["class"].str.removeprefix("rle_")
    truth = truth.sort_values(["id", "class"])  # the class names sort in CLASSES order
    write_csv_atomic(truth, out / "truth_fold0.csv")
    write_csv_atomic(stand_in_submission(valid), out / "submission_fold0.csv")
    result = score_submission(
        "uwmgi", out / "truth_fold0.csv", out / "submission_fold0.csv", Path(data_dir) / "train"
    )
    yield (
        f"kseg score (fold 0, stand-in prediction): score {result['score']:.4f} = "
        f"0.4 x dice {result['dice']:.4f} + 0.6 x (1 - hausdorff {result['hausdorff']:.4f})"
    )
    yield (
        f"same with the CLI: kseg score --competition uwmgi {out / 'truth_fold0.csv'} "
        f"{out / 'submission_fold0.csv'} --images {Path(data_dir) / 'train'}"
    )
