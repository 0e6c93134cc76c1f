"""Fixed preprocessing named in `data.preprocess`: the same steps in training, OOF, predict and
the kernel.

A step is a name or a dict of the name and its parameters, e.g.
`[{name: n4, shrink: 4, iterations: [50, 50, 30, 20]}, zscore]`; the config keeps each step
resolved to every parameter, so a checkpoint records exactly what its inputs went through.

Two stages, because N4 costs ~0.1-0.25 s per channel and per-image standardisation cannot be
stored in the image store's format (uint16, value = round(65535 x pixel), i.e. [0, 1]):

- "store" steps (`n4`, `clahe`, `grey_dark`) run once per image when the decoded-image store is
  filled (`data.dataset.build_stores`), never per epoch, and at prediction right after reading.
  Their output stays in [0, 1]: N4's corrected channel is rescaled to the input channel's
  maximum, so the store needs no other format and memmap caches of preprocessed images are
  reused by runs.
- "input" steps (`zscore`) run last in the transform pipeline (`data.input_steps`), after the
  augmentations, on the float32 model input: brightness / contrast augmentations and CLAHE
  expect [0, 1] images, and the standardisation must see the image the model sees.

This module stays light (no albumentations, SimpleITK imported only by `n4`): config
validation imports it.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kaggle_seg.errors import KsegError

Stage = Literal["store", "input"]
# pyproject.toml's `n4` extra (tests/test_preprocess.py checks they agree).
SIMPLEITK_REQUIREMENT = "SimpleITK>=2.0"
# Fewer foreground pixels than this: the statistics / N4 fit use the whole channel, or skip.
MIN_FOREGROUND_PIXELS = 64
# N4 fits on images shrunk by `shrink`; the shrunk image keeps at least this many pixels a side.
_MIN_SHRUNK_SIDE = 16


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class N4Params(_Params):
    name: Literal["n4"] = "n4"
    shrink: int = Field(4, ge=1)  # the fit runs on the image shrunk by this factor
    # One entry per fitting level (the B-spline grid doubles at each): its maximum iterations.
    iterations: list[int] = Field(default_factory=lambda: [50, 50, 30, 20], min_length=1)
    convergence_threshold: float = Field(0.001, gt=0)


class ClaheParams(_Params):
    name: Literal["clahe"] = "clahe"
    clip_limit: float = Field(2.0, gt=0)
    tile_grid: int = Field(8, ge=1)


class GreyDarkParams(_Params):
    name: Literal["grey_dark"] = "grey_dark"
    # A channel mean above this counts as a bright (brightfield / stained) background.
    bright_above: float = Field(0.5, gt=0, lt=1)
    # Percentiles [low, high] stretched to [0, 1] after the inversion, so a dim or low-contrast
    # slide reads like a typical one; null keeps the luminance as it is.
    stretch: tuple[float, float] | None = None
    # grey ** gamma last: below 1 lifts dim nuclei toward bright ones in the same image (a slide
    # can hold both) while keeping their order, so the dips between touching nuclei stay.
    gamma: float | None = Field(None, gt=0)

    @field_validator("stretch")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] < value[1] <= 100:
            raise ValueError("stretch needs two percentiles 0 <= low < high <= 100")
        return value


class ZScoreParams(_Params):
    name: Literal["zscore"] = "zscore"
    # Which pixels give the mean and std: above the channel's Otsu threshold, non-zero, or all.
    foreground: Literal["otsu", "nonzero", "all"] = "otsu"


# --- the steps ---------------------------------------------------------------------------------


def _channels(image: np.ndarray) -> np.ndarray:
    return image[..., None] if image.ndim == 2 else image


def foreground_mask(channel: np.ndarray, foreground: str) -> np.ndarray:
    """bool [H, W]: the pixels of a channel that count as foreground ("otsu", "nonzero", "all")."""
    if foreground == "all" or channel.max() <= channel.min():
        return np.ones(channel.shape, dtype=bool)
    if foreground == "nonzero":
        return channel != 0
    from skimage.filters import threshold_otsu

    return channel > threshold_otsu(channel)


def n4_correct(
    image: np.ndarray,
    *,
    shrink: int = 4,
    iterations: Sequence[int] = (50, 50, 30, 20),
    convergence_threshold: float = 0.001,
    **_: Any,
) -> np.ndarray:
    """float32 [H, W, C] in [0, 1] -> each channel divided by its N4 bias field (SimpleITK's
    N4BiasFieldCorrectionImageFilter), rescaled to the channel's own maximum.

    The field is fitted on the channel shrunk by `shrink`, inside its Otsu foreground (and
    non-zero pixels: N4 works on log intensities), then evaluated at full resolution. A constant
    channel, or one with almost no foreground, is returned unchanged.
    """
    sitk = _simpleitk()
    image = _channels(np.asarray(image, dtype=np.float32))
    out = image.copy()
    height, width = image.shape[:2]
    factor = max(1, min(shrink, min(height, width) // _MIN_SHRUNK_SIDE))
    for c in range(image.shape[-1]):
        channel = image[..., c]
        top = float(channel.max())
        if top <= float(channel.min()):
            continue
        itk_image = sitk.GetImageFromArray(channel)
        mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(itk_image, 0, 1, 200)).astype(bool)
        mask &= channel > 0
        if mask.sum() < MIN_FOREGROUND_PIXELS:
            continue
        itk_mask = sitk.GetImageFromArray(mask.astype(np.uint8))
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations([int(n) for n in iterations])
        corrector.SetConvergenceThreshold(float(convergence_threshold))
        corrector.Execute(
            sitk.Shrink(itk_image, [factor, factor]), sitk.Shrink(itk_mask, [factor, factor])
        )
        log_bias = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(itk_image))
        corrected = channel / np.exp(log_bias).astype(np.float32)
        out[..., c] = corrected * np.float32(top / max(float(corrected.max()), 1e-12))
    return out


def clahe(
    image: np.ndarray, *, clip_limit: float = 2.0, tile_grid: int = 8, **_: Any
) -> np.ndarray:
    """float32 [H, W, C] in [0, 1] -> CLAHE of each channel, on 16 bits (cv2 equalises uint16
    histograms too, so UW-Madison's 16-bit slices are not cut to 256 levels)."""
    import cv2

    from kaggle_seg.data.cache import from_uint16, to_uint16

    image = _channels(np.asarray(image, dtype=np.float32))
    equaliser = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(tile_grid, tile_grid))
    levels = to_uint16(image, what="clahe")
    out = np.stack([equaliser.apply(levels[..., c]) for c in range(image.shape[-1])], axis=-1)
    return from_uint16(out)


def grey_dark(
    image: np.ndarray,
    *,
    bright_above: float = 0.5,
    stretch: Sequence[float] | None = None,
    gamma: float | None = None,
    **_: Any,
) -> np.ndarray:
    """float32 [H, W, C] in [0, 1] -> its luminance (ITU-R 601 weights for RGB, the mean of
    other channel counts), inverted when the image is mostly bright, with the percentiles
    `stretch` = (low, high) mapped to 0 and 1 (clipped), raised to `gamma`, repeated on C
    channels.

    Microscopy (DSB 2018) mixes bright nuclei on dark fluorescence backgrounds with dark,
    stained nuclei on bright brightfield / H&E ones, the latter rare in training and common in
    the stage-1 test: mapped to one look, every image reads as fluorescence. Measured on DSB
    stage1_test after 10 epochs of dsb2018_cpu: mAP 0.364 -> 0.389, H&E images 0.13 -> 0.20.
    """
    image = _channels(np.asarray(image, dtype=np.float32))
    if image.shape[-1] == 3:
        grey = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        grey = image.mean(axis=-1)
    if float(grey.mean()) > bright_above:
        grey = 1.0 - grey
    if stretch is not None:
        low, high = np.percentile(grey, stretch)
        if high - low > 1e-6:  # a flat image stays as it is
            grey = np.clip((grey - low) / (high - low), 0.0, 1.0)
    if gamma is not None:
        grey = np.power(np.clip(grey, 0.0, 1.0), np.float32(gamma))
    return np.repeat(grey[..., None], image.shape[-1], axis=-1)


def zscore(image: np.ndarray, *, foreground: str = "otsu", **_: Any) -> np.ndarray:
    """float32 [H, W, C] -> (channel - mean) / std per channel, the mean and std taken over the
    channel's foreground (`foreground_mask`; the whole channel when it has fewer than
    MIN_FOREGROUND_PIXELS). A constant channel becomes zeros."""
    image = _channels(np.asarray(image, dtype=np.float32))
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        channel = image[..., c]
        mask = foreground_mask(channel, foreground)
        values = channel[mask] if mask.sum() >= MIN_FOREGROUND_PIXELS else channel
        std = float(values.std())
        if std < 1e-6:
            out[..., c] = 0.0
            continue
        out[..., c] = (channel - np.float32(values.mean())) / np.float32(std)
    return out


@dataclass(frozen=True)
class Step:
    params: type[_Params]
    stage: Stage
    apply: Callable[..., np.ndarray]
    requirement: str | None = None  # a package the step needs beyond kaggle-seg's dependencies
    extra: str | None = None  # the kaggle-seg extra that installs it


STEPS: dict[str, Step] = {
    "n4": Step(N4Params, "store", n4_correct, SIMPLEITK_REQUIREMENT, "n4"),
    "clahe": Step(ClaheParams, "store", clahe),
    "grey_dark": Step(GreyDarkParams, "store", grey_dark),
    "zscore": Step(ZScoreParams, "input", zscore),
}


def get_step(name: str) -> Step:
    try:
        return STEPS[name]
    except KeyError:
        raise KeyError(
            f"unknown preprocessing step {name!r}; choose one of {', '.join(STEPS)}"
        ) from None


# --- config ------------------------------------------------------------------------------------


def resolve_steps(raw: Sequence[str | dict[str, Any]]) -> list[dict[str, Any]]:
    """`data.preprocess` as written -> one dict per step with every parameter filled in.

    Raises ValueError (a config error naming `data.preprocess`) for an unknown step or
    parameter, a step given twice, or an "input" step (zscore) before a "store" step.
    """
    if isinstance(raw, str | dict):
        raw = [raw]
    steps: list[dict[str, Any]] = []
    for k, item in enumerate(raw):
        given = {"name": item} if isinstance(item, str) else dict(item)
        name = str(given.get("name", ""))
        if name not in STEPS:
            raise ValueError(
                f"step {k}: unknown preprocessing step {name!r}; choose one of {', '.join(STEPS)}"
            )
        try:
            steps.append(STEPS[name].params.model_validate(given).model_dump())
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(f"step {k} ({name}): {problems}") from None
    names = [s["name"] for s in steps]
    for name in set(names):
        if names.count(name) > 1:
            raise ValueError(f"step {name!r} is given {names.count(name)} times")
    stages = [STEPS[n].stage for n in names]
    if "input" in stages and "store" in stages[stages.index("input") :]:
        first = names[stages.index("input")]
        late = names[len(stages) - 1 - stages[::-1].index("store")]
        raise ValueError(
            f"{late!r} after {first!r}: {first} standardises the model input, after the "
            f"augmentations; {late} changes the stored image, so it comes first"
        )
    return steps


def steps_of(steps: Sequence[dict[str, Any]], stage: Stage) -> list[dict[str, Any]]:
    return [s for s in steps if get_step(s["name"]).stage == stage]


def steps_key(steps: Sequence[dict[str, Any]]) -> str:
    """A short digest of resolved steps: names stores and memmap caches of preprocessed images."""
    text = json.dumps(list(steps), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def apply_steps(image: np.ndarray, steps: Sequence[dict[str, Any]]) -> np.ndarray:
    """Run resolved `steps` in order on a float32 [H, W, C] image."""
    for step in steps:
        image = get_step(step["name"]).apply(image, **step)
    return image


def _configured_steps(config: Any) -> list[dict[str, Any]]:
    """The resolved steps of an ExperimentConfig, its data section, or a list of steps."""
    if isinstance(config, list):
        return config
    data = getattr(config, "data", config)
    return getattr(data, "preprocess", [])


def extra_requirements(config: Any) -> list[str]:
    """Requirements beyond kaggle-seg's own dependencies that a config's preprocessing needs
    where it runs (the kernel's wheels): SimpleITK for `n4`. Takes an ExperimentConfig, its
    data section, or the resolved steps."""
    needed = {get_step(s["name"]).requirement for s in _configured_steps(config)}
    return sorted(r for r in needed if r)


def extras_needed(config: Any) -> list[str]:
    """The kaggle-seg extras (e.g. "n4") a config's preprocessing needs where it runs."""
    needed = {get_step(s["name"]).extra for s in _configured_steps(config)}
    return sorted(e for e in needed if e)


def _simpleitk() -> Any:
    try:
        import SimpleITK
    except ImportError:
        raise KsegError(
            "preprocessing step 'n4' needs SimpleITK: pip install 'kaggle-seg[n4]' "
            "(or SimpleITK itself)"
        ) from None
    return SimpleITK


class PreprocessedReader:
    """`reader(position, read)`: `read(position)` with the "store" steps applied, keeping the
    last `keep` results; 2.5D prediction reads each slice for up to `stack_depth` neighbouring
    stacks, and N4 is slow."""

    def __init__(self, steps: Sequence[dict[str, Any]], keep: int = 32):
        self.steps = steps_of(steps, "store")
        self.keep = keep
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()

    def __call__(self, position: int, read: Callable[[int], np.ndarray]) -> np.ndarray:
        if not self.steps:
            return read(position)
        if position in self._recent:
            self._recent.move_to_end(position)
            return self._recent[position]
        image = apply_steps(read(position), self.steps)
        self._recent[position] = image
        if len(self._recent) > self.keep:
            self._recent.popitem(last=False)
        return image
