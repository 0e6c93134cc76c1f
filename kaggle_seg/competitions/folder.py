"""A folder of images and masks, the layout many datasets already have (Kvasir-SEG, the DSB
"processed" layout, exports of anything else), as a competition of its own.

Layout (DIR is `--data-dir`)::

    DIR/images/<name>.png|jpg|jpeg|tif|tiff    the images (RGB, grey or 16-bit)
    DIR/masks/<name>.png|jpg|jpeg|tif|tiff     one mask per image, same name
    DIR/test/[images/]<name>.<ext>             unlabelled images for `kseg submit` (optional)

Set up by the config's `data.options` (`FolderOptions`): `classes` names the mask classes
(required). A one-class mask is foreground where it is 1 in a 0 / 1 mask, else at or above
half its own top value (0 / 255, 0 / 100, 16-bit alike; JPEG noise around 0 is no
foreground), and a colour one wherever a channel is set; a mask of several classes holds the
class number k = 1..K in each pixel (0 background), or the values `mask_values` lists in
class order. A dataset whose every mask is empty is refused: its masks were misread or
mislaid. Scored like the per-image Dice of training (`scoring` "images"), or with
`score_by: group` by each group's Dice, its images' pixels pooled ("groups", as LGG scores
patients); the submission is an `id,class,rle` CSV (`rle_order` C or F), or one mask PNG per
image (`submission: png`, class numbers, 255 for one class).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, ValidationError, field_validator, model_validator

from kaggle_seg.competitions.base import (
    BaseCompetition,
    Skipped,
    Stream,
    TestSet,
)
from kaggle_seg.competitions.folder_masks import mask_classes
from kaggle_seg.competitions.images import (
    IMAGE_SUFFIXES,
    check_same_size,
    image_files,
    image_rows,
    image_size,
    read_png,
    read_tiff,
    rgb_unit,
    tiff_size,
)
from kaggle_seg.config import DataConfig, StrictModel, format_validation_error
from kaggle_seg.errors import InputError, KsegError

COLUMNS = ("id", "class", "rle")


class FolderOptions(StrictModel):
    """`data.options` of the folder competition."""

    classes: list[str] = Field(min_length=1)
    # Pixel value of each class in the masks, in class order (default: 1..K, or for one class
    # "foreground": 1 in a 0 / 1 mask, else at or above half the mask's top value).
    mask_values: list[int] | None = None
    submission: Literal["rle", "png"] = "rle"
    rle_order: Literal["C", "F"] = "C"
    # A regular expression whose first group names what folds group by (a patient in the file
    # name, e.g. "^(TCGA_[A-Z0-9]+_[0-9]+)_"); default: every image is its own group.
    group_pattern: str | None = None
    # What the CV, `kseg tune` and `kseg score` average: "image" (the per-image Dice, an empty
    # image predicted empty scoring 1) or "group" (each group's Dice, its images' pixels
    # pooled, as LGG scores a patient: slices of 3D scans, mostly empty; needs group_pattern).
    score_by: Literal["image", "group"] = "image"

    @model_validator(mode="after")
    def _groups_to_score(self) -> FolderOptions:
        if self.score_by == "group" and self.group_pattern is None:
            raise ValueError("score_by: group needs a group_pattern naming the groups")
        return self

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[str]) -> list[str]:
        if len(set(classes)) != len(classes) or "border" in classes:
            raise ValueError("name each class once (and not 'border', the instance border)")
        return classes

    @field_validator("group_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                if re.compile(pattern).groups < 1:
                    raise ValueError("needs a group, e.g. ^(patient[0-9]+)_")
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc})") from None
        return pattern


def _is_tiff(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".tif", ".tiff")


def _size(path: str | Path) -> tuple[int, int]:
    return tiff_size(path) if _is_tiff(path) else image_size(path)


def _read(path: str | Path) -> np.ndarray:
    return read_tiff(path) if _is_tiff(path) else read_png(path)


class Folder(BaseCompetition):
    name = "folder"
    channels = 3  # read as RGB (grey images repeated)
    scoring = "images"  # the mean per-image Dice, classes pooled
    rgb = True
    submission_columns = COLUMNS

    def __init__(self, options: FolderOptions | None = None):
        self.options = options
        self.classes: tuple[str, ...] = tuple(options.classes) if options else ()
        self.rle_order = options.rle_order if options else "C"
        self.submission_suffix = ".csv" if options is None or options.submission == "rle" else ""
        self.scoring = "groups" if options and options.score_by == "group" else "images"

    def configure(self, options: Mapping[str, Any]) -> Folder:
        try:
            return Folder(FolderOptions.model_validate(dict(options)))
        except ValidationError as exc:
            message = format_validation_error("folder: data.options", exc)
            if "'classes'" in message and "classes" not in options:
                message += " (name the mask classes, e.g. data.options.classes: [polyp])"
            raise KsegError(message) from None

    def _settings(self) -> FolderOptions:
        if self.options is None:
            raise KsegError(
                "folder: set data.options.classes (the mask classes, e.g. [polyp]) in the "
                "config (--config)"
            )
        return self.options

    # ---- reading --------------------------------------------------------------------------

    def read_table(self, data_dir: Path, config: DataConfig) -> pd.DataFrame:
        data_dir = Path(data_dir)
        settings = self._settings()
        if not (data_dir / "images").is_dir() or not (data_dir / "masks").is_dir():
            raise InputError(f"{data_dir}: expected images/ and masks/ (one mask per image)")
        images = image_files(data_dir / "images")
        masks = image_files(data_dir / "masks")
        missing = sorted(set(images) - set(masks))
        if missing:
            raise InputError(f"{images[missing[0]]}: no mask of that name in {data_dir / 'masks'}")
        from kaggle_seg.progress import progress

        rows = []
        for name in progress(list(images), description="prepare"):
            height, width = _size(images[name])
            row = {
                "id": name,
                "group": self._group(name, settings),
                "image_path": str(images[name].resolve()),
                "mask_path": str(masks[name].resolve()),
                "height": height,
                "width": width,
            }
            present = self.read_mask(row).reshape(-1, len(self.classes)).any(axis=0)
            rows.append(
                {
                    **row,
                    "labels": "".join("1" if p else "0" for p in present),
                    "empty": not present.any(),
                }
            )
        if not rows:
            raise InputError(f"{data_dir / 'images'}: no images")
        if all(row["empty"] for row in rows):
            # Nothing to learn, and a tuned CV of 1.0 for predicting nothing: refuse it.
            raise InputError(
                f"{data_dir / 'masks'}: every one of the {len(rows)} masks is empty (no pixel "
                f"of {', '.join(self.classes)}); check the mask files and data.options.mask_values"
            )
        table = pd.DataFrame(rows)
        orphans = sorted(set(masks) - set(images))
        if orphans:  # a naming mismatch shows here first
            table.attrs["notes"] = [
                f"{len(orphans)} mask(s) in {data_dir / 'masks'} without an image of that name, "
                f"left out: {', '.join(masks[name].name for name in orphans[:3])}"
                + (", ..." if len(orphans) > 3 else "")
            ]
        return table

    @staticmethod
    def _group(name: str, settings: FolderOptions) -> str:
        if settings.group_pattern is None:
            return name
        match = re.search(settings.group_pattern, name)
        if match is None:
            raise InputError(f"{name}: the file name does not match group_pattern")
        return match.group(1)

    def read_test_table(self, test_dir: Path, skipped: list[Skipped] | None = None) -> pd.DataFrame:
        """Image files in `test_dir` (or its images/ folder), sorted by name."""
        test_dir = Path(test_dir)
        if (test_dir / "images").is_dir():
            test_dir = test_dir / "images"
        if not test_dir.is_dir():
            raise InputError(f"{test_dir}: test folder not found")
        return image_rows(image_files(test_dir), _size, skipped)

    def read_image(self, row: Any) -> np.ndarray:
        """float32 [H, W, 3] RGB in [0, 1]; alpha dropped, grey repeated, 16-bit kept exact."""
        return rgb_unit(_read(row["image_path"]))

    def read_mask(self, row: Any) -> np.ndarray:
        """uint8 0/1 [H, W, K] from the mask file (see the module docstring)."""
        settings = self._settings()
        path = row["mask_path"]
        mask = _read(path)
        check_same_size(
            np.empty((int(row["height"]), int(row["width"]))), mask, row["image_path"], path
        )
        return mask_classes(mask, path, self.classes, settings.mask_values)

    def with_submission_format(self, submission_format: str) -> Folder:
        if submission_format not in ("rle", "png"):
            raise KsegError(f"--format {submission_format!r}: choose one of rle, png")
        return Folder(self._settings().model_copy(update={"submission": submission_format}))

    def stratify_labels(self, table: pd.DataFrame) -> pd.Series:
        # Which classes an image holds ("00" empty, "10" the first class only...).
        return table["labels"].astype(str) if "labels" in table else table["empty"].astype(str)

    # ---- submission -----------------------------------------------------------------------

    def test_set(
        self,
        data_dir: Path,
        test_dir: Path | None,
        *,
        scratch: ExitStack,
        skipped: list[Skipped] | None,
        fallback_volumes: int = 2,
    ) -> TestSet:
        """`test_dir`, else DIR/test/ (or DIR itself when it is a folder of test images, not
        the training layout: its images/ beside masks/ are the training set)."""
        data_dir = Path(data_dir)
        folder = Path(test_dir) if test_dir else data_dir / "test"
        if test_dir is None and not folder.is_dir():
            if (data_dir / "masks").is_dir():
                raise InputError(
                    f"{folder}: not found (a folder dataset's test images go in DIR/test/; "
                    "or pass --test-dir)"
                )
            folder = data_dir
        table = self.read_test_table(folder, skipped)
        if table.empty and not skipped:
            raise InputError(f"{folder}: no test images ({', '.join(IMAGE_SUFFIXES)})")
        return TestSet(table)

    def write_submission(
        self,
        stream: Stream,
        test: TestSet,
        settings: Any,
        out: Path,
        skipped: list[Skipped] | None,
    ) -> tuple[int, int]:
        from kaggle_seg.submission import postprocessed_images

        options = self._settings()
        table = test.table
        masks = postprocessed_images(stream, table, settings)
        if options.submission == "png":
            return self._write_pngs(masks, table, Path(out))
        from kaggle_seg.data.rle import encode_rle
        from kaggle_seg.io import write_csv_atomic

        rows = [
            {
                "id": image_id,
                "class": name,
                "rle": encode_rle(mask, self.rle_order) if mask.any() else "",
            }
            for image_id, image_masks in masks
            for name, mask in zip(self.classes, image_masks, strict=True)
        ]
        # Images that could not be read (--on-error skip) are predicted empty.
        predicted = {row["id"] for row in rows}
        rows += [
            {"id": s.id, "class": name, "rle": ""}
            for s in skipped or []
            if s.id not in predicted
            for name in self.classes
        ]
        shapes = _shapes(table)
        shapes.update({s.id: (0, 0) for s in skipped or [] if s.id not in shapes})
        frame = self.validate_submission(
            pd.DataFrame(rows, columns=list(COLUMNS)), shapes, source=str(out)
        )
        write_csv_atomic(frame, Path(out))
        return len(frame), len(shapes)

    def _write_pngs(self, masks: Any, table: pd.DataFrame, out: Path) -> tuple[int, int]:
        """`out/<id>.png` per image: class numbers 1..K (255 for one class), 0 background;
        where classes overlap, the later one wins."""
        import cv2

        from kaggle_seg.io import atomic_path
        from kaggle_seg.safe_paths import check_name, path_inside

        out.mkdir(parents=True, exist_ok=True)
        written = 0
        for image_id, image_masks in masks:
            label = np.zeros(image_masks.shape[1:], dtype=np.uint8)
            for k, mask in enumerate(image_masks, start=1):
                label[mask > 0] = 255 if len(self.classes) == 1 else k
            path = path_inside(out, check_name(f"{image_id}.png", "mask file"))
            encoded, data = cv2.imencode(".png", label)
            if not encoded:
                raise KsegError(f"{path}: cannot encode the mask")
            with atomic_path(path) as tmp:
                tmp.write_bytes(data.tobytes())
            written += 1
        if written != len(table):
            raise KsegError(f"{out}: {written} masks written for {len(table)} test images")
        return written, written

    def validate_submission(
        self,
        submission: pd.DataFrame,
        shapes: Mapping[str, tuple[int, int]],
        *,
        source: str = "submission",
    ) -> pd.DataFrame:
        """`id,class,rle`: one row per (image, class), valid RLEs in the configured order."""
        from kaggle_seg.submission import (
            check_columns,
            check_one_row_per_key,
            check_rles,
            csv_line,
        )

        check_columns(submission, COLUMNS, source)
        frame = submission.loc[:, list(COLUMNS)].fillna("").astype(str).reset_index(drop=True)
        for position, (image_id, name) in enumerate(zip(frame["id"], frame["class"], strict=True)):
            if image_id not in shapes or name not in self.classes:
                what = f"id {image_id!r}" if image_id not in shapes else f"class {name!r}"
                raise InputError(f"{source}: line {csv_line(position)}: unknown {what}")
        check_one_row_per_key(frame, ("id", "class"), source)
        if len(frame) != len(shapes) * len(self.classes):
            raise InputError(
                f"{source}: {len(frame)} rows for {len(shapes)} image(s) x "
                f"{len(self.classes)} class(es)"
            )
        check_rles(frame, "id", "rle", shapes, source)
        return frame

    # ---- scoring --------------------------------------------------------------------------

    def score_submission(
        self, truth: Path, submission: Path, images_dir: Path | None, **modes: Any
    ) -> dict[str, Any]:
        """Dice and IoU per image (classes pooled, both empty: 1) and per class, averaged.

        `truth`: the dataset's masks/ folder (or a folder holding one), or an `id,class,rle`
        CSV with `images_dir` for the sizes; `submission`: a CSV of this format or a folder of
        mask PNGs as `kseg submit` writes them."""
        if any(modes.values()):
            raise KsegError("--merged-classes, --dice and --hausdorff apply to uwmgi only")
        truths = self._truth_masks(Path(truth), images_dir)
        shapes = {image_id: masks.shape[:2] for image_id, masks in truths.items()}
        predicted = self._submitted_masks(Path(submission), shapes)
        from kaggle_seg.metrics import pixel_metrics_table

        ids = list(truths)
        table = pixel_metrics_table(
            ids, [truths[i] for i in ids], [predicted[i] for i in ids], self.classes
        )
        means = table.drop(columns="id").mean()
        score = float(means["dice"]) if len(table) else float("nan")
        grouped: dict[str, Any] = {}
        if self.scoring == "groups" and len(table):  # each group's pixels pooled, as the CV
            per_group = self._group_dice(ids, truths, predicted)
            score = float(per_group["dice"].mean())
            grouped = {"group_dice": score, "n_groups": len(per_group), "per_group": per_group}
        return {
            "score": score,
            "dice": float(means["dice"]) if len(table) else float("nan"),
            "iou": float(means["iou"]) if len(table) else float("nan"),
            "per_class": {
                name: {"dice": float(means[f"dice_{name}"]), "iou": float(means[f"iou_{name}"])}
                for name in self.classes
            },
            "n_images": len(table),
            **grouped,
            "per_image": table,
        }

    def _group_dice(
        self, ids: list[str], truths: Mapping[str, np.ndarray], predicted: Mapping[str, Any]
    ) -> pd.DataFrame:
        """The Dice of each group (group_pattern), its images' pixels pooled."""
        from kaggle_seg.metrics import pixel_counts, volume_dice

        settings = self._settings()
        rows = [
            {"group": self._group(i, settings), **pixel_counts(truths[i], predicted[i])}
            for i in ids
        ]
        counts = pd.DataFrame(rows)
        dice = volume_dice(counts, "group")
        return pd.DataFrame({"group": dice.index, "dice": dice.to_numpy()})

    def _truth_masks(self, truth: Path, images_dir: Path | None) -> dict[str, np.ndarray]:
        if truth.is_dir():
            folder = truth / "masks" if (truth / "masks").is_dir() else truth
            masks = {}
            for name, path in image_files(folder).items():
                height, width = _size(path)
                row = {
                    "mask_path": str(path),
                    "image_path": str(path),
                    "height": height,
                    "width": width,
                }
                masks[name] = self.read_mask(row)
            if not masks:
                raise InputError(f"{folder}: no mask files")
            return masks
        if images_dir is None:
            raise KsegError(f"{truth}: an RLE CSV truth needs --images DIR for the sizes")
        from kaggle_seg.io import read_csv_checked

        files = image_files(Path(images_dir))
        ids = list(dict.fromkeys(read_csv_checked(truth, list(COLUMNS))["id"]))
        unsized = [i for i in ids if i not in files]
        if unsized:
            raise InputError(
                f"{truth}: {len(unsized)} id(s) without an image in {images_dir}, "
                f"first {unsized[0]}"
            )
        return self._csv_masks(truth, {i: _size(files[i]) for i in ids})

    def _submitted_masks(
        self, submission: Path, shapes: Mapping[str, tuple[int, int]]
    ) -> dict[str, np.ndarray]:
        if not submission.is_dir():
            return self._csv_masks(submission, shapes)
        files = image_files(submission)
        missing = [i for i in shapes if i not in files]
        if missing:
            raise InputError(
                f"{submission}: no mask PNG for {len(missing)} image(s), first {missing[0]}"
            )
        found = {}
        for image_id, shape in shapes.items():
            label = _read(files[image_id])
            if label.shape[:2] != tuple(shape):
                raise InputError(
                    f"{files[image_id]}: mask is {label.shape[1]}x{label.shape[0]}, "
                    f"the image {shape[1]}x{shape[0]} (W x H)"
                )
            # Read as the truth is: 0 / 255 (as `_write_pngs` writes one class) or 0 / 1 for
            # one class, class numbers 1..K for several.
            found[image_id] = mask_classes(label, files[image_id], self.classes, None)
        return found

    def _csv_masks(self, path: Path, shapes: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
        from kaggle_seg.data.rle import decode_rle
        from kaggle_seg.io import read_csv_checked

        frame = read_csv_checked(path, list(COLUMNS))
        frame = self.validate_submission(frame, shapes, source=str(path))
        masks = {i: np.zeros((*shape, len(self.classes)), np.uint8) for i, shape in shapes.items()}
        for image_id, name, rle in zip(frame["id"], frame["class"], frame["rle"], strict=True):
            if rle:
                k = self.classes.index(name)
                masks[image_id][..., k] = decode_rle(rle, shapes[image_id], self.rle_order)
        return masks


def _shapes(table: pd.DataFrame) -> dict[str, tuple[int, int]]:
    return dict(zip(table["id"], zip(table["height"], table["width"], strict=True), strict=True))
