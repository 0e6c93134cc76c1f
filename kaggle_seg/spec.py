"""The model's contract (`ModelSpec`): what goes in, what comes out, how an image becomes a model
input and how the output goes back.

One place for the sizing rule and its inverse, used by training (validation, OOF) and by
prediction alike:

- "resize": every image is resized to height x width; outputs are resized back (bilinear).
- "pad": every image is centre-padded to at least height x width (uwmgi scans to 320 x 384, so a
  batch shares one shape); outputs are cropped back (`pad_offsets`).
- "crop": training sees random height x width crops at the image's native scale; validation and
  prediction see the whole image, only padded (bottom / right) to a multiple of SIZE_DIVISOR, and
  cut into overlapping tiles when a side exceeds `tile_size`. Nothing is resampled, so small
  objects (DSB nuclei in a 1024 x 1024 image) keep every pixel.

In every mode the model input is finally padded bottom / right to a multiple of the spec's
divisor (SIZE_DIVISOR, `pad_to_divisor`) and the output cropped back before `restore_size`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from kaggle_seg.errors import KsegError

# Encoder-decoders halve the input 5 times: inputs are padded to a multiple of this.
SIZE_DIVISOR = 32
RESIZE_MODES: tuple[str, ...] = ("resize", "pad", "crop")
# The output channel that holds instance borders (targets "mask_border"): the instance split
# finds it by this name, never by the number of channels.
BORDER = "border"


@dataclass(frozen=True)
class ModelSpec:
    """One model's input / output contract: what goes in (channels, size and resize mode,
    normalisation, preprocessing, 2.5D stack, divisor, tiling) and what comes out (the names of
    the output channels, e.g. ("nuclei", "border")).

    Built once when training starts (`for_training`), saved in every checkpoint as plain data
    (`as_dict`), and read back (`from_checkpoint`) by prediction, tuning, post-processing, show
    and the kernel; a checkpoint of an older kseg without one gets it from its embedded config.
    Frozen and hashable: models of one spec share their input pipeline in an ensemble.
    """

    in_channels: int  # image channels x stack_depth
    outputs: tuple[str, ...]  # output channel names: the mask classes, then "border" if any
    height: int
    width: int
    resize_mode: str
    normalize: str
    stack_depth: int = 1
    stack_stride: int = 1
    divisor: int = SIZE_DIVISOR
    tile_size: int | None = None  # "crop": whole images above this side are tiled
    tile_overlap: float = 0.25
    # Resolved data.preprocess (kaggle_seg/preprocess.py) as JSON text, so that specs stay
    # hashable: "store" steps on each image read, "input" steps after the sizing, as in training.
    preprocess: str = "[]"

    @classmethod
    def for_training(cls, config: Any, competition: Any) -> ModelSpec:
        """The spec of a model trained with `config` on `competition`: its classes (and the
        border channel for targets "mask_border"), its image channels times the stack depth."""
        outputs = list(competition.classes)
        if config.data.targets == "mask_border":
            outputs.append(BORDER)
        return cls._from_config(config, competition.channels * config.data.stack_depth, outputs)

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any], config: Any) -> ModelSpec:
        """The spec stored in a checkpoint; for one of an older kseg, built from its embedded
        `config` and its `classes` / `in_channels` entries, which it always had."""
        stored = state.get("spec")
        if stored is not None:
            return cls.from_dict(stored)
        return cls._from_config(config, int(state["in_channels"]), list(state["classes"]))

    @classmethod
    def _from_config(cls, config: Any, in_channels: int, outputs: Sequence[str]) -> ModelSpec:
        augment, data = config.augment, config.data
        return cls(
            in_channels=int(in_channels),
            outputs=tuple(outputs),
            height=augment.height,
            width=augment.width,
            resize_mode=augment.resize_mode,
            normalize=augment.normalize,
            stack_depth=data.stack_depth,
            stack_stride=data.stack_stride,
            divisor=SIZE_DIVISOR,
            tile_size=getattr(augment, "tile_size", None),
            tile_overlap=getattr(augment, "tile_overlap", 0.25),
            preprocess=json.dumps(getattr(data, "preprocess", []), sort_keys=True),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint (loads with torch.load(weights_only=True))."""
        values = asdict(self)
        values["outputs"] = list(self.outputs)
        values["preprocess"] = self.preprocess_steps
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelSpec:
        values = dict(values)
        values["outputs"] = tuple(values["outputs"])
        values["preprocess"] = json.dumps(values.get("preprocess", []), sort_keys=True)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @property
    def classes(self) -> tuple[str, ...]:
        """The mask channels: every output but the border."""
        return tuple(name for name in self.outputs if name != BORDER)

    @property
    def preprocess_steps(self) -> list[dict[str, Any]]:
        return json.loads(self.preprocess)

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) an image of this size reaches the model at (before the divisor padding)."""
        if self.resize_mode == "resize":
            return self.height, self.width
        if self.resize_mode == "crop":
            return height, width
        return max(self.height, height), max(self.width, width)

    def eval_transform(self) -> Any:
        """The validation / prediction pipeline (albumentations): the sizing, the normalisation
        and the "input" preprocessing steps, as training validates."""
        from kaggle_seg.config import AugmentConfig
        from kaggle_seg.data.input_steps import with_input_steps
        from kaggle_seg.data.transforms import build_transforms

        sizing = AugmentConfig(
            preset="none",
            height=self.height,
            width=self.width,
            resize_mode=self.resize_mode,  # type: ignore[arg-type]
            normalize=self.normalize,  # type: ignore[arg-type]
        )
        return with_input_steps(build_transforms(sizing, train=False), self.preprocess_steps)


def channel_indices(outputs: Sequence[str], names: Sequence[str]) -> list[int]:
    """Positions of `names` among the output channels `outputs`; KsegError for a name the
    model does not output."""
    missing = [name for name in names if name not in outputs]
    if missing:
        raise KsegError(
            f"the model outputs {', '.join(outputs)}; it has no channel {', '.join(missing)}"
        )
    return [list(outputs).index(name) for name in names]


def shape_batches(
    table: Any, specs: Sequence[ModelSpec], batch_size: int, *, keep_order: bool = True
) -> list[list[int]]:
    """Row positions of `table` (height, width columns) cut into batches whose inputs share one
    shape under every spec.

    keep_order: consecutive rows only, so results come back in table order (uwmgi volumes stay
    whole); otherwise rows are grouped by shape first (stable), so a table of mixed sizes (DSB
    in "crop" mode) makes full batches.
    """
    heights = table["height"].astype(int).to_numpy()
    widths = table["width"].astype(int).to_numpy()
    keys = [tuple(s.input_shape(h, w) for s in specs) for h, w in zip(heights, widths, strict=True)]
    order = range(len(keys)) if keep_order else sorted(range(len(keys)), key=keys.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    current_key = None
    for i in order:
        if current and (keys[i] != current_key or len(current) == batch_size):
            batches.append(current)
            current = []
        current.append(i)
        current_key = keys[i]
    if current:
        batches.append(current)
    return batches


def restore_size(
    probabilities: np.ndarray, height: int, width: int, resize_mode: str
) -> np.ndarray:
    """[K, h, w] probabilities at the model's input size -> [K, height, width] at the image's own.

    "pad": crop the centre, undoing the symmetric padding of the validation transform;
    "crop": the input was the image itself (cropped back from the /32 padding already);
    "resize": bilinear resize back.
    """
    _, h, w = probabilities.shape
    if (h, w) == (height, width):
        return probabilities
    if resize_mode == "crop":
        return probabilities[:, :height, :width]
    if resize_mode == "pad":
        from kaggle_seg.data.transforms import pad_offsets

        top, left = pad_offsets(height, width, h, w)
        return probabilities[:, top : top + height, left : left + width]
    import cv2

    resized = cv2.resize(np.moveaxis(probabilities, 0, -1), (width, height),
                         interpolation=cv2.INTER_LINEAR)  # fmt: skip
    return resized[None] if resized.ndim == 2 else np.moveaxis(resized, -1, 0)


def pad_to_divisor(images: Any, divisor: int = SIZE_DIVISOR) -> tuple[Any, int, int]:
    """(images zero-padded bottom / right to a multiple of `divisor`, h, w before padding)
    for a tensor [..., H, W]; crop outputs back with `[..., :h, :w]`."""
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    pad_h = (-h) % divisor
    pad_w = (-w) % divisor
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    return images, h, w


def tile_starts(length: int, tile: int, overlap: float, divisor: int = SIZE_DIVISOR) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `length`, overlapping by about
    `overlap` x tile (steps a multiple of `divisor`), the last one flush with the end; [0] when
    one tile covers it all."""
    if length <= tile:
        return [0]
    stride = max(divisor, int(tile * (1.0 - overlap)) // divisor * divisor)
    count = math.ceil((length - tile) / stride) + 1
    starts = [min(k * stride, length - tile) for k in range(count)]
    return sorted(set(starts))


def _tile_weight(h: int, w: int, device: Any) -> Any:
    """A [h, w] blending window: 1 in the middle, falling linearly to a small floor at the
    edges, where a tile's prediction sees the least context."""
    import torch

    def ramp(n: int) -> Any:
        position = torch.arange(n, device=device, dtype=torch.float32)
        distance = torch.minimum(position + 1, n - position) / max(1.0, n / 4)
        return distance.clamp(0.05, 1.0)

    return ramp(h)[:, None] * ramp(w)[None, :]


def forward_tiled(
    forward: Callable[[Any], Any],
    images: Any,
    tile_size: int | None,
    overlap: float,
    divisor: int = SIZE_DIVISOR,
) -> Any:
    """`forward(images)` for images [B, C, H, W] (H, W multiples of `divisor`), run tile by
    tile when a side exceeds `tile_size`: outputs [..., K, H, W] of overlapping tiles are blended
    with a window that favours tile centres. `forward` may return leading dims (TTA views)."""
    import torch

    height, width = images.shape[-2:]
    if tile_size is None or (height <= tile_size and width <= tile_size):
        return forward(images)
    tile_size = max(divisor, tile_size // divisor * divisor)
    tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    total = weights = None
    for top in tile_starts(height, tile_h, overlap, divisor):
        for left in tile_starts(width, tile_w, overlap, divisor):
            out = forward(images[..., top : top + tile_h, left : left + tile_w]).float()
            if total is None:
                total = torch.zeros((*out.shape[:-2], height, width), device=out.device)
                weights = torch.zeros((height, width), device=out.device)
                window = _tile_weight(tile_h, tile_w, out.device)
            total[..., top : top + tile_h, left : left + tile_w] += out * window
            weights[top : top + tile_h, left : left + tile_w] += window
    return total / weights
