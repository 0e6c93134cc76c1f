"""Submission frames: the checks Kaggle's scorer would make, with errors naming the CSV line.

The same validators serve `kseg score` (someone else's CSV) and `kseg submit` (our own, before it
is written). Line numbers count the header as line 1, as an editor shows them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from kaggle_seg.errors import InputError, RLEError, one_line

UWMGI_COLUMNS = ("id", "class", "predicted")
DSB_COLUMNS = ("ImageId", "EncodedPixels")


def _line(position: int) -> int:
    return position + 2


def _check_columns(frame: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = ", ".join(one_line(repr(c)) for c in frame.columns) or "none"
        raise InputError(f"{source}: missing column(s) {', '.join(missing)}; found {found}")


def validate_uwmgi_submission(
    submission: pd.DataFrame,
    expected_ids: Sequence[str],
    slice_shapes: Mapping[str, tuple[int, int]],
    classes: Sequence[str],
    *,
    source: str = "submission",
) -> pd.DataFrame:
    """Check `id,class,predicted`: one row per (expected slice, class), valid row-major RLEs.

    Returns the frame with empty cells as "". Raises InputError naming the line at fault.
    """
    from kaggle_seg.data.rle import validate_rle

    _check_columns(submission, UWMGI_COLUMNS, source)
    frame = submission.loc[:, list(UWMGI_COLUMNS)].fillna("").astype(str).reset_index(drop=True)
    bad_class = ~frame["class"].isin(classes)
    if bad_class.any():
        i = int(np.flatnonzero(bad_class)[0])
        raise InputError(
            f"{source}: line {_line(i)}: unknown class {frame.loc[i, 'class']!r}; "
            f"expected one of {', '.join(classes)}"
        )
    duplicated = frame.duplicated(["id", "class"])
    if duplicated.any():
        i = int(np.flatnonzero(duplicated)[0])
        raise InputError(
            f"{source}: line {_line(i)}: second row for ({frame.loc[i, 'id']}, "
            f"{frame.loc[i, 'class']})"
        )
    expected = set(expected_ids)
    unknown = ~frame["id"].isin(expected)
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise InputError(f"{source}: line {_line(i)}: id {frame.loc[i, 'id']!r} is not expected")
    if len(frame) != len(expected) * len(classes):
        present = set(zip(frame["id"], frame["class"], strict=True))
        missing = [(i, c) for i in expected_ids for c in classes if (i, c) not in present]
        raise InputError(
            f"{source}: {len(missing)} (id, class) row(s) missing, first {missing[0][0]}, "
            f"{missing[0][1]}"
        )
    for i, (slice_id, rle) in enumerate(zip(frame["id"], frame["predicted"], strict=True)):
        if rle:
            height, width = slice_shapes[slice_id]
            try:
                validate_rle(rle, height * width)
            except RLEError as exc:
                raise InputError(f"{source}: line {_line(i)} ({slice_id}): {exc}") from None
    return frame


def validate_dsb_submission(
    submission: pd.DataFrame,
    image_shapes: Mapping[str, tuple[int, int]],
    *,
    source: str = "submission",
) -> pd.DataFrame:
    """Check `ImageId,EncodedPixels`: every image present, valid column-major RLEs, no nucleus
    overlapping another. `<id>,` (an empty row) stands for an image with no nuclei.
    """
    from kaggle_seg.data.rle import decode_rles_to_labels, validate_rle

    _check_columns(submission, DSB_COLUMNS, source)
    frame = submission.loc[:, list(DSB_COLUMNS)].fillna("").astype(str).reset_index(drop=True)
    unknown = ~frame["ImageId"].isin(image_shapes.keys())
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise InputError(f"{source}: line {_line(i)}: unknown ImageId {frame.loc[i, 'ImageId']!r}")
    present = set(frame["ImageId"])
    missing = [image_id for image_id in image_shapes if image_id not in present]
    if missing:
        raise InputError(f"{source}: {len(missing)} image(s) have no row, first {missing[0]}")
    for image_id, rows in frame.groupby("ImageId", sort=False).groups.items():
        positions = [p for p in rows if frame.at[p, "EncodedPixels"]]
        height, width = image_shapes[image_id]
        for p in positions:
            try:
                validate_rle(frame.at[p, "EncodedPixels"], height * width)
            except RLEError as exc:
                raise InputError(f"{source}: line {_line(p)} ({image_id}): {exc}") from None
        if len(positions) > 1:
            try:
                decode_rles_to_labels(
                    [frame.at[p, "EncodedPixels"] for p in positions],
                    (height, width),
                    "F",
                    labels=[f"line {_line(p)}" for p in positions],
                )
            except RLEError as exc:
                raise InputError(f"{source}: {image_id}: {exc}") from None
    return frame
