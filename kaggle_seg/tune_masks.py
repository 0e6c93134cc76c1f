"""`kseg tune` for class masks: the OOF read as the mask search's source (a volume at a time,
mapped, never copied whole), the search (`kaggle_seg.search`), and the before / after scores
by the public path (`postprocess_masks`, `apply_z_continuity` and the metric functions).

Volumes (uwmgi) are scored by the GI score with the z-continuity rule searched too; groups
(lgg patients) by the mean per-group volume Dice; images (folder) by the mean per-image Dice.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from kaggle_seg.data.stacks import sort_slices
from kaggle_seg.errors import KsegError
from kaggle_seg.metrics import pixel_counts, pixel_metrics, uwmgi_score_volumes, volume_dice
from kaggle_seg.postprocess import (
    PostprocessConfig,
    apply_z_continuity,
    default_postprocess,
    postprocess_masks,
)
from kaggle_seg.probabilities import ProbabilityFile, decode_probabilities
from kaggle_seg.progress import make_progress
from kaggle_seg.search import (
    FastMaskSearch,
    MaskSource,
    SearchReport,
    collect_mask_stats,
    describe_parts,
    median_image_area,
    search_mask_settings,
    settings_parts,
)
from kaggle_seg.search_stats import default_workers

T = TypeVar("T")
R = TypeVar("R")


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
        return competition.read_mask_volume(volume)  # [K, D, H, W]

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
    volume_column = competition.volume_key if volumetric else None
    if volumetric:
        rows = sort_slices(rows, competition.volume_key, competition.slice_key)
    source, names = read_mask_source(
        competition, rows, files, classes, volume_column, class_probabilities
    )
    started = time.perf_counter()
    stats = collect_mask_stats(source, volumetric=volumetric)
    report = SearchReport(seconds={"statistics": time.perf_counter() - started})
    started = time.perf_counter()
    # "groups" scoring (lgg): each image's pixels pool into its group's (patient's) Dice.
    patients = None
    if competition.scoring == "groups":
        patients = dict(zip(rows["id"].astype(str), rows["group"].astype(str), strict=True))
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


def tune_volume_masks(competition, rows, files, classes, rounds, class_probabilities=None):
    return _tune_masks(
        competition, rows, files, classes, rounds, class_probabilities, volumetric=True
    )


def tune_image_masks(competition, rows, files, classes, rounds, class_probabilities=None):
    return _tune_masks(
        competition, rows, files, classes, rounds, class_probabilities, volumetric=False
    )
