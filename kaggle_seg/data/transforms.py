"""Albumentations presets: named training augmentation lists, and the train / validation pipelines.

Images arrive float32 [H, W, C] in [0, 1] with any channel count C (1 for a UW slice, 3 for RGB or
a 2.5D stack of 3, 5 for a deeper stack); masks arrive uint8 0/1 [H, W, K]. Every transform here
works for any C: the ones albumentations restricts to 1 or 3 channels (CLAHE) are replaced by
per-channel versions, since the channels of a 2.5D stack are separate slices, not colours.

Pipelines from `build_transforms` also take uint16 images, value = round(65535 x pixel) (the
`ImageStore` format): the leading transforms that only move or zero pixels (sizing, flips, affine,
elastic and grid warps, dropout) run on uint16, about twice as fast as on float32 for the affine
warp, and `ToUnitFloat` converts to float32 [0, 1] before the first transform that needs values
(noise, blur, brightness / contrast, CLAHE, normalisation) or at the end. Float32 input passes
through unchanged; either way the output is float32.

A pipeline is always: bring to height x width first (resize, or pad + crop), then the preset, then
the normalisation. Sizing first gives every preset a known input size, and keeps the warps at the
model's input size, far below e.g. a 1024x1024 DSB image (padding a 266x266 UW slice to 320x384
is the one case where it costs: ~40 % more pixels to warp).
"""

from __future__ import annotations

from collections.abc import Callable

import albumentations as A
import cv2

from kaggle_seg.config import AugmentConfig
from kaggle_seg.data.augment_ops import (  # noqa: F401  (also the pipelines' public names)
    GREY_MEAN,
    GREY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MASK_RESIZE_INTERPOLATION,
    BrightnessContrast,
    ChannelCLAHE,
    FastElasticTransform,
    FastGaussNoise,
    ImagenetNormalize,
    InvertUnit,
    RandomScaledCrop,
    ToUnitFloat,
    accepts_uint16,
    uint16_safe,
)


def _affine(shift: float, scale: float, rotate: float, p: float) -> A.Affine:
    """The old ShiftScaleRotate (deprecated in albumentations 2) as an Affine."""
    return A.Affine(
        translate_percent=(-shift, shift),
        scale=(1.0 - scale, 1.0 + scale),
        rotate=(-rotate, rotate),
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=0,
        p=p,
    )


def _distortion(strength: float, p: float) -> A.OneOf:
    """Elastic or grid warp; strength 1 moves pixels by ~2-3 px (median) on a 320x384 image
    (grid: distort_limit 0.05, the UW-Madison notebooks' value)."""
    # The elastic warp is the dearest op of the presets (~10 ms at 320x384 against ~1 ms for
    # the others): approximate=True (a fixed 17x17 smoothing kernel instead of one ~6 sigma
    # wide) and uniform noise (smoothed, it is as Gaussian as Gaussian noise) make it ~2x faster.
    return A.OneOf(
        [
            FastElasticTransform(
                alpha=50.0 * strength,
                sigma=8.0,
                approximate=True,
                noise_distribution="uniform",
                p=1.0,
            ),
            A.GridDistortion(num_steps=5, distort_limit=(-0.05 * strength, 0.05 * strength), p=1.0),
        ],
        p=p,
    )


def _noise_or_blur(p: float) -> A.OneOf:
    return A.OneOf(
        [
            # std as a fraction of the [0, 1] range; albumentations' default (0.2-0.44) is meant
            # for a stronger look than scans tolerate. Noise drawn at half resolution and
            # upscaled: half the cost, and scan noise is not pixel-independent anyway.
            FastGaussNoise(std_range=(0.01, 0.04), noise_scale_factor=0.5, p=1.0),
            A.GaussianBlur(blur_limit=(3, 5), p=1.0),
        ],
        p=p,
    )


def preset_none(height: int, width: int) -> list[A.BasicTransform]:
    """No augmentation: only the sizing and normalisation of `build_transforms`."""
    return []


def preset_light(height: int, width: int) -> list[A.BasicTransform]:
    """Horizontal and vertical flips, and a small shift / scale / rotation (<= 10 degrees)."""
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        _affine(shift=0.05, scale=0.1, rotate=10, p=0.5),
    ]


def preset_heavy(height: int, width: int) -> list[A.BasicTransform]:
    """`light` + elastic or grid distortion, noise or blur, brightness / contrast, dropout."""
    return [
        *preset_light(height, width),
        _distortion(strength=1.5, p=0.3),
        _noise_or_blur(p=0.3),
        BrightnessContrast(brightness_limit=(-0.2, 0.2), contrast_limit=(-0.2, 0.2), p=0.5),
        # The mask is blanked under a hole too (as the UW-Madison notebooks do): a black box
        # hides the organ, so the model is not asked to hallucinate it.
        A.CoarseDropout(
            num_holes_range=(1, 8),
            hole_height_range=(0.02, 0.08),
            hole_width_range=(0.02, 0.08),
            fill=0,
            fill_mask=0,
            p=0.3,
        ),
    ]


def preset_gi(height: int, width: int) -> list[A.BasicTransform]:
    """The UW-Madison GI project's list: CLAHE, shift-scale-rotate, elastic or grid distortion,
    noise or blur, horizontal flip (no vertical flip: anatomy is never upside down)."""
    return [
        ChannelCLAHE(clip_limit=(1.0, 4.0), p=0.25),
        _affine(shift=0.0625, scale=0.05, rotate=10, p=0.5),
        _distortion(strength=1.0, p=0.25),
        _noise_or_blur(p=0.25),
        A.HorizontalFlip(p=0.5),
    ]


def preset_lgg(height: int, width: int) -> list[A.BasicTransform]:
    """The LGG project's list: flips, transpose, 90-degree rotations, shift-scale-rotate and a
    random sized crop resized back to height x width.

    Transpose and RandomRotate90 swap height and width, so they are left out when the target is
    not square (the two flips still give the 180-degree rotation).
    """
    square = height == width
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        *([A.Transpose(p=0.5), A.RandomRotate90(p=0.5)] if square else []),
        _affine(shift=0.0625, scale=0.1, rotate=15, p=0.5),
        A.RandomSizedCrop(
            min_max_height=(int(0.75 * height), height),
            size=(height, width),
            w2h_ratio=width / height,
            mask_interpolation=MASK_RESIZE_INTERPOLATION,
            p=0.25,
        ),
    ]


def _slide_orientations(height: int, width: int) -> list[A.BasicTransform]:
    """The 8 dihedral orientations of a slide (which has no up); the transpose only when the
    output is square, since it swaps height and width."""
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        *([A.Transpose(p=0.5)] if height == width else []),
    ]


def preset_nuclei(height: int, width: int) -> list[A.BasicTransform]:
    """Microscopy (DSB 2018): the 8 dihedral orientations (a slide has no up), brightness /
    contrast, noise or blur, and a colour inversion now and then (dark nuclei on bright
    brightfield backgrounds against bright nuclei on dark fluorescence ones). Scale changes come
    from the "crop" input mode's scale_jitter, not from here."""
    return [
        *_slide_orientations(height, width),
        _noise_or_blur(p=0.2),
        BrightnessContrast(brightness_limit=(-0.2, 0.2), contrast_limit=(-0.3, 0.3), p=0.5),
        InvertUnit(p=0.15),
    ]


def preset_nuclei_robust(height: int, width: int) -> list[A.BasicTransform]:
    """`nuclei` for slides of kinds the training set lacks: the same orientations and inversion,
    with stronger looks (defocus and Gaussian blur up to 9 px, gamma, wider brightness /
    contrast) at higher rates. A blurred nucleus keeps its sharp mask, so the model learns to
    outline an out-of-focus nucleus to its full extent instead of only its bright core, and
    dim or low-contrast slides look like the ones it trained on."""
    return [
        *_slide_orientations(height, width),
        A.OneOf(
            [
                A.GaussianBlur(blur_limit=(3, 9), p=1.0),
                A.Defocus(radius=(1, 3), alias_blur=(0.1, 0.3), p=1.0),
                FastGaussNoise(std_range=(0.01, 0.05), noise_scale_factor=0.5, p=1.0),
            ],
            p=0.4,
        ),
        A.RandomGamma(gamma_limit=(60, 160), p=0.3),
        BrightnessContrast(brightness_limit=(-0.25, 0.25), contrast_limit=(-0.5, 0.4), p=0.6),
        InvertUnit(p=0.15),
    ]


PRESETS: dict[str, Callable[[int, int], list[A.BasicTransform]]] = {
    "none": preset_none,
    "light": preset_light,
    "heavy": preset_heavy,
    "gi": preset_gi,
    "lgg": preset_lgg,
    "nuclei": preset_nuclei,
    "nuclei_robust": preset_nuclei_robust,
}


def get_preset(name: str) -> Callable[[int, int], list[A.BasicTransform]]:
    """The preset called `name`; a KeyError lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(
            f"augment.preset: unknown augmentation preset {name!r}; "
            f"choose one of {', '.join(PRESETS)}"
        ) from None


def pad_offsets(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int]:
    """(top, left) where a height x width image sits once centre-padded to the target size.

    The padding is split as evenly as possible, the odd pixel going to the bottom / right:
    top = (target_height - height) // 2, left = (target_width - width) // 2 (0 where the image is
    already at least as large). Prediction crops back with
    `padded[top:top + height, left:left + width]`.
    """
    return max(target_height - height, 0) // 2, max(target_width - width, 0) // 2


def _pad(height: int, width: int) -> A.PadIfNeeded:
    return A.PadIfNeeded(
        min_height=height,
        min_width=width,
        position="center",
        border_mode=cv2.BORDER_CONSTANT,
        fill=0,
        fill_mask=0,
    )


def build_transforms(config: AugmentConfig, train: bool) -> A.Compose:
    """The pipeline for float32 [H, W, C] images in [0, 1] (or uint16, see the module docstring)
    and uint8 [H, W, K] masks; images come out float32.

    Training: bring to config.height x config.width (resize_mode "resize": Resize; "pad": centre
    PadIfNeeded then RandomCrop, so larger images give random crops; "crop": RandomScaledCrop
    at native scale, with config.scale_jitter), then the preset, then the normalisation.
    Validation / prediction: only the sizing, then the normalisation; "pad" pads
    symmetrically at the centre and never crops (an image larger than the target keeps its size
    along that side), so `pad_offsets` gives where to crop predictions back; "crop" leaves the
    image whole (spec.py pads it to /32 and tiles it). Masks get the same geometry, with
    nearest-neighbour interpolation (MASK_RESIZE_INTERPOLATION for resizes) and 0 padding.
    """
    height, width = config.height, config.width
    if config.resize_mode == "resize":
        sizing: list[A.BasicTransform] = [
            A.Resize(height, width, mask_interpolation=MASK_RESIZE_INTERPOLATION)
        ]
    elif config.resize_mode == "crop":
        sizing = [RandomScaledCrop(height, width, config.scale_jitter)] if train else []
    elif train:
        sizing = [_pad(height, width), A.RandomCrop(height, width)]
    else:
        sizing = [_pad(height, width)]
    augment = get_preset(config.preset)(height, width) if train else []
    normalize = [ImagenetNormalize()] if config.normalize == "imagenet" else []
    steps = [*sizing, *augment]
    # uint16 input stays uint16 through the leading transforms that only move pixels.
    split = next((k for k, t in enumerate(steps) if not uint16_safe(t)), len(steps))
    return A.Compose([*steps[:split], ToUnitFloat(), *steps[split:], *normalize])
