"""2018 Data Science Bowl on Kaggle: the test set, the submission frame and its validator, the
scorer of `kseg score`, the kernel's held-back test, and the demo example.

Truth files as Kaggle ships them: `stage1_solution.csv` (with Height/Width), or
`stage1_train_labels.csv` plus the image folders for the sizes. One submission row per nucleus,
column-major RLE, `<id>,` for an image without nuclei.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kaggle_seg.competitions.base import (
    DemoExample,
    DemoRecipe,
    KernelTarget,
    Skipped,
    StagedTest,
    TestSet,
    check_sample_ids,
)
from kaggle_seg.errors import InputError, KsegError, RLEError, one_line
from kaggle_seg.io import read_csv_checked, write_csv_atomic
from kaggle_seg.submission import check_columns, check_rles, csv_line, non_empty_rles

COLUMNS = ("ImageId", "EncodedPixels")
# The test folders and the sample submission listing each one's images.
TEST_SAMPLES = {
    "stage2_test_final": "stage2_sample_submission_final.csv",
    "stage1_test": "stage1_sample_submission.csv",
}
RLE_ORDER = "F"  # column-major: the labels CSV and the submission

KERNEL = KernelTarget(
    "dsb2018",
    time_limit_hours=12.0,  # not a code competition: a Kaggle session's limit
    unit="images",
    hidden_test_items=3019,
    hidden_test_note="the stage 2 test set",
    default_holdout=8,
    holdout_unit="images",
)


def test_set(
    competition: Any,
    data_dir: Path,
    test_dir: Path | None = None,
    *,
    scratch: ExitStack | None = None,
    skipped: list[Skipped] | None = None,
) -> TestSet:
    """The test images: `test_dir`, else stage2_test_final/ or stage1_test/ in data_dir
    (extracted from its zip into a fresh temporary folder that `scratch` removes). With
    `skipped`, images whose header cannot be read are left out and recorded there."""
    data_dir = Path(data_dir)
    if test_dir is None:
        test_dir = _test_folder(data_dir, scratch)
    test_dir = Path(test_dir)
    table = competition.read_test_table(test_dir, skipped)
    if table.empty and not skipped:
        raise InputError(f"{test_dir}: no test images (expected <id>/images/<id>.png)")
    sample_path = test_dir.parent / TEST_SAMPLES.get(test_dir.name, "-")
    if sample_path.is_file():
        sample = read_csv_checked(sample_path, ["ImageId", "EncodedPixels"])
        found = pd.concat([table["id"], pd.Series([s.id for s in skipped or []], dtype=str)])
        check_sample_ids(found, sample["ImageId"], sample_path)
    return TestSet(table)


def _test_folder(data_dir: Path, scratch: ExitStack | None = None) -> Path:
    """The stage-2 test folder, else stage 1's; where Kaggle mounts only `<folder>.zip`, it is
    extracted, beside its sample CSV, into a new temporary folder (the input folder is
    read-only), which `scratch` removes when the run ends. A fresh folder per run, so images of
    an earlier, other zip are never predicted with this one's."""
    for name in TEST_SAMPLES:
        if (data_dir / name).is_dir():
            return data_dir / name
    for name, sample in TEST_SAMPLES.items():
        archive = data_dir / f"{name}.zip"
        if archive.is_file():
            extracted = Path(tempfile.mkdtemp(prefix="kseg_dsb2018_"))
            if scratch is not None:
                scratch.callback(shutil.rmtree, extracted, ignore_errors=True)
            try:
                with zipfile.ZipFile(archive) as zipped:
                    zipped.extractall(extracted / name)  # zipfile drops '..' and absolute parts
            except (zipfile.BadZipFile, OSError) as exc:
                raise InputError(f"{archive}: cannot extract ({one_line(exc)})") from exc
            if (data_dir / sample).is_file():
                shutil.copy(data_dir / sample, extracted / sample)
            return extracted / name
    return data_dir


def submission_rows(stream: Iterator[tuple[Any, ...]], settings: Any) -> list[dict[str, str]]:
    """`ImageId,EncodedPixels` rows (column-major RLE), one per nucleus, `<id>,` for none."""
    from kaggle_seg.data.rle import encode_rle
    from kaggle_seg.postprocess import postprocess_instances

    rows = []
    for _, image_id, probabilities, *_ in stream:
        labels = postprocess_instances(probabilities, settings)
        n = int(labels.max())
        if n == 0:
            rows.append({"ImageId": image_id, "EncodedPixels": ""})
            continue
        for k in range(1, n + 1):
            nucleus = labels == k
            if nucleus.any():
                rows.append({"ImageId": image_id, "EncodedPixels": encode_rle(nucleus, RLE_ORDER)})
    return rows


def write_submission(
    stream: Iterator[tuple[Any, ...]],
    test: TestSet,
    settings: Any,
    out: Path,
    skipped: list[Skipped] | None,
) -> tuple[int, int]:
    """The validated `ImageId,EncodedPixels` CSV at `out`; returns (rows, images)."""
    table = test.table
    shapes = dict(zip(table["id"], zip(table["height"], table["width"], strict=True), strict=True))
    rows = submission_rows(stream, settings)
    # Images whose header could not be read (--on-error skip) have no nuclei: `<id>,`.
    unread = [s.id for s in skipped or [] if s.id not in shapes]
    rows += [{"ImageId": image_id, "EncodedPixels": ""} for image_id in unread]
    shapes.update(dict.fromkeys(unread, (0, 0)))
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame = validate_submission(frame, shapes, source=str(out))
    write_csv_atomic(frame, out)
    return len(frame), len(shapes)


def validate_submission(
    submission: pd.DataFrame,
    image_shapes: Mapping[str, tuple[int, int]],
    *,
    source: str = "submission",
) -> pd.DataFrame:
    """Check `ImageId,EncodedPixels`: every image present, valid column-major RLEs, no nucleus
    overlapping another. `<id>,` (an empty row) stands for an image with no nuclei.
    """
    from kaggle_seg.data.rle import decode_rles_to_labels

    check_columns(submission, COLUMNS, source)
    frame = submission.loc[:, list(COLUMNS)].fillna("").astype(str).reset_index(drop=True)
    unknown = ~frame["ImageId"].isin(image_shapes.keys())
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise InputError(
            f"{source}: line {csv_line(i)}: unknown ImageId {frame.loc[i, 'ImageId']!r}"
        )
    present = set(frame["ImageId"])
    missing = [image_id for image_id in image_shapes if image_id not in present]
    if missing:
        raise InputError(f"{source}: {len(missing)} image(s) have no row, first {missing[0]}")
    check_rles(frame, "ImageId", "EncodedPixels", image_shapes, source)
    for image_id, rows in frame.groupby("ImageId", sort=False).groups.items():
        positions = [p for p in rows if frame.at[p, "EncodedPixels"]]
        height, width = image_shapes[image_id]
        if len(positions) > 1:
            try:
                decode_rles_to_labels(
                    [frame.at[p, "EncodedPixels"] for p in positions],
                    (height, width),
                    RLE_ORDER,
                    labels=[f"line {csv_line(p)}" for p in positions],
                )
            except RLEError as exc:  # "row 3 (id=line 12)": the CSV line says it all
                message = re.sub(r"row \d+ \(id=(line \d+)\)", r"\1", str(exc))
                raise InputError(f"{source}: {image_id}: {message}") from None
    return frame


def image_shapes(
    truth: pd.DataFrame, images_dir: Path | None, truth_csv: Path
) -> dict[str, tuple[int, int]]:
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


def dsb_labels(rles: pd.Series, shape: tuple[int, int]) -> np.ndarray:
    """int32 [H, W] instance labels of one image's column-major RLE rows (blank ones skipped)."""
    from kaggle_seg.data.rle import decode_rles_to_labels

    keep = non_empty_rles(rles)
    if not keep.any():
        return np.zeros(shape, dtype=np.int32)
    return decode_rles_to_labels(rles.to_numpy()[keep].tolist(), shape, RLE_ORDER)


def dsb_score_frames(
    truth: pd.DataFrame, submission: pd.DataFrame, shapes: Mapping[str, tuple[int, int]]
) -> dict:
    """DSB 2018 mean average precision of a submission frame.

    truth, submission: `ImageId,EncodedPixels`, one row per nucleus, column-major RLE (an image
    with no predicted nucleus has one row with an empty RLE). shapes: ImageId -> (H, W). The images
    scored are those of the truth (in order of first appearance); one missing from the submission
    scores as predicted empty. Returns {"score": mean over images, "pixel_dice": mean Dice of
    the nuclei unions (both empty: 1), "per_image": DataFrame(ImageId, score, pixel_dice,
    n_truth, n_pred), "n_images"}.
    """
    from kaggle_seg.metrics import dsb_precisions_and_counts

    check_columns(truth, COLUMNS, "truth")
    check_columns(submission, COLUMNS, "submission")
    predicted = {
        image_id: group["EncodedPixels"]
        for image_id, group in submission.groupby("ImageId", sort=False)
    }
    rows = []
    for image_id, group in truth.groupby("ImageId", sort=False):
        if image_id not in shapes:
            raise InputError(f"shapes has no (H, W) for image {image_id!r}")
        shape = tuple(int(n) for n in shapes[image_id])
        truth_labels = dsb_labels(group["EncodedPixels"], shape)
        prediction_rles = predicted.get(image_id, pd.Series([], dtype=object))
        prediction_labels = dsb_labels(prediction_rles, shape)
        precisions, n_truth, n_prediction = dsb_precisions_and_counts(
            truth_labels, prediction_labels
        )
        truth_pixels, predicted_pixels = truth_labels > 0, prediction_labels > 0
        total = int(truth_pixels.sum()) + int(predicted_pixels.sum())
        overlap = int(np.count_nonzero(truth_pixels & predicted_pixels))
        rows.append(
            {
                "ImageId": image_id,
                "score": float(precisions.mean()),
                "pixel_dice": 2.0 * overlap / total if total else 1.0,
                "n_truth": n_truth,
                "n_pred": n_prediction,
            }
        )
    columns = ["ImageId", "score", "pixel_dice", "n_truth", "n_pred"]
    per_image = pd.DataFrame(rows, columns=columns)
    score = float(per_image["score"].mean()) if len(per_image) else math.nan
    pixel_dice = float(per_image["pixel_dice"].mean()) if len(per_image) else math.nan
    return {
        "score": score,
        "pixel_dice": pixel_dice,
        "per_image": per_image,
        "n_images": len(per_image),
    }


def score_submission(
    truth_csv: Path, submission_csv: Path, images_dir: Path | None, **modes: Any
) -> dict[str, Any]:
    """`kseg score -c dsb2018`: the mAP; nuclei are one class, so no metric mode applies."""
    if any(modes.values()):
        raise KsegError("--merged-classes, --dice and --hausdorff apply to uwmgi only")
    truth = read_csv_checked(truth_csv, ["ImageId", "EncodedPixels"])
    submission = read_csv_checked(submission_csv, ["ImageId", "EncodedPixels"])
    if images_dir is None and {"Height", "Width"} <= set(submission.columns) - set(truth.columns):
        raise KsegError(
            f"{submission_csv} has the Height/Width columns of a solution file and {truth_csv} "
            "has none: the truth comes first (kseg score TRUTH SUBMISSION)"
        )
    shapes = image_shapes(truth, images_dir, truth_csv)
    submission = validate_submission(submission, shapes, source=str(submission_csv))
    return dsb_score_frames(truth[["ImageId", "EncodedPixels"]], submission, shapes)


def stage_test(source: Path, dest: Path, holdout: int, scratch: Path) -> StagedTest:
    """dsb2018 with `holdout` stage1_train images moved to stage1_test/ (images only)."""
    from kaggle_seg.io import link_file, link_tree

    train = source / "stage1_train"
    if not train.is_dir():
        raise KsegError(f"{source}: stage1_train/ not found (a DSB 2018 folder as Kaggle ships it)")
    ids = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not 0 < holdout < len(ids):
        raise KsegError(f"{source}: {len(ids)} train image(s); hold back 1 to {len(ids) - 1}")
    held = ids[len(ids) - holdout :]
    for image_id in ids:
        if image_id in held:
            name = f"{image_id}/images/{image_id}.png"
            link_file(train / name, dest / "stage1_test" / name)
        else:
            link_tree(train / image_id, dest / "stage1_train" / image_id)
    labels = read_csv_checked(source / "stage1_train_labels.csv", ["ImageId", "EncodedPixels"])
    write_csv_atomic(labels[~labels["ImageId"].isin(held)], dest / "stage1_train_labels.csv")
    sample = pd.DataFrame({"ImageId": held, "EncodedPixels": "1 1"})
    write_csv_atomic(sample, dest / "stage1_sample_submission.csv")
    truth = scratch / "truth.csv"
    write_csv_atomic(labels[labels["ImageId"].isin(held)], truth)
    return StagedTest(len(held), truth, dest / "stage1_test", dest / "stage1_train")


def write_demo_example(root: Path) -> DemoExample:
    """The 50 CC0 stage-1 images shipped in the package (kaggle_seg/examples/dsb2018, written by
    scripts/make_dsb_example.py): stage1_train/ (26) + labels CSV + stage1_test/ (24) and its
    solution."""
    source = resources.files("kaggle_seg") / "examples" / "dsb2018"
    with resources.as_file(source) as folder:
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(folder, root)
    return DemoExample(root, root / "stage1_solution.csv", None)


def _describe_demo_score(scored: dict[str, Any]) -> str:
    return f"mAP over {scored['n_images']} images"


# Nuclei + borders on native-scale crops, whole images at validation and test, the watershed
# split; a slide has no up, so all 8 orientations for TTA.
DEMO = DemoRecipe(
    data={
        "n_folds": 5,
        "stack_depth": 1,
        "stack_stride": 1,
        "exclude_case_days": [],
        "targets": "mask_border",
    },
    augment={
        "preset": "nuclei",
        "height": 192,
        "width": 192,
        "resize_mode": "crop",
        "scale_jitter": 0.2,
    },
    epochs=90,
    tta="d4",
    write_example=write_demo_example,
    describe_score=_describe_demo_score,
)
