"""Speed of the competition metrics against the naive recipes, printed as a markdown table.

    python benchmarks/bench_metrics.py [--quick]

UW-Madison GI: real data is not available, so a 5-fold out-of-fold set is synthesised: 270
case_days x 144 slices of 266 x 266 (38,880 slices) with 3 organ-like classes (unions of smooth
ellipsoids), predictions = the same organs with jittered centres and radii, class shifts, missed
parts, false-positive specks and dropped end slices. Volumes are generated one case_day at a time
(a full set would need ~16 GB) and the generation time is measured and left out of the score time.
The naive baseline on a few case_days is the public-notebook recipe: Dice per slice in a Python
loop and `scipy.spatial.distance.directed_hausdorff` on all foreground voxels.

DSB 2018: the 65 stage1_test images of stage1_solution.csv, scored against themselves and against
a perturbed copy (every nucleus shifted by one pixel, a tenth of them dropped); the naive baseline
matches nuclei in a Python loop over truth instances (one mask comparison per nucleus).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy
from scipy.spatial.distance import directed_hausdorff

from kaggle_seg.competitions.dsb2018_kaggle import dsb_score_frames
from kaggle_seg.competitions.uwmgi_files import CLASSES as UWMGI_CLASSES
from kaggle_seg.competitions.uwmgi_kaggle import uwmgi_score_frames
from kaggle_seg.data.rle import decode_rles_to_labels, encode_rle
from kaggle_seg.metrics import (
    DSB_IOU_THRESHOLDS,
    dsb_image_score,
    hausdorff_3d,
    uwmgi_score_volumes,
)

DEPTH, HEIGHT, WIDTH = 144, 266, 266


def shared_data() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("KSEG_SHARED_DATA", default))


# ----------------------------------------------------------------------------- synthetic GI


def paint_ellipsoid(
    volume: np.ndarray, channel: int, center: np.ndarray, radii: np.ndarray
) -> None:
    """OR an axis-aligned ellipsoid into volume[..., channel] ([D, H, W, C] bool)."""
    lo = np.maximum(np.floor(center - radii).astype(int), 0)
    hi = np.minimum(np.ceil(center + radii).astype(int) + 1, volume.shape[:3])
    if np.any(lo >= hi):
        return
    z, y, x = (
        ((np.arange(lo[axis], hi[axis]) - center[axis]) / radii[axis]) ** 2 for axis in range(3)
    )
    inside = z[:, None, None] + y[None, :, None] + x[None, None, :] <= 1.0
    volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2], channel] |= inside


def organ_ellipsoids(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centres [K, 3], radii [K, 3]) in voxels for large bowel, small bowel, stomach."""
    arc = np.linspace(0.0, np.pi, 10)
    large_bowel = np.column_stack(
        (
            rng.uniform(50, 90) + 20 * np.cos(arc) * rng.uniform(0.5, 1.0),
            130 + 60 * np.sin(arc) * rng.uniform(0.7, 1.0),
            133 + 70 * np.cos(arc),
        )
    )
    small_bowel = rng.normal([70, 150, 140], [12, 20, 20], size=(18, 3))
    stomach = rng.normal([45, 100, 170], [4, 5, 5], size=(2, 3))
    return [
        (large_bowel, rng.uniform([6, 9, 9], [10, 15, 15], size=(10, 3))),
        (small_bowel, rng.uniform([4, 6, 6], [8, 11, 11], size=(18, 3))),
        (stomach, rng.uniform([12, 22, 22], [20, 38, 38], size=(2, 3))),
    ]


def synthetic_case_day(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Truth and prediction [D, H, W, 3] bool for one synthetic case_day."""
    truth = np.zeros((DEPTH, HEIGHT, WIDTH, 3), dtype=bool)
    prediction = np.zeros_like(truth)
    for channel, (centers, radii) in enumerate(organ_ellipsoids(rng)):
        shift = np.array([rng.integers(-1, 2), rng.integers(-2, 3), rng.integers(-2, 3)])
        for center, radius in zip(centers, radii, strict=True):
            paint_ellipsoid(truth, channel, center, radius)
            if rng.random() < 0.1:
                continue  # a missed part of the organ
            jitter = rng.normal(0.0, [1.0, 1.5, 1.5])
            paint_ellipsoid(
                prediction, channel, center + shift + jitter, radius * rng.uniform(0.85, 1.15)
            )
        if rng.random() < 0.5:  # the model stops a few slices early
            present = np.flatnonzero(prediction[..., channel].any(axis=(1, 2)))
            if present.size:
                prediction[present[: rng.integers(1, 4)], :, :, channel] = False
        if rng.random() < 0.3:  # false-positive specks anywhere
            for _ in range(rng.integers(1, 4)):
                z, y, x = rng.integers([0, 0, 0], [DEPTH - 2, HEIGHT - 4, WIDTH - 4])
                prediction[z : z + 2, y : y + 4, x : x + 4, channel] = True
    return truth, prediction


class Clock:
    """Seconds spent inside the wrapped generator, to subtract from the consumer's wall time."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, items: Iterator) -> Iterator:
        while True:
            start = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                self.seconds += time.perf_counter() - start
                return
            self.seconds += time.perf_counter() - start
            yield item


def naive_uwmgi_score(volumes: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> float:
    """The public-notebook recipe: per-slice Dice loop, directed_hausdorff on all voxels."""
    dice_values, hausdorff_values = [], []
    for _, truth, prediction in volumes:
        scale = 1.0 / np.array(truth.shape[:3], dtype=np.float64)
        for channel in range(truth.shape[-1]):
            for z in range(truth.shape[0]):
                t, p = truth[z, :, :, channel], prediction[z, :, :, channel]
                total = t.sum() + p.sum()
                if total:
                    dice_values.append(2.0 * (t & p).sum() / total)
            a = np.argwhere(truth[..., channel]) * scale
            b = np.argwhere(prediction[..., channel]) * scale
            if len(a) and len(b):
                distance = max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])
                hausdorff_values.append(distance / math.sqrt(3.0))
            elif len(a) or len(b):
                hausdorff_values.append(1.0)
    return 0.4 * float(np.mean(dice_values)) + 0.6 * (1.0 - float(np.mean(hausdorff_values)))


def bench_uwmgi(n_case_days: int, n_naive: int, n_frames: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    generation, hausdorff_only = Clock(), 0.0
    voxels = []

    def case_days() -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        nonlocal hausdorff_only
        for index in range(n_case_days):
            truth, prediction = synthetic_case_day(rng)
            voxels.append(int(np.count_nonzero(truth)))
            # Timed here so that one generated set serves both numbers; Clock leaves it out of
            # the score time along with the generation.
            for channel in range(3):
                # [D, H, W] arrays as a caller of hausdorff_3d has them; the channel copy is
                # not timed.
                truth_channel = np.ascontiguousarray(truth[..., channel])
                prediction_channel = np.ascontiguousarray(prediction[..., channel])
                start = time.perf_counter()
                hausdorff_3d(truth_channel, prediction_channel)
                hausdorff_only += time.perf_counter() - start
            yield f"case{index}_day0", truth, prediction

    start = time.perf_counter()
    result = uwmgi_score_volumes(generation.wrap(case_days()), UWMGI_CLASSES)
    score_seconds = time.perf_counter() - start - generation.seconds
    generation_seconds = generation.seconds - hausdorff_only
    n_slices = result["n_slices"]
    rows = [
        {
            "benchmark": "uwmgi_score_volumes (Dice + 3D Hausdorff)",
            "size": f"{n_case_days} case_days, {n_slices:,} slices 266x266 x 3 classes",
            "ours_s": score_seconds,
            "naive_s": math.nan,
            "note": f"score {result['score']:.4f}; ~{np.mean(voxels) / 3:,.0f} voxels per organ; "
            f"generation {generation_seconds:.0f} s not counted",
        },
        {
            "benchmark": "hausdorff_3d only",
            "size": f"{3 * n_case_days} (case_day, class) volumes 144x266x266",
            "ours_s": hausdorff_only,
            "naive_s": math.nan,
            "note": f"mean normalised distance {result['hausdorff']:.4f}",
        },
    ]

    subset = [
        (f"naive{index}", *synthetic_case_day(np.random.default_rng(seed + 1 + index)))
        for index in range(n_naive)
    ]
    start = time.perf_counter()
    ours = uwmgi_score_volumes(subset, UWMGI_CLASSES)["score"]
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    naive = naive_uwmgi_score(subset)
    naive_seconds = time.perf_counter() - start
    if not math.isclose(ours, naive, rel_tol=1e-9):
        raise AssertionError(f"scores differ: ours {ours!r}, naive {naive!r}")
    rows.append(
        {
            "benchmark": "uwmgi score, ours vs naive recipe",
            "size": f"{n_naive} case_day(s) ({n_naive * DEPTH} slices)",
            "ours_s": ours_seconds,
            "naive_s": naive_seconds,
            "note": f"same score {ours:.6f}; naive extrapolated to the full set: "
            f"{naive_seconds / n_naive * n_case_days / 60:.0f} min",
        }
    )
    rows.append(bench_identical(subset[0][1]))
    rows.append(bench_uwmgi_frames(n_frames, seed))
    return rows


def bench_identical(truth: np.ndarray) -> dict:
    """A perfect prediction: the worst case of directed_hausdorff's early break (all pairs)."""
    channel = int(np.argmin(np.count_nonzero(truth.reshape(-1, truth.shape[-1]), axis=0)))
    organ = np.ascontiguousarray(truth[..., channel])
    start = time.perf_counter()
    ours = hausdorff_3d(organ, organ.copy())
    ours_seconds = time.perf_counter() - start
    points = np.argwhere(organ) / np.array(organ.shape, dtype=np.float64)
    start = time.perf_counter()
    naive = max(directed_hausdorff(points, points)[0], directed_hausdorff(points, points)[0])
    naive_seconds = time.perf_counter() - start
    if ours != 0.0 or naive != 0.0:
        raise AssertionError(f"identical volumes: ours {ours!r}, naive {naive!r}")
    return {
        "benchmark": "hausdorff_3d, prediction == truth",
        "size": f"1 volume 144x266x266, {len(points):,} voxels ({UWMGI_CLASSES[channel]})",
        "ours_s": ours_seconds,
        "naive_s": naive_seconds,
        "note": "directed_hausdorff never breaks early on identical sets: all pairs",
    }


def uwmgi_frames(
    volumes: Iterable[tuple[str, np.ndarray, np.ndarray]],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, tuple[int, int]]]:
    """train.csv-like truth, a submission and slice shapes for [D, H, W, 3] volumes."""
    truth_rows, submission_rows = [], []
    for case_day, truth, prediction in volumes:
        for z in range(truth.shape[0]):
            slice_id = f"{case_day}_slice_{z + 1:04d}"
            for channel, name in enumerate(UWMGI_CLASSES):
                truth_rle = encode_rle(truth[z, :, :, channel], "C")
                truth_rows.append((slice_id, name, truth_rle or np.nan))
                prediction_rle = encode_rle(prediction[z, :, :, channel], "C")
                submission_rows.append((slice_id, name, prediction_rle))
    truth_frame = pd.DataFrame(truth_rows, columns=["id", "class", "segmentation"])
    submission = pd.DataFrame(submission_rows, columns=["id", "class", "predicted"])
    return truth_frame, submission, dict.fromkeys(truth_frame["id"], (HEIGHT, WIDTH))


def bench_uwmgi_frames(n_case_days: int, seed: int) -> dict:
    volumes = [
        (f"case{index}_day0", *synthetic_case_day(np.random.default_rng(seed + 100 + index)))
        for index in range(n_case_days)
    ]
    truth, submission, shapes = uwmgi_frames(volumes)
    start = time.perf_counter()
    from_volumes = uwmgi_score_volumes(volumes, UWMGI_CLASSES)["score"]
    volumes_seconds = time.perf_counter() - start
    del volumes
    start = time.perf_counter()
    from_frames = uwmgi_score_frames(truth, submission, shapes)["score"]
    frames_seconds = time.perf_counter() - start
    if not math.isclose(from_frames, from_volumes, rel_tol=1e-12):
        raise AssertionError(f"frame score {from_frames!r} != volume score {from_volumes!r}")
    return {
        "benchmark": "uwmgi_score_frames (RLE decode + volumes included)",
        "size": f"{n_case_days} case_days, {len(truth):,} truth rows",
        "ours_s": frames_seconds,
        "naive_s": math.nan,
        "note": f"same score as from the arrays ({volumes_seconds:.2f} s there)",
    }


# ----------------------------------------------------------------------------- DSB 2018


def naive_dsb_image_score(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Python loop over truth nuclei: one full-image comparison each, greedy matching."""
    truth_ids = np.unique(truth)[1:]
    prediction_ids, prediction_areas = np.unique(prediction, return_counts=True)
    area_of = dict(zip(prediction_ids.tolist(), prediction_areas.tolist(), strict=True))
    n_prediction = len(prediction_ids) - (prediction_ids[0] == 0)
    if len(truth_ids) == 0 or n_prediction == 0:
        return float(len(truth_ids) == n_prediction)
    best = []
    for label in truth_ids:
        inside = truth == label
        area = int(inside.sum())
        overlapping, intersections = np.unique(prediction[inside], return_counts=True)
        ious = [
            inter / (area + area_of[j] - inter)
            for j, inter in zip(overlapping, intersections, strict=True)
            if j != 0
        ]
        best.append(max(ious, default=0.0))
    scores = []
    for threshold in DSB_IOU_THRESHOLDS:
        tp = sum(iou > threshold for iou in best)
        scores.append(tp / (len(truth_ids) + n_prediction - tp))
    return float(np.mean(scores))


def perturbed(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every nucleus shifted by one pixel, about a tenth of them dropped."""
    shifted = np.roll(labels, (1, 1), axis=(0, 1))
    ids = np.unique(shifted)[1:]
    dropped = ids[rng.random(ids.size) < 0.1]
    return np.where(np.isin(shifted, dropped), 0, shifted)


def bench_dsb() -> list[dict]:
    path = shared_data() / "dsb2018" / "stage1_solution.csv"
    if not path.is_file():
        return [{"benchmark": "DSB 2018", "size": "-", "note": f"skipped: no {path}"}]
    solution = pd.read_csv(path)
    truth = solution[["ImageId", "EncodedPixels"]]
    first = solution.drop_duplicates("ImageId")
    shapes = {
        i: (int(h), int(w))
        for i, h, w in zip(first.ImageId, first.Height, first.Width, strict=True)
    }
    labels = {
        image_id: decode_rles_to_labels(group["EncodedPixels"].tolist(), shapes[image_id], "F")
        for image_id, group in truth.groupby("ImageId", sort=False)
    }
    rng = np.random.default_rng(0)
    predictions = {image_id: perturbed(label_map, rng) for image_id, label_map in labels.items()}
    n_images = len(labels)

    rows = []
    for name, pairs in (
        ("truth vs itself", [(labels[i], labels[i]) for i in labels]),
        ("truth vs shifted / dropped", [(labels[i], predictions[i]) for i in labels]),
    ):
        start = time.perf_counter()
        ours = [dsb_image_score(t, p) for t, p in pairs]
        ours_seconds = time.perf_counter() - start
        start = time.perf_counter()
        naive = [naive_dsb_image_score(t, p) for t, p in pairs]
        naive_seconds = time.perf_counter() - start
        if not np.allclose(ours, naive, rtol=1e-12):
            raise AssertionError(f"DSB scores differ ({name})")
        rows.append(
            {
                "benchmark": f"dsb_image_score, {name}",
                "size": f"{n_images} images, {len(truth):,} nuclei",
                "ours_s": ours_seconds,
                "naive_s": naive_seconds,
                "note": f"mAP {np.mean(ours):.4f}; "
                f"{ours_seconds / n_images * 1e3:.2f} ms / image "
                f"(naive {naive_seconds / n_images * 1e3:.1f} ms)",
            }
        )

    submission = pd.DataFrame(
        [
            (image_id, encode_rle(prediction == label, "F"))
            for image_id, prediction in predictions.items()
            for label in np.unique(prediction)[1:]
        ],
        columns=["ImageId", "EncodedPixels"],
    )
    start = time.perf_counter()
    result = dsb_score_frames(truth, submission, shapes)
    frames_seconds = time.perf_counter() - start
    rows.append(
        {
            "benchmark": "dsb_score_frames (RLE decode included)",
            "size": f"{n_images} images, {len(truth):,} + {len(submission):,} RLE rows",
            "ours_s": frames_seconds,
            "naive_s": math.nan,
            "note": f"mAP {result['score']:.4f}",
        }
    )
    return rows


# ----------------------------------------------------------------------------- report


def seconds(value: float) -> str:
    if math.isnan(value):
        return ""
    return f"{value:.2f}" if value >= 0.1 else f"{value:.4f}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| benchmark | size | ours (s) | naive (s) | naive / ours | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        ours, naive = row.get("ours_s", math.nan), row.get("naive_s", math.nan)
        cells = [
            seconds(ours),
            seconds(naive),
            "" if math.isnan(ours) or math.isnan(naive) else f"{naive / ours:.0f}x",
        ]
        lines.append(
            f"| {row['benchmark']} | {row['size']} | {' | '.join(cells)} | {row['note']} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the metric benchmarks and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="20 case_days, 1 for the naive ratio, 4 as frames"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_case_days, n_naive, n_frames = (20, 1, 4) if args.quick else (270, 3, 20)

    rows = bench_uwmgi(n_case_days, n_naive, n_frames, args.seed) + bench_dsb()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"numpy {np.__version__}, scipy {scipy.__version__}, pandas {pd.__version__}"
    )
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
