"""`kseg tune`: post-processing settings chosen on out-of-fold probabilities by the competition
metric itself (uwmgi GI score, DSB 2018 mAP, LGG mean Dice), written to
`runs/<exp>/postprocess.json` for `kseg submit`.

The search is coordinate descent over small grids, starting from the defaults (threshold 0.5, no
rule) and accepting a change only when it raises the score, so the chosen settings never score
below the defaults on the OOF images. For uwmgi / lgg a class's score only depends on its own
masks, and every rule but the threshold only decides which connected components survive: the
components of each (class, threshold) are found once, with their areas and their overlap with the
truth, so Dice needs no mask at all and only the 3D Hausdorff of a case-day whose masks changed is
recomputed. With a classification head's out-of-fold class probabilities (oof_classes.npz in every
fold) the per-class `gate_probability` is searched too: it only decides whether a whole (image,
class) mask survives, so it is one more filter on the kept components. The before / after numbers
come from the public path (`postprocess_masks`, `apply_z_continuity`, `postprocess_instances` and
the metric functions), not from the search's bookkeeping.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import ValidationError

from kaggle_seg import paths
from kaggle_seg.competitions import get_competition
from kaggle_seg.config import ExperimentConfig
from kaggle_seg.errors import KsegError
from kaggle_seg.metrics import (
    UWMGI_DICE_WEIGHT,
    UWMGI_HAUSDORFF_WEIGHT,
    dsb_image_score,
    hausdorff_3d,
    pixel_metrics,
    uwmgi_score_volumes,
)
from kaggle_seg.paths import POSTPROCESS_FILE
from kaggle_seg.postprocess import (
    PostprocessConfig,
    apply_z_continuity,
    default_postprocess,
    instance_labels,
    mask_components,
    postprocess_instances,
    postprocess_masks,
    remove_small_instances,
    save_postprocess,
    select_components,
    z_continuous,
)

THRESHOLD_GRID: tuple[float, ...] = tuple(float(t) for t in np.round(np.linspace(0.3, 0.7, 9), 2))
# Pixel counts for a 256 x 256 image, scaled by the OOF images' median area.
MIN_AREA_GRID: tuple[int, ...] = (0, 16, 32, 64, 128, 256)
GATE_PIXELS_GRID: tuple[int, ...] = (0, 32, 64, 128, 256, 512, 1024)
# A class is emptied where the head's probability is below this; 0.0: off (no probability is).
GATE_PROBABILITY_GRID: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_NUCLEUS_GRID: tuple[int, ...] = (0, 4, 8, 16, 32, 64)
REFERENCE_AREA = 256 * 256
# Score differences this small are float rounding, not an improvement: ties keep the default.
IMPROVEMENT = 1e-9
_FOLD_DIR = re.compile(r"^fold_(\d+)$")


@dataclass
class TuneResult:
    """What `kseg tune` reports: the metric with default and with chosen settings (`score` and
    its parts: uwmgi dice / hausdorff overall and per class, dsb2018 map, lgg dice)."""

    before: dict[str, float]
    after: dict[str, float]
    settings: PostprocessConfig
    n_images: int
    folds: list[int]
    path: Path | None = field(default=None)  # where the settings were written


# ----------------------------------------------------------------------------- inputs


def oof_folds(experiment_dir: Path) -> list[tuple[int, Path]]:
    """(fold, fold folder) of every `fold_<k>/` of the experiment holding an oof.npz, by fold."""
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise KsegError(f"{experiment_dir}: experiment folder not found")
    folds = []
    for folder in experiment_dir.iterdir():
        match = _FOLD_DIR.match(folder.name)
        if match and (folder / paths.OOF_FILE).is_file():
            folds.append((int(match.group(1)), folder))
    if not folds:
        raise KsegError(
            f"no out-of-fold predictions in {experiment_dir}: train with kseg train first"
        )
    return sorted(folds)


def read_fold_config(fold_dir: Path) -> ExperimentConfig:
    """The resolved config a fold was trained with (`fold_<k>/config.yaml`)."""
    path = Path(fold_dir) / paths.CONFIG_FILE
    if not path.is_file():
        raise KsegError(f"{path}: resolved config not found beside the fold's predictions")
    try:
        return ExperimentConfig.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as exc:
        raise KsegError(f"{path}: not a valid experiment config ({exc})") from exc


def model_classes(config: ExperimentConfig) -> list[str]:
    """Names of the channels a model of this config outputs (as its checkpoint lists them)."""
    classes = list(get_competition(config.data.competition).classes)
    return [*classes, "border"] if config.data.targets == "mask_border" else classes


def _experiment_config(folds: Sequence[tuple[int, Path]]) -> ExperimentConfig:
    configs = [(fold_dir, read_fold_config(fold_dir)) for _, fold_dir in folds]
    first_dir, first = configs[0]
    for fold_dir, config in configs[1:]:
        for what in ("competition", "table", "targets"):
            if getattr(config.data, what) != getattr(first.data, what):
                raise KsegError(
                    f"{fold_dir / paths.CONFIG_FILE}: data.{what} "
                    f"{getattr(config.data, what)!r} differs from {first_dir.name}'s "
                    f"{getattr(first.data, what)!r}: tune one experiment at a time"
                )
    return first


def _table_path(config: ExperimentConfig, experiment_dir: Path) -> Path:
    if config.data.table is None:
        raise KsegError(f"{experiment_dir}: the fold config sets no data.table to score against")
    table = Path(config.data.table)
    if table.is_file() or table.is_absolute():
        return table
    # Relative to where training ran: the current directory, or the root above runs/<exp>/.
    beside = Path(experiment_dir).resolve().parent.parent / table
    return beside if beside.is_file() else table


def _oof_ids(path: Path) -> list[str]:
    # An npz lists its arrays without decompressing them: the ids, to subsample before loading.
    with np.load(path) as data:
        return list(data.files)


def _select_groups(
    table: pd.DataFrame, group_column: str, max_images: int | None, seed: int
) -> pd.DataFrame:
    """Whole groups drawn at random until `max_images` rows (at least one group)."""
    if max_images is None or len(table) <= max_images:
        return table
    if max_images < 1:
        raise KsegError(f"--max-images {max_images}: need at least 1")
    sizes = table.groupby(group_column, sort=True).size()
    order = np.random.default_rng(seed).permutation(len(sizes))
    chosen, total = [], 0
    for index in order:
        if chosen and total + int(sizes.iloc[index]) > max_images:
            continue
        chosen.append(sizes.index[index])
        total += int(sizes.iloc[index])
    return table[table[group_column].isin(chosen)]


def _compact(probabilities: np.ndarray) -> np.ndarray:
    """float16 when that holds the values exactly (OOF saved as float16), else float32."""
    half = probabilities.astype(np.float16)
    return half if np.array_equal(half, probabilities) else probabilities


def _load_class_probabilities(
    folds: Sequence[tuple[int, Path]], table: pd.DataFrame, classes: Sequence[str]
) -> dict[str, np.ndarray] | None:
    """id -> float32 [K] head probabilities of the table's rows when every fold has an
    oof_classes.npz (a model with a classification head), else None."""
    from kaggle_seg.probabilities import load_class_oof

    if not all((fold_dir / paths.OOF_CLASSES_FILE).is_file() for _, fold_dir in folds):
        return None
    wanted = set(table["id"])
    found: dict[str, np.ndarray] = {}
    for _, fold_dir in folds:
        path = fold_dir / paths.OOF_CLASSES_FILE
        for image_id, array in load_class_oof(path).items():
            if image_id not in wanted:
                continue
            if array.shape != (len(classes),):
                raise KsegError(
                    f"{path}: {image_id} has class probabilities {array.shape}, expected "
                    f"({len(classes)},) ({', '.join(classes)})"
                )
            found[image_id] = array
    missing = wanted - set(found)
    if missing:
        raise KsegError(
            f"{len(missing)} image(s) with out-of-fold masks have no class probabilities in "
            f"{paths.OOF_CLASSES_FILE}, first {sorted(missing)[0]!r}"
        )
    return found


def _load_probabilities(
    folds: Sequence[tuple[int, Path]],
    table: pd.DataFrame,
    classes: Sequence[str],
) -> dict[str, np.ndarray]:
    """id -> [K, H, W] probabilities (float16 / float32) of the table's rows, from every fold."""
    from kaggle_seg.probabilities import load_oof

    wanted = set(table["id"])
    shapes = dict(zip(table["id"], zip(table["height"], table["width"], strict=True), strict=True))
    probabilities: dict[str, np.ndarray] = {}
    for _, fold_dir in folds:
        path = fold_dir / paths.OOF_FILE
        for image_id, array in load_oof(path).items():
            if image_id not in wanted:
                continue
            expected = (len(classes), *(int(n) for n in shapes[image_id]))
            if array.shape != expected:
                raise KsegError(
                    f"{path}: {image_id} has probabilities {array.shape}, expected {expected} "
                    f"({len(classes)} channel(s) {', '.join(classes)} at the image's size)"
                )
            probabilities[image_id] = _compact(array)
    return probabilities


def _read_rows(
    folds: Sequence[tuple[int, Path]],
    config: ExperimentConfig,
    experiment_dir: Path,
    group_column: str,
    max_images: int | None,
    seed: int,
) -> pd.DataFrame:
    """The table rows that have OOF probabilities (subsampled by whole groups), table order."""
    from kaggle_seg.prepare import read_table

    table_path = _table_path(config, experiment_dir)
    table = read_table(table_path)
    known = set(table["id"])
    with_oof: set[str] = set()
    for _, fold_dir in folds:
        ids = _oof_ids(fold_dir / paths.OOF_FILE)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise KsegError(
                f"{fold_dir / paths.OOF_FILE}: {len(unknown)} id(s) not in the table "
                f"{table_path}, first {unknown[0]!r}"
            )
        with_oof.update(ids)
    rows = table[table["id"].isin(with_oof)]
    return _select_groups(rows, group_column, max_images, seed).reset_index(drop=True)


# ----------------------------------------------------------------------------- masks: uwmgi, lgg


@dataclass
class MaskData:
    """uwmgi / lgg inputs. A volume is a uwmgi case-day (slices in slice order) or one lgg image.

    probabilities: [K, H, W] per image (float16 / float32); truths: bool [K, D, H, W] per
    volume; volumes: the image positions of each volume; names: case_day (or id) per volume.
    """

    classes: list[str]
    probabilities: list[np.ndarray]
    truths: list[np.ndarray]
    volumes: list[list[int]]
    names: list[str]
    # float32 [K] per image from a classification head, or None without one
    class_probabilities: list[np.ndarray] | None = None


@dataclass
class _ClassPart:
    """One class's share of the score under one setting.

    volumetric (uwmgi): running sums as `uwmgi_score_volumes` keeps them; per image (lgg):
    intersection and truth + prediction pixel counts of every image.
    """

    dice_sum: float = 0.0
    dice_count: int = 0
    hausdorff_sum: float = 0.0
    hausdorff_count: int = 0
    intersections: np.ndarray | None = None
    totals: np.ndarray | None = None


@dataclass(frozen=True)
class _ClassRule:
    threshold: float = 0.5
    min_area: int = 0
    gate_pixels: int = 0
    gate_probability: float = 0.0


class MaskSearch:
    """Scores of per-class rules on `MaskData`, with the bookkeeping that makes a sweep cheap."""

    def __init__(self, data: MaskData, volumetric: bool):
        self.data = data
        self.volumetric = volumetric
        # (image, volume, slice) for every image, in image order.
        self._where = sorted(
            (i, v, z) for v, positions in enumerate(data.volumes) for z, i in enumerate(positions)
        )
        # Truth pixels per class, volume and slice.
        self._truth_areas = [
            [np.count_nonzero(truth[k], axis=(1, 2)) for truth in data.truths]
            for k in range(len(data.classes))
        ]
        # Per image, uint8 [K, H, W]: how many grid thresholds each probability is above (as
        # float32, the comparison postprocess_masks makes), so the mask at grid threshold j is
        # `levels > j` without touching the probabilities again.
        self._grid = np.asarray(THRESHOLD_GRID, dtype=np.float32)
        self._levels = [
            np.searchsorted(self._grid, p.astype(np.float32), side="left").astype(np.uint8)
            for p in data.probabilities
        ]
        # Peak probability per class and image: no pixel is above a threshold at or over it.
        self._peaks = [
            [np.float32(p[k].max()) for p in data.probabilities] for k in range(len(data.classes))
        ]
        # Head probability per class and image, as postprocess_masks compares it (float64).
        self._class_probabilities = (
            None
            if data.class_probabilities is None
            else np.asarray(data.class_probabilities, dtype=np.float64).reshape(
                len(data.probabilities), len(data.classes)
            )
        )
        self._components: dict[tuple[int, float], list[tuple[np.ndarray, np.ndarray]]] = {}
        self._hausdorff: dict[tuple, float] = {}
        self._parts: dict[tuple, _ClassPart] = {}

    def class_mask(self, i: int, k: int, threshold: float) -> np.ndarray:
        """bool [H, W]: image i's class k probabilities above `threshold` (float32)."""
        on_grid = np.flatnonzero(self._grid == np.float32(threshold))
        if on_grid.size:
            return self._levels[i][k] > on_grid[0]
        return self.data.probabilities[i][k].astype(np.float32) > np.float32(threshold)

    def components(self, k: int, threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image: (areas [n], overlaps with the truth [n]) of the class's 8-connected
        components above `threshold`."""
        key = (k, threshold)
        if key not in self._components:
            found = []
            nothing = (np.zeros(0, np.int64), np.zeros(0, np.int64))
            for i, v, z in self._where:
                if not self._peaks[k][i] > np.float32(threshold):
                    found.append(nothing)
                    continue
                mask = self.class_mask(i, k, threshold)
                n, labels, areas = mask_components(mask)
                truth = self.data.truths[v][k, z]
                overlaps = np.bincount(labels[truth], minlength=n + 1)[1:].astype(np.int64)
                found.append((areas, overlaps))
            self._components[key] = found
        return self._components[key]

    def _predicted_volume(self, k: int, v: int, threshold: float, keeps: list[np.ndarray]):
        """bool [D, H, W]: the kept components of one class in one volume."""
        positions = self.data.volumes[v]
        truth = self.data.truths[v]
        volume = np.zeros(truth.shape[1:], dtype=bool)
        for z, (i, keep) in enumerate(zip(positions, keeps, strict=True)):
            if keep.all():
                volume[z] = self.class_mask(i, k, threshold)
            elif keep.any():
                _, labels, _ = mask_components(self.class_mask(i, k, threshold))
                volume[z] = np.concatenate(([False], keep))[labels]
        return volume

    def part(self, k: int, rule: _ClassRule, largest: bool, z_rule: bool) -> _ClassPart:
        key = (k, rule, largest, z_rule)
        if key in self._parts:
            return self._parts[key]
        components = self.components(k, rule.threshold)
        part = _ClassPart()
        n_images = len(self._where)
        if not self.volumetric:
            part.intersections = np.zeros(n_images, np.int64)
            part.totals = np.zeros(n_images, np.int64)
        for v, positions in enumerate(self.data.volumes):
            keeps = [
                select_components(components[i][0], rule.min_area, largest, rule.gate_pixels)
                for i in positions
            ]
            if self._class_probabilities is not None:
                # The head's gate empties the whole (image, class) mask, before z-continuity.
                gated = self._class_probabilities[positions, k] < rule.gate_probability
                keeps = [keep & ~g for keep, g in zip(keeps, gated, strict=True)]
            if z_rule:
                present = z_continuous(np.array([keep.any() for keep in keeps]))
                keeps = [keep & p for keep, p in zip(keeps, present, strict=True)]
            predicted = np.array(
                [components[i][0][keep].sum() for i, keep in zip(positions, keeps, strict=True)],
                dtype=np.int64,
            )
            overlap = np.array(
                [components[i][1][keep].sum() for i, keep in zip(positions, keeps, strict=True)],
                dtype=np.int64,
            )
            truth = self._truth_areas[k][v]
            if not self.volumetric:
                part.intersections[positions] = overlap
                part.totals[positions] = truth + predicted
                continue
            # As uwmgi_score_volumes sums them: the Dice of the slices not both empty, in order.
            scored = truth + predicted > 0
            dice = 2.0 * overlap[scored] / (truth + predicted)[scored]
            part.dice_sum += float(dice.sum())
            part.dice_count += dice.size
            truth_any, predicted_any = truth.any(), predicted.any()
            if not truth_any and not predicted_any:
                continue
            if truth_any != predicted_any:
                distance = 1.0
            else:
                signature = np.packbits(np.concatenate(keeps)).tobytes()
                hkey = (k, v, rule.threshold, len(signature), signature)
                if hkey not in self._hausdorff:
                    predicted_volume = self._predicted_volume(k, v, rule.threshold, keeps)
                    self._hausdorff[hkey] = hausdorff_3d(self.data.truths[v][k], predicted_volume)
                distance = self._hausdorff[hkey]
            part.hausdorff_sum += distance
            part.hausdorff_count += 1
        self._parts[key] = part
        return part

    def score_settings(self, settings: PostprocessConfig) -> float:
        """The score of full settings by this bookkeeping (what the search compares)."""
        gates = settings.gate_probability or [0.0] * len(self.data.classes)
        parts = [
            self.part(
                k,
                _ClassRule(
                    settings.thresholds[k],
                    settings.min_area[k],
                    settings.gate_pixels[k],
                    float(gates[k]),
                ),
                settings.largest_component,
                settings.z_continuity,
            )
            for k in range(len(self.data.classes))
        ]
        return self.score(parts)

    def score(self, parts: Sequence[_ClassPart]) -> float:
        """The competition score of all classes' parts (uwmgi GI score, or mean image Dice)."""
        if self.volumetric:
            dice_count = sum(p.dice_count for p in parts)
            hausdorff_count = sum(p.hausdorff_count for p in parts)
            dice = sum(p.dice_sum for p in parts) / dice_count if dice_count else 1.0
            hausdorff = (
                sum(p.hausdorff_sum for p in parts) / hausdorff_count if hausdorff_count else 0.0
            )
            return UWMGI_DICE_WEIGHT * dice + UWMGI_HAUSDORFF_WEIGHT * (1.0 - hausdorff)
        intersections = sum(p.intersections for p in parts)
        totals = sum(p.totals for p in parts)
        with np.errstate(divide="ignore", invalid="ignore"):
            dice = np.where(totals == 0, 1.0, 2.0 * intersections / totals)
        return float(dice.mean()) if dice.size else 1.0


def _scaled_grid(grid: Sequence[int], scale: float) -> list[int]:
    return sorted({round(value * scale) for value in grid})


def search_mask_settings(
    data: MaskData, *, volumetric: bool, tune_z: bool, rounds: int = 2
) -> tuple[PostprocessConfig, float]:
    """Coordinate descent: per class threshold, min_area, gate_pixels (and gate_probability when
    `data` has class probabilities); then largest_component (and z_continuity when `tune_z`) for
    all classes. Returns the settings and their score."""
    search = MaskSearch(data, volumetric)
    n_classes = len(data.classes)
    areas = [p.shape[1] * p.shape[2] for p in data.probabilities]
    scale = float(np.median(areas)) / REFERENCE_AREA if areas else 1.0
    grids = {
        "threshold": list(THRESHOLD_GRID),
        "min_area": _scaled_grid(MIN_AREA_GRID, scale),
        "gate_pixels": _scaled_grid(GATE_PIXELS_GRID, scale),
    }
    if data.class_probabilities is not None:
        grids["gate_probability"] = list(GATE_PROBABILITY_GRID)
    rules = [_ClassRule() for _ in range(n_classes)]
    flags = {"largest_component": False, "z_continuity": False}

    def parts_for(rules: Sequence[_ClassRule], flags: dict[str, bool]) -> list[_ClassPart]:
        return [
            search.part(k, rules[k], flags["largest_component"], flags["z_continuity"])
            for k in range(n_classes)
        ]

    parts = parts_for(rules, flags)
    best = search.score(parts)
    flag_names = ["largest_component", *(["z_continuity"] if tune_z else [])]
    for _ in range(rounds):
        improved = False
        for k in range(n_classes):
            for name, grid in grids.items():
                for value in grid:
                    candidate = dataclasses.replace(rules[k], **{name: value})
                    if candidate == rules[k]:
                        continue
                    part = search.part(
                        k, candidate, flags["largest_component"], flags["z_continuity"]
                    )
                    score = search.score([*parts[:k], part, *parts[k + 1 :]])
                    if score > best + IMPROVEMENT:
                        best, rules[k], improved = score, candidate, True
                        parts[k] = part
        for name in flag_names:
            candidate_flags = {**flags, name: not flags[name]}
            candidate_parts = parts_for(rules, candidate_flags)
            score = search.score(candidate_parts)
            if score > best + IMPROVEMENT:
                best, flags, parts, improved = score, candidate_flags, candidate_parts, True
        if not improved:
            break
    settings = PostprocessConfig(
        classes=list(data.classes),
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


def _mask_volumes(
    data: MaskData, settings: PostprocessConfig
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, truth, prediction) per volume, both bool [D, H, W, K], by the public functions."""
    heads = data.class_probabilities
    for name, positions, truth in zip(data.names, data.volumes, data.truths, strict=True):
        masks = np.stack(
            [
                postprocess_masks(
                    data.probabilities[i].astype(np.float32),
                    settings,
                    class_probabilities=None if heads is None else heads[i],
                )
                for i in positions
            ]
        )
        if settings.z_continuity:
            masks = apply_z_continuity(masks)
        yield name, np.moveaxis(truth, 0, -1), np.moveaxis(masks, 1, -1)


def score_uwmgi_settings(data: MaskData, settings: PostprocessConfig) -> dict[str, float]:
    """The GI score of the OOF masks under `settings`: score, dice, hausdorff, and per class."""
    result = uwmgi_score_volumes(_mask_volumes(data, settings), data.classes)
    scores = {name: float(result[name]) for name in ("score", "dice", "hausdorff")}
    for name, values in result["per_class"].items():
        scores[f"dice_{name}"] = float(values["dice"])
        scores[f"hausdorff_{name}"] = float(values["hausdorff"])
    return scores


def score_image_dice_settings(data: MaskData, settings: PostprocessConfig) -> dict[str, float]:
    """Mean per-image pixel Dice (all classes pooled), as `kseg train` scores lgg folds."""
    dice = [
        pixel_metrics(truth, prediction)["dice"]
        for _, truth, prediction in _mask_volumes(data, settings)
    ]
    value = float(np.mean(dice)) if dice else 1.0
    return {"score": value, "dice": value}


def read_mask_data(
    competition: Any,
    rows: pd.DataFrame,
    probabilities: dict[str, np.ndarray],
    classes: Sequence[str],
    volume_column: str | None,
    class_probabilities: dict[str, np.ndarray] | None = None,
) -> MaskData:
    """`MaskData` of table rows: truths read once with `competition.read_mask`; volumes are the
    groups of `volume_column` (rows already in slice order), or single images when None.
    `class_probabilities`: id -> [K] of a classification head, to tune its gate."""
    records = rows.to_dict("records")
    if volume_column is None:
        groups = [[i] for i in range(len(records))]
    else:
        groups = [
            list(positions)
            for _, positions in rows.groupby(volume_column, sort=True).indices.items()
        ]
    truths, names = [], []
    for positions in groups:
        masks = [competition.read_mask(records[i]) for i in positions]
        shapes = {m.shape for m in masks}
        if len(shapes) != 1:
            raise KsegError(
                f"{records[positions[0]][volume_column]}: slices of different sizes "
                f"{sorted(shapes)} in one volume"
            )
        # [D, H, W, K] -> [K, D, H, W]: one class's volume is then contiguous.
        truths.append(np.ascontiguousarray(np.moveaxis(np.stack(masks) > 0, -1, 0)))
        first = records[positions[0]]
        names.append(str(first[volume_column] if volume_column else first["id"]))
    return MaskData(
        classes=list(classes),
        probabilities=[probabilities[r["id"]] for r in records],
        truths=truths,
        volumes=groups,
        names=names,
        class_probabilities=(
            None
            if class_probabilities is None
            else [np.asarray(class_probabilities[r["id"]], np.float32) for r in records]
        ),
    )


def _tune_uwmgi(competition, rows, probabilities, classes, rounds, class_probabilities=None):
    rows = rows.sort_values(["case_day", "slice_index"], kind="stable").reset_index(drop=True)
    data = read_mask_data(
        competition, rows, probabilities, classes, "case_day", class_probabilities
    )
    settings, _ = search_mask_settings(data, volumetric=True, tune_z=True, rounds=rounds)
    return settings, data, score_uwmgi_settings


def _tune_lgg(competition, rows, probabilities, classes, rounds, class_probabilities=None):
    data = read_mask_data(competition, rows, probabilities, classes, None, class_probabilities)
    settings, _ = search_mask_settings(data, volumetric=False, tune_z=False, rounds=rounds)
    return settings, data, score_image_dice_settings


# ----------------------------------------------------------------------------- dsb2018 instances


@dataclass
class InstanceData:
    """dsb2018 inputs: [K, H, W] probabilities (K = 1, or 2 with borders) and int32 truth labels."""

    classes: list[str]
    probabilities: list[np.ndarray]
    truths: list[np.ndarray]


def _instance_settings(classes: Sequence[str], threshold, border_threshold, min_nucleus):
    thresholds = [threshold, border_threshold][: len(classes)]
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
    has_border = len(data.classes) > 1
    defaults = default_postprocess(data.classes)
    min_nuclei = sorted({*MIN_NUCLEUS_GRID, defaults.min_nucleus})
    tables: dict[tuple[float, float], dict[int, float]] = {}

    def scores(threshold: float, border_threshold: float) -> dict[int, float]:
        key = (threshold, border_threshold)
        if key not in tables:
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
    settings = _instance_settings(
        data.classes, current["threshold"], current["border_threshold"], current["min_nucleus"]
    )
    return settings, best


def score_instance_settings(data: InstanceData, settings: PostprocessConfig) -> dict[str, float]:
    """DSB 2018 mAP of `postprocess_instances` under `settings`, averaged over the images."""
    scores = [
        dsb_image_score(truth, postprocess_instances(p.astype(np.float32), settings))
        for p, truth in zip(data.probabilities, data.truths, strict=True)
    ]
    value = float(np.mean(scores)) if scores else 1.0
    return {"score": value, "map": value}


def _tune_dsb2018(competition, rows, probabilities, classes, rounds, class_probabilities=None):
    # The nuclei split has no per-class gate: a head's probabilities are not used.
    records = rows.to_dict("records")
    data = InstanceData(
        classes=list(classes),
        probabilities=[probabilities[r["id"]] for r in records],
        truths=[competition.read_instances(r) for r in records],
    )
    settings, _ = search_instance_settings(data, rounds=rounds)
    return settings, data, score_instance_settings


# ----------------------------------------------------------------------------- entry point

_Tuner = Callable[..., tuple[PostprocessConfig, Any, Callable[[Any, PostprocessConfig], dict]]]
TUNERS: dict[str, _Tuner] = {
    "uwmgi": _tune_uwmgi,
    "dsb2018": _tune_dsb2018,
    "lgg": _tune_lgg,
}


def get_tuner(name: str) -> _Tuner:
    """The tuner of competition `name`; a KeyError lists those there are."""
    try:
        return TUNERS[name]
    except KeyError:
        raise KeyError(f"no tuner for {name!r}; choose one of {', '.join(TUNERS)}") from None


def tune_experiment(
    experiment_dir: Path,
    *,
    out: Path | None = None,
    max_images: int | None = None,
    seed: int = 0,
    rounds: int = 2,
) -> TuneResult:
    """Choose post-processing settings on the experiment's out-of-fold probabilities.

    experiment_dir: `runs/<exp>/` with `fold_<k>/{config.yaml, oof.npz}`; every fold with an
    oof.npz is used, its truth read through the config's `data.table`. When every such fold also
    has oof_classes.npz (a classification head), uwmgi / lgg also tune `gate_probability`.
    max_images: score whole groups (uwmgi case-days, lgg patients, dsb images) drawn with `seed`,
    up to this many images. rounds: passes of coordinate descent. Writes the settings to `out`
    (default `experiment_dir / "postprocess.json"`); `after["score"] >= before["score"]` always.
    """
    experiment_dir = Path(experiment_dir)
    folds = oof_folds(experiment_dir)
    config = _experiment_config(folds)
    competition = get_competition(config.data.competition)
    tuner = get_tuner(competition.name)
    classes = model_classes(config)
    group_column = "case_day" if competition.name == "uwmgi" else "group"
    rows = _read_rows(folds, config, experiment_dir, group_column, max_images, seed)
    probabilities = _load_probabilities(folds, rows, classes)
    class_probabilities = _load_class_probabilities(folds, rows, classes)
    settings, data, score = tuner(
        competition, rows, probabilities, classes, rounds, class_probabilities=class_probabilities
    )
    before = score(data, default_postprocess(classes))
    after = score(data, settings)
    if after["score"] < before["score"] or math.isnan(after["score"]):
        # Cannot happen while the search's bookkeeping matches the public path (tested); if it
        # ever does, the defaults are the safe answer.
        settings, after = default_postprocess(classes), before
    path = save_postprocess(settings, Path(out) if out else experiment_dir / POSTPROCESS_FILE)
    return TuneResult(
        before=before,
        after=after,
        settings=settings,
        n_images=len(rows),
        folds=[fold for fold, _ in folds],
        path=path,
    )
