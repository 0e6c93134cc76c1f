"""Test-time augmentation: dihedral (flip / rotate / transpose) views as augment / undo pairs.

Every function here is pure: images `[B, C, H, W]` go in, model outputs `[B, K, H, W]` come
back in the original frame. `tta_logits` returns one undone view per transform, `[T, B, K, H, W]`,
so that ensembling code can merge views and checkpoints in one place; `predict_tta` is the
one-call version for a single model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Spatial dims of both images [B, C, H, W] and outputs [B, K, H, W].
_H, _W = -2, -1

# Floor for geometric-mean merging: log(0) would turn one confident "no" into -inf.
GMEAN_EPS = 1e-7


@dataclass(frozen=True)
class TTATransform:
    """One test-time view: `undo(model(augment(x)))` is the model's output in x's frame.

    `augment` maps `[B, C, H, W]` to the augmented view (H and W swap for rotations by 90 / 270
    degrees and the transposes); `undo` maps the model's `[B, K, h, w]` output of that view back.
    """

    name: str
    augment: Callable[[torch.Tensor], torch.Tensor]
    undo: Callable[[torch.Tensor], torch.Tensor]


# Named functions rather than lambdas, so transforms pickle (DataLoader workers, DDP) and read well.
def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(_W)


def _vflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(_H)


def _rot90(x: torch.Tensor) -> torch.Tensor:
    # Counter-clockwise, as np.rot90: out[i, j] = x[j, W - 1 - i].
    return torch.rot90(x, 1, dims=(_H, _W))


def _rot180(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 2, dims=(_H, _W))


def _rot270(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 3, dims=(_H, _W))


def _transpose(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(_H, _W)


def _anti_transpose(x: torch.Tensor) -> torch.Tensor:
    # Mirror about the anti-diagonal: out[i, j] = x[H - 1 - j, W - 1 - i].
    return x.transpose(_H, _W).flip(_H, _W)


IDENTITY = TTATransform("identity", _identity, _identity)
HFLIP = TTATransform("hflip", _hflip, _hflip)
VFLIP = TTATransform("vflip", _vflip, _vflip)
ROT90 = TTATransform("rot90", _rot90, _rot270)
ROT180 = TTATransform("rot180", _rot180, _rot180)
ROT270 = TTATransform("rot270", _rot270, _rot90)
TRANSPOSE = TTATransform("transpose", _transpose, _transpose)
ANTI_TRANSPOSE = TTATransform("anti_transpose", _anti_transpose, _anti_transpose)

# The identity always comes first, so views[0] is the plain prediction.
TTA_MODES: dict[str, tuple[TTATransform, ...]] = {
    "none": (IDENTITY,),
    "hflip": (IDENTITY, HFLIP),
    "flip": (IDENTITY, HFLIP, VFLIP),
    "d4": (IDENTITY, HFLIP, VFLIP, ROT90, ROT180, ROT270, TRANSPOSE, ANTI_TRANSPOSE),
}


def get_tta(name: str) -> tuple[TTATransform, ...]:
    """The transforms of TTA mode `name`; a KeyError lists the valid names."""
    try:
        return TTA_MODES[name]
    except KeyError:
        raise KeyError(f"unknown TTA mode {name!r}; choose one of {', '.join(TTA_MODES)}") from None


def _merge_mean(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities.mean(0)


def _merge_gmean(probabilities: torch.Tensor) -> torch.Tensor:
    # float32: GMEAN_EPS is below float16's normal range.
    logs = probabilities.float().clamp_min(GMEAN_EPS).log()
    return logs.mean(0).exp().to(probabilities.dtype)


def _merge_max(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities.amax(0)


def _merge_tsharpen(probabilities: torch.Tensor) -> torch.Tensor:
    # ttach's "tsharpen" (temperature 0.5). Not calibrated like "mean": tune thresholds with it.
    return probabilities.sqrt().mean(0)


_MERGERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": _merge_mean,
    "gmean": _merge_gmean,
    "max": _merge_max,
    "tsharpen": _merge_tsharpen,
}
MERGE_MODES: tuple[str, ...] = tuple(_MERGERS)


def merge_probabilities(probabilities: torch.Tensor, mode: str) -> torch.Tensor:
    """[T, B, K, H, W] probabilities of T views, already undone -> [B, K, H, W].

    "mean": arithmetic mean; "gmean": geometric mean, exp(mean(log(max(p, GMEAN_EPS))));
    "max": element-wise maximum; "tsharpen": mean of sqrt(p). A KeyError lists the valid modes.
    """
    try:
        merger = _MERGERS[mode]
    except KeyError:
        raise KeyError(
            f"unknown TTA merge mode {mode!r}; choose one of {', '.join(MERGE_MODES)}"
        ) from None
    if probabilities.ndim != 5:
        raise ValueError(
            f"expected probabilities [T, B, K, H, W], got shape {tuple(probabilities.shape)}"
        )
    return merger(probabilities)


# Batched views run in forwards of at most this many input pixels. The d4 OOF of DSB's
# 1024x1024 images at batch 8 (8 views: 67M pixels in one forward) was killed for memory at
# 22.8 GB on a 24 GB machine; plain validation of the same batches (8.4M pixels) ran.
MAX_FORWARD_PIXELS = 1 << 23


def _forward_in_chunks(model: torch.nn.Module, inputs: torch.Tensor, max_pixels: int) -> Any:
    """`model(inputs)`, run on consecutive slices of the batch of at most `max_pixels` input
    pixels each (at least one row), concatenated in order."""
    rows = max(1, max_pixels // (inputs.shape[-2] * inputs.shape[-1]))
    if inputs.shape[0] <= rows:
        return model(inputs)
    return torch.cat([model(part) for part in inputs.split(rows)])


def tta_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    transforms: Sequence[TTATransform],
    *,
    batched: bool = True,
    max_pixels: int = MAX_FORWARD_PIXELS,
) -> torch.Tensor:
    """[B, C, H, W] images -> [T, B, K, H, W] logits, one view per transform, in the images' frame.

    batched=True stacks the views along the batch dimension and runs one forward pass per view
    shape: one for square images, two for non-square ones under rotations by 90 / 270 degrees or
    transposes (their views are W x H), cut into forwards of at most `max_pixels` input pixels
    (large images). batched=False runs one forward per view, so only one view's activations
    are in memory at a time.

    The model's mode is left as it is (put it in eval mode first: batch-norm in training mode
    would mix the views); the caller chooses the grad mode (torch.inference_mode).
    """
    if not transforms:
        raise ValueError("need at least one TTA transform (use get_tta('none') for a plain pass)")
    if not batched:
        # contiguous: rot90 / transpose return strided views, slow for some conv kernels.
        return torch.stack([t.undo(model(t.augment(images).contiguous())) for t in transforms])

    views = [t.augment(images) for t in transforms]
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, view in enumerate(views):
        groups.setdefault(tuple(view.shape[-2:]), []).append(index)
    logits_by_view: dict[int, torch.Tensor] = {}
    for indices in groups.values():
        group_logits = _forward_in_chunks(model, torch.cat([views[i] for i in indices]), max_pixels)
        # strict: a model that changes the batch size would otherwise mislabel views silently.
        for index, view_logits in zip(indices, group_logits.split(images.shape[0]), strict=True):
            logits_by_view[index] = view_logits
    return torch.stack([t.undo(logits_by_view[i]) for i, t in enumerate(transforms)])


def predict_tta(
    model: torch.nn.Module,
    images: torch.Tensor,
    tta: str = "flip",
    merge: str = "mean",
    *,
    batched: bool = True,
) -> torch.Tensor:
    """[B, C, H, W] images -> [B, K, H, W] float32 probabilities: sigmoid per view, then merged.

    One sigmoid per class (multi-label / binary heads). Float32 so that half-precision logits
    from autocast merge without rounding.
    """
    transforms = get_tta(tta)
    probabilities = torch.sigmoid(tta_logits(model, images, transforms, batched=batched).float())
    return merge_probabilities(probabilities, merge)


# Probabilities are clamped this far from 0 and 1 before the logit: a merged 1.0 stays finite.
LOGIT_EPS = 1e-6


class TTAModel(torch.nn.Module):
    """`model` seen through TTA mode `tta`: its forward returns the logits of the views' merged
    probabilities, so a caller that applies a sigmoid (validation, the OOF pass) gets what
    `predict_tta` gives `kseg submit`. A classification head's logits (a model returning
    (mask logits, class logits)) are merged the same way, views averaged as probabilities."""

    def __init__(self, model: torch.nn.Module, tta: str, merge: str = "mean"):
        super().__init__()
        get_tta(tta)  # an unknown mode fails here, not at the first batch
        self.model, self.tta, self.merge = model, tta, merge

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        heads: list[torch.Tensor] = []

        def mask_logits(x: torch.Tensor) -> torch.Tensor:
            out = self.model(x)
            if isinstance(out, tuple | list):
                heads.append(out[1])
                return out[0]
            return out

        merged = predict_tta(mask_logits, images, self.tta, self.merge)  # type: ignore[arg-type]
        logits = torch.logit(merged.clamp(LOGIT_EPS, 1 - LOGIT_EPS))
        if not heads:
            return logits
        # tta_logits runs the views in groups of B rows each: the rows are view-major.
        head = torch.sigmoid(torch.cat(heads).float())
        head = head.reshape(-1, images.shape[0], *head.shape[1:]).mean(0)
        return logits, torch.logit(head.clamp(LOGIT_EPS, 1 - LOGIT_EPS))
