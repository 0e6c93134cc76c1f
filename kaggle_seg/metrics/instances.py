"""The DSB 2018 score of instance label maps: the mean over IoU thresholds 0.50:0.05:0.95 of
TP / (TP + FP + FN), a match meaning IoU > t, from one contingency table per image."""

from __future__ import annotations

import numpy as np

from kaggle_seg.errors import InputError

# linspace + round: np.arange(0.5, 1.0, 0.05) gives 0.6000000000000001, which would turn an IoU of
# exactly 3/5 into a match at t = 0.6.
DSB_IOU_THRESHOLDS: np.ndarray = np.round(np.linspace(0.5, 0.95, 10), 2)


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


def instance_ious(
    truth_labels: np.ndarray, prediction_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The overlapping instance pairs of one image: (truth areas [n_truth], predicted areas
    [n_prediction], truth index [P], prediction index [P], IoU [P]), indices 0-based into the
    area arrays (instances renumbered in order of label value)."""
    truth_labels, prediction_labels = np.asarray(truth_labels), np.asarray(prediction_labels)
    if truth_labels.shape != prediction_labels.shape:
        raise InputError(
            f"truth labels {truth_labels.shape} and prediction labels "
            f"{prediction_labels.shape} differ in shape"
        )
    truth_index, n_truth = _consecutive_labels(truth_labels)
    prediction_index, n_prediction = _consecutive_labels(prediction_labels)
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
    return truth_area, prediction_area, truth_of, prediction_of, iou


def dsb_precisions_and_counts(
    truth_labels: np.ndarray, prediction_labels: np.ndarray
) -> tuple[np.ndarray, int, int]:
    """(`dsb_image_precisions`, truth instances, predicted instances) of one image."""
    truth_area, prediction_area, _, _, iou = instance_ious(truth_labels, prediction_labels)
    n_truth, n_prediction = truth_area.size, prediction_area.size
    if n_truth == 0 or n_prediction == 0:
        value = 1.0 if n_truth == n_prediction else 0.0
        return np.full(DSB_IOU_THRESHOLDS.size, value), n_truth, n_prediction
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
    return dsb_precisions_and_counts(truth_labels, prediction_labels)[0]


def dsb_image_score(truth_labels: np.ndarray, prediction_labels: np.ndarray) -> float:
    """DSB 2018 score of one image: the mean of `dsb_image_precisions` over the 10 thresholds."""
    return float(dsb_precisions_and_counts(truth_labels, prediction_labels)[0].mean())


def dsb_thresholds() -> np.ndarray:
    """The IoU thresholds 0.50, 0.55, ..., 0.95 (a copy of DSB_IOU_THRESHOLDS)."""
    return DSB_IOU_THRESHOLDS.copy()
