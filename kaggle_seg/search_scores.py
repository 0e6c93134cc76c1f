"""The mask search's bookkeeping: what a per-class rule (threshold, minimum area, gate...) scores
on the OOF, from `collect_mask_stats`' statistics, without rebuilding the masks where the
statistics say it exactly (`FastMaskSearch`). Pure, no file I/O; `search.py` drives it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kaggle_seg import search_kernels as kernels
from kaggle_seg.metrics import UWMGI_DICE_WEIGHT, UWMGI_HAUSDORFF_WEIGHT, directed_hausdorff_3d
from kaggle_seg.postprocess import PostprocessConfig
from kaggle_seg.search_stats import (
    THRESHOLD_GRID,
    ClassStats,
    MaskSource,
    default_workers,
    largest_by_cv2,
    stored_dtype_code,
    stored_plane,
)

# Bounds are computed in floats too: a candidate is passed over only this far below the bar.
BOUND_SLACK = 1e-12


@dataclass(frozen=True)
class ClassRule:
    threshold: float = 0.5
    min_area: int = 0
    gate_pixels: int = 0
    gate_probability: float = 0.0


@dataclass
class ClassPart:
    """One class's share of the score under one setting.

    volumetric (uwmgi): running sums as `uwmgi_score_volumes` keeps them (in a bound,
    hausdorff_sum is a lower bound); per image (lgg): intersection and truth + prediction pixel
    counts of every image.
    """

    dice_sum: float = 0.0
    dice_count: int = 0
    hausdorff_sum: float = 0.0
    hausdorff_count: int = 0
    intersections: np.ndarray | None = None
    totals: np.ndarray | None = None


def _contained(inner: tuple, outer: tuple) -> bool:
    """Whether the mask of rule `inner` is inside that of `outer` in every slice: every field
    at least as strict, and, when `outer` keeps only the largest component, one threshold
    (the largest at another threshold need not lie in it). Rules are
    (threshold, min_area, gate_pixels, gate_probability, largest, z_continuity)."""
    if any(a < b for a, b in zip(inner, outer, strict=True)):
        return False
    return not (outer[4] and inner[0] != outer[0])


@dataclass
class _Evaluation:
    """evaluate_rule's results for one (class, rule, largest, z) (see search_kernels)."""

    predicted: np.ndarray
    overlap: np.ndarray
    modes: np.ndarray
    arguments: np.ndarray
    signatures: np.ndarray
    farthest: np.ndarray
    nearest_outside: np.ndarray
    keeps_overlapping: np.ndarray


@dataclass
class _Directed:
    """Directed Hausdorff distances of one exactly scored rule, per volume (NaN: unknown, or
    not both present)."""

    key: tuple
    truth_to_prediction: np.ndarray
    prediction_to_truth: np.ndarray


def score_parts(
    parts: Sequence[ClassPart], volumetric: bool, groups: np.ndarray | None = None
) -> float:
    """The competition score of all classes' parts: the uwmgi GI score; or, per image (lgg),
    the mean Dice of the `groups` (an int per image, e.g. its patient: each group's pixels
    pooled, the per-patient volume Dice training reports), else the mean image Dice."""
    if volumetric:
        dice_count = sum(p.dice_count for p in parts)
        hausdorff_count = sum(p.hausdorff_count for p in parts)
        dice = sum(p.dice_sum for p in parts) / dice_count if dice_count else 1.0
        hausdorff = (
            sum(p.hausdorff_sum for p in parts) / hausdorff_count if hausdorff_count else 0.0
        )
        return UWMGI_DICE_WEIGHT * dice + UWMGI_HAUSDORFF_WEIGHT * (1.0 - hausdorff)
    intersections = sum(p.intersections for p in parts)
    totals = sum(p.totals for p in parts)
    if groups is not None and len(groups):
        intersections = np.bincount(groups, weights=intersections)
        totals = np.bincount(groups, weights=totals)
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(totals == 0, 1.0, 2.0 * intersections / totals)
    return float(dice.mean()) if dice.size else 1.0


class FastMaskSearch:
    """Scores of per-class rules from `collect_mask_stats`' statistics: `bound` (Dice exact,
    Hausdorff bounded below where not known) and `part` (exact).

    A volume's Hausdorff distance under a rule is the larger of two directed distances. The
    prediction -> truth one is exact from the statistics (the farthest kept component). The
    truth -> prediction one is exact when every component overlapping the truth is kept (a
    mask Q) and no kept component outside the truth comes nearer to it than Q's distance,
    or bounded by Q's when the prediction -> truth distance exceeds it: Q's distance is
    computed once per (class, threshold, volume). The rest are built and measured in full.
    """

    def __init__(
        self,
        source: MaskSource,
        stats: list[ClassStats],
        volumetric: bool,
        *,
        grid: Sequence[float] = THRESHOLD_GRID,
        workers: int | None = None,
        groups: np.ndarray | None = None,
    ):
        self.source, self.stats, self.volumetric = source, stats, volumetric
        self.groups = groups  # per image (lgg): the patient each image's pixels pool into
        self.grid = [float(t) for t in grid]
        self.workers = workers or default_workers()
        self.table = kernels.level_table(np.dtype(source.dtype), np.asarray(grid))
        starts = source.volume_starts[:-1]
        self.truth_any = [
            np.add.reduceat(s.truth_area, starts) > 0 if len(starts) else np.zeros(0, bool)
            for s in stats
        ]
        heads = source.class_probabilities
        n = source.n_slices
        self.heads = None if heads is None else np.asarray(heads, np.float64).reshape(n, -1)
        self._volume_of = np.repeat(np.arange(source.n_volumes), np.diff(source.volume_starts))
        self._evaluations: dict[tuple, _Evaluation] = {}
        self._parts: dict[tuple, ClassPart] = {}
        # Per class and volume: kept-component signature -> (distance, truth -> prediction,
        # prediction -> truth), NaN where a directed one is not known.
        self._cache = [[{} for _ in range(source.n_volumes)] for _ in stats]
        self._overlapping: dict[tuple[int, int, int], float] = {}
        self._directed: list[list[_Directed]] = [[] for _ in stats]
        self.exact_volumes = 0  # volumes whose masks were built and measured
        self.overlap_volumes = 0  # (class, threshold, volume) whose overlapping mask was

    def _threshold_index(self, threshold: float) -> int:
        try:
            return self.grid.index(float(threshold))
        except ValueError:
            raise ValueError(f"threshold {threshold} is not on the grid {self.grid}") from None

    def _resolve_ties(self, k: int, j: int) -> None:
        """Make largest[:, j] of class k the component cv2 labels first where areas tie."""
        s = self.stats[k]
        for i in np.flatnonzero(s.tied[:, j]):
            v = int(self._volume_of[i])
            data = self.source.read_slices(v)
            z = int(i - self.source.volume_starts[v])
            plane = stored_plane(data, self.source.shapes[v], z, k, len(self.source.classes))
            block = s.records[s.starts[i, j] : s.starts[i, j] + s.counts[i, j]]
            s.largest[i, j] = largest_by_cv2(plane, self.table, j, block)
            s.tied[i, j] = False

    def _evaluate(self, k: int, rule: ClassRule, largest: bool, z_rule: bool) -> _Evaluation:
        key = (k, rule, largest, z_rule)
        if key not in self._evaluations:
            j = self._threshold_index(rule.threshold)
            if largest:
                self._resolve_ties(k, j)
            s = self.stats[k]
            if self.heads is None:
                gated = np.zeros(self.source.n_slices, dtype=bool)
            else:
                gated = self.heads[:, k] < rule.gate_probability
            self._evaluations[key] = _Evaluation(
                *kernels.evaluate_rule(
                    j,
                    int(rule.min_area),
                    int(rule.gate_pixels),
                    gated,
                    largest,
                    z_rule,
                    self.source.volume_starts,
                    s.hist,
                    s.records,
                    s.distances,
                    s.starts,
                    s.counts,
                    s.largest,
                )
            )
        return self._evaluations[key]

    def _lower_bounds(self, k: int, key: tuple) -> np.ndarray:
        """Per volume, the best lower bound on the Hausdorff distance from exactly scored rules
        whose masks contain or lie inside this one (0 where none tells)."""
        bound = np.zeros(self.source.n_volumes)
        for done in self._directed[k]:
            if _contained(key, done.key):  # inside: at least as far from the truth's voxels
                np.fmax(bound, done.truth_to_prediction, out=bound)
            if _contained(done.key, key):  # contains it: its voxels at least as far
                np.fmax(bound, done.prediction_to_truth, out=bound)
        return bound

    def _known(self, k: int, evaluation: _Evaluation, v: int) -> tuple | None:
        return self._cache[k][v].get(tuple(evaluation.signatures[v]))

    def _assemble(self, k: int, rule: ClassRule, largest: bool, z_rule: bool, exact: bool):
        """(part, open volumes): with exact=False the part has bounds where a distance is not
        known; with exact=True only the volumes still to measure are listed."""
        evaluation = self._evaluate(k, rule, largest, z_rule)
        truth_area = self.stats[k].truth_area
        part = ClassPart()
        if not self.volumetric:
            part.intersections = evaluation.overlap.copy()
            part.totals = truth_area + evaluation.predicted
            return part, []
        rule_key = (*dataclasses.astuple(rule), largest, z_rule)
        bounds = None
        open_volumes = []
        starts = self.source.volume_starts
        for v in range(self.source.n_volumes):
            first, stop = starts[v], starts[v + 1]
            truth = truth_area[first:stop]
            predicted = evaluation.predicted[first:stop]
            total = truth + predicted
            scored = total > 0
            # As uwmgi_score_volumes sums them: the Dice of the slices not both empty, in order.
            dice = 2.0 * evaluation.overlap[first:stop][scored] / total[scored]
            part.dice_sum += float(dice.sum())
            part.dice_count += dice.size
            truth_any, predicted_any = self.truth_any[k][v], bool(predicted.any())
            if not truth_any and not predicted_any:
                continue
            if truth_any != predicted_any:
                distance = 1.0
            else:
                known = self._known(k, evaluation, v)
                if known is not None:
                    distance = known[0]
                else:
                    open_volumes.append(v)
                    if exact:
                        continue
                    if bounds is None:
                        bounds = self._lower_bounds(k, rule_key)
                    # prediction -> truth is exact: the farthest kept component.
                    distance = max(bounds[v], evaluation.farthest[v]) - BOUND_SLACK
            part.hausdorff_sum += distance
            part.hausdorff_count += 1
        return part, open_volumes

    def bound(self, k: int, rule: ClassRule, largest: bool, z_rule: bool) -> ClassPart:
        """The class's part with its Dice exact and its Hausdorff sum a lower bound."""
        key = (k, rule, largest, z_rule)
        if key in self._parts:
            return self._parts[key]
        return self._assemble(k, rule, largest, z_rule, exact=False)[0]

    def part(self, k: int, rule: ClassRule, largest: bool, z_rule: bool) -> ClassPart:
        """The class's exact part: the distances not known are found, in parallel."""
        key = (k, rule, largest, z_rule)
        if key in self._parts:
            return self._parts[key]
        _, open_volumes = self._assemble(k, rule, largest, z_rule, exact=True)
        evaluation = self._evaluate(k, rule, largest, z_rule)
        if open_volumes:
            j = self._threshold_index(rule.threshold)
            with ThreadPoolExecutor(self.workers) as pool:
                found = list(pool.map(lambda v: self._distances(k, j, evaluation, v), open_volumes))
            for v, distances in zip(open_volumes, found, strict=True):
                self._cache[k][v][tuple(evaluation.signatures[v])] = distances
        part, still_open = self._assemble(k, rule, largest, z_rule, exact=True)
        assert not still_open
        if self.volumetric:
            self._directed[k].append(self._directed_arrays(k, evaluation, rule, largest, z_rule))
        self._parts[key] = part
        return part

    def _distances(self, k: int, j: int, evaluation: _Evaluation, v: int) -> tuple:
        """(distance, truth -> prediction, prediction -> truth) of one volume, both sides
        present: from the statistics and Q's distance where they decide, else measured."""
        to_truth = float(evaluation.farthest[v])
        if evaluation.keeps_overlapping[v]:
            to_overlapping = self._overlapping_distance(k, j, v)
            if evaluation.nearest_outside[v] >= to_overlapping:  # Q's nearest voxels stay so
                return max(to_overlapping, to_truth), to_overlapping, to_truth
            if to_truth >= to_overlapping:  # truth -> prediction is at most Q's
                return to_truth, math.nan, to_truth
        first, stop = self.source.volume_starts[v], self.source.volume_starts[v + 1]
        modes = evaluation.modes[first:stop]
        arguments = evaluation.arguments[first:stop]
        prediction, truth = self._build(k, j, v, modes, arguments)
        self.exact_volumes += 1
        to_prediction, to_truth = directed_hausdorff_3d(truth, prediction)
        return max(to_prediction, to_truth), to_prediction, to_truth

    def _build(self, k: int, j: int, v: int, modes: np.ndarray, arguments: np.ndarray):
        """(prediction bool [D, H, W], truth uint8 [D, H, W]) of class k in volume v."""
        buffer, offsets, dtype = self.source.read_slices(v)
        height, width = self.source.shapes[v]
        truth = np.ascontiguousarray(self.source.read_truth(v)[k], dtype=np.uint8)
        prediction = np.empty((len(offsets), height, width), dtype=bool)
        kernels.build_prediction(
            buffer,
            offsets,
            stored_dtype_code(dtype),
            self.table,
            height,
            width,
            k,
            j,
            modes,
            arguments,
            truth,
            prediction,
        )
        return prediction, truth

    def _overlapping_distance(self, k: int, j: int, v: int) -> float:
        """truth -> Q distance, Q the components at threshold j overlapping the truth (inf when
        there are none)."""
        key = (k, j, v)
        if key not in self._overlapping:
            depth = int(self.source.volume_starts[v + 1] - self.source.volume_starts[v])
            modes = np.full(depth, kernels.KEEP_OVERLAPPING, dtype=np.int8)
            prediction, truth = self._build(k, j, v, modes, np.zeros(depth, np.int64))
            self.overlap_volumes += 1
            if not prediction.any():
                self._overlapping[key] = math.inf
            else:
                self._overlapping[key] = directed_hausdorff_3d(truth, prediction)[0]
        return self._overlapping[key]

    def _directed_arrays(self, k, evaluation, rule, largest, z_rule) -> _Directed:
        n_volumes = self.source.n_volumes
        to_prediction, to_truth = np.full(n_volumes, np.nan), np.full(n_volumes, np.nan)
        for v in range(n_volumes):
            known = self._known(k, evaluation, v)
            if known is not None:
                to_prediction[v], to_truth[v] = known[1], known[2]
        key = (*dataclasses.astuple(rule), largest, z_rule)
        return _Directed(key, to_prediction, to_truth)

    def score(self, parts: Sequence[ClassPart]) -> float:
        """The competition score of all classes' parts (uwmgi GI score, or mean image Dice)."""
        return score_parts(parts, self.volumetric, self.groups)

    def score_settings(self, settings: PostprocessConfig) -> float:
        """The score of full settings by this bookkeeping."""
        return self.score(settings_parts(self, settings))


def settings_parts(search, settings: PostprocessConfig) -> list[ClassPart]:
    """The exact parts of full settings, one per class."""
    gates = settings.gate_probability or [0.0] * len(settings.classes)
    return [
        search.part(
            k,
            ClassRule(
                settings.thresholds[k],
                settings.min_area[k],
                settings.gate_pixels[k],
                float(gates[k]),
            ),
            settings.largest_component,
            settings.z_continuity,
        )
        for k in range(len(settings.classes))
    ]
