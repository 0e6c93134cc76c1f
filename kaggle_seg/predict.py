"""Probabilities from checkpoints: TTA, fold and model ensembles, streamed one image at a time.

A checkpoint carries its resolved config, so prediction rebuilds each model and its input
pipeline (size, padding or resizing, normalisation, 2.5D depth) without the training command
line. Images are read and pre-processed in DataLoader workers, batched by input shape, run under
`torch.inference_mode` (with AMP on GPU), and each image's ensembled probabilities are yielded at
the image's own size, so the whole test set is never held in memory. Models with a
classification head (smp `aux_params`) also give per-image class probabilities on request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from kaggle_seg.competitions.base import Skipped
from kaggle_seg.ensemble_weights import check_weights
from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.runs import find_checkpoints
from kaggle_seg.spec import (
    ModelSpec,
    forward_tiled,
    pad_to_divisor,
    restore_size,
    shape_batches,
)

log = logging.getLogger(__name__)

EnsembleMode = Literal["mean", "logit"]
OnError = Literal["skip", "fail"]


# -- checkpoints --


@dataclass
class Member:
    """One model of an ensemble, with what it needs to be fed."""

    model: Any  # torch.nn.Module, in eval mode on its device
    config: Any  # ExperimentConfig
    spec: ModelSpec
    weight: float
    source: Path
    has_class_head: bool = False  # the model returns (mask logits, class logits)

    @property
    def classes(self) -> tuple[str, ...]:
        """The names of the output channels (the spec's outputs, e.g. nuclei, border)."""
        return self.spec.outputs

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels


def load_member(path: Path, weight: float, device: Any) -> Member:
    """Rebuild a model from a checkpoint's embedded config and load its weights."""
    import torch

    from kaggle_seg.checkpoints import checkpoint_config, load_checkpoint
    from kaggle_seg.models import build_model, has_class_head, load_checked

    state = load_checkpoint(path)  # tensors and plain data only: no code runs
    config = checkpoint_config(state, path)
    # Weights come from the checkpoint: local pre-training paths of the training machine are
    # neither needed nor present where predictions run (a Kaggle kernel).
    model_config = config.model.model_copy(
        update={"encoder_weights": None, "encoder_weights_path": None, "weights_path": None}
    )
    spec = ModelSpec.from_checkpoint(state, config)
    model = build_model(model_config, spec.in_channels, len(spec.outputs))
    load_checked(model, state["model"], path, "embedded config", strict=True)
    model.eval().to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Member(
        model=model,
        config=config,
        spec=spec,
        weight=float(weight),
        source=path,
        has_class_head=has_class_head(config.model),
    )


def member_autocast(member: Member) -> Any:
    """The autocast context `member` predicts under: its `train.amp` on its device (bf16 on a
    CPU that computes it natively; runtime.autocast_settings)."""
    import torch

    from kaggle_seg.runtime import autocast_settings

    device = next(member.model.parameters()).device
    enabled, dtype = autocast_settings(member.config.train.amp, device)
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def load_ensemble(
    sources: Sequence[str | Path], weights: Sequence[float] | None = None, device: Any = "cpu"
) -> list[Member]:
    """Every checkpoint under `sources`; `weights` (one per source) split evenly over its folds.

    Members must agree on competition, classes and input channels: otherwise their
    probabilities cannot be averaged, and the error names both checkpoints.
    """
    from kaggle_seg.runtime import parse_device

    device = parse_device(device)
    shares = check_weights(weights, len(sources), "checkpoint source")
    members: list[Member] = []
    for k, source in enumerate(sources):
        found = find_checkpoints(source)
        weight = shares[k] / len(found)
        members.extend(load_member(path, weight, device) for path in found)
    if not members:
        raise KsegError("no checkpoints given")
    first = members[0]
    for other in members[1:]:
        for what in ("classes", "in_channels"):
            if getattr(other, what) != getattr(first, what):
                raise KsegError(
                    f"checkpoints disagree on {what}: {first.source} has "
                    f"{getattr(first, what)}, {other.source} has {getattr(other, what)}"
                )
        first_name, other_name = first.config.data.competition, other.config.data.competition
        if other_name != first_name:
            raise KsegError(
                f"checkpoints disagree on competition: {first.source} is {first_name}, "
                f"{other.source} is {other_name}"
            )
    return members


# -- reading test images --


class PredictionDataset:
    """Test rows -> {"index", "inputs": one float32 [C, h, w] tensor per ModelSpec, "ok",
    "error": why a skipped row failed, else ""}.

    A read failure names the file; with on_error="skip" the image becomes a blank input, marked
    not ok, so its prediction is empty and the run goes on.
    """

    def __init__(
        self,
        competition: Any,
        table: pd.DataFrame,
        specs: Sequence[ModelSpec],
        on_error: OnError = "fail",
    ):
        from kaggle_seg.preprocess import PreprocessedReader

        self.competition = competition
        self.rows = table.to_dict("records")
        self.specs = list(specs)
        self.on_error = on_error
        self.transforms = [s.eval_transform() for s in self.specs]
        # The "store" steps (n4, clahe) of each spec, on the image as read.
        self.readers = [PreprocessedReader(s.preprocess_steps) for s in self.specs]
        self.stacks = []
        for s in self.specs:
            if s.stack_depth > 1:
                from kaggle_seg.data.stacks import stack_positions

                volume_key = competition.volume_key
                if volume_key is None:
                    raise KsegError(
                        f"stack_depth {s.stack_depth}: {competition.name} images are not "
                        "slices of a volume"
                    )
                self.stacks.append(
                    stack_positions(table, s.stack_depth, s.stack_stride, volume_key)
                )
            else:
                self.stacks.append(None)

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, position: int, cache: dict[int, np.ndarray], k: int = 0) -> np.ndarray:
        """The image at `position` as spec k's model takes it (before the transform)."""

        def read(p: int) -> np.ndarray:
            if p not in cache:
                cache[p] = self.competition.read_image(self.rows[p])
            return cache[p]

        return self.readers[k](position, read)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        cache: dict[int, np.ndarray] = {}
        row = self.rows[i]
        try:
            images = []
            for k, stack in enumerate(self.stacks):
                if stack is None:
                    images.append(self._read(i, cache, k))
                else:
                    slices = [self._read(p, cache, k) for p in stack[i]]
                    images.append(np.concatenate(slices, -1))
            ok, error = True, ""
        except (InputError, OSError, ValueError) as exc:
            if self.on_error == "fail":
                raise InputError(f"{exc} (pass --on-error skip to predict it as empty)") from exc
            log.warning("skipping %s: %s", row["id"], exc)
            error = str(exc)
            channels = self.competition.channels
            blank = np.zeros((int(row["height"]), int(row["width"]), channels), np.float32)
            images = [np.repeat(blank, s.stack_depth, axis=-1) for s in self.specs]
            ok = False
        inputs = [
            torch.from_numpy(np.ascontiguousarray(t(image=img)["image"].transpose(2, 0, 1)))
            for t, img in zip(self.transforms, images, strict=True)
        ]
        return {"index": i, "inputs": inputs, "ok": ok, "error": error}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    return {
        "index": [item["index"] for item in items],
        "ok": [item["ok"] for item in items],
        "error": [item["error"] for item in items],
        "inputs": [
            torch.stack(group) for group in zip(*(item["inputs"] for item in items), strict=True)
        ],
    }


# -- the loop --


class _ClassLogitsCapture:
    """A head model as `tta_logits` wants one: returns the mask logits `[N, K, H, W]` and keeps
    the class logits `[N, K]` of every call, in call order (views stacked along the batch)."""

    def __init__(self, model: Any):
        self.model = model
        self.class_logits: list[Any] = []

    def __call__(self, images: Any) -> Any:
        from kaggle_seg.models import split_outputs

        logits, class_logits = split_outputs(self.model(images))
        if class_logits is not None:
            self.class_logits.append(class_logits)
        return logits


def predict_probabilities(
    members: Sequence[Member],
    competition: Any,
    table: pd.DataFrame,
    *,
    tta: str = "none",
    merge: str = "mean",
    ensemble: EnsembleMode = "mean",
    batch_size: int = 8,
    num_workers: int = 2,
    on_error: OnError = "fail",
    batched_tta: bool = True,
    with_class_probabilities: bool = False,
    skipped: list[Any] | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Yield (table position, id, float32 [K, H, W] probabilities) for every row, in order.

    `ensemble`: "mean" averages the members' probabilities with their weights (after each merged
    its TTA views with `merge`); "logit" averages logits over views and members, then applies the
    sigmoid once. A row that failed to read (on_error="skip") yields zeros.

    `with_class_probabilities`: yield (position, id, probabilities, class probabilities) instead,
    the last float32 [K] from the members with a classification head (None when none has one):
    per member the sigmoid averaged over the TTA views (the head sees the whole image, so a flip
    changes its answer only a little), then the members' weighted mean whatever `ensemble` is.

    `skipped`: a list that gets a `Skipped` record for every row that failed to read.
    """
    import torch
    from torch.utils.data import DataLoader

    from kaggle_seg.tta import get_tta, merge_probabilities, tta_logits

    if ensemble not in ("mean", "logit"):
        raise KsegError(f"unknown ensemble mode {ensemble!r}; choose mean or logit")
    if len(table) == 0:
        return
    transforms = get_tta(tta)
    specs = list(dict.fromkeys(m.spec for m in members))
    spec_index = [specs.index(m.spec) for m in members]
    device = next(members[0].model.parameters()).device
    dataset = PredictionDataset(competition, table, specs, on_error)
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_sampler=shape_batches(table, specs, batch_size),
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    heights = table["height"].astype(int).to_numpy()
    widths = table["width"].astype(int).to_numpy()
    ids = table["id"].astype(str).to_numpy()
    total_weight = sum(m.weight for m in members)
    head_weight = sum(m.weight for m in members if m.has_class_head)
    want_classes = with_class_probabilities and head_weight > 0
    for batch in loader:
        positions = batch["index"]
        sums: list[np.ndarray | None] = [None] * len(positions)
        class_sums = np.zeros((len(positions), len(members[0].classes)), np.float64)
        # Inference mode for the model passes only: a generator that yields inside it would
        # leave the caller in inference mode (and keep it there if abandoned mid-way).
        with torch.inference_mode():
            for member, k in zip(members, spec_index, strict=True):
                images = batch["inputs"][k].to(device, non_blocking=True)
                if member.config.train.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                images, h, w = pad_to_divisor(images, member.spec.divisor)
                model = _ClassLogitsCapture(member.model) if member.has_class_head else None
                spec = member.spec

                def views(tiles: Any, model: Any = model or member.model) -> Any:
                    return tta_logits(model, tiles, transforms, batched=batched_tta)

                with member_autocast(member):
                    # Tiled only in "crop" mode, for images with a side above tile_size.
                    tile = spec.tile_size if spec.resize_mode == "crop" else None
                    logits = forward_tiled(views, images, tile, spec.tile_overlap, spec.divisor)
                if model is not None and want_classes:
                    # [views * B, K] in call order -> [views, B, K]: every call is whole views
                    class_logits = torch.cat(model.class_logits).float()
                    class_logits = class_logits.reshape(-1, len(positions), class_logits.shape[-1])
                    class_probabilities = torch.sigmoid(class_logits).mean(0).cpu().numpy()
                    class_sums += member.weight * class_probabilities
                logits = logits[..., :h, :w].float()
                if ensemble == "logit":
                    merged = logits.mean(0)
                else:
                    merged = merge_probabilities(torch.sigmoid(logits), merge)
                merged_np = merged.cpu().numpy()
                for j, position in enumerate(positions):
                    restored = member.weight * restore_size(
                        merged_np[j], heights[position], widths[position], member.spec.resize_mode
                    )
                    sums[j] = restored if sums[j] is None else sums[j] + restored
        for j, position in enumerate(positions):
            result = sums[j] / total_weight
            if ensemble == "logit":
                result = 1.0 / (1.0 + np.exp(-result))
            if not batch["ok"][j]:
                result = np.zeros_like(result)
                if skipped is not None:
                    path = str(table["image_path"].iloc[position])
                    skipped.append(Skipped(ids[position], path, batch["error"][j]))
            result = result.astype(np.float32, copy=False)
            if not with_class_probabilities:
                yield position, ids[position], result
                continue
            classes = None
            if want_classes:
                classes = (class_sums[j] / head_weight).astype(np.float32)
                if not batch["ok"][j]:
                    classes = np.zeros_like(classes)
            yield position, ids[position], result, classes


def default_tta(members: Sequence[Any]) -> str:
    """The TTA when none is asked for: the one every member's OOF was predicted with
    (`train.oof_tta`), as `kseg tune` chose the post-processing on those probabilities; flip
    for members with plain OOF or disagreeing ones."""
    tuned_with = {m.config.train.oof_tta for m in members} - {"none"}
    return tuned_with.pop() if len(tuned_with) == 1 else "flip"
