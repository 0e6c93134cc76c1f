"""How the folder competition reads a user's mask files: one class stored any common way
(0 / 1, 0 / 255, 0 / any value, 16-bit, a colour on black, JPEG), or class numbers, and a mask
value that is no class refused naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kaggle_seg.errors import InputError, KsegError


def mask_plane(mask: np.ndarray, path: str | Path, one_class: bool) -> np.ndarray:
    """[H, W] from a mask file's array: alpha dropped, grey stored as RGB read once; a colour
    mask (its channels differ) is one class wherever a channel is set, and is refused for
    several classes, whose numbers a colour cannot carry."""
    if mask.ndim == 2:
        return mask
    colour = mask[..., :3] if mask.shape[2] >= 3 else mask[..., :1]
    if (colour == colour[..., :1]).all():
        return colour[..., 0]
    if one_class:
        return colour.max(axis=-1)
    raise InputError(
        f"{path}: a colour mask (its channels differ); save each pixel's class number "
        "(1..K, or data.options.mask_values) as a grey image"
    )


def foreground_threshold(plane: np.ndarray, path: str | Path) -> int:
    """The lowest foreground value of a one-class mask plane: 1 in a 0 / 1 mask, else half
    the mask's own top value (0 / 255, 0 / 100, 16-bit 0 / 255 or 0 / 65535 alike; soft
    edges split at half). A JPEG's compression noise around 0 is no foreground: there the
    top must be a clear 64 or more."""
    top = int(plane.max())
    if top <= 1:
        return 1
    if Path(path).suffix.lower() in (".jpg", ".jpeg") and top < 64:
        return top + 1  # noise only: an empty mask
    return (top + 1) // 2


def mask_classes(
    mask: np.ndarray, path: str | Path, classes: tuple[str, ...], values: list[int] | None
) -> np.ndarray:
    """uint8 0/1 [H, W, K] from a mask file's array (see the module docstring); a pixel value
    that is no class is refused, naming the file."""
    k = len(classes)
    plane = mask_plane(mask, path, one_class=k == 1)
    if values is None and k == 1:
        return (plane >= foreground_threshold(plane, path)).astype(np.uint8)[..., None]
    values = values or list(range(1, k + 1))
    if len(values) != k:
        raise KsegError(f"folder: mask_values has {len(values)} value(s) for {k} class(es)")
    unknown = sorted(set(np.unique(plane).tolist()) - {0, *values})
    if unknown:
        raise InputError(
            f"{path}: mask value {unknown[0]} is no class (values {values} for "
            f"{', '.join(classes)}, 0 background)"
        )
    return np.stack([plane == v for v in values], axis=-1).astype(np.uint8)
