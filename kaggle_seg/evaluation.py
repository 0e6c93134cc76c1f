"""Scoring a validation fold from streamed predictions: pixel metrics plus the competition metric.

Predictions arrive one image at a time, in table order, at the image's own size. What is scored
follows the competition's `scoring` (competitions/base.py); slices of a competition scored by
volume (uwmgi case-days) are scored one volume at a time, so memory stays at one volume. Each
DDP rank scores its own share (whole volumes) and returns rows that `summarize_fold` merges on
rank 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
from kaggle_seg.spec import channel_indices


class FoldEvaluator:
    """Collects per-image metric rows (and per-volume rows where the competition scores
    volumes) for one validation pass.

    `truth_cache` keeps decoded truths between epochs (DSB nuclei come from many PNGs each).
    `outputs`: the names of the model's output channels (`ModelSpec.outputs`; default the
    competition's classes): the class masks are taken by name, as is a border channel.
    """

    def __init__(
        self,
        competition: Any,
        table: pd.DataFrame,
        truth_cache: dict | None = None,
        outputs: Sequence[str] | None = None,
    ):
        self.competition = competition
        self.table = table
        self.outputs = list(outputs) if outputs is not None else list(competition.classes)
        channels = channel_indices(self.outputs, competition.classes)
        # The usual layout (classes first) as a slice: a view, not a copy, of each prediction.
        leading = channels == list(range(len(channels)))
        self.mask_channels = slice(0, len(channels)) if leading else channels
        self.truth_cache = truth_cache if truth_cache is not None else {}
        self.image_rows: list[dict] = []
        self.volume_rows: list[pd.DataFrame] = []
        self._volume: list[tuple[np.ndarray, np.ndarray]] = []
        self._volume_name: str | None = None

    def _truth(self, position: int) -> np.ndarray:
        """uint8 [H, W, K] masks, or int32 [H, W] instance labels ("instances" scoring)."""
        if position in self.truth_cache:
            return self.truth_cache[position]
        truth = self.competition.read_truth(self.table.iloc[position])
        # Volumes are scored from RLE truths that decode in microseconds (uwmgi), and a whole
        # fold of them would hold gigabytes.
        if self.competition.scoring != "volumes":
            self.truth_cache[position] = truth
        return truth

    def add(self, position: int, probabilities: np.ndarray) -> None:
        """probabilities: float [K, H, W] at the image's own size, for table row `position`."""
        row = self.table.iloc[position]
        truth = self._truth(position)
        scoring = self.competition.scoring
        masks = binarize(probabilities[self.mask_channels])
        if scoring == "instances":
            union = (truth > 0).astype(np.uint8)
            metrics = pixel_metrics(union, masks[0])
            instances = split_instances(probabilities, channels=self.outputs)
            metrics["map"] = dsb_image_score(truth, instances)
        else:
            prediction = np.moveaxis(masks, 0, -1)
            metrics = pixel_metrics(truth, prediction)
            if scoring == "groups":  # scored per group (patient) volume
                metrics.update(pixel_counts(truth, prediction), patient=row["group"])
        self.image_rows.append({"id": row["id"], **metrics})
        if scoring == "volumes":
            volume = row[self.competition.volume_key]
            if self._volume_name is not None and volume != self._volume_name:
                self._flush_volume()
            self._volume_name = volume
            self._volume.append((truth, np.moveaxis(masks, 0, -1)))

    def _flush_volume(self) -> None:
        truth = np.stack([t for t, _ in self._volume])
        prediction = np.stack([p for _, p in self._volume])
        result = uwmgi_score_volumes(
            [(self._volume_name, truth, prediction)], self.competition.classes
        )
        self.volume_rows.append(result["per_volume"])
        self._volume = []

    def finish(self) -> dict[str, Any]:
        """This rank's rows: {"images": [...], "volumes": DataFrame or None}."""
        if self._volume:
            self._flush_volume()
        volumes = pd.concat(self.volume_rows, ignore_index=True) if self.volume_rows else None
        return {"images": self.image_rows, "volumes": volumes}


def summarize_fold(parts: Sequence[dict[str, Any]], competition: Any) -> dict[str, float]:
    """Merge the ranks' rows into fold metrics: pixel means over images, and `score` = the
    competition metric by its `scoring` (the GI score of volumes, the mean image mAP of
    instances, the mean per-group volume Dice of groups: the per-image mean `dice` counts each
    empty slice predicted empty as a perfect 1, so a model that predicts nothing would look
    good on a dataset of mostly empty slices; else the per-image mean Dice)."""
    images = pd.DataFrame([row for part in parts for row in part["images"]])
    if images.empty:
        return {}
    images = images.drop_duplicates("id")
    summary = {name: float(images[name].mean()) for name in PIXEL_METRICS}
    scoring = competition.scoring
    if scoring == "volumes":
        volumes = pd.concat([p["volumes"] for p in parts if p["volumes"] is not None])
        summary.update(uwmgi_score_from_volume_rows(volumes))
    elif scoring == "instances":
        summary["map"] = float(images["map"].mean())
        summary["score"] = summary["map"]
    elif "patient" in images.columns:
        summary["patient_dice"] = float(volume_dice(images, "patient").mean())
        summary["score"] = summary["patient_dice"]
    else:
        summary["score"] = summary["dice"]
    return summary


# The validation columns of each scoring kind beside the pixel metrics and `score`.
_EXTRA_METRICS: dict[str, tuple[str, ...]] = {
    "volumes": ("gi_dice", "hausdorff"),
    "instances": ("map",),
    "groups": (),
    "images": (),
}


def fold_metric_names(competition: Any) -> tuple[str, ...]:
    """The keys `summarize_fold` returns for a competition (history.csv's validation columns)."""
    return (*PIXEL_METRICS, "score", *_EXTRA_METRICS[competition.scoring])


def validation_pass(
    model: Any,
    loader: Any,
    evaluator: FoldEvaluator,
    spec: Any,
    losses: Callable[[Any, Any], tuple[Any, Any, Any]],
    *,
    device: Any,
    autocast: Callable[[], Any],
    channels_last: bool,
    tiled: bool,
    keep: bool,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One pass of `model` over a validation loader (batches of "image", "mask", "index"),
    inputs padded and tiled as the `ModelSpec` says, outputs restored to each image's size and
    scored by `evaluator`. `losses(outputs, masks)` -> (mask logits, loss, class BCE or None).

    Returns (this rank's part: the evaluator's rows with the summed loss (and class BCE) and
    the image count, for `summarize_validation`; with `keep`, probabilities [K, H, W] by id;
    class probabilities [K] by id for a model with a classification head)."""
    import torch

    from kaggle_seg.spec import forward_tiled, pad_to_divisor, restore_size

    table = evaluator.table
    tile = spec.tile_size if spec.resize_mode == "crop" and tiled else None
    model.eval()
    kept: dict[str, np.ndarray] = {}
    kept_classes: dict[str, np.ndarray] = {}
    loss_sum, class_bce_sum, n_images, with_head = 0.0, 0.0, 0, False
    with torch.inference_mode():
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True).float()
            images, height, width = pad_to_divisor(images, spec.divisor)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            masks = batch["mask"].to(device, non_blocking=True).float()
            with autocast():
                outputs = forward_tiled(model, images, tile, spec.tile_overlap, spec.divisor)
                if isinstance(outputs, tuple | list):
                    outputs = (outputs[0][..., :height, :width], outputs[1])
                else:
                    outputs = outputs[..., :height, :width]
                logits, loss, class_bce = losses(outputs, masks)
            loss_sum += loss.item() * images.shape[0]
            n_images += images.shape[0]
            probabilities = torch.sigmoid(logits.float()).cpu().numpy()
            positions = batch["index"].tolist()
            if class_bce is not None:
                with_head = True
                class_bce_sum += class_bce.item() * images.shape[0]
                heads = torch.sigmoid(outputs[1].float()).cpu().numpy()
                if keep:
                    for position, head in zip(positions, heads, strict=True):
                        kept_classes[table.iloc[position]["id"]] = head
            for position, probs in zip(positions, probabilities, strict=True):
                row = table.iloc[position]
                probs = restore_size(probs, int(row["height"]), int(row["width"]), spec.resize_mode)
                evaluator.add(position, probs)
                if keep:
                    kept[row["id"]] = probs
    part: dict[str, Any] = {**evaluator.finish(), "loss": (loss_sum, n_images)}
    if with_head:
        part["class_bce"] = (class_bce_sum, n_images)
    return part, kept, kept_classes


def summarize_validation(parts: Sequence[dict[str, Any]], competition: Any) -> dict[str, float]:
    """`summarize_fold` of the ranks' parts, with `valid_loss` (and `valid_class_bce`): the
    mean over every rank's images."""
    summary = summarize_fold(parts, competition)
    for name, column in (("loss", "valid_loss"), ("class_bce", "valid_class_bce")):
        if any(name in p for p in parts):
            total = sum(p[name][0] for p in parts if name in p)
            summary[column] = total / max(1, sum(p[name][1] for p in parts if name in p))
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
