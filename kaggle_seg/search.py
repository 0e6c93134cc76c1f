"""The post-processing search of `kseg tune` for masks (uwmgi, lgg): pure, no file I/O.

Coordinate descent over small grids from the defaults (threshold 0.5, no rule), a change kept
only when it raises the score, as before; what changed is how a candidate is scored:

- One numba pass over the OOF (`collect_mask_stats`) gives, per slice and class, the histogram of
  probability levels inside and outside the truth and the components of every grid threshold's
  mask with their areas and overlaps (see `search_kernels`). A candidate's Dice then comes from
  counts: cumulative histogram sums when every component is kept, component sums for the minimum
  area and the largest component, slice flags for the gates and z-continuity.
- The uwmgi Hausdorff term is exact for a volume whose kept components were scored before (a
  signature of them keys a cache), 1 or skipped when one or both sides are empty, and otherwise
  bounded below: by each kept component's distance to the truth (at four extreme pixels), and by
  the directed distances of exactly scored rules whose masks contain or are contained in this
  one. A candidate whose score with those bounds cannot beat the best so far is passed over; the
  few left open get their masks built and their Hausdorff distances computed, in parallel over
  volumes. Passed-over candidates could not have been accepted, so the result is the exhaustive
  search's on the same grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kaggle_seg.postprocess import PostprocessConfig
from kaggle_seg.progress import make_progress
from kaggle_seg.search_scores import (
    BOUND_SLACK,
    ClassPart,
    ClassRule,
    FastMaskSearch,
    score_parts,
    settings_parts,
)
from kaggle_seg.search_stats import (
    THRESHOLD_GRID,
    ClassStats,
    MaskSource,
    collect_mask_stats,
    median_image_area,
)

# Pixel counts for a 256 x 256 image, scaled by the OOF images' median area.
MIN_AREA_GRID: tuple[int, ...] = (0, 16, 32, 64, 128, 256)
GATE_PIXELS_GRID: tuple[int, ...] = (0, 32, 64, 128, 256, 512, 1024)
# A class is emptied where the head's probability is below this; 0.0: off (no probability is).
GATE_PROBABILITY_GRID: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
REFERENCE_AREA = 256 * 256
# Score differences this small are float rounding, not an improvement: ties keep the default.
IMPROVEMENT = 1e-9


def describe_parts(
    parts: Sequence[ClassPart],
    classes: Sequence[str],
    volumetric: bool,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """The score and its parts as `kseg tune` reports them: uwmgi score, dice, hausdorff and
    dice_<class> / hausdorff_<class> (as `uwmgi_score_volumes` means them); lgg score (the mean
    per-patient Dice with `groups`), patient_dice and dice (the mean image Dice)."""
    score = score_parts(parts, volumetric, groups)
    if not volumetric:
        result = {"score": score, "dice": score_parts(parts, volumetric)}
        if groups is not None:
            result["patient_dice"] = score
        return result

    def mean(total: float, count: int, empty: float) -> float:
        return total / count if count else empty  # the metric's convention for nothing scored

    result = {
        "score": score,
        "dice": mean(sum(p.dice_sum for p in parts), sum(p.dice_count for p in parts), 1.0),
        "hausdorff": mean(
            sum(p.hausdorff_sum for p in parts), sum(p.hausdorff_count for p in parts), 0.0
        ),
    }
    for name, part in zip(classes, parts, strict=True):
        result[f"dice_{name}"] = mean(part.dice_sum, part.dice_count, 1.0)
        result[f"hausdorff_{name}"] = mean(part.hausdorff_sum, part.hausdorff_count, 0.0)
    return result


def scaled_grid(grid: Sequence[int], scale: float) -> list[int]:
    return sorted({round(value * scale) for value in grid})


@dataclass
class SearchReport:
    """What the mask search did: candidates seen, passed over on their bounds, scored exactly,
    and the distances it had to measure."""

    candidates: int = 0
    passed_over: int = 0
    scored: int = 0
    hausdorff_volumes: int = 0  # volumes whose prediction was built and measured in full
    overlap_volumes: int = 0  # (class, threshold, volume) whose overlapping mask was measured
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each stage


def search_mask_settings(
    search,
    classes: Sequence[str],
    *,
    median_area: float,
    with_heads: bool,
    tune_z: bool,
    rounds: int = 2,
    report: SearchReport | None = None,
) -> tuple[PostprocessConfig, float]:
    """Coordinate descent: per class threshold, min_area, gate_pixels (and gate_probability
    with a classification head); then largest_component (and z_continuity when `tune_z`) for
    all classes. A candidate is scored exactly only when its bound (`search.bound`) could beat
    the best so far. `search`: a FastMaskSearch, or anything with its bound / part / score.
    Returns the settings and their score."""
    report = report if report is not None else SearchReport()
    n_classes = len(classes)
    scale = median_area / REFERENCE_AREA if median_area else 1.0
    grids = {
        "threshold": list(THRESHOLD_GRID),
        "min_area": scaled_grid(MIN_AREA_GRID, scale),
        "gate_pixels": scaled_grid(GATE_PIXELS_GRID, scale),
    }
    if with_heads:
        grids["gate_probability"] = list(GATE_PROBABILITY_GRID)
    rules = [ClassRule() for _ in range(n_classes)]
    flags = {"largest_component": False, "z_continuity": False}
    flag_names = ["largest_component", *(["z_continuity"] if tune_z else [])]
    per_round = n_classes * sum(len(g) for g in grids.values()) + len(flag_names)
    display = make_progress(rounds * per_round, "tune: search", "candidates")

    def parts_for(rules, flags, exact: bool) -> list[ClassPart]:
        get = search.part if exact else search.bound
        return [
            get(k, rules[k], flags["largest_component"], flags["z_continuity"])
            for k in range(n_classes)
        ]

    def worth_scoring(parts: list[ClassPart], best: float) -> bool:
        report.candidates += 1
        if search.score(parts) + BOUND_SLACK > best + IMPROVEMENT:
            report.scored += 1
            return True
        report.passed_over += 1
        return False

    try:
        parts = parts_for(rules, flags, exact=True)
        best = search.score(parts)
        for _ in range(rounds):
            improved = False
            for k in range(n_classes):
                for name, grid in grids.items():
                    for value in grid:
                        display.advance()
                        candidate = dataclasses.replace(rules[k], **{name: value})
                        if candidate == rules[k]:
                            continue
                        largest, z_rule = flags["largest_component"], flags["z_continuity"]
                        bound = search.bound(k, candidate, largest, z_rule)
                        if not worth_scoring([*parts[:k], bound, *parts[k + 1 :]], best):
                            continue
                        part = search.part(k, candidate, largest, z_rule)
                        score = search.score([*parts[:k], part, *parts[k + 1 :]])
                        if score > best + IMPROVEMENT:
                            best, rules[k], improved = score, candidate, True
                            parts[k] = part
            for name in flag_names:
                display.advance()
                candidate_flags = {**flags, name: not flags[name]}
                if not worth_scoring(parts_for(rules, candidate_flags, exact=False), best):
                    continue
                candidate_parts = parts_for(rules, candidate_flags, exact=True)
                score = search.score(candidate_parts)
                if score > best + IMPROVEMENT:
                    best, flags, parts, improved = score, candidate_flags, candidate_parts, True
            if not improved:
                break
        display.finish()  # rounds * per_round was the most the search could take
    finally:
        display.close()
    report.hausdorff_volumes = getattr(search, "exact_volumes", 0)
    report.overlap_volumes = getattr(search, "overlap_volumes", 0)
    settings = PostprocessConfig(
        classes=list(classes),
        thresholds=[rule.threshold for rule in rules],
        min_area=[rule.min_area for rule in rules],
        gate_pixels=[rule.gate_pixels for rule in rules],
        gate_probability=(
            [rule.gate_probability for rule in rules]
            if any(rule.gate_probability > 0 for rule in rules)
            else None
        ),
        **flags,
    )
    return settings, best


__all__ = [
    "ClassPart",
    "ClassRule",
    "ClassStats",
    "FastMaskSearch",
    "MaskSource",
    "SearchReport",
    "collect_mask_stats",
    "describe_parts",
    "median_image_area",
    "score_parts",
    "search_mask_settings",
    "settings_parts",
]
