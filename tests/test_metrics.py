"""Metric values computed by hand, exactness against brute force, and real DSB 2018 rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.spatial.distance import cdist

from kaggle_seg.competitions.dsb2018_kaggle import dsb_score_frames
from kaggle_seg.competitions.uwmgi_files import CLASSES as UWMGI_CLASSES
from kaggle_seg.competitions.uwmgi_kaggle import uwmgi_score_frames
from kaggle_seg.data.rle import decode_rles_to_labels, encode_rle
from kaggle_seg.errors import InputError
from kaggle_seg.metrics import (
    DSB_IOU_THRESHOLDS,
    dsb_image_precisions,
    dsb_image_score,
    dsb_thresholds,
    gi_dice_per_slice,
    hausdorff_3d,
    pixel_metrics,
    pixel_metrics_table,
    uwmgi_score_volumes,
)

SQRT3 = math.sqrt(3.0)


@pytest.fixture(scope="module")
def dsb_solution(shared_data: Path) -> pd.DataFrame:
    # shared_data (conftest): ../shared/data beside the checkout or $KSEG_SHARED_DATA, else skip.
    path = shared_data / "dsb2018" / "stage1_solution.csv"
    if not path.is_file():
        pytest.skip(f"real DSB 2018 data not found at {path} (set KSEG_SHARED_DATA)")
    return pd.read_csv(path)


def dsb_shapes(solution: pd.DataFrame) -> dict[str, tuple[int, int]]:
    first = solution.drop_duplicates("ImageId")
    return {
        image_id: (int(h), int(w))
        for image_id, h, w in zip(first.ImageId, first.Height, first.Width, strict=True)
    }


def brute_force_hausdorff(truth: np.ndarray, prediction: np.ndarray) -> float:
    """All-pairs definition: the reference the fast path must equal."""
    scale = 1.0 / np.asarray(truth.shape, dtype=np.float64)
    a, b = np.argwhere(truth) * scale, np.argwhere(prediction) * scale
    if len(a) == 0 and len(b) == 0:
        return math.nan
    if len(a) == 0 or len(b) == 0:
        return 1.0
    distances = cdist(a, b)
    return max(distances.min(axis=1).max(), distances.min(axis=0).max()) / SQRT3


def volume(shape: tuple[int, ...], voxels: list[tuple[int, ...]]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for voxel in voxels:
        out[voxel] = True
    return out


# ----------------------------------------------------------------------------- pixel metrics


def test_pixel_metrics_hand_values() -> None:
    truth = np.array([[1, 1, 0], [0, 0, 0]], dtype=np.uint8)
    prediction = np.array([[1, 0, 1], [0, 0, 0]], dtype=bool)
    # tp = 1, fp = 1, fn = 1, tn = 3
    metrics = pixel_metrics(truth, prediction)
    assert metrics == pytest.approx(
        {"dice": 2 / 4, "iou": 1 / 3, "precision": 1 / 2, "recall": 1 / 2, "accuracy": 4 / 6}
    )


def test_pixel_metrics_zero_denominators() -> None:
    empty = np.zeros((3, 3), dtype=bool)
    one = empty.copy()
    one[1, 1] = True
    assert pixel_metrics(empty, empty) == dict.fromkeys(
        ("dice", "iou", "precision", "recall", "accuracy"), 1.0
    )
    # Predicted on an empty truth: recall has nothing to find but a false positive -> 0.
    assert pixel_metrics(empty, one) == {
        "dice": 0.0,
        "iou": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "accuracy": 8 / 9,
    }
    # Nothing predicted on a non-empty truth: precision has no prediction but a miss -> 0.
    assert pixel_metrics(one, empty)["precision"] == 0.0
    assert pixel_metrics(one, one)["precision"] == 1.0


def test_pixel_metrics_shape_mismatch() -> None:
    with pytest.raises(InputError, match="shape"):
        pixel_metrics(np.zeros((2, 2)), np.zeros((2, 3)))


def test_pixel_metrics_table_with_classes() -> None:
    truth_a = np.zeros((2, 2, 2), dtype=bool)
    prediction_a = np.zeros((2, 2, 2), dtype=bool)
    truth_a[0, :, 0] = True  # class x: 2 px, both predicted
    prediction_a[0, :, 0] = True
    truth_a[1, 0, 1] = True  # class y: 1 px missed, 1 px false positive
    prediction_a[1, 1, 1] = True
    # pooled over both channels: tp = 2, fp = 1, fn = 1, tn = 4
    truth_b = np.zeros((3, 1, 2), dtype=np.uint8)  # another size, all empty
    table = pixel_metrics_table(
        ["a", "b"], [truth_a, truth_b], [prediction_a, truth_b], classes=["x", "y"]
    )
    assert list(table.columns) == [
        "id",
        "dice",
        "iou",
        "precision",
        "recall",
        "accuracy",
        "dice_x",
        "iou_x",
        "dice_y",
        "iou_y",
    ]
    row = table.iloc[0]
    assert row["dice"] == pytest.approx(4 / 6)
    assert row["iou"] == pytest.approx(2 / 4)
    assert row["accuracy"] == pytest.approx(6 / 8)
    assert (row["dice_x"], row["iou_x"], row["dice_y"], row["iou_y"]) == (1.0, 1.0, 0.0, 0.0)
    assert table.iloc[1].drop("id").tolist() == [1.0] * 9
    means = table.mean(numeric_only=True)
    assert means["dice"] == pytest.approx((4 / 6 + 1) / 2)


def test_pixel_metrics_table_matches_pixel_metrics_without_classes() -> None:
    rng = np.random.default_rng(0)
    truths = rng.random((4, 5, 6)) > 0.5
    predictions = rng.random((4, 5, 6)) > 0.5
    table = pixel_metrics_table(list("abcd"), truths, predictions)
    assert list(table.columns) == ["id", "dice", "iou", "precision", "recall", "accuracy"]
    for i in range(4):
        assert table.iloc[i, 1:].tolist() == pytest.approx(
            list(pixel_metrics(truths[i], predictions[i]).values())
        )


def test_pixel_metrics_table_rejects_bad_input() -> None:
    mask = np.zeros((2, 2, 3), dtype=bool)
    with pytest.raises(InputError, match="one of each"):
        pixel_metrics_table(["a", "b"], [mask], [mask])
    with pytest.raises(InputError, match="classes"):
        pixel_metrics_table(["a"], [mask], [mask], classes=["x", "y"])


# ----------------------------------------------------------------------------- Hausdorff


def test_hausdorff_hand_value() -> None:
    # [D, H, W] = [2, 4, 4]: voxel (z, y, x) sits at (z / 2, y / 4, x / 4).
    truth = volume((2, 4, 4), [(0, 0, 0), (0, 0, 1)])
    prediction = volume((2, 4, 4), [(0, 0, 0), (1, 0, 0)])
    # truth -> prediction: (0,0,1) is 1/4 from (0,0,0); prediction -> truth: (1,0,0) is 1/2 from
    # (0,0,0). Hausdorff = 1/2, normalised by sqrt(3).
    assert hausdorff_3d(truth, prediction) == pytest.approx(0.5 / SQRT3)
    # (0,0,0) vs (1,3,3): sqrt((1/2)^2 + (3/4)^2 + (3/4)^2) = sqrt(1.375)
    far = volume((2, 4, 4), [(1, 3, 3)])
    assert hausdorff_3d(volume((2, 4, 4), [(0, 0, 0)]), far) == pytest.approx(
        math.sqrt(1.375) / SQRT3
    )


def test_hausdorff_empty_rules_and_identity() -> None:
    empty = np.zeros((3, 4, 5), dtype=bool)
    some = volume((3, 4, 5), [(1, 2, 3)])
    assert math.isnan(hausdorff_3d(empty, empty))
    assert hausdorff_3d(some, empty) == 1.0
    assert hausdorff_3d(empty, some) == 1.0
    assert hausdorff_3d(some, some) == 0.0
    with pytest.raises(InputError):
        hausdorff_3d(empty, empty[:2])
    with pytest.raises(InputError):
        hausdorff_3d(empty[0], empty[0])


def test_hausdorff_identical_large_volume_is_zero() -> None:
    # ~280k voxels: all-pairs or directed_hausdorff on raw points would take minutes here.
    z, y, x = np.ogrid[:96, :160, :160]
    ball = (z - 48) ** 2 / 40**2 + (y - 80) ** 2 / 70**2 + (x - 80) ** 2 / 70**2 <= 1
    assert hausdorff_3d(ball, ball.copy()) == 0.0
    shifted = np.roll(ball, 2, axis=2)
    # A shift by 2 columns moves every surface point 2 / W along x, nothing more.
    assert hausdorff_3d(ball, shifted) == pytest.approx(2 / 160 / SQRT3)


def random_volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    kind = rng.integers(4)
    if kind == 0:  # sparse specks
        return rng.random(shape) < rng.uniform(0.02, 0.2)
    if kind == 1:  # dense, with interior voxels for the surface pruning to skip
        return rng.random(shape) < rng.uniform(0.6, 0.95)
    # boxes: solid blobs
    out = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        lo = [rng.integers(n) for n in shape]
        hi = [lo_ + rng.integers(1, n - lo_ + 1) for lo_, n in zip(lo, shape, strict=True)]
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return out


def test_hausdorff_matches_brute_force_on_random_volumes() -> None:
    rng = np.random.default_rng(20240601)
    for _ in range(400):
        # anisotropic shapes, including flat ones (one slice, one row)
        shape = (int(rng.integers(1, 8)), int(rng.integers(1, 12)), int(rng.integers(1, 12)))
        truth = random_volume(rng, shape)
        prediction = random_volume(rng, shape) if rng.random() < 0.8 else truth.copy()
        expected = brute_force_hausdorff(truth, prediction)
        got = hausdorff_3d(truth, prediction)
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), (shape, truth, prediction)


def test_hausdorff_exact_with_far_point_and_thick_blob() -> None:
    # A far outside point next to a thick blob: the nearest blob voxel must be on the surface.
    rng = np.random.default_rng(7)
    for _ in range(30):
        shape = (int(rng.integers(5, 12)), int(rng.integers(8, 30)), int(rng.integers(8, 30)))
        z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
        center = [rng.uniform(0, n) for n in shape]
        radii = [rng.uniform(2, n) for n in shape]
        blob = (
            sum((g - c) ** 2 / r**2 for g, c, r in zip((z, y, x), center, radii, strict=True)) <= 1
        )
        if not blob.any():
            continue
        other = np.zeros(shape, dtype=bool)
        other[tuple(int(rng.integers(n)) for n in shape)] = True
        other |= np.roll(blob, int(rng.integers(-3, 4)), axis=int(rng.integers(3)))
        assert hausdorff_3d(blob, other) == pytest.approx(
            brute_force_hausdorff(blob, other), rel=1e-12
        )


@settings(max_examples=150, deadline=None)
@given(
    st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 7)).flatmap(
        lambda shape: st.tuples(arrays(np.bool_, shape), arrays(np.bool_, shape))
    )
)
def test_hausdorff_matches_brute_force_property(pair: tuple[np.ndarray, np.ndarray]) -> None:
    truth, prediction = pair
    expected = brute_force_hausdorff(truth, prediction)
    got = hausdorff_3d(truth, prediction)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- UW-Madison GI


def test_gi_dice_per_slice() -> None:
    truth = volume((3, 2, 2), [(0, 0, 0), (0, 0, 1), (1, 1, 1)])
    prediction = volume((3, 2, 2), [(0, 0, 0)])
    # slice 0: 2 * 1 / (2 + 1); slice 1: missed -> 0; slice 2: both empty -> NaN (skipped)
    dice = gi_dice_per_slice(truth, prediction)
    assert dice[:2] == pytest.approx([2 / 3, 0.0])
    assert math.isnan(dice[2])


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    """[D, H, W, C] = [2, 4, 4, 3] truth and prediction; values worked out in the tests."""
    truth = np.zeros((2, 4, 4, 3), dtype=bool)
    prediction = np.zeros((2, 4, 4, 3), dtype=bool)
    # large_bowel: as in test_hausdorff_hand_value
    truth[0, 0, 0, 0] = truth[0, 0, 1, 0] = True
    prediction[0, 0, 0, 0] = prediction[1, 0, 0, 0] = True
    # small_bowel: empty in both -> no Dice row, no Hausdorff volume
    # stomach: one truth voxel, nothing predicted
    truth[1, 2, 2, 2] = True
    return truth, prediction


def test_uwmgi_score_volumes_hand_case() -> None:
    truth, prediction = hand_case()
    result = uwmgi_score_volumes([("case1_day1", truth, prediction)], UWMGI_CLASSES)
    # Dice rows: large_bowel slice 0 = 2*1/(2+1) = 2/3, slice 1 = 0 (predicted on empty truth);
    # stomach slice 1 = 0 (missed); every other (slice, class) is empty/empty and skipped.
    dice = (2 / 3 + 0 + 0) / 3
    # Hausdorff volumes: large_bowel 0.5 / sqrt(3) (see test_hausdorff_hand_value);
    # stomach exactly one empty -> 1; small_bowel both empty -> skipped.
    hausdorff = (0.5 / SQRT3 + 1.0) / 2
    assert result["dice"] == pytest.approx(dice)
    assert result["hausdorff"] == pytest.approx(hausdorff)
    assert result["score"] == pytest.approx(0.4 * dice + 0.6 * (1 - hausdorff))
    assert result["per_class"] == {
        "large_bowel": pytest.approx({"dice": 1 / 3, "hausdorff": 0.5 / SQRT3}),
        # nothing to score: perfect by convention
        "small_bowel": {"dice": 1.0, "hausdorff": 0.0},
        "stomach": {"dice": 0.0, "hausdorff": 1.0},
    }
    assert (result["n_slices"], result["n_volumes"]) == (2, 1)
    per_volume = result["per_volume"].set_index("class")
    assert per_volume.loc["small_bowel", "n_dice_slices"] == 0
    assert math.isnan(per_volume.loc["small_bowel", "hausdorff"])


def test_uwmgi_score_volumes_merged_classes() -> None:
    truth, prediction = hand_case()
    result = uwmgi_score_volumes(
        [("case1_day1", truth, prediction)], UWMGI_CLASSES, merged_classes=True
    )
    # Union truth: slice 0 {(0,0),(0,1)}, slice 1 {(2,2)}; union prediction: slice 0 {(0,0)},
    # slice 1 {(0,0)}. Dice: slice 0 = 2/3, slice 1 = 0 -> mean 1/3.
    # Hausdorff, voxel (z, y, x) at (z/2, y/4, x/4): truth (1,2,2) is sqrt(0 + 1/4 + 1/4) from
    # prediction (1,0,0), its nearest; no prediction voxel is farther from the truth (max 1/2).
    hausdorff = math.sqrt(0.5) / SQRT3
    assert result["dice"] == pytest.approx(1 / 3)
    assert result["hausdorff"] == pytest.approx(hausdorff)
    assert result["score"] == pytest.approx(0.4 / 3 + 0.6 * (1 - hausdorff))
    assert list(result["per_class"]) == ["merged"]


def test_uwmgi_score_volumes_pools_rows_over_volumes() -> None:
    truth, prediction = hand_case()
    perfect = truth.copy()
    volumes = [("case1_day1", truth, prediction), ("case2_day1", truth, perfect)]
    result = uwmgi_score_volumes(iter(volumes), UWMGI_CLASSES)
    # Rows are pooled over volumes: case1 gives 2/3, 0, 0; case2 (perfect) gives large_bowel
    # slice 0 and stomach slice 1, 1 each. Hausdorff volumes: case1 0.5/sqrt(3) and 1, case2 0, 0.
    assert result["dice"] == pytest.approx((2 / 3 + 2) / 5)
    assert result["hausdorff"] == pytest.approx((0.5 / SQRT3 + 1 + 0 + 0) / 4)
    assert (result["n_slices"], result["n_volumes"]) == (4, 2)


def test_uwmgi_score_volumes_perfect_and_empty() -> None:
    truth, _ = hand_case()
    assert uwmgi_score_volumes([("c", truth, truth)], UWMGI_CLASSES)["score"] == 1.0
    empty = np.zeros_like(truth)
    assert uwmgi_score_volumes([("c", empty, empty)], UWMGI_CLASSES)["score"] == 1.0
    assert uwmgi_score_volumes([("c", truth, empty)], UWMGI_CLASSES)["score"] == 0.0
    with pytest.raises(InputError, match="case"):
        uwmgi_score_volumes([("case", truth, truth[:1])], UWMGI_CLASSES)
    with pytest.raises(InputError):
        uwmgi_score_volumes([("case", truth, truth)], UWMGI_CLASSES[:2])


def test_uwmgi_score_volumes_agrees_with_the_public_pieces() -> None:
    # The scorer crops each class to a box before Dice and Hausdorff; the public functions see
    # whole volumes. uint8 masks and specks far from the blobs stretch the box.
    rng = np.random.default_rng(5)
    truth = np.zeros((9, 20, 24, 3), dtype=np.uint8)
    truth[2:6, 4:12, 5:15] = 1
    prediction = np.roll(truth, (1, -2, 1), axis=(0, 1, 2)) * (rng.random(truth.shape) < 0.9)
    prediction[8, 19, 0, 1] = 1
    truth[:, :, :, 2] = 0
    result = uwmgi_score_volumes([("c", truth, prediction)], UWMGI_CLASSES)
    dice_rows = []
    for channel, name in enumerate(UWMGI_CLASSES):
        dice = gi_dice_per_slice(truth[..., channel], prediction[..., channel])
        dice_rows.append(dice[~np.isnan(dice)])
        hausdorff = hausdorff_3d(truth[..., channel], prediction[..., channel])
        assert result["per_class"][name]["hausdorff"] == pytest.approx(hausdorff, rel=1e-12)
        assert result["per_class"][name]["dice"] == pytest.approx(dice_rows[-1].mean())
    assert result["dice"] == pytest.approx(np.concatenate(dice_rows).mean())


def volumes_to_frames(
    case_day: str, slice_numbers: list[int], truth: np.ndarray, prediction: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame]:
    truth_rows, submission_rows = [], []
    for z, number in enumerate(slice_numbers):
        slice_id = f"{case_day}_slice_{number:04d}"
        for c, name in enumerate(UWMGI_CLASSES):
            truth_rle = encode_rle(truth[z, :, :, c], "C")
            truth_rows.append((slice_id, name, truth_rle or np.nan))
            submission_rows.append((slice_id, name, encode_rle(prediction[z, :, :, c], "C")))
    return (
        pd.DataFrame(truth_rows, columns=["id", "class", "segmentation"]),
        pd.DataFrame(submission_rows, columns=["id", "class", "predicted"]),
    )


def test_uwmgi_score_frames_matches_volumes_and_orders_slices() -> None:
    rng = np.random.default_rng(3)
    truth = rng.random((3, 5, 6, 3)) < 0.3
    prediction = rng.random((3, 5, 6, 3)) < 0.3
    # Slice numbers need not be consecutive; depth is the number of slices, order is by number.
    truth_frame, submission = volumes_to_frames("case7_day12", [2, 7, 10], truth, prediction)
    other_truth, other_submission = volumes_to_frames("case8_day0", [1, 2], *hand_case())
    truth_frame = pd.concat([truth_frame, other_truth]).sample(frac=1, random_state=0)
    submission = pd.concat([submission, other_submission]).sample(frac=1, random_state=1)
    shapes = dict.fromkeys(truth_frame["id"], (5, 6))
    shapes.update(dict.fromkeys(other_truth["id"], (4, 4)))
    expected = uwmgi_score_volumes(
        [("case7_day12", truth, prediction), ("case8_day0", *hand_case())], UWMGI_CLASSES
    )
    result = uwmgi_score_frames(truth_frame, submission, shapes)
    assert result["score"] == pytest.approx(expected["score"], rel=1e-12)
    for name in UWMGI_CLASSES:
        assert result["per_class"][name] == pytest.approx(expected["per_class"][name])
    # Guard on the test itself: a mixed-up slice order scores differently.
    mixed_up = uwmgi_score_volumes(
        [("case7_day12", truth[[1, 0, 2]], prediction[[1, 0, 2]]), ("case8_day0", *hand_case())],
        UWMGI_CLASSES,
    )
    assert mixed_up["score"] != pytest.approx(expected["score"], rel=1e-9)
    merged = uwmgi_score_frames(truth_frame, submission, shapes, merged_classes=True)
    assert merged["score"] == pytest.approx(
        uwmgi_score_volumes(
            [("case7_day12", truth, prediction), ("case8_day0", *hand_case())],
            UWMGI_CLASSES,
            merged_classes=True,
        )["score"]
    )


def test_uwmgi_score_frames_perfect_missing_and_errors() -> None:
    truth, prediction = hand_case()
    truth_frame, submission = volumes_to_frames("case1_day3", [5, 6], truth, prediction)
    shapes = dict.fromkeys(truth_frame["id"], (4, 4))
    perfect = truth_frame.rename(columns={"segmentation": "predicted"})
    assert uwmgi_score_frames(truth_frame, perfect, shapes)["score"] == 1.0
    # Rows the submission lacks are empty predictions: here all of them.
    nothing = submission.iloc[:0]
    assert uwmgi_score_frames(truth_frame, nothing, shapes)["score"] == 0.0
    with pytest.raises(InputError, match="slice_shapes"):
        uwmgi_score_frames(truth_frame, submission, {})
    with pytest.raises(InputError, match="different shapes"):
        uwmgi_score_frames(truth_frame, submission, {**shapes, "case1_day3_slice_0006": (4, 5)})
    with pytest.raises(InputError, match="unknown class"):
        uwmgi_score_frames(truth_frame.replace("stomach", "liver"), submission, shapes)
    with pytest.raises(InputError, match="not like"):
        uwmgi_score_frames(truth_frame.replace("case1_day3_slice_0005", "x"), submission, shapes)
    with pytest.raises(InputError, match="more than one row"):
        uwmgi_score_frames(truth_frame, pd.concat([submission, submission]), shapes)


# ----------------------------------------------------------------------------- DSB 2018


def test_dsb_thresholds() -> None:
    expected = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    assert DSB_IOU_THRESHOLDS.tolist() == expected
    assert dsb_thresholds().tolist() == expected


def dsb_hand_case() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((5, 8), dtype=np.int32)
    prediction = np.zeros((5, 8), dtype=np.int64)
    truth[0, 0:4] = 7  # nucleus A, 4 px
    truth[2, 0:2] = 42  # nucleus B, 2 px, never predicted
    prediction[0, 1:5] = 1000  # overlaps A in 3 px: IoU = 3 / (4 + 4 - 3) = 0.6 exactly
    prediction[4, 5:7] = 3  # false positive
    return truth, prediction


def test_dsb_hand_case() -> None:
    truth, prediction = dsb_hand_case()
    # t = 0.50, 0.55: 0.6 > t, TP = 1, FP = 1, FN = 1 -> 1 / 3.
    # t = 0.60: 0.6 > 0.6 is false (a match needs IoU > t), so TP = 0 -> 0 / 4; likewise above.
    expected = [1 / 3, 1 / 3] + [0.0] * 8
    assert dsb_image_precisions(truth, prediction).tolist() == pytest.approx(expected)
    assert dsb_image_score(truth, prediction) == pytest.approx(2 / 3 / 10)


def test_dsb_empty_rules_and_labels() -> None:
    truth, prediction = dsb_hand_case()
    empty = np.zeros_like(truth)
    assert dsb_image_score(empty, empty) == 1.0
    assert dsb_image_score(truth, empty) == 0.0
    assert dsb_image_score(empty, prediction) == 0.0
    assert dsb_image_score(truth, truth) == 1.0
    # Huge, sparse label values take the np.unique path and score the same.
    huge = np.where(prediction > 0, prediction.astype(np.int64) + 2**40, 0)
    assert dsb_image_score(truth, huge) == pytest.approx(2 / 3 / 10)
    with pytest.raises(InputError, match=">= 0"):
        dsb_image_score(truth, -prediction)
    with pytest.raises(InputError, match="integers"):
        dsb_image_score(truth, prediction.astype(float))
    with pytest.raises(InputError, match="shape"):
        dsb_image_score(truth, prediction[:2])


def naive_precisions(truth: np.ndarray, prediction: np.ndarray) -> list[float]:
    """Kaggle-kernel style: IoU of every pair from masks, greedy one-to-one matching."""
    truth_ids = [i for i in np.unique(truth) if i != 0]
    prediction_ids = [j for j in np.unique(prediction) if j != 0]
    ious = np.zeros((len(truth_ids), len(prediction_ids)))
    for a, i in enumerate(truth_ids):
        for b, j in enumerate(prediction_ids):
            intersection = np.logical_and(truth == i, prediction == j).sum()
            ious[a, b] = intersection / np.logical_or(truth == i, prediction == j).sum()
    values = []
    for t in np.linspace(0.5, 0.95, 10).round(2):
        used: set[int] = set()
        tp = 0
        for a in range(len(truth_ids)):
            for b in range(len(prediction_ids)):
                if b not in used and ious[a, b] > t:
                    used.add(b)
                    tp += 1
                    break
        total = len(truth_ids) + len(prediction_ids) - tp
        values.append(tp / total if total else 1.0)
    return values


def test_dsb_matches_naive_matcher_on_random_instances() -> None:
    rng = np.random.default_rng(11)
    for _ in range(25):
        truth = np.zeros((24, 30), dtype=np.int32)
        prediction = np.zeros((24, 30), dtype=np.int32)
        for label in range(1, int(rng.integers(1, 9))):
            y, x = rng.integers(0, 20), rng.integers(0, 26)
            h, w = rng.integers(1, 6, size=2)
            truth[y : y + h, x : x + w] = label * 3  # later boxes overwrite: no overlaps
            dy, dx = rng.integers(-1, 2, size=2)
            grow = rng.integers(0, 2)
            prediction[max(0, y + dy) : y + dy + h + grow, max(0, x + dx) : x + dx + w] = (
                label + 100
            )
        assert dsb_image_precisions(truth, prediction).tolist() == pytest.approx(
            naive_precisions(truth, prediction)
        )


def test_dsb_score_frames_real_solution(dsb_solution: pd.DataFrame) -> None:
    shapes = dsb_shapes(dsb_solution)
    truth = dsb_solution[["ImageId", "EncodedPixels"]]
    perfect = dsb_score_frames(truth, truth.copy(), shapes)
    assert perfect["score"] == 1.0
    assert perfect["n_images"] == 65
    per_image = perfect["per_image"]
    assert per_image["n_truth"].sum() == len(truth) == per_image["n_pred"].sum()

    nothing = pd.DataFrame({"ImageId": list(shapes), "EncodedPixels": ""})
    assert dsb_score_frames(truth, nothing, shapes)["score"] == 0.0


def test_dsb_score_frames_half_the_nuclei_dropped(dsb_solution: pd.DataFrame) -> None:
    shapes = dsb_shapes(dsb_solution)
    truth = dsb_solution[["ImageId", "EncodedPixels"]]
    image_id = truth["ImageId"].iloc[0]
    rows = truth.index[truth["ImageId"] == image_id]
    n = len(rows)
    submission = truth.drop(rows[: n // 2])
    # The kept nuclei match exactly (IoU 1 > every t), the dropped ones are misses:
    # TP = n - n//2, FP = 0, FN = n//2 at every threshold.
    kept = n - n // 2
    result = dsb_score_frames(truth, submission, shapes)
    assert result["score"] == pytest.approx((64 + kept / n) / 65)
    row = result["per_image"].set_index("ImageId").loc[image_id]
    assert (row["score"], row["n_truth"], row["n_pred"]) == (pytest.approx(kept / n), n, kept)

    # Pixel metrics on the same image: nothing wrongly predicted, recall = kept area share.
    truth_labels = decode_rles_to_labels(truth.loc[rows, "EncodedPixels"], shapes[image_id], "F")
    kept_labels = decode_rles_to_labels(
        submission.loc[submission["ImageId"] == image_id, "EncodedPixels"], shapes[image_id], "F"
    )
    table = pixel_metrics_table([image_id], [truth_labels > 0], [kept_labels > 0])
    assert table.loc[0, "precision"] == 1.0
    assert table.loc[0, "recall"] == pytest.approx(
        np.count_nonzero(kept_labels) / np.count_nonzero(truth_labels)
    )


def test_dsb_score_frames_missing_image_and_shape() -> None:
    truth = pd.DataFrame({"ImageId": ["a", "a", "b"], "EncodedPixels": ["1 2", "5 1", "3 2"]})
    submission = pd.DataFrame({"ImageId": ["a", "a"], "EncodedPixels": ["1 2", "5 1"]})
    result = dsb_score_frames(truth, submission, {"a": (3, 3), "b": (3, 3)})
    # "b" has no submission row: predicted empty -> 0; "a" is perfect -> 1.
    assert result["score"] == 0.5
    assert result["per_image"]["ImageId"].tolist() == ["a", "b"]
    assert result["per_image"]["pixel_dice"].tolist() == [1.0, 0.0]
    assert result["pixel_dice"] == 0.5


def test_dsb_pixel_dice_counts_the_union_of_nuclei() -> None:
    truth = pd.DataFrame({"ImageId": ["a", "a"], "EncodedPixels": ["1 2", "5 2"]})  # 4 pixels
    # 2 of the truth's pixels and 1 more: Dice = 2 * 2 / (4 + 3)
    submission = pd.DataFrame({"ImageId": ["a"], "EncodedPixels": ["1 3"]})  # pixels 1-3
    result = dsb_score_frames(truth, submission, {"a": (3, 3)})
    assert result["pixel_dice"] == pytest.approx(4 / 7)


def test_dsb_score_frames_shape_missing() -> None:
    truth = pd.DataFrame({"ImageId": ["a", "a", "b"], "EncodedPixels": ["1 2", "5 1", "3 2"]})
    submission = pd.DataFrame({"ImageId": ["a", "a"], "EncodedPixels": ["1 2", "5 1"]})
    with pytest.raises(InputError, match="shapes"):
        dsb_score_frames(truth, submission, {"a": (3, 3)})


# ----------------------------------------------------------------------------- per-patient Dice


def test_volume_dice_pools_a_patients_pixels() -> None:
    import pandas as pd

    from kaggle_seg.metrics import pixel_counts, volume_dice

    truth = np.zeros((3, 4, 4), bool)
    truth[0, :2, :2] = True  # 4 pixels on slice 0, slices 1 and 2 empty
    prediction = np.zeros_like(truth)
    prediction[0, :2, :1] = True  # 2 of them found
    prediction[2, 3, 3] = True  # 1 false positive on an empty slice
    rows = [{"patient": "a", **pixel_counts(t, p)} for t, p in zip(truth, prediction, strict=True)]
    rows.append({"patient": "b", **pixel_counts(truth[1], prediction[1])})  # empty, empty
    dice = volume_dice(pd.DataFrame(rows), "patient")
    assert dice["a"] == pytest.approx(2 * 2 / (4 + 3))
    assert dice["b"] == 1.0
