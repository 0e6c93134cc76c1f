"""Competition folders staged the way Kaggle mounts them for a rehearsal, with held-back train
cases (uwmgi) or images (dsb2018) as the test set, and the truth to score the kernel's output."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kaggle_seg.errors import KsegError
from kaggle_seg.kernel.sandbox import link_file, link_tree


@dataclass
class StagedTest:
    """A staged competition folder and how to check the submission its kernel writes."""

    items: int  # test slices / images
    truth_csv: Path | None  # the held-back truth, None for an empty test
    test_images: Path | None
    train_images: Path


def _case_number(case_id: str) -> int:
    return int(re.sub(r"\D", "", case_id) or 0)


def stage_uwmgi(source: Path, dest: Path, holdout: int, scratch: Path) -> StagedTest:
    """uwmgi as Kaggle mounts it: train.csv and train/ without the held-back cases, which make
    test/ and sample_submission.csv (both empty when `holdout` is 0)."""
    import pandas as pd

    from kaggle_seg.competitions.uwmgi import CLASSES, scan_slices
    from kaggle_seg.io import read_csv_checked, write_csv_atomic

    labels = read_csv_checked(source / "train.csv", ["id", "class", "segmentation"])
    slices = scan_slices(source / "train")
    cases = sorted(slices["case_id"].unique(), key=_case_number)
    if holdout >= len(cases):
        raise KsegError(f"{source}: {len(cases)} case(s); cannot hold back {holdout}")
    held = set(cases[len(cases) - holdout :]) if holdout else set()
    for case in cases:
        link_tree(source / "train" / case, dest / ("test" if case in held else "train") / case)
    (dest / "test").mkdir(parents=True, exist_ok=True)
    label_case = labels["id"].str.split("_").str[0]
    write_csv_atomic(labels[~label_case.isin(held)], dest / "train.csv")
    test_ids = slices.loc[slices["case_id"].isin(held), "id"].tolist()
    sample = pd.DataFrame(
        [(i, c, "") for i in test_ids for c in CLASSES], columns=["id", "class", "predicted"]
    )
    write_csv_atomic(sample, dest / "sample_submission.csv")
    truth = None
    if held:
        truth = scratch / "truth.csv"
        write_csv_atomic(labels[label_case.isin(held)], truth)
    return StagedTest(len(test_ids), truth, dest / "test" if held else None, dest / "train")


def stage_dsb2018(source: Path, dest: Path, holdout: int, scratch: Path) -> StagedTest:
    """dsb2018 with `holdout` stage1_train images moved to stage1_test/ (images only)."""
    import pandas as pd

    from kaggle_seg.io import read_csv_checked, write_csv_atomic

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


STAGERS = {"uwmgi": stage_uwmgi, "dsb2018": stage_dsb2018}
