"""The "input" preprocessing steps (kaggle_seg/preprocess.py, e.g. zscore) as the last transform
of a pipeline, so training, validation and prediction standardise the exact model input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np

from kaggle_seg.preprocess import apply_steps, steps_of


class InputSteps(A.ImageOnlyTransform):
    """Resolved "input" preprocessing steps on a float32 [H, W, C] image, always applied."""

    def __init__(self, steps: Sequence[dict[str, Any]] = (), p: float = 1.0):
        super().__init__(p=p)
        self.steps = [dict(s) for s in steps]

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return apply_steps(img, self.steps)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("steps",)


def with_input_steps(transform: A.Compose, steps: Sequence[dict[str, Any]]) -> A.Compose:
    """`transform` (from `build_transforms`) with the "input" steps of `steps` appended; the same
    pipeline when there are none."""
    inputs = steps_of(steps, "input")
    if not inputs:
        return transform
    return A.Compose([*transform.transforms, InputSteps(inputs)])
