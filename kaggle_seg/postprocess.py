"""From probabilities to masks: thresholds, small components, DSB instance split."""

from __future__ import annotations

import numpy as np


def binarize(probabilities: np.ndarray, threshold: float | np.ndarray = 0.5) -> np.ndarray:
    """[K, H, W] probabilities -> uint8 [K, H, W] masks (per-class thresholds broadcast)."""
    threshold = np.asarray(threshold, dtype=np.float32).reshape(-1, 1, 1)
    return (probabilities > threshold).astype(np.uint8)


def split_instances(
    probabilities: np.ndarray, threshold: float = 0.5, min_size: int = 8
) -> np.ndarray:
    """DSB nuclei: [K, H, W] probabilities (channel 0 mask, optional channel 1 border) -> int32
    label map [H, W], 0 = background, no overlaps.

    With a border channel, seeds are the mask minus the borders, grown back over the mask by a
    watershed on the mask probability, so touching nuclei come apart. Without it, connected
    components. Nuclei smaller than `min_size` pixels are dropped.
    """
    from skimage.measure import label
    from skimage.segmentation import watershed

    mask = probabilities[0] > threshold
    if probabilities.shape[0] > 1:
        seeds = label(mask & (probabilities[1] < threshold), connectivity=1)
        labels = watershed(-probabilities[0], seeds, mask=mask)
    else:
        labels = label(mask, connectivity=1)
    return remove_small_instances(labels.astype(np.int32), min_size)


def remove_small_instances(labels: np.ndarray, min_size: int) -> np.ndarray:
    """int label map [H, W] with instances of fewer than `min_size` pixels set to 0."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    if small.any():
        labels = np.where(small[labels], 0, labels).astype(labels.dtype)
    return labels
