"""`kseg submit` under torchrun: every process predicts its share of the test set into a part of
the submission, and rank 0 joins the parts in the order one process writes them. `kseg predict
--save` shares the same way (its npz parts joined by probabilities.join_probability_files).

    torchrun --standalone --nproc_per_node 2 -m kaggle_seg submit --checkpoints ... --data-dir ...

On a Kaggle T4 x2 that is both GPUs (one process each, `cuda:<LOCAL_RANK>`) and two processes
for the CPU side (decoding, post-processing, RLE). Shares are whole volumes (2.5D stacks and the
z rule need a slice's neighbours) or images, balanced by pixels. The joined file is the file
one process writes, row for row (tests/test_submit_shards.py).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from kaggle_seg.competitions.base import Skipped, TestSet
from kaggle_seg.errors import KsegError

# Ranks wait for the slowest one's share before the join; Kaggle's limit is 9 hours.
JOIN_TIMEOUT = dt.timedelta(hours=9)


def world_size() -> int:
    """The torchrun processes sharing this submission (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_shares(device: str | None) -> tuple[Any, str]:
    """(runtime, device) for `kseg submit` / `kseg predict`: under torchrun this process joins
    the group that shares the test set and predicts on its own device (`cuda:<LOCAL_RANK>`);
    alone, runtime is None and the device the one asked for, else cuda when visible."""
    import torch

    runtime = None
    if world_size() > 1:
        from kaggle_seg.runtime import start_runtime

        runtime = start_runtime(device, timeout=JOIN_TIMEOUT)
        device = str(runtime.device)
    return runtime, device or ("cuda" if torch.cuda.is_available() else "cpu")


def gather_then_join(
    mine: Any, runtime: Any, join: Callable[[list[Any]], Any]
) -> tuple[list[Any], Any]:
    """(every rank's `mine`, on every rank; what `join(shares)` returned on rank 0, else None).
    Rank 0 joins the parts into one output while the others wait, then the process group
    closes, so no rank reports before the joined output exists."""
    import torch.distributed as dist

    from kaggle_seg.runtime import gather

    shares = gather(mine, runtime)
    joined = join(shares) if runtime.is_main else None
    dist.barrier()
    dist.destroy_process_group()
    return shares, joined


def shard_of(test: TestSet, volume_key: str | None, rank: int, world: int) -> TestSet:
    """This rank's rows of `test`, in table order: whole groups of `volume_key` (each image
    alone when None), given largest first to the rank with the least work so far, counted in
    pixels where the table has the sizes (DSB's images range from 256x256 to 1024x1360)."""
    table = test.table
    groups = table[volume_key] if volume_key else table["id"]
    if {"height", "width"} <= set(table.columns):
        work = (table["height"] * table["width"]).astype("int64")
    else:
        work = pd.Series(1, index=table.index)
    sizes = work.groupby(groups.to_numpy(), sort=False).sum()
    load = [0] * world
    owner: dict[object, int] = {}
    # Largest first, ties in table order: every rank computes the same split.
    order = sorted(range(len(sizes)), key=lambda i: -int(sizes.iloc[i]))
    for i in order:
        r = min(range(world), key=lambda k: load[k])
        owner[sizes.index[i]] = r
        load[r] += int(sizes.iloc[i])
    mine = table[groups.map(owner).to_numpy() == rank].reset_index(drop=True)
    sample = test.sample
    if sample is not None:
        sample = sample[sample["id"].isin(set(mine["id"]))].reset_index(drop=True)
    return replace(test, table=mine, sample=sample)


def skipped_of(
    skipped: list[Skipped] | None, shard: TestSet, table: pd.DataFrame, rank: int
) -> list[Skipped] | None:
    """The skips this rank's part reports: its own images' (failed while predicting), and on
    rank 0 also those whose header could not be read (not in the table, so in no share)."""
    if skipped is None:
        return None
    own = set(shard.table["id"])
    listed = set(table["id"])
    return [s for s in skipped if s.id in own or (rank == 0 and s.id not in listed)]


def part_path(out: Path, rank: int, directory: bool) -> Path:
    """Where rank `rank` writes its part: beside `out` for a file, `out` itself for a folder of
    per-image files (names do not collide: every image is in one share)."""
    if directory:
        return out
    return out.with_name(f"{out.stem}.part{rank}{out.suffix}")


def join_parts(
    parts: Sequence[Path],
    out: Path,
    test: TestSet,
    skipped: Sequence[Skipped],
    columns: Sequence[str],
) -> int:
    """The parts' rows as one CSV at `out`, in the order one process writes: the sample
    submission's when it lists the rows, else the table's, then images that could not be read.
    Returns the row count; the parts are removed."""
    from kaggle_seg.io import write_csv_atomic

    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in parts]
    frame = pd.concat(frames, ignore_index=True)
    if list(frame.columns) != list(columns):
        raise KsegError(f"{parts[0]}: columns {list(frame.columns)}, expected {list(columns)}")
    keys = list(columns[:-1])
    sample = test.sample
    if sample is not None and len(sample) and set(keys) <= set(sample.columns):
        reference = list(sample[keys].astype(str).itertuples(index=False, name=None))
        position = {key: i for i, key in reversed(list(enumerate(reference)))}
        where = [position.get(key, len(position)) for key in frame[keys].itertuples(False, None)]
    else:
        ids = [*test.table["id"], *(s.id for s in skipped)]
        first = {image_id: i for i, image_id in reversed(list(enumerate(ids)))}
        where = [first.get(image_id, len(first)) for image_id in frame[columns[0]]]
    frame = frame.iloc[pd.Series(where).argsort(kind="stable").to_numpy()]
    write_csv_atomic(frame, out)
    for part in parts:
        part.unlink(missing_ok=True)
    return len(frame)
