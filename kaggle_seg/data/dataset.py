"""The torch Dataset over a competition table: images (2.5D stacks of volumes), masks, targets.

A sample is a dict: `image` float32 [C, H, W], `mask` float32 [K, H, W] (0/1), `index` (the row's
position in the table) and `id`. Decoded arrays come from `ImageStore`s when given (filled once,
before the DataLoader forks, see cache.py), else from the competition's readers on every call.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from kaggle_seg.competitions.base import Competition
from kaggle_seg.config import TARGETS, Targets
from kaggle_seg.data.cache import ImageStore, StoreMode, fingerprint, from_uint16
from kaggle_seg.data.stacks import check_slice_order, stack_positions
from kaggle_seg.data.transforms import accepts_uint16
from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.preprocess import apply_steps, steps_key, steps_of

log = logging.getLogger(__name__)

# Table columns that name the files a row's mask is read from (any competition).
_MASK_SOURCE_COLUMNS = ("image_path", "mask_path", "mask_dir", "labels_csv")


def instance_targets(labels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 2] from an int [H, W] instance label map: nuclei union, nuclei borders.

    The border channel holds each nucleus's outline pixels (skimage `find_boundaries`, mode
    "inner": nucleus pixels 4-adjacent to background or to another nucleus), dilated by one pixel
    (3x3) and kept inside the union, so border ⊂ union and the union minus the border falls apart
    into one piece per nucleus even where nuclei touch: the seeds of an instance split.
    """
    import cv2
    from skimage.segmentation import find_boundaries

    union = labels > 0
    outline = find_boundaries(labels, mode="inner").astype(np.uint8)
    border = cv2.dilate(outline, np.ones((3, 3), np.uint8)).astype(bool) & union
    return np.stack([union, border], axis=-1).astype(np.uint8)


def read_target(competition: Competition, row: Any, targets: Targets) -> np.ndarray:
    """uint8 0/1 [H, W, K] for one table row: the competition's masks (K = len(classes)) for
    "mask", `instance_targets` (K = 2) for "mask_border"."""
    if targets == "mask":
        mask = competition.read_mask(row)
        return mask[..., None] if mask.ndim == 2 else mask
    return instance_targets(competition.read_instances(row))


def _check_targets(competition: Competition, targets: str) -> None:
    if targets not in TARGETS:
        raise KsegError(f"unknown targets {targets!r}; choose one of {', '.join(TARGETS)}")
    if targets == "mask_border" and not competition.instance_masks:
        raise KsegError(
            f"targets 'mask_border' need instance masks; {competition.name} has none "
            "(use targets 'mask')"
        )


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    # Plain dicts: readers index rows by column name, and a dict lookup is ~100x an iloc.
    return table.to_dict("records")


def _read_row_image(
    competition: Competition, rows: list[dict[str, Any]], steps: list[dict[str, Any]], i: int
) -> np.ndarray:
    image = competition.read_image(rows[i])
    return apply_steps(image, steps) if steps else image


def _read_row_target(
    competition: Competition, rows: list[dict[str, Any]], targets: Targets, i: int
) -> np.ndarray:
    return read_target(competition, rows[i], targets)


def build_stores(
    competition: Competition,
    table: pd.DataFrame,
    mode: StoreMode,
    *,
    folder: str | Path | None = None,
    targets: Targets = "mask",
    threads: int | None = None,
    preprocess: list[dict[str, Any]] | None = None,
) -> tuple[ImageStore, ImageStore]:
    """(image store, mask store) for every row of `table`, keyed by `id`, filled now.

    Fill them once for the whole table (before building DataLoaders): datasets over any subset
    of its rows (a fold's training or validation part) then share them. Images are stored per
    row, i.e. per slice for uwmgi, and 2.5D stacks are assembled on reading. memmap files live
    in `folder` as `<competition>-images` and `<competition>-<targets>`.
    preprocess: resolved `data.preprocess`; its "store" steps (n4, clahe) run here, once per
    image, and name the image store `<competition>-images-<steps_key>`. They are too slow to
    repeat every epoch, so a "none" mode becomes "memmap" (with a folder) or "memory".
    """
    _check_targets(competition, targets)
    rows = _records(table)
    ids = [str(row["id"]) for row in rows]
    sizes = [(int(row["height"]), int(row["width"])) for row in rows]
    steps = steps_of(preprocess or [], "store")
    images_name = f"{competition.name}-images" + (f"-{steps_key(steps)}" if steps else "")
    if steps and mode == "none":
        mode = "memmap" if folder is not None else "memory"
        log.warning("cache 'none' with preprocessing %s: storing images (%s) once instead",
                    "+".join(s["name"] for s in steps), mode)  # fmt: skip
    image_store = ImageStore(mode, "image", folder=folder, name=images_name)
    mask_store = ImageStore(mode, "mask", folder=folder, name=f"{competition.name}-{targets}")
    image_sources = mask_sources = None
    if mode == "memmap":
        image_sources = [
            fingerprint(
                [row["image_path"]], extra=str(row["id"]) + (json.dumps(steps) if steps else "")
            )
            for row in rows
        ]
        mask_sources = [
            fingerprint(
                [row[c] for c in _MASK_SOURCE_COLUMNS if row.get(c)],
                # The whole row: inline labels (uwmgi's RLE columns) live in the table itself.
                extra=targets + json.dumps(row, sort_keys=True, default=str),
            )
            for row in rows
        ]
    # partial over module functions rather than lambdas: a "none" store keeps its reader, and
    # DataLoader workers started with "spawn" receive it pickled.
    image_store.fill(
        partial(_read_row_image, competition, rows, steps),
        len(rows),
        sizes=sizes,
        ids=ids,
        sources=image_sources,
        threads=threads,
    )
    mask_store.fill(
        partial(_read_row_target, competition, rows, targets),
        len(rows),
        sizes=sizes,
        ids=ids,
        sources=mask_sources,
        threads=threads,
    )
    return image_store, mask_store


class SegmentationDataset(Dataset):
    """Samples of one competition table, transformed by an albumentations pipeline.

    stack_depth / stack_stride: 2.5D input for competitions whose images are slices of volumes
    (`competition.volume_key`, uwmgi's case_day): each image is its slice with neighbours
    `stack_stride * (k - stack_depth // 2)` rows away, for k = 0..stack_depth-1, clamped within
    the volume (`data.stacks.stack_positions`), concatenated on channels in that order (C =
    image channels x stack_depth). The table must hold every slice of each volume, sorted; to
    train on a subset of slices, draw it with a sampler.
    targets: "mask" (K = len(competition.classes)) or "mask_border" (K = 2: union and borders of
    the instances, `instance_targets`; competitions with `instance_masks`, i.e. dsb2018).
    image_store / mask_store: filled `ImageStore`s holding (at least) the table's ids, e.g. from
    `build_stores`; None reads the files on every call.
    compact: image as float16 and mask as uint8 tensors (cast back to float32 by the consumer),
    instead of float32 for both.
    """

    def __init__(
        self,
        competition: Competition,
        table: pd.DataFrame,
        transform: A.Compose | None,
        *,
        stack_depth: int = 1,
        stack_stride: int = 1,
        targets: Targets = "mask",
        image_store: ImageStore | None = None,
        mask_store: ImageStore | None = None,
        compact: bool = False,
    ):
        _check_targets(competition, targets)
        self.competition = competition
        self.table = table.reset_index(drop=True)
        self.transform = transform
        self.targets = targets
        self.stack_depth = stack_depth
        self.compact = compact
        self._rows = _records(self.table)
        if stack_depth > 1:
            volume_key, slice_key = competition.volume_key, competition.slice_key
            if volume_key is None or slice_key is None or volume_key not in self.table.columns:
                raise KsegError(
                    f"stack_depth {stack_depth} needs slices grouped by volume (uwmgi's "
                    f"case_day); {competition.name} images are not slices of a volume: use "
                    "stack_depth 1"
                )
            check_slice_order(self.table, volume_key, slice_key)
            self.stacks = stack_positions(self.table, stack_depth, stack_stride, volume_key)
        else:
            self.stacks = np.arange(len(self.table), dtype=np.int64)[:, None]
        ids = [str(row["id"]) for row in self._rows]
        self.image_store = image_store
        self.mask_store = mask_store
        self._image_slots = image_store.positions(ids) if image_store is not None else None
        self._mask_slots = mask_store.positions(ids) if mask_store is not None else None
        # Stacks assembled straight from the store's uint16 views when the pipeline takes uint16
        # (`build_transforms`'): no float copy, and the geometric augmentations run on uint16.
        self._store_views = image_store is not None and image_store.mode != "none"
        self._seeded_pid: int | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def read_image(self, position: int) -> np.ndarray:
        """float32 [H, W, C] of the table row at `position` (one slice, no stacking)."""
        if self._image_slots is not None:
            return self.image_store.get(int(self._image_slots[position]))  # type: ignore[union-attr]
        image = self.competition.read_image(self._rows[position])
        return image[..., None] if image.ndim == 2 else image

    def read_target(self, position: int) -> np.ndarray:
        """uint8 [H, W, K] targets of the table row at `position`."""
        if self._mask_slots is not None:
            return self.mask_store.get(int(self._mask_slots[position]))  # type: ignore[union-attr]
        return read_target(self.competition, self._rows[position], self.targets)

    def _stack(self, i: int) -> np.ndarray:
        if self._store_views and accepts_uint16(self.transform):
            return self._stack_uint16(i)
        if self.stack_depth == 1:
            return self.read_image(i)
        slices = [self.read_image(int(p)) for p in self.stacks[i]]
        self._check_stack(i, slices)
        return np.concatenate(slices, axis=-1)

    def _stack_uint16(self, i: int) -> np.ndarray:
        """uint16 [H, W, C] (value = round(65535 x pixel)) of the stack at `i`, a new array."""
        store, slots = self.image_store, self._image_slots
        assert store is not None and slots is not None
        views = [store.view(int(slots[int(p)])) for p in self.stacks[i]]
        if len(views) == 1:
            return np.array(views[0])
        self._check_stack(i, views)
        if views[0].shape[-1] == 1:
            # cv2.merge interleaves single-channel planes ~3x faster than np.concatenate.
            return cv2.merge([v[..., 0] for v in views])
        return np.concatenate(views, axis=-1)

    def _check_stack(self, i: int, slices: list[np.ndarray]) -> None:
        if len({s.shape for s in slices}) != 1:
            names = ", ".join(
                f"{self._rows[int(p)]['image_path']} {s.shape[1]}x{s.shape[0]}"
                for p, s in zip(self.stacks[i], slices, strict=True)
            )
            raise InputError(f"2.5D stack of {self._rows[i]['id']}: slice sizes differ: {names}")

    def _seed_transform_in_worker(self) -> None:
        # Albumentations 2 draws from generators made when the pipeline was built, so forked
        # DataLoader workers would all replay the same augmentations. Each worker process
        # reseeds once from torch's per-worker seed (new every epoch unless workers persist).
        info = torch.utils.data.get_worker_info()
        if info is None or self.transform is None or self._seeded_pid == os.getpid():
            return
        seed = info.seed % 2**32
        self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        self._seeded_pid = os.getpid()

    def sample_arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image float32 [H, W, C], mask uint8 [H, W, K]) of row `i`, stacked and transformed."""
        self._seed_transform_in_worker()
        row = self._rows[i]
        image = self._stack(i)
        mask = self.read_target(i)
        if image.shape[:2] != mask.shape[:2]:
            raise InputError(
                f"{row['image_path']}: image is {image.shape[1]}x{image.shape[0]} but its mask is "
                f"{mask.shape[1]}x{mask.shape[0]} (W x H)"
            )
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        if image.dtype == np.uint16:  # no transform
            image = from_uint16(image)
        if mask.ndim == 2:
            mask = mask[..., None]
        return image, mask

    def sample_id(self, i: int) -> str:
        return str(self._rows[i]["id"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, mask = self.sample_arrays(i)
        # compact: half the bytes through the worker -> main process queue, which costs more
        # than decoding here; the training step casts back to float32 on its device.
        image_tensor = _chw_tensor(image, torch.float16 if self.compact else torch.float32)
        mask_tensor = _chw_tensor(mask, torch.uint8 if self.compact else torch.float32)
        return {"image": image_tensor, "mask": mask_tensor, "index": i, "id": self.sample_id(i)}


def _chw_tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous `dtype` [C, H, W] tensor of an [H, W, C] (or [H, W]) array."""
    if array.ndim == 2:
        array = array[..., None]
    height, width, channels = array.shape
    out = torch.empty((channels, height, width), dtype=dtype)
    write_chw(array, out)
    return out


def write_chw(array: np.ndarray, out: torch.Tensor) -> None:
    """Copy an [H, W, C] array into a [C, H, W] tensor, converting to its dtype.

    Where the dtype changes, torch converts while transposing, in one pass (float32 to float16:
    ~10x faster than numpy's astype, 0.2 vs 1.8 ms at 320x384x3). Same dtype and a few
    channels: cv2.split de-interleaves with SIMD, ~3x faster than a strided copy.
    """
    source = np.ascontiguousarray(array)
    tensor = torch.from_numpy(source)
    if tensor.dtype != out.dtype or source.shape[-1] > 4:
        out.copy_(tensor.permute(2, 0, 1))
        return
    planes = out.numpy()
    for k, plane in enumerate(cv2.split(source)):
        planes[k] = plane


class EpochWeightedSampler(WeightedRandomSampler):
    """A WeightedRandomSampler whose draws depend on (seed, epoch) alone, as DistributedSampler's
    do through `set_epoch`: a resumed run draws what the uninterrupted run drew, where one
    generator carried across epochs would start again from epoch 0's draws."""

    def __init__(self, weights: torch.Tensor, num_samples: int, *, seed: int):
        super().__init__(weights, num_samples, replacement=True, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)
        self.generator.manual_seed(int(state[0]))


def weighted_sampler(
    table: pd.DataFrame,
    column: str | Sequence[str],
    *,
    num_samples: int | None = None,
    seed: int,
    power: float = 1.0,
) -> EpochWeightedSampler:
    """Draw rows with replacement, rarer values of `column` more often.

    Row weight = 1 / (number of rows sharing its value) ** power. With power 1 (the default)
    every value is drawn as often as any other, so e.g. "empty" gives ~50 % empty and ~50 %
    non-empty slices per epoch whatever the table's mix; 0.5 draws a value 4x rarer 2x more
    often per row. Several columns: their combined value (e.g. [height, width], DSB's image
    kinds). num_samples: draws per epoch (default len(table)). Missing values count as one
    more value.
    """
    columns = [column] if isinstance(column, str) else list(column)
    missing = [c for c in columns if c not in table.columns]
    if missing or not columns:
        raise KsegError(
            f"sampler column {', '.join(map(repr, missing)) or '[]'} is not in the table; "
            f"columns: {', '.join(table.columns)}"
        )
    if len(table) == 0:
        raise KsegError("weighted sampler over an empty table")
    codes = table.groupby(columns, dropna=False, sort=False).ngroup().to_numpy()
    counts = np.bincount(codes).astype(np.float64)
    weights = torch.as_tensor(counts[codes] ** -power, dtype=torch.double)
    return EpochWeightedSampler(weights, num_samples or len(table), seed=seed)
