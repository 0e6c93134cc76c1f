"""numba kernels of the post-processing search (`kaggle_seg.search`).

Probabilities are never thresholded twice: a lookup table gives each stored value (uint8, or
float16 by its bits) its *level*, the number of grid thresholds it is above (compared as float32,
as `postprocess_masks` compares), so the mask at grid threshold j is `level > j`. One pass per
slice and class then counts the levels inside and outside the truth (the histograms every
threshold's Dice comes from) and builds the component tree of the levels: the 8-connected
components of every threshold's mask, found once by union-find from the highest level down, each
with its area, its overlap with the truth, its first pixel in raster order, and the largest and
smallest distance of its pixels to the truth volume (measured per pixel by the caller).
"""

from __future__ import annotations

import numba
import numpy as np

from kaggle_seg.jit import jit_cache_enabled

# Columns of a component record (int32) and of its distances to the truth (float64).
AREA, OVERLAP, FIRST = range(3)
N_FIELDS = 3
FARTHEST, NEAREST = range(2)
# Stored dtypes the kernels read, by code.
UINT8, FLOAT16 = 0, 1
# How a slice's kept components are described to build_prediction.
KEEP_NONE, KEEP_ALL, KEEP_CONTAINING, KEEP_AREA, KEEP_OVERLAPPING = range(5)
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Off where no cache directory is writable (the package in Kaggle's read-only input).
_CACHE = jit_cache_enabled(__file__)


def level_table(dtype: np.dtype, grid: np.ndarray) -> np.ndarray:
    """uint8 [256] or [65536]: stored value (uint8, or float16 bits) -> number of grid
    thresholds the probability is above, by float32 comparison (uint8 means value / 255)."""
    grid = np.asarray(grid, dtype=np.float32)
    if dtype == np.uint8:
        values = np.arange(256).astype(np.float32) / 255  # as decode_probabilities
    elif dtype == np.float16:
        values = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    else:
        raise ValueError(f"no level table for {dtype}")
    with np.errstate(invalid="ignore"):
        return (values[:, None] > grid[None, :]).sum(axis=1).astype(np.uint8)


@numba.njit(nogil=True, cache=_CACHE)
def _plane_levels(buffer, offset, kind, table, n_pixels, levels):
    """levels[:n_pixels] = table[stored value] for one [H, W] plane at byte `offset`."""
    if kind == UINT8:
        for p in range(n_pixels):
            levels[p] = table[buffer[offset + p]]
    else:
        values = buffer[offset : offset + 2 * n_pixels].view(np.uint16)
        for p in range(n_pixels):
            levels[p] = table[values[p]]


@numba.njit(nogil=True, cache=_CACHE)
def volume_scan(buffer, offsets, kind, table, height, width, k, truth, n_grid):
    """One pass over class k's pixels in a volume's slices (offsets [D]: byte offset of slice
    z's [K, H, W] array in buffer; truth uint8 [D, H, W]).

    Returns levels uint8 [D, H * W] (each pixel's level); hist int64 [D, n_grid + 1, 2]
    (pixels per level outside (0) / inside (1) the truth); the pixels above the lowest
    threshold, slice by slice and highest level first: active int32 [n] with slice z's at
    active_starts[z] : active_starts[z + 1], and for each the index of its point or -1 inside
    the truth (point_of int32 [n]); points int64 [m, 3], the (z, y, x) of those outside the
    truth, where the caller measures the distance to the truth.
    """
    depth = offsets.size
    n_pixels = height * width
    itemsize = 1 if kind == UINT8 else 2
    levels = np.empty((depth, n_pixels), dtype=np.uint8)
    hist = np.zeros((depth, n_grid + 1, 2), dtype=np.int64)
    active_starts = np.zeros(depth + 1, dtype=np.int64)
    capacity = 4096
    found = np.empty(n_pixels, dtype=np.int32)  # this slice's active pixels, raster order
    active = np.empty(capacity, dtype=np.int32)
    point_of = np.empty(capacity, dtype=np.int32)
    points = np.empty((capacity, 3), dtype=np.int64)
    n_active = 0
    n_points = 0
    per_level = np.zeros(n_grid + 1, dtype=np.int64)
    next_slot = np.zeros(n_grid + 1, dtype=np.int64)
    for z in range(depth):
        level_of = levels[z]
        _plane_levels(buffer, offsets[z] + k * n_pixels * itemsize, kind, table, n_pixels, level_of)
        inside = truth[z].ravel()
        n_found = 0
        counts = hist[z]
        for p in range(n_pixels):
            level = level_of[p]
            counts[level, np.int64(inside[p] != 0)] += 1
            found[n_found] = p
            n_found += level > 0  # branch-free: a pixel is kept by moving on past it
        if n_active + n_found > active.size:
            size = 2 * (n_active + n_found)
            active = np.concatenate((active, np.empty(size - active.size, np.int32)))
            point_of = np.concatenate((point_of, np.empty(size - point_of.size, np.int32)))
        if n_points + n_found > points.shape[0]:
            bigger = np.empty((2 * (n_points + n_found), 3), dtype=np.int64)
            bigger[:n_points] = points[:n_points]
            points = bigger
        # Counting sort of this slice's active pixels by level, highest first.
        per_level[:] = 0
        for q in range(n_found):
            per_level[level_of[found[q]]] += 1
        position = n_active
        for level in range(n_grid, 0, -1):
            next_slot[level] = position
            position += per_level[level]
        for q in range(n_found):
            p = found[q]
            slot = next_slot[level_of[p]]
            next_slot[level_of[p]] += 1
            active[slot] = p
            if inside[p] == 0:
                point_of[slot] = n_points
                points[n_points, 0] = z
                points[n_points, 1] = p // width
                points[n_points, 2] = p % width
                n_points += 1
            else:
                point_of[slot] = -1
        n_active += n_found
        active_starts[z + 1] = n_active
    return (
        levels,
        hist,
        active[:n_active].copy(),
        point_of[:n_active].copy(),
        active_starts,
        points[:n_points].copy(),
    )


@numba.njit(nogil=True, cache=_CACHE, inline="always")
def _find(parent, p):
    while parent[p] != p:
        parent[p] = parent[parent[p]]  # path halving
        p = parent[p]
    return p


@numba.njit(nogil=True, cache=_CACHE)
def _union(parent, stats, distances, a, b):
    """Merge the sets of pixels a and b; the statistics follow the new root."""
    a, b = _find(parent, a), _find(parent, b)
    if a == b:
        return
    if stats[a, AREA] < stats[b, AREA]:
        a, b = b, a
    parent[b] = a
    stats[a, AREA] += stats[b, AREA]
    stats[a, OVERLAP] += stats[b, OVERLAP]
    stats[a, FIRST] = min(stats[a, FIRST], stats[b, FIRST])
    distances[a, FARTHEST] = max(distances[a, FARTHEST], distances[b, FARTHEST])
    distances[a, NEAREST] = min(distances[a, NEAREST], distances[b, NEAREST])


@numba.njit(nogil=True, cache=_CACHE)
def volume_stats(levels, width, truth, active, point_of, active_starts, point_distances, n_grid):
    """The component tree of one class in one volume, from `volume_scan`'s results and the
    distances to the truth of its points (float64 [m]); truth uint8 [D, H, W].

    Returns
      records int32 [n, N_FIELDS] and distances float64 [n, 2] (farthest and nearest distance
        of a component's pixels to the truth, 0 inside it): the components, those of (z, j)
        at starts[z, j] : starts[z, j] + counts[z, j], ordered by first pixel, slice by slice;
      starts, counts int64 [D, n_grid];
      largest int32 [D, n_grid]: index (in the (z, j) list) of the first component of the
        largest area, -1 when none; tied bool [D, n_grid]: another has that area too.
    """
    depth, n_pixels = levels.shape
    height = n_pixels // width
    parent = np.empty(n_pixels, dtype=np.int32)
    stats = np.empty((n_pixels, N_FIELDS), dtype=np.int32)
    root_distances = np.empty((n_pixels, 2), dtype=np.float64)
    roots = np.empty(n_pixels, dtype=np.int32)
    starts = np.zeros((depth, n_grid), dtype=np.int64)
    counts = np.zeros((depth, n_grid), dtype=np.int64)
    largest = np.full((depth, n_grid), -1, dtype=np.int32)
    tied = np.zeros((depth, n_grid), dtype=np.bool_)
    capacity = 1024
    records = np.empty((capacity, N_FIELDS), dtype=np.int32)
    distances = np.empty((capacity, 2), dtype=np.float64)
    n_records = 0
    for z in range(depth):
        level_of = levels[z]
        inside = truth[z].ravel()
        order = active[active_starts[z] : active_starts[z + 1]]
        points = point_of[active_starts[z] : active_starts[z + 1]]
        # Pixels per level (order holds them highest level first).
        per_level = np.zeros(n_grid + 1, dtype=np.int64)
        for q in range(order.size):
            per_level[level_of[order[q]]] += 1
        n_roots = 0
        added = 0
        for level in range(n_grid, 0, -1):
            first_new = added
            added += per_level[level]
            for q in range(first_new, added):
                p = order[q]
                parent[p] = p
                stats[p, AREA] = 1
                stats[p, OVERLAP] = 1 if inside[p] != 0 else 0
                stats[p, FIRST] = p
                distance = 0.0 if points[q] < 0 else point_distances[points[q]]
                root_distances[p, FARTHEST] = distance
                root_distances[p, NEAREST] = distance
                roots[n_roots] = p
                n_roots += 1
            for q in range(first_new, added):
                p = order[q]
                y, x = p // width, p % width
                for dy in range(-1, 2):
                    yy = y + dy
                    if yy < 0 or yy >= height:
                        continue
                    for dx in range(-1, 2):
                        xx = x + dx
                        if (dy == 0 and dx == 0) or xx < 0 or xx >= width:
                            continue
                        neighbour = yy * width + xx
                        if level_of[neighbour] >= level:
                            _union(parent, stats, root_distances, p, neighbour)
            # The mask of grid threshold j = level - 1 is complete: record its components.
            alive = 0
            for r in range(n_roots):
                root = roots[r]
                if parent[root] == root:
                    roots[alive] = root
                    alive += 1
            n_roots = alive
            j = level - 1
            starts[z, j] = n_records
            counts[z, j] = n_roots
            if n_roots == 0:
                continue
            firsts = np.empty(n_roots, dtype=np.int32)
            for r in range(n_roots):
                firsts[r] = stats[roots[r], FIRST]
            by_first = np.argsort(firsts)
            if n_records + n_roots > capacity:
                capacity = 2 * (n_records + n_roots)
                bigger = np.empty((capacity, N_FIELDS), dtype=np.int32)
                bigger[:n_records] = records[:n_records]
                records = bigger
                farther = np.empty((capacity, 2), dtype=np.float64)
                farther[:n_records] = distances[:n_records]
                distances = farther
            best_area = -1
            for r in range(n_roots):
                root = roots[by_first[r]]
                records[n_records] = stats[root]
                distances[n_records] = root_distances[root]
                area = stats[root, AREA]
                if area > best_area:
                    best_area = area
                    largest[z, j] = r
                    tied[z, j] = False
                elif area == best_area:
                    tied[z, j] = True
                n_records += 1
    return (
        records[:n_records].copy(),
        distances[:n_records].copy(),
        starts,
        counts,
        largest,
        tied,
    )


@numba.njit(nogil=True, cache=_CACHE, inline="always")
def _splitmix(x):
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


@numba.njit(nogil=True, cache=_CACHE, inline="always")
def _kept(records, c, start, mode, argument):
    """Whether component c (of a slice's list starting at `start`) is kept under mode."""
    if mode == KEEP_ALL:
        return True
    if mode == KEEP_CONTAINING:
        return c - start == argument
    if mode == KEEP_AREA:
        return records[c, AREA] >= argument
    return False


@numba.njit(nogil=True, cache=_CACHE)
def evaluate_rule(
    j,
    min_area,
    gate_pixels,
    gated,
    use_largest,
    z_rule,
    volume_starts,
    hist,
    records,
    distances,
    starts,
    counts,
    largest,
):
    """One class under one rule, every slice: the Dice bookkeeping and what the Hausdorff term
    needs (see `search.FastMaskSearch`).

    gated bool [N]: slices the classification head empties. hist [N, n_grid + 1, 2] and the
    component arrays of the class (starts, counts, largest [N, n_grid]).
    Returns predicted, overlap int64 [N]; modes int8 [N] and arguments int64 [N] (see
    build_prediction); per volume: signature uint64 [V, 2] of the kept components (equal kept
    pixels at one threshold, equal signature); farthest float64 [V], the directed Hausdorff
    distance prediction -> truth (-1 with nothing kept); nearest_outside float64 [V], the
    smallest distance to the truth of a kept component outside it (inf with none); and
    keeps_overlapping bool [V]: every component overlapping the truth is kept.
    """
    n_slices = hist.shape[0]
    n_volumes = volume_starts.size - 1
    predicted = np.zeros(n_slices, dtype=np.int64)
    overlap = np.zeros(n_slices, dtype=np.int64)
    modes = np.zeros(n_slices, dtype=np.int8)
    arguments = np.zeros(n_slices, dtype=np.int64)
    signatures = np.zeros((n_volumes, 2), dtype=np.uint64)
    farthest = np.full(n_volumes, -1.0)
    nearest_outside = np.full(n_volumes, np.inf)
    keeps_overlapping = np.ones(n_volumes, dtype=np.bool_)
    use_all = min_area <= 1 and not use_largest
    for i in range(n_slices):
        if counts[i, j] == 0 or gated[i]:
            continue
        start, count = starts[i, j], counts[i, j]
        if use_all:
            area, inside = 0, 0
            for level in range(j + 1, hist.shape[1]):  # the histogram's cumulative sums
                area += hist[i, level, 0] + hist[i, level, 1]
                inside += hist[i, level, 1]
            mode, argument = KEEP_ALL, 0
        elif use_largest:
            best = largest[i, j]
            area, inside = records[start + best, AREA], records[start + best, OVERLAP]
            mode, argument = KEEP_CONTAINING, best
            if area < min_area:
                area, inside, mode = 0, 0, KEEP_NONE
        else:
            area, inside = 0, 0
            for c in range(start, start + count):
                if records[c, AREA] >= min_area:
                    area += records[c, AREA]
                    inside += records[c, OVERLAP]
            mode, argument = KEEP_AREA, min_area
        if area < gate_pixels or area == 0:  # the gate empties a class with too few pixels
            continue
        predicted[i], overlap[i], modes[i], arguments[i] = area, inside, mode, argument
    for v in range(n_volumes):
        first, stop = volume_starts[v], volume_starts[v + 1]
        if z_rule and stop - first >= 2:
            # A slice keeps the class only when a neighbour had it (as z_continuous decides,
            # on the presence before this rule).
            previous = False  # slice i - 1's presence before the rule (not yet changed)
            for i in range(first, stop):
                here = predicted[i] > 0
                following = i + 1 < stop and predicted[i + 1] > 0
                if here and not previous and not following:
                    predicted[i], overlap[i], modes[i] = 0, 0, KEEP_NONE
                previous = here
        h1 = np.uint64(j + 1)
        h2 = np.uint64(0x5BD1E995) * np.uint64(j + 7)
        for i in range(first, stop):
            start, count = starts[i, j], counts[i, j]
            for c in range(start, start + count):
                if _kept(records, c, start, modes[i], arguments[i]):
                    h1 = (h1 + _splitmix(np.uint64(c) ^ np.uint64(0xA5A5A5A5))) & _MASK64
                    h2 = h2 ^ _splitmix((np.uint64(c) * np.uint64(0x100000001B3) + h2) & _MASK64)
                    farthest[v] = max(farthest[v], distances[c, FARTHEST])
                    if records[c, OVERLAP] == 0:
                        nearest_outside[v] = min(nearest_outside[v], distances[c, NEAREST])
                elif records[c, OVERLAP] > 0:
                    keeps_overlapping[v] = False
        signatures[v, 0] = h1
        signatures[v, 1] = h2
    for i in range(n_slices):
        if modes[i] == KEEP_CONTAINING:
            arguments[i] = records[starts[i, j] + arguments[i], FIRST]
    return (
        predicted,
        overlap,
        modes,
        arguments,
        signatures,
        farthest,
        nearest_outside,
        keeps_overlapping,
    )


@numba.njit(nogil=True, cache=_CACHE)
def build_prediction(
    buffer, offsets, kind, table, height, width, k, j, modes, arguments, truth, out
):
    """bool out [D, H, W]: class k's kept mask at grid threshold j in each slice of a volume
    (modes / arguments per slice: KEEP_NONE; KEEP_ALL; KEEP_CONTAINING the component holding
    flat pixel `argument`; KEEP_AREA the components of at least `argument` pixels;
    KEEP_OVERLAPPING the components that overlap truth [D, H, W])."""
    n_pixels = height * width
    itemsize = 1 if kind == UINT8 else 2
    levels = np.empty(n_pixels, dtype=np.uint8)
    parent = np.empty(n_pixels, dtype=np.int32)
    tally = np.zeros(n_pixels, dtype=np.int32)
    for z in range(offsets.size):
        flat = out[z].ravel()
        flat[:] = False
        mode = modes[z]
        if mode == KEEP_NONE:
            continue
        _plane_levels(buffer, offsets[z] + k * n_pixels * itemsize, kind, table, n_pixels, levels)
        if mode == KEEP_ALL:
            for p in range(n_pixels):
                flat[p] = levels[p] > j
            continue
        for p in range(n_pixels):
            if levels[p] > j:
                parent[p] = p
                # Union with the 4 neighbours already visited (raster order), 8-connected.
                y, x = p // width, p % width
                for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
                    yy, xx = y + dy, x + dx
                    if yy >= 0 and 0 <= xx < width and levels[yy * width + xx] > j:
                        a, b = _find(parent, p), _find(parent, yy * width + xx)
                        if a != b:
                            parent[max(a, b)] = min(a, b)
        if mode == KEEP_CONTAINING:
            root = _find(parent, arguments[z])
            for p in range(n_pixels):
                flat[p] = levels[p] > j and _find(parent, p) == root
            continue
        inside = truth[z].ravel()
        for p in range(n_pixels):
            if levels[p] > j:
                tally[_find(parent, p)] = 0
        for p in range(n_pixels):
            # KEEP_AREA counts pixels, KEEP_OVERLAPPING pixels in the truth.
            if levels[p] > j and (mode == KEEP_AREA or inside[p] != 0):
                tally[_find(parent, p)] += 1
        threshold = arguments[z] if mode == KEEP_AREA else 1
        for p in range(n_pixels):
            flat[p] = levels[p] > j and tally[_find(parent, p)] >= threshold
