"""BatchNorm statistics of the images being predicted (AdaBN over a test set).

A trained model's BN running statistics describe its training images. A test set from other
instruments or stains (DSB stage 1: dim slides, stained tissue and strips that stage1_train
lacks) shifts every layer's activations away from them. Recomputing the statistics on the test
images themselves, no labels needed (Li et al. 2016, "Revisiting batch normalization for
practical domain adaptation"), moves the model to them: on five DSB checkpoints stage 1 rose by
0.010 mAP on average (four of five up) with the fold-0 OOF level (benchmarks/README.md, "BN
statistics of the test set"). `train.adapt_bn_batches` turns it on: the OOF pass adapts to
the validation fold, so the tuned post-processing fits predictions made as the submission
makes them.

The statistics come from batches like training's: `batch_size` random crops of the model's
training size from different images, all in one random view of the prediction TTA. One image at
a time does not work (per-image AdaBN on stage 1: 0.43 -> 0.30, measured), so a set smaller than
`MIN_IMAGES` keeps the trained statistics. Crops are drawn with a fixed seed from the whole
table, so every torchrun rank computes the same statistics without a collective.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from kaggle_seg.batchnorm import recalibrate_batchnorm
from kaggle_seg.spec import ModelSpec

# Fewer images than this and the statistics would describe a handful of slides, not a set.
MIN_IMAGES = 16


def crop_batches(
    images: Callable[[int], torch.Tensor],
    count: int,
    crop: tuple[int, int],
    *,
    batches: int,
    batch_size: int,
    views: list[Callable[[torch.Tensor], torch.Tensor]],
    seed: int,
) -> Iterator[torch.Tensor]:
    """`batches` batches [B, C, h, w] of random crops: each of `batch_size` images drawn from
    the `count` that `images(i)` gives ([C, H, W], as the model takes them; called once per
    draw, so a reader that decodes should cache), cropped to `crop`
    (or to the smallest image of the batch, so nothing is padded with values training never
    saw), the batch in one random view."""
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        chosen = rng.choice(count, size=batch_size, replace=batch_size > count)
        picked = [images(int(i)) for i in chosen]
        height = min(crop[0], *(x.shape[-2] for x in picked))
        width = min(crop[1], *(x.shape[-1] for x in picked))
        crops = []
        for x in picked:
            top = int(rng.integers(0, x.shape[-2] - height + 1))
            left = int(rng.integers(0, x.shape[-1] - width + 1))
            crops.append(x[:, top : top + height, left : left + width])
        view = views[int(rng.integers(0, len(views)))]
        yield view(torch.stack(crops))


def image_reader(
    competition: Any, table: pd.DataFrame, spec: ModelSpec
) -> Callable[[int], torch.Tensor]:
    """Row i of `table` as `spec`'s model takes it ([C, H, W]), each image decoded once."""
    from kaggle_seg.predict import PredictionDataset

    dataset = PredictionDataset(competition, table.reset_index(drop=True), [spec])

    @functools.cache
    def image(i: int) -> torch.Tensor:
        return dataset[i]["inputs"][0]

    return image


def adapt_batchnorm(
    model: nn.Module,
    spec: ModelSpec,
    competition: Any,
    table: pd.DataFrame,
    *,
    batches: int,
    batch_size: int,
    tta: str,
    autocast: Callable[[], AbstractContextManager[Any]],
    channels_last: bool,
    seed: int = 0,
    images: Callable[[int], torch.Tensor] | None = None,
) -> int:
    """Recompute `model`'s BN statistics from crops of `table`'s images (read and transformed
    as `spec` predicts them; `images`: a reader from `image_reader` to share between models of
    one spec). Returns the batches used: 0 when `batches` is 0 or the table has fewer than
    MIN_IMAGES rows (the trained statistics stay)."""
    from kaggle_seg.tta import get_tta

    if batches <= 0 or len(table) < MIN_IMAGES:
        return 0
    device = next(model.parameters()).device

    def to_input(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch

    stream = crop_batches(
        images or image_reader(competition, table, spec),
        len(table),
        (spec.height, spec.width),
        batches=batches,
        batch_size=batch_size,
        views=[t.augment for t in get_tta(tta)],
        seed=seed,
    )
    return recalibrate_batchnorm(model, stream, to_input, batches, autocast=autocast)


def adapt_members(
    members: list[Any], competition: Any, table: pd.DataFrame, tta: str, batches: int | None
) -> str | None:
    """Every member of an ensemble adapted to `table` (`batches`: None = each member's
    `train.adapt_bn_batches`, as its OOF was predicted). Returns a note for the user, or None
    when nothing was asked."""
    from kaggle_seg.predict import member_autocast

    def wanted(member: Any) -> int:
        return member.config.train.adapt_bn_batches if batches is None else batches

    asked = [m for m in members if wanted(m)]
    if not asked:
        return None
    if len(table) < MIN_IMAGES:
        return (
            f"BN statistics: the trained ones ({len(table)} images to predict, fewer than "
            f"{MIN_IMAGES} to adapt them to)"
        )
    readers: dict[ModelSpec, Callable[[int], torch.Tensor]] = {}  # folds of one spec share
    used = 0
    for member in asked:
        cfg = member.config.train
        if member.spec not in readers:
            readers[member.spec] = image_reader(competition, table, member.spec)
        used = adapt_batchnorm(
            member.model,
            member.spec,
            competition,
            table,
            batches=wanted(member),
            batch_size=cfg.batch_size,
            tta=tta,
            autocast=lambda member=member: member_autocast(member),
            channels_last=cfg.channels_last,
            seed=cfg.seed,
            images=readers[member.spec],
        )
    return (
        f"BN statistics: adapted to the {len(table)} images to predict ({len(asked)} of "
        f"{len(members)} model(s), {used} batches of crops each)"
    )


def adapt_mismatch(members: list[Any], batches: int | None) -> str | None:
    """A one-line warning when `--adapt-bn` turns adaptation on or off against how the members'
    OOF was predicted (`train.adapt_bn_batches`): `kseg tune` chose thresholds on that OOF."""
    if batches is None:
        return None
    tuned = {m.config.train.adapt_bn_batches > 0 for m in members}
    if tuned == {batches > 0}:
        return None
    how = "with BN adapted" if True in tuned else "with the trained BN statistics"
    return (
        f"--adapt-bn {batches}: the post-processing was tuned on OOF predicted {how} "
        "(train.adapt_bn_batches); predict the same way for thresholds that transfer"
    )
