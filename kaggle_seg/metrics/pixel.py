"""Pixel metrics: Dice, IoU, precision, recall and accuracy of binary masks, per image or
pooled over a volume.

Zero-denominator convention (pixel metrics and empty aggregates): a ratio whose denominator is 0
is 1.0 when there was nothing to find and nothing was predicted wrongly, else 0.0. For example
precision with no predicted pixel is 1.0 on an empty truth and 0.0 when the truth has pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from kaggle_seg.errors import InputError

PIXEL_METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "accuracy")


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
