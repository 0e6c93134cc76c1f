"""Statistics of the mask search (`kaggle_seg.search`), read once from the OOF: per slice and
class, the histogram of probability levels inside and outside the truth, and the components
of every grid threshold's mask with their areas, overlaps and distances to the truth (see
`search_kernels`). One volume at a time, on worker threads; what is kept grows with the
components, not with the OOF.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from kaggle_seg import search_kernels as kernels
from kaggle_seg.metrics import distances_to_mask_3d
from kaggle_seg.progress import make_progress

THRESHOLD_GRID: tuple[float, ...] = tuple(float(t) for t in np.round(np.linspace(0.3, 0.7, 9), 2))


def default_workers() -> int:
    """Threads for the parallel parts: the CPUs this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


@dataclass
class MaskSource:
    """What the search reads, one volume at a time (a uwmgi case-day in slice order, or one
    image). Slices are numbered in volume order: volume v is slices
    volume_starts[v] : volume_starts[v + 1].

    read_slices(v) -> (buffer uint8 [bytes], offsets int64 [D], dtype): slice z's stored
    [K, H, W] probabilities (uint8 = value * 255, or float16) start at byte offsets[z];
    read_truth(v) -> uint8 [K, D, H, W]; class_probabilities: float32 [N, K] of a
    classification head, or None.
    """

    classes: list[str]
    volume_starts: np.ndarray
    shapes: list[tuple[int, int]]
    dtype: np.dtype
    read_slices: Callable[[int], tuple[np.ndarray, np.ndarray, np.dtype]]
    read_truth: Callable[[int], np.ndarray]
    class_probabilities: np.ndarray | None = None

    @property
    def n_volumes(self) -> int:
        return len(self.volume_starts) - 1

    @property
    def n_slices(self) -> int:
        return int(self.volume_starts[-1])


@dataclass
class ClassStats:
    """One class over every slice: hist int64 [N, n_grid + 1, 2]; components records
    [n, N_FIELDS] and distances float64 [n, 2] (farthest / nearest pixel's distance to the
    truth volume) with starts / counts / largest int [N, n_grid]; tied bool [N, n_grid]: the
    largest area is shared, cv2's order not yet asked; truth_area int64 [N]."""

    hist: np.ndarray
    records: np.ndarray
    distances: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    largest: np.ndarray
    tied: np.ndarray
    truth_area: np.ndarray


def stored_dtype_code(dtype: np.dtype) -> int:
    return kernels.UINT8 if dtype == np.uint8 else kernels.FLOAT16


def largest_by_cv2(plane: np.ndarray, table: np.ndarray, j: int, block: np.ndarray) -> int:
    """The largest component's index in a (slice, threshold) list of components (`block`,
    ordered by first pixel) as `select_components` picks it on cv2's labels: of those of the
    largest area, the one cv2 labels first (its scan order need not be the raster order)."""
    import cv2

    mask = (table[plane] > j).view(np.uint8)
    _, labels = cv2.connectedComponents(mask, connectivity=8)
    tied = np.flatnonzero(block[:, kernels.AREA] == block[:, kernels.AREA].max())
    label_of = labels.ravel()[block[tied, kernels.FIRST]]
    return int(tied[np.argmin(label_of)])


def stored_plane(data, shape: tuple[int, int], z: int, k: int, n_classes: int) -> np.ndarray:
    """Slice z's class-k plane of a volume as stored: uint8, or float16 by its bits (uint16)."""
    buffer, offsets, dtype = data
    height, width = shape
    plane_bytes = height * width * np.dtype(dtype).itemsize
    at = int(offsets[z]) + k * plane_bytes
    stored = np.uint8 if dtype == np.uint8 else np.uint16
    return buffer[at : at + plane_bytes].view(stored).reshape(height, width)


def _class_volume_stats(
    shape: tuple[int, int],
    table: np.ndarray,
    n_grid: int,
    data: tuple[np.ndarray, np.ndarray, np.dtype],
    truth: np.ndarray,
    volumetric: bool,
    k: int,
) -> ClassStats:
    """ClassStats of class k in one volume (starts relative to the volume's records)."""
    buffer, offsets, dtype = data
    height, width = shape
    levels, hist, active, point_of, active_starts, points = kernels.volume_scan(
        buffer, offsets, stored_dtype_code(dtype), table, height, width, k, truth[k], n_grid
    )
    if volumetric and truth[k].any() and len(points):
        point_distances = distances_to_mask_3d(truth[k], points)
    else:  # no Hausdorff term here (lgg), or one side empty: the distances are never used
        point_distances = np.zeros(len(points))
    records, distances, starts, counts, largest, tied = kernels.volume_stats(
        levels, width, truth[k], active, point_of, active_starts, point_distances, n_grid
    )
    truth_area = truth[k].reshape(len(offsets), -1).sum(axis=1, dtype=np.int64)
    return ClassStats(hist, records, distances, starts, counts, largest, tied, truth_area)


def collect_mask_stats(
    source: MaskSource,
    *,
    volumetric: bool,
    grid: Sequence[float] = THRESHOLD_GRID,
    workers: int | None = None,
) -> list[ClassStats]:
    """The per-class statistics of every slice, one volume per task on `workers` threads."""
    n_grid = len(grid)
    table = kernels.level_table(np.dtype(source.dtype), np.asarray(grid))
    n_classes = len(source.classes)
    display = make_progress(source.n_slices, "tune: reading OOF", "images")

    def one(v: int) -> list[ClassStats]:
        data = source.read_slices(v)
        truth = np.ascontiguousarray(source.read_truth(v), dtype=np.uint8)
        found = [
            _class_volume_stats(source.shapes[v], table, n_grid, data, truth, volumetric, k)
            for k in range(n_classes)
        ]
        display.advance(int(source.volume_starts[v + 1] - source.volume_starts[v]))
        return found

    try:
        with ThreadPoolExecutor(workers or default_workers()) as pool:
            volumes = list(pool.map(one, range(source.n_volumes)))
    finally:
        display.close()
    stats = []
    for k in range(n_classes):
        parts = [found[k] for found in volumes]
        offsets = np.cumsum([0, *(len(p.records) for p in parts[:-1])]) if parts else []
        stats.append(
            ClassStats(
                hist=_concatenate([p.hist for p in parts], (0, n_grid + 1, 2), np.int64),
                records=_concatenate([p.records for p in parts], (0, kernels.N_FIELDS), np.int32),
                distances=_concatenate([p.distances for p in parts], (0, 2), np.float64),
                starts=_concatenate(
                    [p.starts + offset for p, offset in zip(parts, offsets, strict=True)],
                    (0, n_grid),
                    np.int64,
                ),
                counts=_concatenate([p.counts for p in parts], (0, n_grid), np.int64),
                largest=_concatenate([p.largest for p in parts], (0, n_grid), np.int32),
                tied=_concatenate([p.tied for p in parts], (0, n_grid), np.bool_),
                truth_area=_concatenate([p.truth_area for p in parts], (0,), np.int64),
            )
        )
    return stats


def _concatenate(arrays: list[np.ndarray], empty: tuple[int, ...], dtype) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(empty, dtype=dtype)


def median_image_area(source: MaskSource) -> float:
    """Median pixels of an image (the grids of pixel counts scale with it)."""
    sizes = np.diff(source.volume_starts)
    areas = np.repeat([h * w for h, w in source.shapes], sizes)
    return float(np.median(areas)) if areas.size else 0.0
