"""uwmgi metric modes: Dice and Hausdorff each per class (the competition) or on the union of
the organs; per-class Dice with merged Hausdorff reproduces MLE-bench's combination, checked
against an independent computation of its formula on the phantom scans."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import directed_hausdorff
from test_metrics import SQRT3, UWMGI_CLASSES, hand_case

from kaggle_seg.data.rle import decode_rle, encode_rle
from kaggle_seg.errors import InputError
from kaggle_seg.metrics import uwmgi_score_volumes


def test_hand_case_per_class_dice_with_merged_hausdorff():
    truth, prediction = hand_case()
    volumes = [("case1_day1", truth, prediction)]
    mixed = uwmgi_score_volumes(volumes, UWMGI_CLASSES, dice="per-class", hausdorff="merged")
    # Dice as the competition takes it (test_uwmgi_score_volumes_hand_case), Hausdorff on the
    # union volume (test_uwmgi_score_volumes_merged_classes).
    dice, hausdorff = (2 / 3 + 0 + 0) / 3, math.sqrt(0.5) / SQRT3
    assert mixed["dice"] == pytest.approx(dice)
    assert mixed["hausdorff"] == pytest.approx(hausdorff)
    assert mixed["score"] == pytest.approx(0.4 * dice + 0.6 * (1 - hausdorff))
    assert mixed["modes"] == {"dice": "per-class", "hausdorff": "merged"}
    assert mixed["per_class"]["merged"] == {"hausdorff": pytest.approx(hausdorff)}
    assert mixed["per_class"]["large_bowel"] == {"dice": pytest.approx(1 / 3)}

    other = uwmgi_score_volumes(volumes, UWMGI_CLASSES, dice="merged", hausdorff="per-class")
    assert other["dice"] == pytest.approx(1 / 3)
    assert other["hausdorff"] == pytest.approx((0.5 / SQRT3 + 1.0) / 2)
    both = uwmgi_score_volumes(volumes, UWMGI_CLASSES, dice="merged", hausdorff="merged")
    assert (
        both["score"] == uwmgi_score_volumes(volumes, UWMGI_CLASSES, merged_classes=True)["score"]
    )
    plain = uwmgi_score_volumes(volumes, UWMGI_CLASSES, dice="per-class", hausdorff="per-class")
    assert plain["score"] == uwmgi_score_volumes(volumes, UWMGI_CLASSES)["score"]


def test_conflicting_or_unknown_modes_are_refused():
    truth, prediction = hand_case()
    volumes = [("c", truth, prediction)]
    with pytest.raises(InputError, match="--merged-classes means"):
        uwmgi_score_volumes(volumes, UWMGI_CLASSES, merged_classes=True, dice="per-class")
    with pytest.raises(InputError, match="--hausdorff 'union': choose per-class or merged"):
        uwmgi_score_volumes(volumes, UWMGI_CLASSES, hausdorff="union")


def mle_bench_style_score(truth: pd.DataFrame, submission: pd.DataFrame, shapes: dict) -> float:
    """MLE-bench's uwmgi formula, written out independently of kseg's metric code: Dice per
    (id, class) row, NaN rows skipped; Hausdorff per case-day on the union of the classes,
    coordinates divided by the volume shape, over sqrt(3). Its two departures from the
    competition are left out: RLEs decode row-major here, and no `> 10x` shortcut."""
    merged = truth.merge(submission, on=["id", "class"])
    dice_rows, volumes = [], {}
    for row in merged.itertuples():
        shape = shapes[row.id]
        t, p = decode_rle(row.segmentation, shape, "C"), decode_rle(row.predicted, shape, "C")
        total = int(t.sum() + p.sum())
        dice_rows.append(np.nan if total == 0 else 2 * int((t & p).sum()) / total)
        volumes.setdefault(row.id.split("_slice_")[0], {}).setdefault(row.id, []).append((t, p))
    hausdorffs = []
    for slices in volumes.values():
        t = np.stack([np.logical_or.reduce([a for a, _ in slices[k]]) for k in sorted(slices)])
        p = np.stack([np.logical_or.reduce([b for _, b in slices[k]]) for k in sorted(slices)])
        if not t.any() and not p.any():
            continue
        if not t.any() or not p.any():
            hausdorffs.append(1.0)
            continue
        a, b = np.argwhere(t) / t.shape, np.argwhere(p) / t.shape
        distance = max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])
        hausdorffs.append(distance / np.sqrt(3))
    return 0.4 * float(np.nanmean(dice_rows)) + 0.6 * (1 - float(np.mean(hausdorffs)))


@pytest.fixture(scope="module")
def phantom_submission(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom's truth with every stomach mask shifted 3 px right and one organ dropped in
    the first case-day: per-class and merged Hausdorff differ on it."""
    truth = pd.read_csv(phantom_dir / "train.csv", dtype=str, keep_default_na=False)
    shapes = _shapes(phantom_dir)
    predicted = []
    for slice_id, organ, rle in zip(truth["id"], truth["class"], truth["segmentation"],
                                    strict=True):  # fmt: skip
        mask = decode_rle(rle, shapes[slice_id], "C")
        if organ == "stomach":
            mask = np.roll(mask, 3, axis=1)
        if organ == "small_bowel" and slice_id.startswith("case7_day0"):
            mask[:] = 0
        predicted.append(encode_rle(mask, "C") if mask.any() else "")
    submission = truth[["id", "class"]].assign(predicted=predicted)
    path = tmp_path_factory.mktemp("modes") / "submission.csv"
    submission.to_csv(path, index=False)
    return path


def _shapes(phantom_dir: Path) -> dict:
    from kaggle_seg.competitions.uwmgi_files import scan_slices

    slices = scan_slices(phantom_dir / "train")
    return dict(zip(slices["id"], zip(slices["height"], slices["width"], strict=True),
                    strict=True))  # fmt: skip


def test_mle_bench_combination_matches_its_formula_on_the_phantom(
    phantom_dir: Path, phantom_submission: Path
):
    from kaggle_seg.scoring import score_submission

    truth_csv = phantom_dir / "train.csv"
    images = phantom_dir / "train"
    truth = pd.read_csv(truth_csv, dtype=str, keep_default_na=False)
    submission = pd.read_csv(phantom_submission, dtype=str, keep_default_na=False)
    expected = mle_bench_style_score(truth, submission, _shapes(phantom_dir))
    mixed = score_submission("uwmgi", truth_csv, phantom_submission, images,
                             dice="per-class", hausdorff="merged")  # fmt: skip
    assert mixed["score"] == pytest.approx(expected, abs=1e-9)
    competition = score_submission("uwmgi", truth_csv, phantom_submission, images)
    assert competition["dice"] == pytest.approx(mixed["dice"])
    assert competition["hausdorff"] != pytest.approx(mixed["hausdorff"])  # the modes differ here


@pytest.mark.slow
def test_cli_modes_and_the_shorthand(phantom_dir: Path, phantom_submission: Path):
    def score(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "kaggle_seg", "score", "-c", "uwmgi",
             str(phantom_dir / "train.csv"), str(phantom_submission), "--images",
             str(phantom_dir / "train"), "--json", *options],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    mixed = json.loads(score("--dice", "per-class", "--hausdorff", "merged").stdout)
    assert mixed["modes"] == {"dice": "per-class", "hausdorff": "merged"}
    shorthand = json.loads(score("--merged-classes").stdout)
    explicit = json.loads(score("--dice", "merged", "--hausdorff", "merged").stdout)
    assert shorthand["score"] == explicit["score"] and list(shorthand["per_class"]) == ["merged"]
    conflict = score("--merged-classes", "--hausdorff", "per-class")
    assert conflict.returncode == 1 and conflict.stderr.count("\n") == 1
    assert "--merged-classes means" in conflict.stderr
