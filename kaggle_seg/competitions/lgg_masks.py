"""LGG's mask files: the dataset's mask reader and patient rule, and kseg's output, predicted
masks laid out as the dataset's own (`<series>/<id>_mask.tif`, uint8 0 / 255), which `kseg
submit` writes and `kseg score -c lgg` scores against the dataset's masks, per patient (Buda et
al.'s volume Dice, as the CV) with the per-image table beside it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kaggle_seg.competitions.images import read_tiff
from kaggle_seg.errors import InputError, KsegError

MASK_SUFFIX = "_mask.tif"
_SLICE_MASK = re.compile(r"^(?P<series>.+)_(?P<index>\d+)_mask\.tif$")


def patient_of(series: str) -> str:
    """TCGA_CS_4942 from the series folder TCGA_CS_4942_19970222 (the date dropped)."""
    return "_".join(series.split("_")[:3])


def read_mask_tiff(path: Path | str) -> np.ndarray:
    """[H, W] mask; a file that decodes to anything else (a truncated TIFF) is named."""
    mask = read_tiff(path)
    mask = mask[..., 0] if mask.ndim == 3 else mask
    if mask.ndim != 2 or min(mask.shape) == 0:
        raise InputError(f"{path}: not a mask image (decoded shape {mask.shape})")
    return mask


def write_mask_folder(
    masks: Iterable[tuple[str, np.ndarray]], table: pd.DataFrame, out: Path
) -> int:
    """`out/<series>/<id>_mask.tif` per image of `masks` ([1, H, W] after post-processing);
    returns how many were written."""
    import tifffile

    from kaggle_seg.io import atomic_path
    from kaggle_seg.safe_paths import check_name, path_inside

    series = dict(zip(table["id"], table["series"], strict=True))
    written = 0
    for image_id, image_masks in masks:
        folder = path_inside(out, check_name(str(series[image_id]), "series folder"))
        path = path_inside(folder, check_name(f"{image_id}{MASK_SUFFIX}", "mask file"))
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            tifffile.imwrite(handle, (np.asarray(image_masks[0]) > 0).astype(np.uint8) * 255)
        written += 1
    if written != len(table):
        raise KsegError(f"{out}: {written} masks written for {len(table)} test slices")
    return written


def _mask_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """id -> (path, series) of every `<series>_<n>_mask.tif` under `folder` (any depth)."""
    found: dict[str, tuple[Path, str]] = {}
    for path in sorted(folder.rglob(f"*{MASK_SUFFIX}")):
        if match := _SLICE_MASK.match(path.name):
            found.setdefault(path.name[: -len(MASK_SUFFIX)], (path, match["series"]))
    return found


def _read_binary(path: Path) -> np.ndarray:
    return (read_mask_tiff(path) > 0).astype(np.uint8)


def score_mask_folder(truth: Path, submission: Path) -> dict[str, Any]:
    """The patients the submission holds, scored against the dataset's masks under `truth`
    (kaggle_3m/ or a folder of TCGA_* series): the mean per-patient volume Dice, and the
    per-image Dice / IoU table. Every truth slice of those patients needs its predicted mask."""
    from kaggle_seg.metrics import pixel_counts, pixel_metrics_table, volume_dice

    truth, submission = Path(truth), Path(submission)
    for path, what in ((truth, "truth"), (submission, "submission")):
        if not path.is_dir():
            raise InputError(f"{path}: {what} folder not found (lgg scores mask folders)")
    truths = _mask_files(truth)
    predicted = _mask_files(submission)
    if not truths:
        raise InputError(f"{truth}: no LGG masks (<series>_<n>{MASK_SUFFIX})")
    if not predicted:
        raise InputError(f"{submission}: no predicted masks (<series>_<n>{MASK_SUFFIX})")
    unknown = sorted(set(predicted) - set(truths))
    if unknown:
        raise InputError(f"{predicted[unknown[0]][0]}: no truth mask of that name under {truth}")
    held = {truths[i][1] for i in predicted}  # the series the submission holds
    ids = sorted(i for i, (_, series) in truths.items() if series in held)
    missing = [i for i in ids if i not in predicted]
    if missing:
        raise InputError(
            f"{submission}: no predicted mask for {len(missing)} slice(s) of the patients it "
            f"holds, first {missing[0]}{MASK_SUFFIX}"
        )
    truth_masks, predicted_masks, counts = [], [], []
    for image_id in ids:
        (truth_path, series), predicted_path = truths[image_id], predicted[image_id][0]
        expected, mask = _read_binary(truth_path), _read_binary(predicted_path)
        if mask.shape != expected.shape:
            raise InputError(
                f"{predicted_path}: mask is {mask.shape[1]}x{mask.shape[0]}, the truth "
                f"{expected.shape[1]}x{expected.shape[0]} (W x H)"
            )
        truth_masks.append(expected)
        predicted_masks.append(mask)
        counts.append({"group": patient_of(series), **pixel_counts(expected, mask)})
    table = pixel_metrics_table(ids, truth_masks, predicted_masks)
    per_patient = volume_dice(pd.DataFrame(counts), "group")
    per_group = pd.DataFrame({"group": per_patient.index, "dice": per_patient.to_numpy()})
    means = table.drop(columns="id").mean()
    score = float(per_group["dice"].mean())
    return {
        "score": score,
        "group_dice": score,
        "n_groups": len(per_group),
        "dice": float(means["dice"]),
        "iou": float(means["iou"]),
        "n_images": len(table),
        "per_group": per_group,
        "per_image": table,
    }
