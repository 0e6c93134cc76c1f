"""LGG brain MRI (Buda et al., Kaggle dataset `kaggle_3m`): 3-channel TIFF slices + masks.

Layout: `kaggle_3m/<patient folder>/<folder>_<n>.tif` and `<folder>_<n>_mask.tif`, where the
folder is e.g. `TCGA_CS_4942_19970222` (institution, patient, date) and n is the slice number,
not zero-padded: slices sort numerically.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kaggle_seg.competitions.base import BaseCompetition, Skipped, Stream, TestSet
from kaggle_seg.competitions.images import check_same_size, read_tiff, skip_or_raise, tiff_size
from kaggle_seg.competitions.lgg_masks import (
    patient_of,
    read_mask_tiff,
    score_mask_folder,
    write_mask_folder,
)
from kaggle_seg.config import DataConfig
from kaggle_seg.errors import InputError, KsegError

CLASSES = ("abnormality",)
_SLICE = re.compile(r"^(?P<folder>.+)_(?P<index>\d+)\.tif$")


class LGG(BaseCompetition):
    name = "lgg"
    classes = CLASSES
    channels = 3  # image channels before 2.5D stacking
    rle_order = None
    kaggle_slug = None  # the competition on kaggle.com
    code_competition = False  # True: submitted by a kernel, not a CSV upload
    # The mean per-patient volume Dice (Buda et al.): the per-image mean counts each empty slice
    # predicted empty as a perfect 1, so a model that predicts nothing would look good.
    scoring = "groups"
    table_columns = ("patient", "series", "slice_index", "mask_path")
    # No Kaggle format: `kseg submit` writes a folder of masks laid out as the dataset's own
    # (<series>/<id>_mask.tif), which `kseg score -c lgg` scores per patient (lgg_masks.py).
    submission_columns = ()
    submission_suffix = ""

    def read_table(self, data_dir: Path, config: DataConfig) -> pd.DataFrame:
        data_dir = Path(data_dir)
        root = data_dir / "kaggle_3m" if (data_dir / "kaggle_3m").is_dir() else data_dir
        folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("TCGA_"))
        if not folders:
            raise InputError(f"{root}: no TCGA_* patient folders (expected kaggle_3m/)")
        from kaggle_seg.progress import progress

        rows = []
        for folder in progress(folders, description="prepare", unit="patients"):
            patient = patient_of(folder.name)
            n_rows = len(rows)
            for path in folder.glob("*.tif"):
                match = _SLICE.match(path.name)
                if match is None or path.stem.endswith("_mask"):
                    continue
                mask_path = path.with_name(f"{path.stem}_mask.tif")
                if not mask_path.is_file():
                    raise InputError(f"{path}: no mask file {mask_path.name} beside it")
                height, width = tiff_size(path)
                mask = read_mask_tiff(mask_path)
                check_same_size(np.empty((height, width)), mask, path, mask_path)
                rows.append(
                    {
                        "id": path.stem,
                        "group": patient,
                        "patient": patient,
                        "series": folder.name,
                        "slice_index": int(match["index"]),
                        "image_path": str(path.resolve()),
                        "mask_path": str(mask_path.resolve()),
                        "height": height,
                        "width": width,
                        "empty": not bool((mask > 0).any()),
                    }
                )
            if len(rows) == n_rows:
                raise InputError(f"{folder}: no slices ({folder.name}_<n>.tif + _mask.tif)")
        table = pd.DataFrame(rows)
        return table.sort_values(["series", "slice_index"]).reset_index(drop=True)

    def read_test_table(self, test_dir: Path, skipped: list[Skipped] | None = None) -> pd.DataFrame:
        """Every `*.tif` slice that is not a `_mask.tif`, in patient folders or directly in
        `test_dir`; sorted by series then slice number. See `Competition.read_test_table` for
        `skipped`."""
        test_dir = Path(test_dir)
        if not test_dir.is_dir():
            raise InputError(f"{test_dir}: test folder not found")
        rows = []
        for path in sorted([*test_dir.glob("*.tif"), *test_dir.glob("*/*.tif")]):
            match = _SLICE.match(path.name)
            if match is None or path.stem.endswith("_mask"):
                continue
            try:
                height, width = tiff_size(path)
            except InputError as exc:
                skip_or_raise(exc, path.stem, path, skipped)
                continue
            rows.append(
                {
                    "id": path.stem,
                    "group": patient_of(path.parent.name),
                    "series": path.parent.name,
                    "slice_index": int(match["index"]),
                    "image_path": str(path.resolve()),
                    "height": int(height),
                    "width": int(width),
                }
            )
        columns = ["id", "group", "series", "slice_index", "image_path", "height", "width"]
        table = pd.DataFrame(rows, columns=columns)
        return table.sort_values(["series", "slice_index"]).reset_index(drop=True)

    def test_set(
        self,
        data_dir: Path,
        test_dir: Path | None,
        *,
        scratch: ExitStack,
        skipped: list[Skipped] | None,
        fallback_volumes: int = 2,
    ) -> TestSet:
        """`test_dir`, else the patient folders of `data_dir` (kaggle_3m/ or the folder
        itself): LGG has no test split, so new patients come in the dataset's own layout."""
        data_dir = Path(data_dir)
        if test_dir is not None:
            folder = Path(test_dir)
        else:
            nested = data_dir / "kaggle_3m"
            folder = nested if nested.is_dir() else data_dir
        table = self.read_test_table(folder, skipped)
        if table.empty and not skipped:
            raise InputError(f"{folder}: no LGG slices (TCGA_*/<series>_<n>.tif)")
        patients = table["group"].nunique()
        return TestSet(table, [f"{len(table)} slices of {patients} patient(s) in {folder}"])

    def write_submission(
        self,
        stream: Stream,
        test: TestSet,
        settings: Any,
        out: Path,
        skipped: list[Skipped] | None,
    ) -> tuple[int, int]:
        from kaggle_seg.submission import postprocessed_images

        masks = postprocessed_images(stream, test.table, settings)
        written = write_mask_folder(masks, test.table, Path(out))
        return written, written

    def score_submission(
        self, truth: Path, submission: Path, images_dir: Path | None, **modes: Any
    ) -> dict[str, Any]:
        """`truth`: the dataset folder (its masks); `submission`: the folder `kseg submit`
        wrote. The mean per-patient volume Dice, as the CV, with the per-image table."""
        if any(modes.values()):
            raise KsegError("--merged-classes, --dice and --hausdorff apply to uwmgi only")
        return score_mask_folder(Path(truth), Path(submission))

    def read_image(self, row: Any) -> np.ndarray:
        """float32 [H, W, 3] in [0, 1]: pre-contrast, FLAIR, post-contrast."""
        image = read_tiff(row["image_path"])
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        return image.astype(np.float32) / 255.0

    def read_mask(self, row: Any) -> np.ndarray:
        mask = read_mask_tiff(row["mask_path"])
        check_same_size(
            np.empty((int(row["height"]), int(row["width"]))),
            mask,
            row["image_path"],
            row["mask_path"],
        )
        return (mask > 0).astype(np.uint8)[..., None]

    def stratify_labels(self, table: pd.DataFrame) -> pd.Series:
        return table["empty"].map({True: "empty", False: "lesion"})
