"""A fold's data for training: its table rows, the datasets and loaders over them, and each DDP
rank's share of the validation rows."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kaggle_seg.config import ExperimentConfig
from kaggle_seg.errors import KsegError
from kaggle_seg.runtime import Runtime
from kaggle_seg.spec import ModelSpec


def load_fold_tables(
    config: ExperimentConfig, fold: int, *, full: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, validation rows) of the table for `fold`, in table order; with `full`,
    every row trains and none validates."""
    from kaggle_seg.data.folds import read_folds
    from kaggle_seg.prepare import read_table

    if config.data.table is None or config.data.folds is None:
        raise KsegError(
            "config: data.table and data.folds must name the files of "
            "`kseg prepare` and `kseg folds` (or pass --set data.table=...)"
        )
    if not Path(config.data.table).is_file():  # the config's path, likely not the user's
        competition = config.data.competition
        raise KsegError(
            f"{config.data.table} (the config's data.table): file not found; write it with "
            f"`kseg prepare -c {competition} --data-dir DIR --out {config.data.table}`, or "
            "point to yours with --set data.table=PATH"
        )
    table = read_table(config.data.table)
    folds = read_folds(config.data.folds)
    table = table.merge(folds[["id", "fold"]], on="id", how="left")
    if table["fold"].isna().any():
        missing = table.loc[table["fold"].isna(), "id"].iloc[0]
        raise KsegError(f"{config.data.folds}: no fold for id {missing} of {config.data.table}")
    if full:
        return table.reset_index(drop=True), table.iloc[:0].reset_index(drop=True)
    if fold not in set(table["fold"]):
        raise KsegError(
            f"--fold {fold}: {config.data.folds} has folds {sorted(set(table['fold']))}"
        )
    train = table[table["fold"] != fold].reset_index(drop=True)
    valid = table[table["fold"] == fold].reset_index(drop=True)
    return train, valid


def shard_positions(
    valid: pd.DataFrame, runtime: Runtime, volume_key: str | None = None
) -> np.ndarray:
    """This rank's validation rows; volumes (`volume_key`, uwmgi case-days) stay whole so they
    can be scored."""
    if not runtime.distributed:
        return np.arange(len(valid))
    keys = valid[volume_key] if volume_key else valid["id"]
    owners = pd.factorize(keys)[0] % runtime.world_size
    return np.flatnonzero(owners == runtime.rank)


def _seed_worker(worker_id: int) -> None:
    # albumentations 2 draws from its own generators: seed them from torch's per-worker seed so
    # a run (and its resume) augments the same way.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def fold_datasets(
    config: ExperimentConfig,
    competition: Any,
    spec: ModelSpec,
    train_table: pd.DataFrame,
    valid_table: pd.DataFrame,
    cache_folder: Path,
) -> tuple[Any, Any]:
    """(train, validation) datasets sharing one decoded-image store over the fold's table;
    validation sees the inputs prediction will (`spec.eval_transform`)."""
    from kaggle_seg.data.dataset import SegmentationDataset, build_stores
    from kaggle_seg.data.input_steps import with_input_steps
    from kaggle_seg.data.transforms import build_transforms

    data = config.data
    table = pd.concat([train_table, valid_table], ignore_index=True)
    image_store, mask_store = build_stores(
        competition,
        table,
        config.train.cache,
        folder=cache_folder,
        targets=data.targets,
        preprocess=data.preprocess,
    )
    transforms = {
        True: with_input_steps(build_transforms(config.augment, True), data.preprocess),
        False: spec.eval_transform(),  # validation sees what prediction will
    }
    return tuple(
        SegmentationDataset(
            competition,
            part,
            transforms[train],
            stack_depth=data.stack_depth,
            stack_stride=data.stack_stride,
            targets=data.targets,
            image_store=image_store,
            mask_store=mask_store,
            compact=True,
        )
        for part, train in ((train_table, True), (valid_table, False))
    )


def fold_loaders(
    config: ExperimentConfig,
    competition: Any,
    spec: ModelSpec,
    train_table: pd.DataFrame,
    valid_table: pd.DataFrame,
    runtime: Runtime,
    cache_folder: Path,
    fold: int,
) -> tuple[Any, Any, np.ndarray]:
    """(training loader, validation loader, this rank's validation rows) of a fold."""
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from kaggle_seg.data.loader import WorkerInit, make_train_loader
    from kaggle_seg.spec import shape_batches

    train_cfg = config.train
    train_set, valid_set = fold_datasets(
        config, competition, spec, train_table, valid_table, cache_folder
    )
    if train_cfg.sampler_weight_column:
        from kaggle_seg.data.dataset import weighted_sampler

        sampler = weighted_sampler(
            train_table,
            train_cfg.sampler_weight_column,
            num_samples=len(train_table) // runtime.world_size,
            power=train_cfg.sampler_weight_power,
            seed=train_cfg.seed + runtime.rank,
        )
    elif runtime.distributed:
        sampler = DistributedSampler(train_set, seed=train_cfg.seed, drop_last=True)
    else:
        sampler = None
    loader_args = {
        "batch_size": train_cfg.batch_size,
        "num_workers": train_cfg.num_workers,
        "pin_memory": runtime.device.type == "cuda",
    }
    train_loader = make_train_loader(
        train_set,
        sampler=sampler,
        pooled=train_cfg.pooled_loader,
        worker_init_fn=_seed_worker,
        **loader_args,
    )
    if len(train_loader) == 0:
        raise KsegError(
            f"fold {fold}: {len(train_set)} training images are fewer than "
            f"one batch of {train_cfg.batch_size}"
        )
    positions = shard_positions(valid_table, runtime, competition.volume_key)
    valid_subset = Subset(valid_set, positions.tolist())
    # Batches of one input shape ("crop" validates whole images of many sizes); volumes
    # (uwmgi case-days) are scored slice by slice in table order, so their rows stay in order.
    batches = shape_batches(
        valid_table.iloc[positions],
        [spec],
        train_cfg.batch_size,
        keep_order=competition.volume_key is not None,
    )
    valid_loader = DataLoader(
        valid_subset,
        batch_sampler=batches,
        persistent_workers=train_cfg.num_workers > 0,
        worker_init_fn=WorkerInit(_seed_worker),
        num_workers=train_cfg.num_workers,
        pin_memory=runtime.device.type == "cuda",
    )
    return train_loader, valid_loader, positions
