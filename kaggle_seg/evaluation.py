"""Scoring a validation fold from streamed predictions: pixel metrics plus the competition metric.

Predictions arrive one image at a time, in table order, at the image's own size. uwmgi slices are
scored one case-day volume at a time, so memory stays at one volume. Each DDP rank scores its own
share (whole case-days) and returns rows that `summarize_fold` merges on rank 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from kaggle_seg.metrics import (
    PIXEL_METRICS,
    dsb_image_score,
    pixel_counts,
    pixel_metrics,
    uwmgi_score_volumes,
    volume_dice,
)
from kaggle_seg.postprocess import binarize, split_instances


class FoldEvaluator:
    """Collects per-image metric rows (and uwmgi per-volume rows) for one validation pass.

    `truth_cache` keeps decoded truths between epochs (DSB nuclei come from many PNGs each).
    """

    def __init__(self, competition: Any, table: pd.DataFrame, truth_cache: dict | None = None):
        self.competition = competition
        self.table = table
        self.truth_cache = truth_cache if truth_cache is not None else {}
        self.image_rows: list[dict] = []
        self.volume_rows: list[pd.DataFrame] = []
        self._volume: list[tuple[np.ndarray, np.ndarray]] = []
        self._case_day: str | None = None

    def _truth(self, position: int) -> np.ndarray:
        """uint8 [H, W, K] masks, or int32 [H, W] instance labels for dsb2018."""
        if position in self.truth_cache:
            return self.truth_cache[position]
        row = self.table.iloc[position]
        if self.competition.name == "dsb2018":
            truth = self.competition.read_instances(row)
        else:
            truth = self.competition.read_mask(row)
        if self.competition.name != "uwmgi":  # uwmgi truths decode from RLE in microseconds
            self.truth_cache[position] = truth
        return truth

    def add(self, position: int, probabilities: np.ndarray) -> None:
        """probabilities: float [K, H, W] at the image's own size, for table row `position`."""
        row = self.table.iloc[position]
        truth = self._truth(position)
        masks = binarize(probabilities[: len(self.competition.classes)])
        if self.competition.name == "dsb2018":
            union = (truth > 0).astype(np.uint8)
            metrics = pixel_metrics(union, masks[0])
            metrics["map"] = dsb_image_score(truth, split_instances(probabilities))
        else:
            prediction = np.moveaxis(masks, 0, -1)
            metrics = pixel_metrics(truth, prediction)
            if self.competition.name == "lgg":  # scored per patient volume
                metrics.update(pixel_counts(truth, prediction), patient=row["group"])
        self.image_rows.append({"id": row["id"], **metrics})
        if self.competition.name == "uwmgi":
            if self._case_day is not None and row["case_day"] != self._case_day:
                self._flush_volume()
            self._case_day = row["case_day"]
            self._volume.append((truth, np.moveaxis(masks, 0, -1)))

    def _flush_volume(self) -> None:
        truth = np.stack([t for t, _ in self._volume])
        prediction = np.stack([p for _, p in self._volume])
        result = uwmgi_score_volumes(
            [(self._case_day, truth, prediction)], self.competition.classes
        )
        self.volume_rows.append(result["per_volume"])
        self._volume = []

    def finish(self) -> dict[str, Any]:
        """This rank's rows: {"images": [...], "volumes": DataFrame or None}."""
        if self._volume:
            self._flush_volume()
        volumes = pd.concat(self.volume_rows, ignore_index=True) if self.volume_rows else None
        return {"images": self.image_rows, "volumes": volumes}


def summarize_fold(parts: Sequence[dict[str, Any]], competition_name: str) -> dict[str, float]:
    """Merge the ranks' rows into fold metrics: pixel means over images, and `score` = the
    competition metric (uwmgi score, DSB mAP, LGG mean per-patient volume Dice: the per-image
    mean `dice` counts each empty slice predicted empty as a perfect 1, so a model that predicts
    nothing would look good on a dataset of mostly empty slices)."""
    images = pd.DataFrame([row for part in parts for row in part["images"]])
    if images.empty:
        return {}
    images = images.drop_duplicates("id")
    summary = {name: float(images[name].mean()) for name in PIXEL_METRICS}
    if competition_name == "uwmgi":
        volumes = pd.concat([p["volumes"] for p in parts if p["volumes"] is not None])
        summary.update(uwmgi_score_from_volume_rows(volumes))
    elif competition_name == "dsb2018":
        summary["map"] = float(images["map"].mean())
        summary["score"] = summary["map"]
    elif "patient" in images.columns:
        summary["patient_dice"] = float(volume_dice(images, "patient").mean())
        summary["score"] = summary["patient_dice"]
    else:
        summary["score"] = summary["dice"]
    return summary


def uwmgi_score_from_volume_rows(volumes: pd.DataFrame) -> dict[str, float]:
    """The uwmgi score from `uwmgi_score_volumes` per-volume rows gathered from several ranks."""
    from kaggle_seg.metrics import UWMGI_DICE_WEIGHT, UWMGI_HAUSDORFF_WEIGHT

    counts = volumes["n_dice_slices"].to_numpy()
    dice_sum = float(np.nansum(volumes["dice"].to_numpy() * counts))
    dice = dice_sum / counts.sum() if counts.sum() else 1.0
    hausdorff = volumes["hausdorff"].dropna()
    hausdorff_mean = float(hausdorff.mean()) if len(hausdorff) else 0.0
    score = UWMGI_DICE_WEIGHT * dice + UWMGI_HAUSDORFF_WEIGHT * (1.0 - hausdorff_mean)
    return {"score": float(score), "gi_dice": float(dice), "hausdorff": hausdorff_mean}
