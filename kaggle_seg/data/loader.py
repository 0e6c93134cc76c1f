"""Training batches through a shared-memory pool: DataLoader workers write samples in place.

torch's DataLoader hands every batch from a worker to the main process in a new shared-memory
segment: created, page-faulted and zeroed in the worker, mapped and faulted again in the main
process, then freed. For 320x384 2.5D samples that is ~1.6 ms of CPU per image, as much as the
heavy augmentation itself (benchmarks/README.md, "Loader"). `PooledLoader` allocates a few
batches of shared memory once, before the workers start; a worker writes each sample of a batch
straight into the batch's slot (float16 image, uint8 mask, converted and transposed in one
copy) and sends back only the slot number, positions and ids. Everything else is the
DataLoader's own: sampler, batching, worker processes and seeds, ordering, error reporting.

A batch's `image` and `mask` are views of its slot, valid until the batch after the next one is
requested (`slot_count` keeps one spare slot beyond what the workers can be filling): use them
in the step or copy them (`.to(device).float()` does). `make_train_loader` picks the pool when
there are workers and falls back to the plain DataLoader otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from kaggle_seg.data.dataset import SegmentationDataset, write_chw
from kaggle_seg.errors import InputError
from kaggle_seg.malloc import keep_freed_memory

SHM_DIR = "/dev/shm"
PREFETCH_FACTOR = 2  # batches each worker prepares ahead (the DataLoader's default)


@dataclass(frozen=True)
class SlotBatch:
    """What the batch sampler hands a worker: the slot to fill and the dataset positions."""

    slot: int
    positions: list[int]


class SlotBatchSampler(Sampler[SlotBatch]):
    """A BatchSampler's batches, numbered into `slots` slots round-robin.

    The DataLoader returns batches in sampling order, so the k-th batch the main process gets
    lives in slot k % slots, whichever worker filled it.
    """

    def __init__(self, batches: BatchSampler, slots: int):
        self.batches = batches
        self.slots = slots

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[SlotBatch]:
        for k, positions in enumerate(self.batches):
            yield SlotBatch(k % self.slots, list(positions))


class BatchPool:
    """`slots` batches of shared memory: image [slots, B, C, H, W] (float16, as a compact
    dataset gives it) and mask [slots, B, K, H, W] (uint8)."""

    IMAGE_DTYPE, MASK_DTYPE = torch.float16, torch.uint8

    def __init__(self, slots: int, batch_size: int, image_shape: tuple, mask_shape: tuple):
        # Shared before the workers start: forked workers inherit the mapping, spawned ones get
        # it pickled as a handle to the same memory.
        self.image = _shared_empty((slots, batch_size, *image_shape), self.IMAGE_DTYPE)
        self.mask = _shared_empty((slots, batch_size, *mask_shape), self.MASK_DTYPE)

    @classmethod
    def bytes_needed(
        cls, slots: int, batch_size: int, image_shape: tuple, mask_shape: tuple
    ) -> int:
        image = cls.IMAGE_DTYPE.itemsize * int(np.prod(image_shape))
        mask = cls.MASK_DTYPE.itemsize * int(np.prod(mask_shape))
        return slots * batch_size * (image + mask)


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory.

    Made in place, as the DataLoader's own collate does: `torch.empty(...).share_memory_()`
    would allocate, fault in and copy the whole pool first (0.4 s of CPU for 100 MiB).
    """
    numel = int(np.prod(shape))
    try:
        storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    except (AttributeError, RuntimeError):  # a torch without it: the slow, public way
        return torch.empty(shape, dtype=dtype).share_memory_()
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class PooledDataset(torch.utils.data.Dataset):
    """`dataset`'s samples written into a `BatchPool` slot per batch (`__getitems__`)."""

    def __init__(self, dataset: SegmentationDataset, pool: BatchPool):
        self.dataset = dataset
        self.pool = pool

    @property
    def transform(self) -> Any:  # worker seeding looks for it
        return self.dataset.transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, batch: SlotBatch) -> dict[str, Any]:
        images, masks = self.pool.image[batch.slot], self.pool.mask[batch.slot]
        ids = []
        for j, position in enumerate(batch.positions):
            image, mask = self.dataset.sample_arrays(position)
            sample_id = self.dataset.sample_id(position)
            _check_shape(sample_id, image, images.shape[1:], "image")
            _check_shape(sample_id, mask, masks.shape[1:], "mask")
            write_chw(image, images[j])
            write_chw(mask, masks[j])
            ids.append(sample_id)
        return {"slot": batch.slot, "index": torch.tensor(batch.positions), "id": ids}


def _check_shape(sample_id: str, array: np.ndarray, chw: torch.Size, name: str) -> None:
    height, width, channels = array.shape
    if (channels, height, width) != tuple(chw):
        raise InputError(
            f"{sample_id}: training {name} is {channels}x{height}x{width} (C x H x W) but this "
            f"run's batches are {'x'.join(map(str, chw))}: every training sample must come out "
            "of the augmentation at augment.height x augment.width"
        )


class WorkerInit:
    """A DataLoader `worker_init_fn`: `keep_freed_memory`, then `then(worker_id)` if given.

    A worker allocates and frees several MB of arrays per sample; with glibc's defaults each
    320x384 2.5D sample faulted ~300 pages in again, ~30 with this (benchmarks/README.md).
    """

    def __init__(self, then: Callable[[int], None] | None = None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        keep_freed_memory()
        if self.then is not None:
            self.then(worker_id)


def _keep(batch: dict[str, Any]) -> dict[str, Any]:
    # The sampled batch as the worker produced it: the default collate would stack it again.
    return batch


class PooledLoader:
    """Iterates like a DataLoader over `dataset`, yielding {"image", "mask", "index", "id"}."""

    def __init__(
        self,
        dataset: SegmentationDataset,
        *,
        batch_size: int,
        sampler: Sampler | None,
        drop_last: bool,
        num_workers: int,
        worker_init_fn: Any = None,
        prefetch_factor: int = PREFETCH_FACTOR,
        shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ):
        if num_workers < 1:
            raise ValueError("PooledLoader needs worker processes; use a DataLoader without")
        self.dataset = dataset
        self.sampler = sampler if sampler is not None else RandomSampler(dataset)
        self.slots = slot_count(num_workers, prefetch_factor)
        self.pool = BatchPool(self.slots, batch_size, *(shapes or sample_shapes(dataset)))
        batches = BatchSampler(self.sampler, batch_size, drop_last)
        self.loader = DataLoader(
            PooledDataset(dataset, self.pool),
            batch_sampler=SlotBatchSampler(batches, self.slots),
            collate_fn=_keep,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor,
            persistent_workers=True,
            worker_init_fn=WorkerInit(worker_init_fn),
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for k, batch in enumerate(self.loader):
            slot, n = batch["slot"], len(batch["id"])
            if slot != k % self.slots:  # the DataLoader's in-order delivery is what slots rely on
                raise RuntimeError(f"batch {k} arrived in slot {slot}, expected {k % self.slots}")
            yield {
                "image": self.pool.image[slot, :n],
                "mask": self.pool.mask[slot, :n],
                "index": batch["index"],
                "id": batch["id"],
            }


def slot_count(num_workers: int, prefetch_factor: int = PREFETCH_FACTOR) -> int:
    """Slots for a loader: the batches workers may be filling (num_workers x prefetch_factor),
    the batch in use, and the one before it."""
    return num_workers * prefetch_factor + 2


def sample_shapes(dataset: SegmentationDataset) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(image C x H x W, mask K x H x W) of the dataset's first sample, transformed."""
    image, mask = dataset.sample_arrays(0)
    return (image.shape[2], *image.shape[:2]), (mask.shape[2], *mask.shape[:2])


def shared_memory_free() -> int | None:
    """Free bytes in /dev/shm (where torch puts shared tensors on Linux), None if unknown."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def make_train_loader(
    dataset: SegmentationDataset,
    *,
    batch_size: int,
    sampler: Sampler | None,
    num_workers: int,
    pin_memory: bool = False,
    worker_init_fn: Any = None,
    pooled: bool = True,
) -> PooledLoader | DataLoader:
    """The training loader: shuffled (or `sampler`), full batches only, persistent workers.

    With workers, a `PooledLoader` unless `pooled` is False or /dev/shm has not room for its
    slots (Docker's default is 64 MiB; the pool for 16 x 3 x 320 x 384 takes ~106 MiB), in which
    case the plain DataLoader is used and a note says why. The dataset should be compact (float16
    image, uint8 mask) so both loaders give the same batches.
    """
    if num_workers > 0 and pooled:
        shapes = sample_shapes(dataset)
        needed = BatchPool.bytes_needed(slot_count(num_workers), batch_size, *shapes)
        free = shared_memory_free()
        if free is None or free > 2 * needed:
            return PooledLoader(
                dataset,
                batch_size=batch_size,
                sampler=sampler,
                drop_last=True,
                num_workers=num_workers,
                worker_init_fn=worker_init_fn,
                shapes=shapes,
            )
        print(
            f"note: {SHM_DIR} has {free / 2**20:.0f} MiB free, the batch pool needs "
            f"{needed / 2**20:.0f} MiB: using the plain DataLoader",
            flush=True,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=sampler is None,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=WorkerInit(worker_init_fn),
    )
