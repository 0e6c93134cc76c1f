"""`kseg tune`: post-processing settings chosen on out-of-fold probabilities by the competition
metric itself (uwmgi GI score, DSB 2018 mAP, LGG mean Dice), written to
`runs/<exp>/postprocess.json` for `kseg submit`. This module reads and writes; the mask search
(uwmgi, lgg) is `kaggle_seg.search`.

The OOF is read through memory maps (`open_probabilities`), one volume at a time: a whole
competition's OOF is never copied into memory. With a classification head's out-of-fold class
probabilities (oof_classes.npz in every fold) the per-class `gate_probability` is searched too.
The before / after numbers come from the public path (`postprocess_masks`,
`apply_z_continuity`, `postprocess_instances` and the metric functions), not from the search's
bookkeeping.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import yaml
from pydantic import ValidationError

from kaggle_seg import paths
from kaggle_seg.competitions import get_competition
from kaggle_seg.config import ExperimentConfig
from kaggle_seg.errors import KsegError
from kaggle_seg.metrics import (
    dsb_image_score,
    pixel_counts,
    pixel_metrics,
    uwmgi_score_volumes,
    volume_dice,
)
from kaggle_seg.paths import POSTPROCESS_FILE
from kaggle_seg.postprocess import (
    PostprocessConfig,
    apply_z_continuity,
    default_postprocess,
    instance_labels,
    postprocess_instances,
    postprocess_masks,
    remove_small_instances,
    save_postprocess,
)
from kaggle_seg.probabilities import ProbabilityFile, decode_probabilities, open_probabilities
from kaggle_seg.progress import make_progress
from kaggle_seg.search import (
    IMPROVEMENT,
    THRESHOLD_GRID,
    FastMaskSearch,
    MaskSource,
    SearchReport,
    collect_mask_stats,
    default_workers,
    describe_parts,
    median_image_area,
    search_mask_settings,
    settings_parts,
)

MIN_NUCLEUS_GRID: tuple[int, ...] = (0, 4, 8, 16, 32, 64)
_FOLD_DIR = re.compile(r"^fold_(\d+)$")
_STORED_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16))
T = TypeVar("T")
R = TypeVar("R")


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
    search: SearchReport | None = None  # uwmgi / lgg: what the search scored


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


def _open_folds(folds: Sequence[tuple[int, Path]]) -> list[ProbabilityFile]:
    return [open_probabilities(fold_dir / paths.OOF_FILE) for _, fold_dir in folds]


def _probability_files(
    files: Sequence[ProbabilityFile], rows: pd.DataFrame, classes: Sequence[str]
) -> dict[str, ProbabilityFile]:
    """id -> the OOF file holding the row's probabilities, each checked for its shape [K, H, W]
    at the image's size and a stored dtype (uint8 or float16); nothing is read but headers of
    mapped arrays."""
    wanted = set(rows["id"])
    shapes = dict(zip(rows["id"], zip(rows["height"], rows["width"], strict=True), strict=True))
    found: dict[str, ProbabilityFile] = {}
    for file in files:
        for image_id in file:
            if image_id not in wanted:
                continue
            shape, dtype = file.header(image_id)
            expected = (len(classes), *(int(n) for n in shapes[image_id]))
            if shape != expected:
                raise KsegError(
                    f"{file.path}: {image_id} has probabilities {shape}, expected "
                    f"{expected} ({len(classes)} channel(s) {', '.join(classes)} at the image's "
                    "size)"
                )
            if dtype not in _STORED_DTYPES:
                raise KsegError(
                    f"{file.path}: {image_id} is stored as {dtype}; kseg writes OOF "
                    "probabilities as float16 or uint8 (train.oof_dtype)"
                )
            found[image_id] = file
    return found


def _read_rows(
    folds: Sequence[tuple[int, Path]],
    files: Sequence[ProbabilityFile],
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
    for (_, fold_dir), file in zip(folds, files, strict=True):
        unknown = [i for i in file if i not in known]
        if unknown:
            raise KsegError(
                f"{fold_dir / paths.OOF_FILE}: {len(unknown)} id(s) not in the table "
                f"{table_path}, first {unknown[0]!r}"
            )
        with_oof.update(file)
    rows = table[table["id"].isin(with_oof)]
    return _select_groups(rows, group_column, max_images, seed).reset_index(drop=True)


def ordered_map(
    function: Callable[[T], R], items: Iterable[T], workers: int, ahead: int | None = None
) -> Iterator[R]:
    """function(item) for each item, in order, computed on `workers` threads with at most
    `ahead` results waiting (memory stays at a few volumes)."""
    ahead = ahead or 2 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------- masks: uwmgi, lgg


def read_mask_source(
    competition: Any,
    rows: pd.DataFrame,
    files: dict[str, ProbabilityFile],
    classes: Sequence[str],
    volume_column: str | None,
    class_probabilities: dict[str, np.ndarray] | None = None,
) -> tuple[MaskSource, list[str]]:
    """The search's view of table rows (rows in slice order within each volume): volumes are
    the groups of `volume_column`, or single images when None; probabilities read from
    `files` (id -> its OOF file) a volume at a time, truths with `competition.read_mask`.
    Returns the source and each volume's name."""
    records = rows.to_dict("records")
    if volume_column is None:
        groups = [[i] for i in range(len(records))]
    else:
        groups = [
            list(positions)
            for _, positions in rows.groupby(volume_column, sort=True).indices.items()
        ]
    order = [i for positions in groups for i in positions]
    records = [records[i] for i in order]
    starts = np.cumsum([0, *(len(g) for g in groups)]).astype(np.int64)
    shapes, names = [], []
    for v in range(len(groups)):
        volume = records[starts[v] : starts[v + 1]]
        sizes = {(int(r["height"]), int(r["width"])) for r in volume}
        if len(sizes) != 1:
            raise KsegError(
                f"{volume[0][volume_column]}: slices of different sizes {sorted(sizes)} in one "
                "volume"
            )
        shapes.append(sizes.pop())
        names.append(str(volume[0][volume_column] if volume_column else volume[0]["id"]))
    ids = [r["id"] for r in records]
    dtypes = {files[i].header(i)[1] for i in ids}
    if len(dtypes) > 1:
        raise KsegError(
            f"the folds store probabilities as {' and '.join(sorted(map(str, dtypes)))}: tune "
            "folds trained with one train.oof_dtype"
        )

    def read_slices(v: int) -> tuple[np.ndarray, np.ndarray, np.dtype]:
        volume = ids[starts[v] : starts[v + 1]]
        holders = {id(files[i]) for i in volume}
        first = files[volume[0]]
        offsets = [first.data_offset(i) for i in volume] if len(holders) == 1 else [None]
        if None not in offsets:
            return first.buffer, np.asarray(offsets, dtype=np.int64), first[volume[0]].dtype
        # Compressed (or split) OOF: this volume's arrays, decompressed into one buffer.
        arrays = [files[i][i] for i in volume]
        size = arrays[0].nbytes
        buffer = np.empty(size * len(arrays), dtype=np.uint8)
        for z, array in enumerate(arrays):
            buffer[z * size : (z + 1) * size] = np.ascontiguousarray(array).view(np.uint8).ravel()
        return buffer, np.arange(len(arrays), dtype=np.int64) * size, arrays[0].dtype

    def read_truth(v: int) -> np.ndarray:
        volume = records[starts[v] : starts[v + 1]]
        if hasattr(competition, "read_mask_stack"):  # uwmgi: one decode for the volume
            return competition.read_mask_stack(volume)
        masks = [competition.read_mask(r) for r in volume]
        # [D, H, W, K] -> [K, D, H, W]: one class's volume is contiguous.
        return np.ascontiguousarray(np.moveaxis(np.stack(masks), -1, 0))

    heads = None
    if class_probabilities is not None:
        heads = np.stack([np.asarray(class_probabilities[i], np.float32) for i in ids])
    source = MaskSource(
        classes=list(classes),
        volume_starts=starts,
        shapes=shapes,
        dtype=dtypes.pop() if dtypes else np.dtype(np.float16),
        read_slices=read_slices,
        read_truth=read_truth,
        class_probabilities=heads,
    )
    return source, names


def _mask_volumes(
    source: MaskSource, names: Sequence[str], settings: PostprocessConfig, description: str
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, truth, prediction) per volume, both bool [D, H, W, K], by the public functions,
    computed a few volumes ahead on worker threads."""
    heads = source.class_probabilities
    display = make_progress(source.n_slices, description, "images")

    def one(v: int) -> tuple[str, np.ndarray, np.ndarray]:
        buffer, offsets, dtype = source.read_slices(v)
        height, width = source.shapes[v]
        count = len(source.classes) * height * width
        masks = []
        for z, offset in enumerate(offsets):
            stored = buffer[offset : offset + count * dtype.itemsize].view(dtype)
            probabilities = decode_probabilities(stored.reshape(-1, height, width))
            i = int(source.volume_starts[v]) + z
            head = None if heads is None else heads[i]
            masks.append(postprocess_masks(probabilities, settings, class_probabilities=head))
        masks = np.stack(masks)
        if settings.z_continuity:
            masks = apply_z_continuity(masks)
        truth = source.read_truth(v)
        display.advance(len(offsets))
        return names[v], np.moveaxis(truth, 0, -1), np.moveaxis(masks, 1, -1)

    try:
        yield from ordered_map(one, range(source.n_volumes), default_workers())
    finally:
        display.close()


def score_uwmgi_settings(
    source: MaskSource, names: Sequence[str], settings: PostprocessConfig, what: str = "score"
) -> dict[str, float]:
    """The GI score of the OOF masks under `settings`: score, dice, hausdorff, and per class."""
    volumes = _mask_volumes(source, names, settings, f"tune: {what}")
    result = uwmgi_score_volumes(volumes, source.classes)
    scores = {name: float(result[name]) for name in ("score", "dice", "hausdorff")}
    for name, values in result["per_class"].items():
        scores[f"dice_{name}"] = float(values["dice"])
        scores[f"hausdorff_{name}"] = float(values["hausdorff"])
    return scores


def score_image_dice_settings(
    source: MaskSource,
    names: Sequence[str],
    settings: PostprocessConfig,
    what: str = "score",
    patients: dict[str, str] | None = None,
) -> dict[str, float]:
    """lgg as `kseg train` scores its folds: the mean per-patient volume Dice (each patient's
    pixels pooled, `metrics.volume_dice`) with `patients` (image id -> patient), and the mean
    per-image pixel Dice (all classes pooled) beside it."""
    rows = []
    for name, truth, prediction in _mask_volumes(source, names, settings, f"tune: {what}"):
        row = {"dice": pixel_metrics(truth, prediction)["dice"], **pixel_counts(truth, prediction)}
        rows.append({**row, "patient": (patients or {}).get(name, name)})
    if not rows:
        return {"score": 1.0, "dice": 1.0}
    images = pd.DataFrame(rows)
    dice = float(images["dice"].mean())
    if patients is None:
        return {"score": dice, "dice": dice}
    patient_dice = float(volume_dice(images, "patient").mean())
    return {"score": patient_dice, "dice": dice, "patient_dice": patient_dice}


def _tune_masks(
    competition, rows, files, classes, rounds, class_probabilities, *, volumetric: bool
):
    volume_column = "case_day" if volumetric else None
    if volumetric:
        rows = rows.sort_values(["case_day", "slice_index"], kind="stable").reset_index(drop=True)
    source, names = read_mask_source(
        competition, rows, files, classes, volume_column, class_probabilities
    )
    started = time.perf_counter()
    stats = collect_mask_stats(source, volumetric=volumetric)
    report = SearchReport(seconds={"statistics": time.perf_counter() - started})
    started = time.perf_counter()
    # lgg is scored per patient volume: each image's pixels pool into its patient's Dice.
    patients = None if volumetric else dict(zip(rows["id"].astype(str), rows["group"].astype(str),
                                                strict=True))  # fmt: skip
    groups = None if patients is None else pd.factorize(np.array([patients[n] for n in names]))[0]
    search = FastMaskSearch(source, stats, volumetric, groups=groups)
    settings, _ = search_mask_settings(
        search,
        classes,
        median_area=median_image_area(source),
        with_heads=source.class_probabilities is not None,
        tune_z=volumetric,
        rounds=rounds,
        report=report,
    )
    report.seconds["search"] = time.perf_counter() - started
    # The defaults were scored exactly as the search's start; the chosen settings are scored
    # again below by the public path, which checks the bookkeeping on what gets written.
    defaults = default_postprocess(classes)
    before = describe_parts(settings_parts(search, defaults), classes, volumetric, groups)
    if volumetric:
        score = lambda data, s, what: score_uwmgi_settings(*data, s, what)  # noqa: E731
    else:
        score = lambda data, s, what: score_image_dice_settings(  # noqa: E731
            *data, s, what, patients=patients
        )
    return Tuned(settings, (source, names), score, report, before)


def _tune_uwmgi(competition, rows, files, classes, rounds, class_probabilities=None):
    return _tune_masks(
        competition, rows, files, classes, rounds, class_probabilities, volumetric=True
    )


def _tune_lgg(competition, rows, files, classes, rounds, class_probabilities=None):
    return _tune_masks(
        competition, rows, files, classes, rounds, class_probabilities, volumetric=False
    )


# ----------------------------------------------------------------------------- dsb2018 instances


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
    """dsb2018 inputs: [K, H, W] probabilities (K = 1, or 2 with borders; a LazyProbabilities
    reads them from the OOF on each access) and int32 truth labels."""

    classes: list[str]
    probabilities: Sequence[np.ndarray]
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


def _tune_dsb2018(competition, rows, files, classes, rounds, class_probabilities=None):
    # The nuclei split has no per-class gate: a head's probabilities are not used.
    records = rows.to_dict("records")
    data = InstanceData(
        classes=list(classes),
        probabilities=LazyProbabilities([r["id"] for r in records], files),
        truths=[competition.read_instances(r) for r in records],
    )
    settings, _ = search_instance_settings(data, rounds=rounds)
    return Tuned(settings, data, score_instance_settings)


# ----------------------------------------------------------------------------- entry point


@dataclass
class Tuned:
    """A tuner's answer: the settings, its data and scorer (the public path) for the before /
    after numbers, and what the mask search did; `before` when the search already scored the
    defaults exactly."""

    settings: PostprocessConfig
    data: Any
    score: Callable[..., dict[str, float]]
    report: SearchReport | None = None
    before: dict[str, float] | None = None


_Tuner = Callable[..., Tuned]
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
    files = _open_folds(folds)
    rows = _read_rows(folds, files, config, experiment_dir, group_column, max_images, seed)
    holders = _probability_files(files, rows, classes)
    class_probabilities = _load_class_probabilities(folds, rows, classes)
    tuned = tuner(
        competition, rows, holders, classes, rounds, class_probabilities=class_probabilities
    )
    settings, data, score, report = tuned.settings, tuned.data, tuned.score, tuned.report
    started = time.perf_counter()
    before = tuned.before or score(data, default_postprocess(classes), "score with defaults")
    after = score(data, settings, "score tuned")
    if report is not None:
        report.seconds["scoring"] = time.perf_counter() - started
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
        search=report,
    )
