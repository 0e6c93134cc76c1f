"""2018 Data Science Bowl nuclei: RGB(A) PNGs of many sizes, one PNG (or RLE row) per nucleus.

Layouts read (DIR is what `--data-dir` points at):

- Kaggle: `DIR/stage1_train/<id>/images/<id>.png`, `DIR/stage1_train/<id>/masks/*.png`, and
  optionally `DIR/stage1_train_labels.csv` (ImageId,EncodedPixels, column-major RLE), used for
  images whose masks folder is missing.
- Processed (as many notebooks save it): `DIR/images/<name>.jpg|png` + `DIR/masks/<name>.jpg|png`,
  one union mask per image; nuclei are then its connected components.
"""

from __future__ import annotations

from contextlib import ExitStack
from functools import lru_cache
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
from kaggle_seg.competitions.dsb2018_kaggle import RLE_ORDER
from kaggle_seg.competitions.images import (
    check_file_headers,
    check_same_size,
    image_files,
    image_rows,
    image_size,
    read_png,
    rgb_unit,
)
from kaggle_seg.config import DataConfig
from kaggle_seg.errors import InputError
from kaggle_seg.io import read_csv_checked

CLASSES = ("nuclei",)
LABELS_CSV = "stage1_train_labels.csv"


def _rles_by_image(labels_csv: str) -> dict[str, list[tuple[int, str]]]:
    """ImageId -> its (CSV line, RLE) rows, so errors name the line (the header is line 1).
    Cached per version of the file: one rewritten at the same path (a pseudo-label copy) is
    read again."""
    try:
        stat = Path(labels_csv).stat()
    except OSError:
        return _read_rles(labels_csv, 0, 0)  # read_csv_checked names the missing file
    return _read_rles(labels_csv, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _read_rles(labels_csv: str, mtime_ns: int, size: int) -> dict[str, list[tuple[int, str]]]:
    labels = read_csv_checked(labels_csv, ["ImageId", "EncodedPixels"])
    labels = labels.assign(line=np.arange(len(labels)) + 2)
    labels = labels[labels["EncodedPixels"] != ""]
    return {
        image_id: list(zip(rows["line"].tolist(), rows["EncodedPixels"], strict=True))
        for image_id, rows in labels.groupby("ImageId", sort=False)
    }


class DSB2018(BaseCompetition):
    name = "dsb2018"
    classes = CLASSES
    channels = 3  # image channels before 2.5D stacking
    rle_order = RLE_ORDER
    kaggle_slug = "data-science-bowl-2018"  # the competition on kaggle.com
    code_competition = False  # True: submitted by a kernel, not a CSV upload
    scoring = "instances"  # mAP over IoU thresholds of the nuclei, per image
    rgb = True
    instance_masks = True
    pseudo_labels = True  # a submission's RLE rows read back as stage1_train_labels.csv's
    submission_columns = ("ImageId", "EncodedPixels")
    table_columns = ("mask_dir", "labels_csv", "n_nuclei")

    @property
    def kernel(self) -> KernelTarget:  # type: ignore[override]
        from kaggle_seg.competitions.dsb2018_kaggle import KERNEL

        return self.kernel_target(KERNEL)

    @property
    def demo(self) -> DemoRecipe:  # type: ignore[override]
        from kaggle_seg.competitions.dsb2018_kaggle import DEMO

        return DEMO

    def read_table(self, data_dir: Path, config: DataConfig) -> pd.DataFrame:
        data_dir = Path(data_dir)
        if (data_dir / "stage1_train").is_dir():
            return self._read_kaggle_layout(data_dir / "stage1_train", data_dir / LABELS_CSV)
        if (data_dir / "images").is_dir() and (data_dir / "masks").is_dir():
            return self._read_processed_layout(data_dir)
        raise InputError(
            f"{data_dir}: expected stage1_train/ (Kaggle layout) or images/ + masks/ (processed)"
        )

    def _read_kaggle_layout(self, train_dir: Path, labels_csv: Path) -> pd.DataFrame:
        rles = _rles_by_image(str(labels_csv)) if labels_csv.is_file() else {}
        from kaggle_seg.progress import progress

        folders = sorted(p for p in train_dir.iterdir() if p.is_dir())
        rows = []
        for folder in progress(folders, description="prepare"):
            image_id = folder.name
            image_path = folder / "images" / f"{image_id}.png"
            height, width = image_size(image_path)
            mask_dir = folder / "masks"
            if mask_dir.is_dir():
                n_nuclei = sum(1 for p in mask_dir.iterdir() if p.suffix == ".png")
                source = {"mask_dir": str(mask_dir.resolve()), "labels_csv": ""}
            elif image_id in rles:
                n_nuclei = len(rles[image_id])
                source = {"mask_dir": "", "labels_csv": str(labels_csv.resolve())}
            else:
                raise InputError(f"{folder}: no masks/ folder and no rows in {labels_csv}")
            rows.append(
                {
                    "id": image_id,
                    "group": image_id,
                    "image_path": str(image_path.resolve()),
                    "height": height,
                    "width": width,
                    **source,
                    "mask_path": "",
                    "n_nuclei": n_nuclei,
                    "empty": n_nuclei == 0,
                }
            )
        if not rows:
            raise InputError(f"{train_dir}: no image folders")
        return pd.DataFrame(rows)

    def _read_processed_layout(self, data_dir: Path) -> pd.DataFrame:
        images = image_files(data_dir / "images")
        masks = image_files(data_dir / "masks")
        missing = sorted(set(images) - set(masks))
        if missing:
            raise InputError(
                f"{data_dir / 'images' / missing[0]}.*: no mask in {data_dir / 'masks'}"
            )
        rows = []
        for name, image_path in images.items():
            height, width = image_size(image_path)
            union = read_png(masks[name])
            check_same_size(np.empty((height, width)), union, image_path, masks[name])
            rows.append(
                {
                    "id": name,
                    "group": name,
                    "image_path": str(image_path.resolve()),
                    "height": height,
                    "width": width,
                    "mask_dir": "",
                    "labels_csv": "",
                    "mask_path": str(masks[name].resolve()),
                    "n_nuclei": int(self._components(union).max()),
                    "empty": not bool((union > 127).any()),
                }
            )
        if not rows:
            raise InputError(f"{data_dir / 'images'}: no images")
        return pd.DataFrame(rows)

    @staticmethod
    def _components(union: np.ndarray) -> np.ndarray:
        from skimage.measure import label

        if union.ndim == 3:
            union = union[..., 0]
        return label(union > 127, connectivity=1).astype(np.int32)

    def read_test_table(self, test_dir: Path, skipped: list[Skipped] | None = None) -> pd.DataFrame:
        """`stage1_test/<id>/images/<id>.png` folders (Kaggle layout), or image files directly in
        `test_dir`; sorted by id. See `Competition.read_test_table` for `skipped`."""
        test_dir = Path(test_dir)
        if not test_dir.is_dir():
            raise InputError(f"{test_dir}: test folder not found")
        paths = {
            folder.name: folder / "images" / f"{folder.name}.png"
            for folder in test_dir.iterdir()
            if (folder / "images" / f"{folder.name}.png").is_file()
        }
        paths.update(
            (name, path) for name, path in image_files(test_dir).items() if name not in paths
        )
        return image_rows(paths, image_size, skipped)

    def pseudo_label_rows(self, test: pd.DataFrame, labels: Path) -> pd.DataFrame:
        """The test rows read as stage1_train_labels.csv rows are: a submission's
        (ImageId, EncodedPixels) rows are one nucleus each, an empty one an image without."""
        rles = _rles_by_image(str(Path(labels).resolve()))
        n_nuclei = [len(rles.get(image_id, [])) for image_id in test["id"]]
        return test.assign(
            mask_dir="",
            labels_csv=str(Path(labels).resolve()),
            mask_path="",
            n_nuclei=n_nuclei,
            empty=[n == 0 for n in n_nuclei],
        )

    def read_image(self, row: Any) -> np.ndarray:
        """float32 [H, W, 3] RGB in [0, 1]; alpha dropped, grayscale repeated."""
        return rgb_unit(read_png(row["image_path"]))

    def read_instances(self, row: Any) -> np.ndarray:
        """int32 [H, W] label map: 0 background, nucleus k = k (masks in file-name order)."""
        shape = (int(row["height"]), int(row["width"]))
        if row.get("mask_dir"):
            labels = np.zeros(shape, dtype=np.int32)
            files = sorted(Path(row["mask_dir"]).glob("*.png"))
            for k, path in enumerate(files, start=1):
                nucleus = read_png(path)
                nucleus = nucleus[..., 0] if nucleus.ndim == 3 else nucleus
                check_same_size(labels, nucleus, row["image_path"], path)
                labels[nucleus > 127] = k
            return labels
        if row.get("labels_csv"):
            from kaggle_seg.data.rle import decode_rles_to_labels

            rows = _rles_by_image(row["labels_csv"]).get(row["id"], [])
            tags = [f"{row['labels_csv']} line {line} (ImageId {row['id']})" for line, _ in rows]
            return decode_rles_to_labels([rle for _, rle in rows], shape, RLE_ORDER, labels=tags)
        union = read_png(row["mask_path"])
        check_same_size(np.empty(shape), union, row["image_path"], row["mask_path"])
        return self._components(union)

    def read_mask(self, row: Any) -> np.ndarray:
        """uint8 0/1 [H, W, 1]: the union of the nuclei."""
        return (self.read_instances(row) > 0).astype(np.uint8)[..., None]

    def stratify_labels(self, table: pd.DataFrame) -> pd.Series:
        # Image size stands in for the imaging modality (fluorescence, histology, brightfield).
        return table["width"].astype(str) + "x" + table["height"].astype(str)

    def check_headers(self, row: Any) -> None:
        check_file_headers(row)
        if row.get("labels_csv"):
            from kaggle_seg.data.rle import validate_rle

            size = (int(row["height"]), int(row["width"]))
            for line, rle in _rles_by_image(row["labels_csv"]).get(row["id"], []):
                try:
                    validate_rle(rle, size)
                except ValueError as exc:
                    raise InputError(
                        f"{row['labels_csv']}: line {line} (ImageId {row['id']}): {exc}"
                    ) from None

    def test_set(
        self,
        data_dir: Path,
        test_dir: Path | None,
        *,
        scratch: ExitStack,
        skipped: list[Skipped] | None,
        fallback_volumes: int = 2,
    ) -> TestSet:
        from kaggle_seg.competitions.dsb2018_kaggle import test_set

        return test_set(self, data_dir, test_dir, scratch=scratch, skipped=skipped)

    def write_submission(
        self,
        stream: Stream,
        test: TestSet,
        settings: Any,
        out: Path,
        skipped: list[Skipped] | None,
    ) -> tuple[int, int]:
        from kaggle_seg.competitions.dsb2018_kaggle import write_submission

        return write_submission(stream, test, settings, out, skipped)

    def score_submission(
        self, truth: Path, submission: Path, images_dir: Path | None, **modes: Any
    ) -> dict[str, Any]:
        from kaggle_seg.competitions.dsb2018_kaggle import score_submission

        return score_submission(truth, submission, images_dir, **modes)

    def stage_test(self, source: Path, dest: Path, holdout: int, scratch: Path) -> StagedTest:
        from kaggle_seg.competitions.dsb2018_kaggle import stage_test

        return stage_test(source, dest, holdout, scratch)
