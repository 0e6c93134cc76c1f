"""Probabilities from checkpoints: undoing the input geometry (TTA and ensembles build on this)."""

from __future__ import annotations

import numpy as np


def restore_size(
    probabilities: np.ndarray, height: int, width: int, resize_mode: str
) -> np.ndarray:
    """[K, h, w] probabilities at the model's input size -> [K, height, width] at the image's own.

    "pad": crop the centre, undoing the symmetric padding of the validation transform;
    "resize": bilinear resize back.
    """
    _, h, w = probabilities.shape
    if (h, w) == (height, width):
        return probabilities
    if resize_mode == "pad":
        from kaggle_seg.data.transforms import pad_offsets

        top, left = pad_offsets(height, width, h, w)
        return probabilities[:, top : top + height, left : left + width]
    import cv2

    resized = cv2.resize(np.moveaxis(probabilities, 0, -1), (width, height),
                         interpolation=cv2.INTER_LINEAR)  # fmt: skip
    return resized[None] if resized.ndim == 2 else np.moveaxis(resized, -1, 0)
