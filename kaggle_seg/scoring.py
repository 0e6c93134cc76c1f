"""`kseg score`: read a competition's truth and a submission CSV, validate, and score.

Truth files as Kaggle ships them:
- uwmgi: `train.csv` (id,class,segmentation); slice sizes from the case folders (`--images`).
- dsb2018: `stage1_solution.csv` (with Height/Width), or `stage1_train_labels.csv` plus the image
  folders (`--images`) for the sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.io import read_csv_checked
from kaggle_seg.submission import validate_dsb_submission, validate_uwmgi_submission


def score_uwmgi(
    truth_csv: Path, submission_csv: Path, images_dir: Path | None, **modes: Any
) -> dict[str, Any]:
    """`modes`: merged_classes, dice, hausdorff, as `uwmgi_score_frames` takes them."""
    from kaggle_seg.competitions.uwmgi import CLASSES, scan_slices
    from kaggle_seg.metrics import uwmgi_score_frames

    if images_dir is None:
        raise KsegError("uwmgi: --images DIR (the folder of case folders) is needed for sizes")
    truth = read_csv_checked(truth_csv, ["id", "class", "segmentation"])
    slices = scan_slices(images_dir)
    shapes = dict(
        zip(slices["id"], zip(slices["height"], slices["width"], strict=True), strict=True)
    )
    truth_ids = list(dict.fromkeys(truth["id"]))
    unsized = [i for i in truth_ids if i not in shapes]
    if unsized:
        raise InputError(
            f"{truth_csv}: {len(unsized)} slice(s) without an image under "
            f"{images_dir}, first {unsized[0]}"
        )
    submission = read_csv_checked(submission_csv, ["id", "class", "predicted"])
    submission = validate_uwmgi_submission(
        submission, truth_ids, shapes, CLASSES, source=str(submission_csv)
    )
    return uwmgi_score_frames(truth, submission, shapes, **modes)


def dsb_image_shapes(truth: pd.DataFrame, images_dir: Path | None, truth_csv: Path):
    """ImageId -> (H, W), from Height/Width columns or else the image files."""
    from kaggle_seg.competitions.images import image_size

    if {"Height", "Width"} <= set(truth.columns):
        sizes = truth.drop_duplicates("ImageId")
        try:
            return {
                i: (int(h), int(w))
                for i, h, w in zip(sizes["ImageId"], sizes["Height"], sizes["Width"], strict=True)
            }
        except ValueError as exc:
            raise InputError(f"{truth_csv}: Height/Width must be integers ({exc})") from exc
    if images_dir is None:
        raise KsegError(f"{truth_csv} has no Height/Width columns: pass --images DIR for sizes")
    image_ids = list(dict.fromkeys(truth["ImageId"]))
    return {i: image_size(Path(images_dir) / i / "images" / f"{i}.png") for i in image_ids}


def score_dsb2018(
    truth_csv: Path, submission_csv: Path, images_dir: Path | None, **modes: Any
) -> dict[str, Any]:
    """DSB mAP; nuclei are one class, so no metric mode applies."""
    if any(modes.values()):
        raise KsegError("--merged-classes, --dice and --hausdorff apply to uwmgi only")
    from kaggle_seg.metrics import dsb_score_frames

    truth = read_csv_checked(truth_csv, ["ImageId", "EncodedPixels"])
    shapes = dsb_image_shapes(truth, images_dir, truth_csv)
    submission = read_csv_checked(submission_csv, ["ImageId", "EncodedPixels"])
    submission = validate_dsb_submission(submission, shapes, source=str(submission_csv))
    return dsb_score_frames(truth[["ImageId", "EncodedPixels"]], submission, shapes)


SCORERS = {"uwmgi": score_uwmgi, "dsb2018": score_dsb2018}


def score_submission(
    competition: str,
    truth_csv: Path,
    submission_csv: Path,
    images_dir: Path | None = None,
    *,
    merged_classes: bool = False,
    dice: str | None = None,
    hausdorff: str | None = None,
) -> dict[str, Any]:
    """Validate `submission_csv` against `truth_csv` and score it with the competition metric.

    uwmgi: `dice` / `hausdorff` "per-class" (the competition) or "merged" (the union of the
    organs); `merged_classes` merges both. MLE-bench's grader: dice per-class, hausdorff merged.
    """
    if competition not in SCORERS:
        raise KsegError(
            f"{competition!r} has no Kaggle submission format to score; choose one of "
            f"{', '.join(SCORERS)}"
        )
    return SCORERS[competition](
        truth_csv,
        submission_csv,
        images_dir,
        merged_classes=merged_classes,
        dice=dice,
        hausdorff=hausdorff,
    )
