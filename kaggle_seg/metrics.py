"""Competition metrics: pixel metrics, the UW-Madison GI score (Dice + 3D Hausdorff), DSB 2018 mAP.

Pure functions: masks / label maps in, numbers or DataFrames out, no file I/O. Masks are binary
(nonzero = foreground); thresholding probabilities or logits is the caller's job.

Zero-denominator convention (pixel metrics and empty aggregates): a ratio whose denominator is 0
is 1.0 when there was nothing to find and nothing was predicted wrongly, else 0.0. For example
precision with no predicted pixel is 1.0 on an empty truth and 0.0 when the truth has pixels.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from kaggle_seg.data.rle import decode_rles, decode_rles_to_labels
from kaggle_seg.errors import InputError

UWMGI_CLASSES: tuple[str, ...] = ("large_bowel", "small_bowel", "stomach")
UWMGI_DICE_WEIGHT = 0.4
UWMGI_HAUSDORFF_WEIGHT = 0.6
# linspace + round: np.arange(0.5, 1.0, 0.05) gives 0.6000000000000001, which would turn an IoU of
# exactly 3/5 into a match at t = 0.6.
DSB_IOU_THRESHOLDS: np.ndarray = np.round(np.linspace(0.5, 0.95, 10), 2)
PIXEL_METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "accuracy")

_UWMGI_ID = re.compile(r"^(?P<case_day>case\d+_day\d+)_slice_(?P<slice>\d+)$")
_MERGED = "merged"
_PARALLEL_QUERIES = 20_000


# ----------------------------------------------------------------------------- pixel metrics


def _as_mask(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array if array.dtype == np.bool_ else array != 0


def _ratio(numerator: np.ndarray, denominator: np.ndarray, perfect: np.ndarray) -> np.ndarray:
    """numerator / denominator, and 1.0 / 0.0 (by `perfect`) where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, np.where(perfect, 1.0, 0.0), numerator / safe)


def _metrics_from_counts(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray
) -> dict[str, np.ndarray]:
    """Pixel metrics from confusion counts (scalars or arrays of the same shape)."""
    tp, fp, fn, tn = (np.asarray(x, dtype=np.int64) for x in (tp, fp, fn, tn))
    nothing_wrong = (fp == 0) & (fn == 0)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, nothing_wrong),
        "iou": _ratio(tp, tp + fp + fn, nothing_wrong),
        "precision": _ratio(tp, tp + fp, fn == 0),
        "recall": _ratio(tp, tp + fn, fp == 0),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, nothing_wrong),
    }


def _confusion_counts(
    truth: np.ndarray, prediction: np.ndarray, channels: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """tp, fp, fn, tn over all pixels, or per channel (last axis) when `channels`."""
    truth, prediction = _as_mask(truth), _as_mask(prediction)
    if truth.shape != prediction.shape:
        raise InputError(f"truth shape {truth.shape} != prediction shape {prediction.shape}")
    if channels:
        n_channels = truth.shape[-1]
        flat_truth = truth.reshape(-1, n_channels)
        flat_prediction = prediction.reshape(-1, n_channels)
        n_pixels = flat_truth.shape[0]
        tp = np.count_nonzero(flat_truth & flat_prediction, axis=0)
        n_truth = np.count_nonzero(flat_truth, axis=0)
        n_prediction = np.count_nonzero(flat_prediction, axis=0)
    else:
        n_pixels = truth.size
        tp = np.count_nonzero(truth & prediction)
        n_truth = np.count_nonzero(truth)
        n_prediction = np.count_nonzero(prediction)
    tp = np.asarray(tp, dtype=np.int64)
    fp = n_prediction - tp
    fn = n_truth - tp
    tn = n_pixels - tp - fp - fn
    return tp, fp, fn, tn


def pixel_metrics(truth: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision, recall and accuracy of one binary mask pair.

    truth, prediction: masks of the same shape ([H, W], [H, W, C], [D, H, W], ...), nonzero =
    foreground; all pixels and channels are pooled. Zero denominators follow the module convention
    (an empty truth with an empty prediction scores 1.0 everywhere).
    """
    counts = _confusion_counts(truth, prediction, channels=False)
    return {name: float(value) for name, value in _metrics_from_counts(*counts).items()}


def pixel_counts(truth: np.ndarray, prediction: np.ndarray) -> dict[str, int]:
    """Foreground pixel counts of one mask pair, all channels pooled: `tp` (both), `truth` and
    `predicted`; summed over a volume they give its Dice (`volume_dice`)."""
    counts = _confusion_counts(truth, prediction, channels=False)
    tp, fp, fn = (int(x) for x in counts[:3])
    return {"tp": tp, "truth": tp + fn, "predicted": tp + fp}


def volume_dice(images: pd.DataFrame, key: str) -> pd.Series:
    """Dice of each volume (the rows sharing `key`, e.g. an LGG patient), from per-image
    `pixel_counts` columns: 2 x sum(tp) / (sum(truth) + sum(predicted)), the convention of Buda
    et al. for LGG. A volume empty in truth and prediction scores 1; a model that predicts
    nothing scores 0 on every volume that has a lesion, however many of its slices are empty.
    """
    sums = images.groupby(key, sort=True)[["tp", "truth", "predicted"]].sum()
    denominator = (sums["truth"] + sums["predicted"]).to_numpy()
    dice = _ratio(2 * sums["tp"].to_numpy(), denominator, denominator == 0)
    return pd.Series(dice, index=sums.index, name="volume_dice")


def pixel_metrics_table(
    ids: Sequence[str],
    truths: Sequence[np.ndarray] | np.ndarray,
    predictions: Sequence[np.ndarray] | np.ndarray,
    classes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per image: `id`, the pixel metrics, and `dice_<class>`, `iou_<class>` per class.

    truths, predictions: binary masks [H, W] or [H, W, C] per image (sizes may differ between
    images), or stacked arrays [N, H, W] / [N, H, W, C]. The unprefixed metrics pool all pixels and
    channels of the image. classes: names of the C channels; when given, masks must be
    [H, W, len(classes)] ([H, W] is accepted for a single class). Average with
    `table.mean(numeric_only=True)`.
    """
    if not len(ids) == len(truths) == len(predictions):
        raise InputError(
            f"{len(ids)} ids, {len(truths)} truths and {len(predictions)} predictions: "
            "need one of each per image"
        )
    rows = []
    for image_id, truth, prediction in zip(ids, truths, predictions, strict=True):
        truth, prediction = np.asarray(truth), np.asarray(prediction)
        row: dict[str, object] = {"id": image_id}
        if classes is None:
            counts = _confusion_counts(truth, prediction, channels=False)
            row.update({k: float(v) for k, v in _metrics_from_counts(*counts).items()})
        else:
            if truth.ndim == 2 and len(classes) == 1:
                truth, prediction = truth[..., None], prediction[..., None]
            if truth.ndim != 3 or truth.shape[-1] != len(classes):
                raise InputError(
                    f"image {image_id!r}: mask shape {truth.shape} does not match "
                    f"[H, W, {len(classes)}] for classes {list(classes)}"
                )
            per_class = _confusion_counts(truth, prediction, channels=True)
            pooled = [int(c.sum()) for c in per_class]
            row.update({k: float(v) for k, v in _metrics_from_counts(*pooled).items()})
            class_metrics = _metrics_from_counts(*per_class)
            for index, name in enumerate(classes):
                row[f"dice_{name}"] = float(class_metrics["dice"][index])
                row[f"iou_{name}"] = float(class_metrics["iou"][index])
        rows.append(row)
    columns = ["id", *PIXEL_METRICS]
    if classes is not None:
        columns += [f"{metric}_{name}" for name in classes for metric in ("dice", "iou")]
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------- UW-Madison GI


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Tight [D, H, W] box around the foreground of a 3D mask; None when empty."""
    # Reducing over the leading axis is a fast elementwise OR; do it first, then look at z only
    # inside the (y, x) box.
    plane = mask.any(axis=0)
    rows = np.flatnonzero(plane.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(plane.any(axis=0))
    y, x = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    depth = np.flatnonzero(mask[:, y, x].any(axis=(1, 2)))
    return slice(depth[0], depth[-1] + 1), y, x


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of a 3D mask with at least one of their 6 face neighbours outside the mask.

    For a voxel q of the same array outside the mask, its nearest mask voxel b is always a
    surface voxel: stepping from b one voxel towards q along any axis where they differ shortens
    that per-axis gap and keeps the others, so under any per-axis scaling that neighbour is
    strictly closer to q and, b being nearest, cannot be in the mask. 6-connectivity is therefore
    enough (a full 26-neighbour erosion would keep more voxels than needed). The step stays
    between b and q, inside the array, so neighbours beyond the array edge never matter: they
    count as inside, which keeps the surface small.
    """
    interior = mask.copy()
    interior[1:] &= mask[:-1]
    interior[:-1] &= mask[1:]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    interior[:, :, 1:] &= mask[:, :, :-1]
    interior[:, :, :-1] &= mask[:, :, 1:]
    return mask & ~interior


def _scaled_coordinates(
    mask: np.ndarray, scale: np.ndarray, offset: Sequence[int] = (0, 0, 0)
) -> np.ndarray:
    """[N, 3] coordinates of the voxels of a 3D mask (a crop starting at `offset` of a larger
    array), each axis multiplied by its scale."""
    # flatnonzero + divmod is ~20x faster than np.argwhere, whose N-D nonzero is slow.
    flat = np.flatnonzero(mask)
    depth_index, rest = np.divmod(flat, mask.shape[1] * mask.shape[2])
    row_index, col_index = np.divmod(rest, mask.shape[2])
    return np.column_stack(
        (
            (depth_index + offset[0]) * scale[0],
            (row_index + offset[1]) * scale[1],
            (col_index + offset[2]) * scale[2],
        )
    )


def _grown(box: tuple[slice, ...], shape: Sequence[int]) -> tuple[slice, ...]:
    """The box one voxel larger on every side, within the array."""
    return tuple(
        slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(box, shape, strict=True)
    )


def _directed_hausdorff(
    source: np.ndarray,
    target: np.ndarray,
    scale: np.ndarray,
    source_box: tuple[slice, ...],
    target_box: tuple[slice, ...],
) -> float:
    """max over source voxels of the distance to the nearest target voxel (target not empty);
    the boxes are the masks' tight boxes in these arrays.

    Only the source's box and the target's box grown by a voxel are read: the voxels, their
    order and so the distances are those of the whole arrays, at a fraction of the work when a
    mask is small in the box around both."""
    outside = source[source_box] & ~target[source_box]
    if not outside.any():
        return 0.0
    # Voxels of source inside target are at distance 0, and the nearest target voxel of any other
    # voxel is on target's surface (see _surface), so the tree holds the surface only. Within the
    # grown box every neighbour of a target voxel is present: the same surface.
    grown = _grown(target_box, target.shape)
    surface = _surface(np.ascontiguousarray(target[grown]))
    tree = cKDTree(
        _scaled_coordinates(surface, scale, [b.start for b in grown]),
        balanced_tree=False,
        compact_nodes=False,
    )
    queries = _scaled_coordinates(outside, scale, [b.start for b in source_box])
    # Starting worker threads costs a few ms, more than a small query takes on one core.
    workers = -1 if len(queries) >= _PARALLEL_QUERIES else 1
    distances, _ = tree.query(queries, workers=workers)
    return float(distances.max())


def _directed_in_box(
    truth: np.ndarray,
    prediction: np.ndarray,
    shape: Sequence[int],
    truth_box: tuple[slice, ...] | None = None,
    prediction_box: tuple[slice, ...] | None = None,
) -> tuple[float, float]:
    """Normalised directed Hausdorff distances (truth -> prediction, prediction -> truth) of
    two non-empty masks cropped to a box around both (their own tight boxes in it, when
    known)."""
    scale = 1.0 / np.asarray(shape, dtype=np.float64)
    truth_box = truth_box or _bounding_box(truth)
    prediction_box = prediction_box or _bounding_box(prediction)
    root3 = math.sqrt(3.0)
    return (
        _directed_hausdorff(truth, prediction, scale, truth_box, prediction_box) / root3,
        _directed_hausdorff(prediction, truth, scale, prediction_box, truth_box) / root3,
    )


def _hausdorff_in_box(truth: np.ndarray, prediction: np.ndarray, shape: Sequence[int]) -> float:
    """Normalised symmetric Hausdorff of two non-empty masks cropped to a box around both."""
    # max(a / c, b / c) is max(a, b) / c exactly: division by c is monotonic.
    return max(_directed_in_box(truth, prediction, shape))


def directed_hausdorff_3d(truth: np.ndarray, prediction: np.ndarray) -> tuple[float, float]:
    """(truth -> prediction, prediction -> truth) directed Hausdorff distances of two [D, H, W]
    masks, normalised as `hausdorff_3d`, whose value is their max (the same float). Both
    empty: (NaN, NaN); exactly one empty: (1.0, 1.0)."""
    truth, prediction = _as_mask(truth), _as_mask(prediction)
    if truth.shape != prediction.shape or truth.ndim != 3:
        raise InputError(
            f"need two [D, H, W] volumes of one shape, got {truth.shape} and {prediction.shape}"
        )
    truth_box, prediction_box = _bounding_box(truth), _bounding_box(prediction)
    if truth_box is None and prediction_box is None:
        return math.nan, math.nan
    if truth_box is None or prediction_box is None:
        return 1.0, 1.0
    box = tuple(
        slice(min(t.start, p.start), max(t.stop, p.stop))
        for t, p in zip(truth_box, prediction_box, strict=True)
    )

    def within(inner: tuple[slice, ...]) -> tuple[slice, ...]:
        return tuple(
            slice(i.start - b.start, i.stop - b.start) for i, b in zip(inner, box, strict=True)
        )

    # Contiguous crops: the surface shifts and masks below run several times faster on them.
    return _directed_in_box(
        np.ascontiguousarray(truth[box]),
        np.ascontiguousarray(prediction[box]),
        truth.shape,
        within(truth_box),
        within(prediction_box),
    )


def distances_to_mask_3d(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """float64 [N]: distance of each voxel (z, y, x) of int points [N, 3] to the nearest
    voxel of the non-empty [D, H, W] mask, normalised as `hausdorff_3d` (0 inside the mask)."""
    mask = _as_mask(mask)
    points = np.asarray(points, dtype=np.int64).reshape(-1, 3)
    scale = 1.0 / np.asarray(mask.shape, dtype=np.float64)
    distances = np.zeros(len(points))
    outside = ~mask[points[:, 0], points[:, 1], points[:, 2]]
    box = _bounding_box(mask)
    if outside.any() and box is not None:
        # The nearest mask voxel of a voxel outside is on the mask's surface (see _surface),
        # found in the mask's box grown by one voxel: the same surface as the whole array's.
        box = tuple(
            slice(max(b.start - 1, 0), min(b.stop + 1, n))
            for b, n in zip(box, mask.shape, strict=True)
        )
        surface = np.argwhere(_surface(np.ascontiguousarray(mask[box])))
        surface += np.array([b.start for b in box])
        tree = cKDTree(surface * scale)
        distances[outside], _ = tree.query(points[outside] * scale)
    return distances / math.sqrt(3.0)


def hausdorff_3d(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Symmetric 3D Hausdorff distance as the UW-Madison GI metric normalises it.

    truth, prediction: binary volumes [D, H, W] (slices, height, width), nonzero = foreground.
    Voxel (z, y, x) sits at (z / D, y / H, x / W), and the Euclidean Hausdorff distance between the
    two voxel sets is divided by sqrt(3), so it lies in [0, 1). Both empty: NaN (the metric skips
    the volume); exactly one empty: 1.0. Exact: it equals the brute-force all-pairs value.
    """
    return max(directed_hausdorff_3d(truth, prediction))


def _slice_dice(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Dice per slice of [N, H, W] bool stacks; NaN where both slices are empty."""
    n_slices = truth.shape[0]
    flat_truth = truth.reshape(n_slices, -1)
    flat_prediction = prediction.reshape(n_slices, -1)
    intersection = np.count_nonzero(flat_truth & flat_prediction, axis=1)
    total = np.count_nonzero(flat_truth, axis=1) + np.count_nonzero(flat_prediction, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total == 0, np.nan, 2.0 * intersection / total)


def gi_dice_per_slice(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Dice of each slice of two binary stacks [N, H, W] -> [N] float; NaN where both are empty.

    NaN marks the rows the UW-Madison GI metric skips; one empty slice against a non-empty one is 0.
    """
    truth, prediction = _as_mask(truth), _as_mask(prediction)
    if truth.shape != prediction.shape or truth.ndim != 3:
        raise InputError(
            f"need two [N, H, W] stacks of one shape, got {truth.shape} and {prediction.shape}"
        )
    return _slice_dice(truth, prediction)


def _score_volume_channel(
    truth: np.ndarray,
    prediction: np.ndarray,
    union_plane: np.ndarray,
    union: np.ndarray,
    with_hausdorff: bool = True,
) -> tuple[np.ndarray, float]:
    """Dice of the scored slices and the normalised Hausdorff (NaN: skipped, or not asked for
    with `with_hausdorff` False) of one channel.

    truth, prediction, union: [D, H, W] views of one class; union_plane: union.any(axis=0) [H, W].
    """
    rows = np.flatnonzero(union_plane.any(axis=1))
    if rows.size == 0:
        return np.empty(0), math.nan
    cols = np.flatnonzero(union_plane.any(axis=0))
    y, x = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    depth = np.flatnonzero(union[:, y, x].any(axis=(1, 2)))
    # Every slice outside this box is empty in both masks, so neither term needs it; the copy
    # makes the per-slice counts and the surface shifts run on contiguous memory.
    box = (slice(depth[0], depth[-1] + 1), y, x)
    truth_box = np.ascontiguousarray(truth[box])
    prediction_box = np.ascontiguousarray(prediction[box])
    dice = _slice_dice(truth_box, prediction_box)
    dice = dice[~np.isnan(dice)]
    if not with_hausdorff:
        return dice, math.nan
    if not truth_box.any() or not prediction_box.any():
        return dice, 1.0
    return dice, _hausdorff_in_box(truth_box, prediction_box, truth.shape)


def _uwmgi_summary(
    dice_sum: float, dice_count: int, hausdorff_sum: float, hausdorff_count: int
) -> tuple[float, float, float]:
    """(score, mean Dice, mean Hausdorff) from running sums and counts."""
    # Nothing scored at all means both masks were empty everywhere: perfect by the module
    # convention rather than NaN, so a tuning loop never compares against NaN.
    dice = dice_sum / dice_count if dice_count else 1.0
    hausdorff = hausdorff_sum / hausdorff_count if hausdorff_count else 0.0
    score = UWMGI_DICE_WEIGHT * dice + UWMGI_HAUSDORFF_WEIGHT * (1.0 - hausdorff)
    return float(score), float(dice), float(hausdorff)


def _merge_channels(masks: np.ndarray) -> np.ndarray:
    """[D, H, W, C] -> [D, H, W, 1], the union of the channels."""
    # OR of the channel views: any(axis=-1) over the short last axis is ~30x slower in numpy.
    return functools.reduce(np.logical_or, (masks[..., c] for c in range(masks.shape[-1])))[
        ..., None
    ]


UWMGI_MODES = ("per-class", "merged")


def uwmgi_modes(
    merged_classes: bool = False, dice: str | None = None, hausdorff: str | None = None
) -> tuple[str, str]:
    """(dice mode, hausdorff mode): each "per-class" (the competition's) or "merged" (the union
    of the classes); `merged_classes` is the shorthand for both merged. MLE-bench's grader is
    dice "per-class" with hausdorff "merged"."""
    default = "merged" if merged_classes else "per-class"
    modes = (dice or default, hausdorff or default)
    for option, value in zip(("--dice", "--hausdorff"), modes, strict=True):
        if value not in UWMGI_MODES:
            raise InputError(f"{option} {value!r}: choose per-class or merged")
    if merged_classes and modes != ("merged", "merged"):
        raise InputError("--merged-classes means --dice merged --hausdorff merged; pass one way")
    return modes


def uwmgi_score_volumes(
    volumes: Iterable[tuple[str, np.ndarray, np.ndarray]],
    classes: Sequence[str],
    *,
    merged_classes: bool = False,
    dice: str | None = None,
    hausdorff: str | None = None,
) -> dict:
    """UW-Madison GI score: 0.4 * mean Dice + 0.6 * (1 - mean normalised 3D Hausdorff).

    volumes: (case_day, truth, prediction) per case_day, truth and prediction binary masks
    [D, H, W, C] (slices in slice order, C = len(classes), nonzero = foreground). Consumed lazily,
    one volume at a time, so a generator keeps memory at one case_day.
    Dice is taken per (slice, class) and averaged over all such rows, skipping rows where both
    masks are empty; the Hausdorff distance (see `hausdorff_3d`) per (case_day, class) volume,
    skipping volumes where both are empty and counting 1.0 where exactly one is. `dice` and
    `hausdorff` ("per-class" or "merged", see `uwmgi_modes`) take either term on the union of
    the classes instead (one mask per slice / volume); `merged_classes` merges both.

    Returns {"score", "dice", "hausdorff", "modes", "per_class": {class: {"dice",
    "hausdorff"}}, "n_slices", "n_volumes", "per_volume": DataFrame(case_day, class, dice,
    n_dice_slices, hausdorff)}; a merged term is reported under the class name "merged", and
    per_class holds only the terms taken on each name. Means over nothing (all empty) follow
    the module convention: dice 1.0, hausdorff 0.0.
    """
    dice_mode, hausdorff_mode = uwmgi_modes(merged_classes, dice, hausdorff)
    # Which channels each term is taken on: the classes, the union of the classes, or both.
    dice_names = [_MERGED] if dice_mode == "merged" else list(classes)
    hausdorff_names = [_MERGED] if hausdorff_mode == "merged" else list(classes)
    names = list(dict.fromkeys([*classes, _MERGED]))
    names = [n for n in names if n in dice_names or n in hausdorff_names]
    dice_sums = dict.fromkeys(names, 0.0)
    dice_counts = dict.fromkeys(names, 0)
    hausdorff_sums = dict.fromkeys(names, 0.0)
    hausdorff_counts = dict.fromkeys(names, 0)
    per_volume = []
    n_slices = n_volumes = 0
    for case_day, truth, prediction in volumes:
        truth, prediction = _as_mask(truth), _as_mask(prediction)
        if truth.shape != prediction.shape or truth.ndim != 4 or truth.shape[-1] != len(classes):
            raise InputError(
                f"{case_day}: need truth and prediction [D, H, W, {len(classes)}] of one shape, "
                f"got {truth.shape} and {prediction.shape}"
            )
        if _MERGED in names:
            truth = np.concatenate([truth, _merge_channels(truth)], axis=-1)
            prediction = np.concatenate([prediction, _merge_channels(prediction)], axis=-1)
        union = truth | prediction
        union_plane = union.any(axis=0)
        for name in names:
            channel = len(classes) if name == _MERGED else list(classes).index(name)
            slice_dice, volume_hausdorff = _score_volume_channel(
                truth[..., channel],
                prediction[..., channel],
                union_plane[..., channel],
                union[..., channel],
                with_hausdorff=name in hausdorff_names,
            )
            if name not in dice_names:
                slice_dice = np.empty(0)
            dice_sums[name] += float(slice_dice.sum())
            dice_counts[name] += slice_dice.size
            if not math.isnan(volume_hausdorff):
                hausdorff_sums[name] += volume_hausdorff
                hausdorff_counts[name] += 1
            per_volume.append(
                {
                    "case_day": case_day,
                    "class": name,
                    "dice": float(slice_dice.mean()) if slice_dice.size else math.nan,
                    "n_dice_slices": slice_dice.size,
                    "hausdorff": volume_hausdorff,
                }
            )
        n_slices += truth.shape[0]
        n_volumes += 1
    score, mean_dice, mean_hausdorff = _uwmgi_summary(
        sum(dice_sums.values()),
        sum(dice_counts.values()),
        sum(hausdorff_sums.values()),
        sum(hausdorff_counts.values()),
    )
    per_class = {}
    for name in names:
        _, class_dice, class_hausdorff = _uwmgi_summary(
            dice_sums[name], dice_counts[name], hausdorff_sums[name], hausdorff_counts[name]
        )
        terms = {"dice": (class_dice, dice_names), "hausdorff": (class_hausdorff, hausdorff_names)}
        per_class[name] = {term: value for term, (value, of) in terms.items() if name in of}
    return {
        "score": score,
        "dice": mean_dice,
        "hausdorff": mean_hausdorff,
        "modes": {"dice": dice_mode, "hausdorff": hausdorff_mode},
        "per_class": per_class,
        "n_slices": n_slices,
        "n_volumes": n_volumes,
        "per_volume": pd.DataFrame(
            per_volume, columns=["case_day", "class", "dice", "n_dice_slices", "hausdorff"]
        ),
    }


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise InputError(f"{what} lacks column(s) {missing}; it has {list(frame.columns)}")


def _non_empty(rles: pd.Series) -> np.ndarray:
    """Rows holding an RLE: not NaN / None and not blank."""
    return (rles.notna() & (rles.fillna("").astype(str).str.strip() != "")).to_numpy()


def _paint_uwmgi_volume(
    rles: pd.Series, slice_index: np.ndarray, class_index: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """[D, H, W, C] bool volume from one RLE (order "C") per (slice, class) row (a view of a
    [C, D, H, W] array: each class's volume is contiguous)."""
    depth, height, width, n_classes = shape
    volume = np.zeros((n_classes, depth, height, width), dtype=bool)
    keep = _non_empty(rles)
    if keep.any():
        # One numba call for the whole volume; rows naming the same (slice, class) are OR-ed.
        slots = class_index[keep] * depth + slice_index[keep]
        stack = volume.reshape(n_classes * depth, height, width)
        decode_rles(rles.to_numpy()[keep].tolist(), (height, width), "C", out=stack, index=slots)
    return np.moveaxis(volume, 0, -1)


def _uwmgi_frame_volumes(
    truth: pd.DataFrame, submission: pd.DataFrame, slice_shapes: Mapping[str, tuple[int, int]]
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    _require_columns(truth, ("id", "class", "segmentation"), "truth")
    _require_columns(submission, ("id", "class", "predicted"), "submission")
    unknown = sorted(set(truth["class"].unique()) - set(UWMGI_CLASSES))
    if unknown:
        raise InputError(f"truth has unknown class(es) {unknown}; expected {list(UWMGI_CLASSES)}")
    parsed = truth["id"].astype(str).str.extract(_UWMGI_ID)
    bad = parsed["case_day"].isna().to_numpy()
    if bad.any():
        raise InputError(
            f"truth id {truth['id'].iloc[int(np.argmax(bad))]!r} is not like "
            "'case123_day20_slice_0065'"
        )
    if submission.duplicated(["id", "class"]).any():
        raise InputError("submission has more than one row for some (id, class); validate it first")
    frame = truth[["id", "class", "segmentation"]].assign(
        case_day=parsed["case_day"].to_numpy(), slice_number=parsed["slice"].astype(int).to_numpy()
    )
    # A left merge keeps exactly the truth rows; a (slice, class) the submission lacks is empty.
    frame = frame.merge(submission[["id", "class", "predicted"]], on=["id", "class"], how="left")
    class_of = {name: index for index, name in enumerate(UWMGI_CLASSES)}
    for case_day, group in frame.groupby("case_day", sort=True):
        slice_numbers = np.unique(group["slice_number"].to_numpy())
        shapes = set()
        for slice_id in group["id"].unique():
            if slice_id not in slice_shapes:
                raise InputError(f"slice_shapes has no (H, W) for slice {slice_id!r}")
            shapes.add(tuple(int(n) for n in slice_shapes[slice_id]))
        if len(shapes) != 1:
            raise InputError(f"{case_day}: slices of different shapes {sorted(shapes)}")
        height, width = shapes.pop()
        shape = (slice_numbers.size, height, width, len(UWMGI_CLASSES))
        slice_index = np.searchsorted(slice_numbers, group["slice_number"].to_numpy())
        class_index = group["class"].map(class_of).to_numpy()
        yield (
            str(case_day),
            _paint_uwmgi_volume(group["segmentation"], slice_index, class_index, shape),
            _paint_uwmgi_volume(group["predicted"], slice_index, class_index, shape),
        )


def uwmgi_score_frames(
    truth: pd.DataFrame,
    submission: pd.DataFrame,
    slice_shapes: Mapping[str, tuple[int, int]],
    *,
    merged_classes: bool = False,
    dice: str | None = None,
    hausdorff: str | None = None,
) -> dict:
    """UW-Madison GI score of a submission frame against Kaggle's train.csv frame.

    truth: `id,class,segmentation` (id like `case123_day20_slice_0065`, class one of
    UWMGI_CLASSES, segmentation a row-major RLE, NaN / empty for no mask). submission:
    `id,class,predicted`, already validated; a truth (id, class) it lacks counts as empty and rows
    for other ids are ignored. slice_shapes: slice id -> (H, W). A volume is one case_day, its depth
    the number of its slices in the truth, ordered by slice number. `merged_classes`, `dice` and
    `hausdorff` as in `uwmgi_score_volumes`, which gives the result.
    """
    return uwmgi_score_volumes(
        _uwmgi_frame_volumes(truth, submission, slice_shapes),
        UWMGI_CLASSES,
        merged_classes=merged_classes,
        dice=dice,
        hausdorff=hausdorff,
    )


# ----------------------------------------------------------------------------- DSB 2018


def _consecutive_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel an instance map to 0 (background), 1..n in order of label value; returns n too."""
    labels = np.asarray(labels)
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"instance labels must be integers, got dtype {labels.dtype}")
    if labels.size == 0:
        return labels.astype(np.intp), 0
    if labels.min() < 0:
        raise InputError("instance labels must be >= 0 (0 = background)")
    top = int(labels.max())
    if top <= 4 * labels.size + 1024:
        # A lookup table beats np.unique's sort whenever labels are not absurdly sparse.
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=top + 1)[1:]) + 1
        lookup = np.zeros(top + 1, dtype=np.intp)
        lookup[present] = np.arange(1, present.size + 1)
        return lookup[labels], int(present.size)
    values, inverse = np.unique(labels, return_inverse=True)
    if values[0] != 0:
        return inverse.reshape(labels.shape) + 1, int(values.size)
    return inverse.reshape(labels.shape), int(values.size - 1)


def _dsb_precisions(
    truth_labels: np.ndarray, prediction_labels: np.ndarray
) -> tuple[np.ndarray, int, int]:
    truth_labels, prediction_labels = np.asarray(truth_labels), np.asarray(prediction_labels)
    if truth_labels.shape != prediction_labels.shape:
        raise InputError(
            f"truth labels {truth_labels.shape} and prediction labels "
            f"{prediction_labels.shape} differ in shape"
        )
    truth_index, n_truth = _consecutive_labels(truth_labels)
    prediction_index, n_prediction = _consecutive_labels(prediction_labels)
    if n_truth == 0 or n_prediction == 0:
        value = 1.0 if n_truth == n_prediction else 0.0
        return np.full(DSB_IOU_THRESHOLDS.size, value), n_truth, n_prediction
    # One bincount over (truth, prediction) label pairs is the whole contingency table, background
    # row and column included, so areas come from its margins.
    pairs = truth_index.ravel().astype(np.int64) * (n_prediction + 1) + prediction_index.ravel()
    table = np.bincount(pairs, minlength=(n_truth + 1) * (n_prediction + 1)).reshape(
        n_truth + 1, n_prediction + 1
    )
    truth_area = table.sum(axis=1)[1:]
    prediction_area = table.sum(axis=0)[1:]
    overlap = table[1:, 1:]
    truth_of, prediction_of = np.nonzero(overlap)
    intersection = overlap[truth_of, prediction_of]
    iou = intersection / (truth_area[truth_of] + prediction_area[prediction_of] - intersection)
    # Instances do not overlap, so IoU > 0.5 pairs an instance with at most one partner: counting
    # the pairs above a threshold t >= 0.5 counts the one-to-one matches.
    true_positives = np.count_nonzero(iou[None, :] > DSB_IOU_THRESHOLDS[:, None], axis=1)
    precisions = true_positives / (n_truth + n_prediction - true_positives)
    return precisions, n_truth, n_prediction


def dsb_image_precisions(truth_labels: np.ndarray, prediction_labels: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN) at each IoU threshold of DSB_IOU_THRESHOLDS -> [10] float.

    truth_labels, prediction_labels: integer instance maps [H, W], 0 = background, one label per
    instance (any non-negative values, not necessarily consecutive). A truth and a predicted
    instance match at threshold t when their IoU > t. Both without instances: all 1.0; exactly
    one without: all 0.0.
    """
    return _dsb_precisions(truth_labels, prediction_labels)[0]


def dsb_image_score(truth_labels: np.ndarray, prediction_labels: np.ndarray) -> float:
    """DSB 2018 score of one image: the mean of `dsb_image_precisions` over the 10 thresholds."""
    return float(_dsb_precisions(truth_labels, prediction_labels)[0].mean())


def dsb_thresholds() -> np.ndarray:
    """The IoU thresholds 0.50, 0.55, ..., 0.95 (a copy of DSB_IOU_THRESHOLDS)."""
    return DSB_IOU_THRESHOLDS.copy()


def _dsb_labels(rles: pd.Series, shape: tuple[int, int]) -> np.ndarray:
    keep = _non_empty(rles)
    if not keep.any():
        return np.zeros(shape, dtype=np.int32)
    return decode_rles_to_labels(rles.to_numpy()[keep].tolist(), shape, "F")


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
    _require_columns(truth, ("ImageId", "EncodedPixels"), "truth")
    _require_columns(submission, ("ImageId", "EncodedPixels"), "submission")
    predicted = {
        image_id: group["EncodedPixels"]
        for image_id, group in submission.groupby("ImageId", sort=False)
    }
    rows = []
    for image_id, group in truth.groupby("ImageId", sort=False):
        if image_id not in shapes:
            raise InputError(f"shapes has no (H, W) for image {image_id!r}")
        shape = tuple(int(n) for n in shapes[image_id])
        truth_labels = _dsb_labels(group["EncodedPixels"], shape)
        prediction_rles = predicted.get(image_id, pd.Series([], dtype=object))
        prediction_labels = _dsb_labels(prediction_rles, shape)
        precisions, n_truth, n_prediction = _dsb_precisions(truth_labels, prediction_labels)
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
