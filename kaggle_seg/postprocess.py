"""From probabilities to masks: thresholds, small components, empty-slice gate, DSB instance split.

`PostprocessConfig` holds the per-class settings that `kseg tune` chooses on out-of-fold
probabilities and saves beside the experiment (`runs/<exp>/postprocess.json`); `kseg submit` loads
them and applies `postprocess_masks` (+ `apply_z_continuity` per uwmgi case-day) or, for DSB 2018,
`postprocess_instances`. Pure functions on arrays; only load / save touch files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import Field, ValidationError, model_validator

from kaggle_seg.config import StrictModel
from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.spec import BORDER

# 8-connectivity for class masks (as skimage's default full connectivity in 2D); nuclei seeds use
# 4-connectivity so two nuclei touching at a corner stay apart.
MASK_CONNECTIVITY = 8
SEED_CONNECTIVITY = 4


class PostprocessConfig(StrictModel):
    """Per-class post-processing settings; every list has one entry per class of `classes`.

    Per class k of `probabilities[k]`: pixels above `thresholds[k]`, then connected components
    (8-connectivity) smaller than `min_area[k]` pixels removed, then (`largest_component`) only
    the largest left kept, then the mask emptied when it has fewer than `gate_pixels[k]` pixels,
    or when a classification head's probability for the class is below `gate_probability[k]`.
    uwmgi: `z_continuity` empties a class in a slice when neither neighbouring slice of the
    case-day has it. dsb2018 (`postprocess_instances`): channel 0 is the nuclei mask (the rules
    above apply to it), an optional channel 1 the nuclei borders: pixels with a border
    probability above `thresholds[1]` are not seeds, so touching nuclei split along it; nuclei
    smaller than `min_nucleus` pixels are dropped.
    """

    classes: list[str] = Field(min_length=1)
    thresholds: list[float]
    min_area: list[int]
    gate_pixels: list[int]
    gate_probability: list[float] | None = None
    largest_component: bool = False
    z_continuity: bool = False
    min_nucleus: int = Field(8, ge=0)

    @model_validator(mode="after")
    def _check_lists(self) -> PostprocessConfig:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes {self.classes} name a class twice")
        lists = {
            "thresholds": self.thresholds,
            "min_area": self.min_area,
            "gate_pixels": self.gate_pixels,
        }
        if self.gate_probability is not None:
            lists["gate_probability"] = self.gate_probability
        for name, values in lists.items():
            if len(values) != len(self.classes):
                raise ValueError(
                    f"{name} has {len(values)} value(s) but classes has {len(self.classes)} "
                    f"({', '.join(self.classes)}): need one per class"
                )
        for name in ("thresholds", "gate_probability"):
            values = lists.get(name) or []
            if any(not 0.0 <= v <= 1.0 for v in values):
                raise ValueError(f"{name} {values} must lie in [0, 1]")
        for name in ("min_area", "gate_pixels"):
            if any(v < 0 for v in lists[name]):
                raise ValueError(f"{name} {lists[name]} must be >= 0 pixels")
        return self


def default_postprocess(classes: Sequence[str]) -> PostprocessConfig:
    """Threshold 0.5 for every class and no area, gate or continuity rule (plain binarize)."""
    n = len(classes)
    return PostprocessConfig(
        classes=list(classes), thresholds=[0.5] * n, min_area=[0] * n, gate_pixels=[0] * n
    )


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        elif key:
            parts.append(f"'{key}': {error['msg']}")
        else:
            parts.append(error["msg"].removeprefix("Value error, "))
    return "; ".join(parts)


def load_postprocess(path: str | Path) -> PostprocessConfig:
    """Settings saved by `save_postprocess`; every failure is a KsegError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise KsegError(f"{path}: post-processing settings not found (run kseg tune first)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KsegError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise KsegError(f"{path}: post-processing settings must be a JSON object")
    try:
        return PostprocessConfig.model_validate(raw)
    except ValidationError as exc:
        raise KsegError(
            f"{path}: invalid post-processing settings: {_describe_validation_error(exc)}"
        ) from exc


def check_settings_fit(settings: PostprocessConfig, outputs: Sequence[str], source: object) -> None:
    """KsegError naming `source` (the settings file) unless the settings are for exactly the
    model's output channels, as `kseg submit` requires: settings tuned for another experiment
    (another competition, or mask targets for a mask + border model) would draw and score what
    no submission makes."""
    if list(settings.classes) != list(outputs):
        raise KsegError(
            f"{source}: post-processing for classes {', '.join(settings.classes)}, the run's "
            f"model outputs {', '.join(outputs)}: tune this experiment (kseg tune)"
        )


def save_postprocess(settings: PostprocessConfig, path: str | Path) -> Path:
    """Write the settings as JSON, atomically; returns `path`."""
    from kaggle_seg.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(settings.model_dump(mode="json"), indent=2) + "\n")
    return Path(path)


def binarize(probabilities: np.ndarray, threshold: float | np.ndarray = 0.5) -> np.ndarray:
    """[K, H, W] probabilities -> uint8 [K, H, W] masks (per-class thresholds broadcast)."""
    threshold = np.asarray(threshold, dtype=np.float32).reshape(-1, 1, 1)
    return (probabilities > threshold).astype(np.uint8)


def _check_channels(probabilities: np.ndarray, settings: PostprocessConfig) -> None:
    n_classes = len(settings.classes)
    if probabilities.ndim != 3:
        raise InputError(f"need probabilities [K, H, W], got shape {tuple(probabilities.shape)}")
    if probabilities.shape[0] != n_classes:
        raise InputError(
            f"probabilities have {probabilities.shape[0]} channel(s) but the post-processing "
            f"settings are for {n_classes} class(es) ({', '.join(settings.classes)})"
        )


def select_components(
    areas: np.ndarray, min_area: int, largest_component: bool, gate_pixels: int
) -> np.ndarray:
    """Which connected components of one class mask survive: bool [n] from their pixel areas [n].

    Components of fewer than `min_area` pixels go; with `largest_component` only the largest one
    left stays (the first on ties); then, if fewer than `gate_pixels` pixels are left, all go.
    `postprocess_masks` and the tuner both decide through this function.
    """
    keep = areas >= min_area
    if largest_component and keep.any():
        largest = int(np.argmax(np.where(keep, areas, -1)))
        keep = np.zeros_like(keep)
        keep[largest] = True
    if int(areas[keep].sum()) < gate_pixels:
        keep[:] = False
    return keep


def mask_components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components of a bool / uint8 [H, W] mask: (n, int32 labels [H, W] with
    0 = background and 1..n, int64 areas [n])."""
    import cv2

    # connectedComponents + bincount is ~4x faster than connectedComponentsWithStats, whose
    # bounding boxes and centroids are not needed.
    count, labels = cv2.connectedComponents(
        mask.view(np.uint8) if mask.dtype == np.bool_ else mask.astype(np.uint8, copy=False),
        connectivity=MASK_CONNECTIVITY,
    )
    areas = np.bincount(labels.ravel(), minlength=count)[1:].astype(np.int64, copy=False)
    return count - 1, labels, areas


def clean_mask(
    mask: np.ndarray, min_area: int, largest_component: bool, gate_pixels: int
) -> np.ndarray:
    """bool [H, W] mask with the component rules of `select_components` applied."""
    if not mask.any():
        return mask
    if min_area <= 1 and not largest_component:
        # Every component has >= 1 pixel, so only the gate can act: no labelling needed.
        return mask if np.count_nonzero(mask) >= gate_pixels else np.zeros_like(mask)
    _, labels, areas = mask_components(mask)
    keep = select_components(areas, min_area, largest_component, gate_pixels)
    if keep.all():
        return mask
    return np.concatenate(([False], keep))[labels]


def postprocess_masks(
    probabilities: np.ndarray,
    settings: PostprocessConfig,
    class_probabilities: np.ndarray | None = None,
) -> np.ndarray:
    """float [K, H, W] probabilities -> uint8 0/1 [K, H, W] masks by the per-class rules.

    K must be len(settings.classes). class_probabilities: optional float [K] from a
    classification head; with `settings.gate_probability` set, a class whose probability is below
    its gate is emptied. z-continuity needs the whole case-day: see `apply_z_continuity`.
    """
    probabilities = np.asarray(probabilities)
    _check_channels(probabilities, settings)
    gated = np.zeros(len(settings.classes), dtype=bool)
    if class_probabilities is not None and settings.gate_probability is not None:
        class_probabilities = np.asarray(class_probabilities, dtype=np.float64).reshape(-1)
        if class_probabilities.size != len(settings.classes):
            raise InputError(
                f"{class_probabilities.size} class probabilities for "
                f"{len(settings.classes)} class(es) ({', '.join(settings.classes)})"
            )
        gated = class_probabilities < np.asarray(settings.gate_probability)
    masks = np.zeros(probabilities.shape, dtype=np.uint8)
    for k in range(len(settings.classes)):
        if gated[k]:
            continue
        mask = probabilities[k] > np.float32(settings.thresholds[k])
        mask = clean_mask(
            mask, settings.min_area[k], settings.largest_component, settings.gate_pixels[k]
        )
        masks[k] = mask
    return masks


def z_continuous(present: np.ndarray) -> np.ndarray:
    """bool [D, ...] presence per slice -> what stays present: a slice keeps a class only when the
    slice before or after it has it too. With a single slice there is no neighbour to ask, so it
    is kept."""
    present = np.asarray(present, dtype=bool)
    if present.shape[0] < 2:
        return present.copy()
    neighbour = np.zeros_like(present)
    neighbour[1:] |= present[:-1]
    neighbour[:-1] |= present[1:]
    return present & neighbour


def apply_z_continuity(masks: np.ndarray) -> np.ndarray:
    """uint8 [D, K, H, W] masks of one uwmgi case-day in slice order -> the same with each class
    removed from the slices where it appears in neither neighbouring slice (an isolated
    detection is more often a false positive than a one-slice organ). D = 1 is returned as is."""
    masks = np.asarray(masks)
    if masks.ndim != 4:
        raise InputError(f"need a case-day of masks [D, K, H, W], got shape {masks.shape}")
    present = masks.reshape(masks.shape[0], masks.shape[1], -1).any(axis=2)
    keep = z_continuous(present)
    return masks * keep[:, :, None, None].astype(masks.dtype)


def _seed_labels(mask: np.ndarray) -> tuple[int, np.ndarray]:
    import cv2

    count, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=SEED_CONNECTIVITY)
    return count - 1, labels


def instance_channels(channels: Sequence[str] | None, n_channels: int) -> tuple[int, int | None]:
    """(the nuclei mask's channel, the border channel or None) among output channels named
    `channels` (the model's `ModelSpec.outputs`); the border is found by its name, BORDER."""
    if channels is None:
        if n_channels != 1:
            raise InputError(
                f"{n_channels} probability channels without their names: pass the model's "
                "output channels (e.g. nuclei, border)"
            )
        return 0, None
    if len(channels) != n_channels:
        raise InputError(
            f"probabilities have {n_channels} channel(s) but {len(channels)} names "
            f"({', '.join(channels)})"
        )
    names = list(channels)
    mask = next((k for k, name in enumerate(names) if name != BORDER), None)
    if mask is None:
        raise InputError(f"no mask channel among {', '.join(names)}")
    return mask, names.index(BORDER) if BORDER in names else None


def split_instances(
    probabilities: np.ndarray,
    threshold: float = 0.5,
    min_size: int = 8,
    border_threshold: float | None = None,
    *,
    channels: Sequence[str] | None = None,
) -> np.ndarray:
    """DSB nuclei: [K, H, W] probabilities (a nuclei mask, optionally a border channel, named
    by `channels`; None for a single mask channel) -> int32 label map [H, W], 0 = background,
    no overlaps.

    With a border channel, seeds are the mask minus the borders (border probability above
    `border_threshold`, default `threshold`), grown back over the mask by a watershed on the mask
    probability, so touching nuclei come apart; a piece of mask that holds no seed becomes a
    nucleus of its own. Without it, 4-connected components. Nuclei smaller than `min_size` pixels
    are dropped.
    """
    mask_channel, border_channel = instance_channels(channels, probabilities.shape[0])
    mask = probabilities[mask_channel] > np.float32(threshold)
    border = probabilities[border_channel] if border_channel is not None else None
    border_threshold = threshold if border_threshold is None else border_threshold
    labels = _instances_from_mask(mask, probabilities[mask_channel], border, border_threshold)
    return remove_small_instances(labels, min_size)


def _instances_from_mask(
    mask: np.ndarray,
    nuclei_probabilities: np.ndarray,
    border_probabilities: np.ndarray | None,
    border_threshold: float,
) -> np.ndarray:
    """int32 [H, W] instances of a bool nuclei mask (before the minimum nucleus size)."""
    if border_probabilities is None or not mask.any():
        return _seed_labels(mask)[1].astype(np.int32, copy=False)
    from skimage.segmentation import watershed

    seeds_mask = mask & ~(border_probabilities > np.float32(border_threshold))
    n_seeds, seeds = _seed_labels(seeds_mask)
    labels = watershed(-nuclei_probabilities, seeds, mask=mask).astype(np.int32, copy=False)
    # The watershed only floods from seeds: a blob that is all border would vanish.
    unseeded = mask & (labels == 0)
    if unseeded.any():
        _, extra = _seed_labels(unseeded)
        labels = np.where(extra > 0, extra + n_seeds, labels).astype(np.int32)
    return labels


def remove_small_instances(labels: np.ndarray, min_size: int) -> np.ndarray:
    """int label map [H, W] with instances of fewer than `min_size` pixels set to 0."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    if small.any():
        labels = np.where(small[labels], 0, labels).astype(labels.dtype)
    return labels


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """int32 [H, W] with the instances renumbered 1..n in order of their old labels."""
    sizes = np.bincount(labels.ravel())
    present = np.flatnonzero(sizes[1:]) + 1
    lookup = np.zeros(sizes.size, dtype=np.int32)
    lookup[present] = np.arange(1, present.size + 1, dtype=np.int32)
    return lookup[labels]


def instance_labels(probabilities: np.ndarray, settings: PostprocessConfig) -> np.ndarray:
    """`postprocess_instances` without the minimum nucleus size and the renumbering (the tuner
    sweeps `min_nucleus` on one result of this)."""
    probabilities = np.asarray(probabilities)
    _check_channels(probabilities, settings)
    m, b = instance_channels(settings.classes, probabilities.shape[0])
    mask = probabilities[m] > np.float32(settings.thresholds[m])
    mask = clean_mask(
        mask, settings.min_area[m], settings.largest_component, settings.gate_pixels[m]
    )
    border = probabilities[b] if b is not None else None
    border_threshold = settings.thresholds[b] if b is not None else 0.5
    return _instances_from_mask(mask, probabilities[m], border, border_threshold)


def postprocess_instances(probabilities: np.ndarray, settings: PostprocessConfig) -> np.ndarray:
    """dsb2018: float [K, H, W] (the nuclei channel and, when `settings.classes` names one, the
    BORDER channel) -> int32 [H, W] instance labels 1..n, 0 = background, no overlaps.

    The nuclei mask is its channel above its threshold with the component rules of
    `postprocess_masks`; with a border channel, seeds are the mask minus the pixels whose border
    probability is above the border's threshold, grown over the mask by a watershed (see
    `split_instances`). Nuclei smaller than `min_nucleus` pixels are dropped.
    """
    labels = instance_labels(probabilities, settings)
    return relabel_consecutive(remove_small_instances(labels, settings.min_nucleus))
