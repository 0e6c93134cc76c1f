"""UW-Madison GI Tract files as Kaggle ships them: the organ classes, the RLE order, slice ids
and the scan file names. A leaf module: the plug-in (uwmgi.py), its Kaggle half
(uwmgi_kaggle.py) and the phantom all read it, and it reads none of them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd

from kaggle_seg.errors import InputError

CLASSES = ("large_bowel", "small_bowel", "stomach")
RLE_ORDER = "C"  # row-major: train.csv and the submission
RLE_COLUMNS = tuple(f"rle_{c}" for c in CLASSES)
# What a scan folder tells about each slice (`scan_slices`); the training table adds the RLEs.
SLICE_COLUMNS = (
    "id",
    "group",
    "case_id",
    "case_day",
    "slice_index",
    "width",
    "height",
    "spacing_w",
    "spacing_h",
    "image_path",
)
_SLICE_FILE = re.compile(r"^slice_(\d+)_(\d+)_(\d+)_([\d.]+)_([\d.]+)\.png$")
_CASE_DAY = re.compile(r"^(case\d+)_(day\d+)$")


def parse_slice_filename(name: str) -> dict[str, Any]:
    """`slice_0065_360_310_1.50_1.50.png` -> slice_index 65, width 360, height 310, spacings."""
    match = _SLICE_FILE.match(name)
    if match is None:
        raise InputError(f"{name}: not a slice_SSSS_W_H_PW_PH.png file name")
    index, width, height, spacing_w, spacing_h = match.groups()
    return {
        "slice_index": int(index),
        "width": int(width),
        "height": int(height),
        "spacing_w": float(spacing_w),
        "spacing_h": float(spacing_h),
    }


def slice_id(case_day: str, slice_index: int) -> str:
    return f"{case_day}_slice_{slice_index:04d}"


def scan_slices(images_dir: str | Path) -> pd.DataFrame:
    """Every slice PNG under `images_dir/<case>/<case>_<day>/scans/`, one row each, in order.

    Sizes come from the file names, so no pixel is decoded.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"{images_dir}: folder of case folders not found")
    from kaggle_seg.progress import progress

    rows = []
    files = list(images_dir.glob("*/*/scans/slice_*.png"))
    for path in progress(files, description=f"scan {images_dir.name}", unit="slices"):
        case_day = path.parent.parent.name
        match = _CASE_DAY.match(case_day)
        if match is None:
            raise InputError(f"{path}: folder {case_day!r} is not named <case>_<day>")
        info = parse_slice_filename(path.name)
        rows.append(
            {
                "id": slice_id(case_day, info["slice_index"]),
                "group": match.group(1),
                "case_id": match.group(1),
                "case_day": case_day,
                **info,
                "image_path": str(path.resolve()),
            }
        )
    frame = pd.DataFrame(rows, columns=list(SLICE_COLUMNS))
    if frame["id"].duplicated().any():
        dup = frame.loc[frame["id"].duplicated(), "id"].iloc[0]
        raise InputError(f"{images_dir}: two files for slice {dup}")
    return sort_slices(frame)


def sort_slices(frame: pd.DataFrame) -> pd.DataFrame:
    """Case-day, then slice number: the order volumes and 2.5D stacks rely on."""
    from kaggle_seg.data.stacks import sort_slices as sort_volume_slices

    return sort_volume_slices(frame, "case_day", "slice_index")
