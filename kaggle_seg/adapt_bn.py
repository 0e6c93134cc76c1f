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

`train.adapt_bn_weight` below 1 keeps part of the trained statistics (Schneider et al. 2020,
"Improving robustness against common corruptions by covariate shift adaptation", blend source
and target statistics): each layer's statistics are those of a pooled population, a share
`weight` of test crops and the rest training images, as batches mixing the two would give. The
blend is applied layer by layer during the passes, so every layer sees its inputs as the
blended model will make them.
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

from kaggle_seg.batchnorm import recalibrate_batchnorm, trainable_batchnorms
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


def pooled_statistics(
    mean: torch.Tensor, var: torch.Tensor, source: tuple[torch.Tensor, torch.Tensor], weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of a population that is `weight` test (`mean`, `var`) and the rest
    `source` (the trained statistics): the variance gains the spread between the two means."""
    source_mean, source_var = source
    pooled_mean = weight * mean + (1 - weight) * source_mean
    pooled_var = (
        weight * var + (1 - weight) * source_var + weight * (1 - weight) * (mean - source_mean) ** 2
    )
    return pooled_mean, pooled_var


@torch.no_grad()
def recalibrate_blended(
    model: nn.Module,
    batches: Iterator[torch.Tensor],
    to_input: Callable[[torch.Tensor], torch.Tensor],
    max_batches: int,
    weight: float,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> int:
    """BN statistics pooled from the trained ones and `batches` (share `weight`). Each layer
    runs in eval mode on the running statistics that a pre-hook sets to the pooled statistics
    of the batch it is given, so any BN subclass (timm's BatchNormAct2d) normalises with them;
    the hook also averages the batch statistics, pooled with the trained ones at the end."""
    layers = trainable_batchnorms(model)
    if not layers or max_batches <= 0:
        return 0
    sources = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    sums = [[torch.zeros_like(mean), torch.zeros_like(mean)] for mean, _ in sources]

    def pool_batch(index: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].float()
            dims = [d for d in range(x.dim()) if d != 1]
            mean = x.mean(dims)
            biased = x.var(dims, unbiased=False)
            # Averaged unbiased and normalised with the biased variance, as BN's train mode
            # does: at weight 1 this is `recalibrate_batchnorm` exactly.
            count = x.numel() // x.shape[1]
            sums[index][0] += mean
            sums[index][1] += biased * count / max(count - 1, 1)
            pooled = pooled_statistics(mean, biased, sources[index], weight)
            layer.running_mean.copy_(pooled[0])
            layer.running_var.copy_(pooled[1])

        return hook

    was_training = model.training
    model.eval()
    hooks = [m.register_forward_pre_hook(pool_batch(i)) for i, m in enumerate(layers)]
    used = 0
    try:
        for batch in batches:
            if used >= max_batches:
                break
            with autocast():
                model(to_input(batch))
            used += 1
    finally:
        for hook in hooks:
            hook.remove()
        for layer, source, (mean_sum, var_sum) in zip(layers, sources, sums, strict=True):
            # Interrupted before a batch: the trained statistics stay as they were.
            mean, var = (
                pooled_statistics(mean_sum / used, var_sum / used, source, weight)
                if used
                else source
            )
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        model.train(was_training)
    return used


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
    weight: float = 1.0,
) -> int:
    """Recompute `model`'s BN statistics from crops of `table`'s images (read and transformed
    as `spec` predicts them; `images`: a reader from `image_reader` to share between models of
    one spec); `weight` < 1 pools them with the trained ones (`recalibrate_blended`). Returns
    the batches used: 0 when `batches` is 0 or the table has fewer than MIN_IMAGES rows (the
    trained statistics stay)."""
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
    if weight < 1:
        return recalibrate_blended(model, stream, to_input, batches, weight, autocast)
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
            weight=cfg.adapt_bn_weight,
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
