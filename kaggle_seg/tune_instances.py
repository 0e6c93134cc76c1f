"""`kseg tune` for instances (dsb2018): coordinate descent over the nuclei and border
thresholds, every `min_nucleus` of the grid scored on the same split, by the DSB mAP."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kaggle_seg.metrics import dsb_image_score
from kaggle_seg.postprocess import (
    PostprocessConfig,
    default_postprocess,
    instance_labels,
    postprocess_instances,
    remove_small_instances,
)
from kaggle_seg.probabilities import ProbabilityFile, decode_probabilities
from kaggle_seg.progress import make_progress
from kaggle_seg.search import IMPROVEMENT, THRESHOLD_GRID
from kaggle_seg.spec import BORDER
from kaggle_seg.tune_masks import Tuned

MIN_NUCLEUS_GRID: tuple[int, ...] = (0, 4, 8, 16, 32, 64)


class LazyProbabilities(Sequence[np.ndarray]):
    """float32 [K, H, W] probabilities of ids, decoded from their (mapped) OOF file on each
    access: nothing is held in memory."""

    def __init__(self, ids: Sequence[str], files: dict[str, ProbabilityFile]):
        self.ids, self.files = list(ids), files

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        image_id = self.ids[i]
        return decode_probabilities(self.files[image_id][image_id])


@dataclass
class InstanceData:
    """dsb2018 inputs: [K, H, W] probabilities (the nuclei channel, and the BORDER channel when
    `classes` names one; a LazyProbabilities reads them from the OOF on each access) and int32
    truth labels."""

    classes: list[str]
    probabilities: Sequence[np.ndarray]
    truths: list[np.ndarray]


def _instance_settings(classes: Sequence[str], threshold, border_threshold, min_nucleus):
    # Channels by name: the border's threshold for the BORDER channel, the nuclei's elsewhere.
    thresholds = [border_threshold if name == BORDER else threshold for name in classes]
    n = len(classes)
    return PostprocessConfig(
        classes=list(classes),
        thresholds=thresholds,
        min_area=[0] * n,
        gate_pixels=[0] * n,
        min_nucleus=min_nucleus,
    )


def search_instance_settings(
    data: InstanceData, rounds: int = 2
) -> tuple[PostprocessConfig, float]:
    """Coordinate descent over the nuclei threshold and (with a border channel) the border
    threshold; for each, every `min_nucleus` of the grid is scored on the same split."""
    has_border = BORDER in data.classes
    defaults = default_postprocess(data.classes)
    min_nuclei = sorted({*MIN_NUCLEUS_GRID, defaults.min_nucleus})
    tables: dict[tuple[float, float], dict[int, float]] = {}

    def scores(threshold: float, border_threshold: float) -> dict[int, float]:
        key = (threshold, border_threshold)
        if key not in tables:
            display.advance()
            settings = _instance_settings(data.classes, threshold, border_threshold, 0)
            per_image = {m: [] for m in min_nuclei}
            for probabilities, truth in zip(data.probabilities, data.truths, strict=True):
                labels = instance_labels(probabilities.astype(np.float32), settings)
                areas = np.bincount(labels.ravel())[1:]
                areas = areas[areas > 0]
                previous_removed, score = -1, math.nan
                for m in min_nuclei:  # ascending
                    # A larger minimum that drops no more nuclei leaves the same labels.
                    removed = int(np.count_nonzero(areas < m))
                    if removed != previous_removed:
                        score = dsb_image_score(truth, remove_small_instances(labels, m))
                        previous_removed = removed
                    per_image[m].append(score)
            tables[key] = {m: float(np.mean(v)) if v else 1.0 for m, v in per_image.items()}
        return tables[key]

    # At most one table per (threshold, border threshold) pair.
    n_pairs = len(THRESHOLD_GRID) ** (2 if has_border else 1)
    display = make_progress(n_pairs, "tune: search", "thresholds")
    current = {"threshold": 0.5, "border_threshold": 0.5, "min_nucleus": defaults.min_nucleus}
    best = scores(0.5, 0.5)[current["min_nucleus"]]
    names = ["threshold", *(["border_threshold"] if has_border else [])]
    for _ in range(rounds):
        improved = False
        for name in names:
            for value in THRESHOLD_GRID:
                candidate = {**current, name: value}
                table = scores(candidate["threshold"], candidate["border_threshold"])
                for min_nucleus, score in table.items():
                    if score > best + IMPROVEMENT:
                        best, improved = score, True
                        current = {**candidate, "min_nucleus": min_nucleus}
        if not improved:
            break
    display.finish()  # n_pairs was the most the search could take
    display.close()
    settings = _instance_settings(
        data.classes, current["threshold"], current["border_threshold"], current["min_nucleus"]
    )
    return settings, best


def score_instance_settings(
    data: InstanceData, settings: PostprocessConfig, what: str = "score"
) -> dict[str, float]:
    """DSB 2018 mAP of `postprocess_instances` under `settings`, averaged over the images."""
    display = make_progress(len(data.truths), f"tune: {what}", "images")
    scores = []
    for p, truth in zip(data.probabilities, data.truths, strict=True):
        scores.append(dsb_image_score(truth, postprocess_instances(p.astype(np.float32), settings)))
        display.advance()
    display.close()
    value = float(np.mean(scores)) if scores else 1.0
    return {"score": value, "map": value}


def tune_instance_settings(competition, rows, files, classes, rounds, class_probabilities=None):
    # The nuclei split has no per-class gate: a head's probabilities are not used.
    records = rows.to_dict("records")
    data = InstanceData(
        classes=list(classes),
        probabilities=LazyProbabilities([r["id"] for r in records], files),
        truths=[competition.read_instances(r) for r in records],
    )
    settings, _ = search_instance_settings(data, rounds=rounds)
    return Tuned(settings, data, score_instance_settings)
