"""The transforms kseg adds to albumentations: per-channel CLAHE and brightness / contrast (the
channels of a 2.5D stack are slices, not colours), a scaled random crop at native scale, the
uint16 -> float step (`ToUnitFloat`) and which transforms may run before it, ImageNet
normalisation for any channel count, and faster elastic and noise transforms. `transforms.py`
builds the presets and pipelines from them.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import albumentations.augmentations.geometric.functional as fgeometric
import cv2
import numpy as np

from kaggle_seg.data.cache import from_uint16

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNet statistics of grey images (the RGB averages): used for every channel when C != 3.
GREY_MEAN = 0.449
GREY_STD = 0.226
# Resizing masks: cv2's INTER_NEAREST samples source pixel floor(x * scale), half a pixel off the
# centre-aligned grid INTER_LINEAR uses for the image, which shifts a resized mask by up to ~0.4
# output pixels against its image (measured: a disc resized 120x100 -> 96x96 or 30x25).
# INTER_NEAREST_EXACT samples the centres, as the image does. Warps (Affine, elastic, grid) map
# image and mask through the same coordinates and keep albumentations' INTER_NEAREST.
MASK_RESIZE_INTERPOLATION = cv2.INTER_NEAREST_EXACT


class ChannelCLAHE(A.ImageOnlyTransform):
    """CLAHE on each channel separately, for float32 [H, W, C] in [0, 1] and any C.

    Albumentations' CLAHE accepts only 1 or 3 channels and equalises the L of LAB for 3, which
    would mix the slices of a 2.5D stack. Like albumentations, the histogram is taken on 8 bits:
    the result is quantised to 256 levels (then returned as float32 in [0, 1]).
    """

    def __init__(
        self,
        clip_limit: tuple[float, float] = (1.0, 4.0),
        tile_grid_size: tuple[int, int] = (8, 8),
        p: float = 0.5,
    ):
        super().__init__(p=p)
        self.clip_limit = clip_limit
        self.tile_grid_size = tile_grid_size

    def get_params(self) -> dict[str, Any]:
        # One clip limit per call, shared by all channels so neighbouring slices stay alike.
        return {"clip": self.py_random.uniform(*self.clip_limit)}

    def apply(self, img: np.ndarray, clip: float, **params: Any) -> np.ndarray:
        clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=self.tile_grid_size)
        as_uint8 = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if as_uint8.ndim == 2:
            return clahe.apply(as_uint8).astype(np.float32) / 255.0
        out = np.empty(img.shape, dtype=np.float32)
        for c in range(as_uint8.shape[-1]):
            out[..., c] = clahe.apply(np.ascontiguousarray(as_uint8[..., c]))
        out /= 255.0
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("clip_limit", "tile_grid_size")


class RandomScaledCrop(A.DualTransform):
    """A random height x width crop at a random scale s in [1 - jitter, 1 + jitter]: a window of
    (height / s) x (width / s) source pixels, centre-padded with 0 where the image is smaller,
    then resized to height x width (image bilinear, mask MASK_RESIZE_INTERPOLATION). With
    jitter 0 it is a plain crop at native scale and nothing is resampled.

    The "crop" input mode's training sizing: a 1024 x 1024 DSB image gives 256 x 256 crops of
    its own pixels instead of being shrunk 4x, so small nuclei stay as large as at test time.
    """

    def __init__(self, height: int, width: int, jitter: float = 0.0, p: float = 1.0):
        super().__init__(p=p)
        self.height, self.width, self.jitter = height, width, jitter

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        height, width = params["shape"][:2]
        scale = self.py_random.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else 1.0
        crop_h = max(1, round(self.height / scale))
        crop_w = max(1, round(self.width / scale))
        return {
            "top": self.py_random.randint(0, max(0, height - crop_h)),
            "left": self.py_random.randint(0, max(0, width - crop_w)),
            "crop_h": crop_h,
            "crop_w": crop_w,
        }

    def _crop(self, img: np.ndarray, top: int, left: int, crop_h: int, crop_w: int,
              interpolation: int) -> np.ndarray:  # fmt: skip
        window = img[top : top + crop_h, left : left + crop_w]
        short_h, short_w = crop_h - window.shape[0], crop_w - window.shape[1]
        if short_h or short_w:
            pad_h = (short_h // 2, short_h - short_h // 2)
            pad_w = (short_w // 2, short_w - short_w // 2)
            window = np.pad(window, [pad_h, pad_w] + [(0, 0)] * (img.ndim - 2))
        if window.shape[:2] == (self.height, self.width):
            return np.ascontiguousarray(window)
        resized = cv2.resize(window, (self.width, self.height), interpolation=interpolation)
        return resized.reshape(self.height, self.width, *img.shape[2:])

    def apply(self, img: np.ndarray, top: int, left: int, crop_h: int, crop_w: int,
              **params: Any) -> np.ndarray:  # fmt: skip
        return self._crop(img, top, left, crop_h, crop_w, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, top: int, left: int, crop_h: int, crop_w: int,
                      **params: Any) -> np.ndarray:  # fmt: skip
        return self._crop(mask, top, left, crop_h, crop_w, MASK_RESIZE_INTERPOLATION)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "jitter")


class ToUnitFloat(A.ImageOnlyTransform):
    """uint16 images (value = round(65535 x pixel), the `ImageStore` format) to float32 [0, 1];
    float32 images pass through unchanged. `build_transforms` places it; see the module docstring.
    """

    def __init__(self, p: float = 1.0):
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return from_uint16(img) if img.dtype == np.uint16 else img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


# Transforms that only move, copy or zero pixels: on uint16 images they give the float32 result
# x 65535, up to rounding (interpolated values are rounded to integers: below 1e-5 of the range).
_UINT16_SAFE = (
    RandomScaledCrop,
    A.PadIfNeeded,
    A.RandomCrop,
    A.Resize,
    A.RandomSizedCrop,
    A.HorizontalFlip,
    A.VerticalFlip,
    A.Transpose,
    A.RandomRotate90,
    A.Affine,
    A.ElasticTransform,  # FastElasticTransform too
    A.GridDistortion,
    A.CoarseDropout,
)


def _fills_zero(transform: A.BasicTransform) -> bool:
    fill = getattr(transform, "fill", 0)
    try:
        return bool(np.all(np.asarray(fill, dtype=np.float64) == 0))
    except (TypeError, ValueError):  # e.g. CoarseDropout's fill "random"
        return False


def uint16_safe(transform: A.BasicTransform) -> bool:
    if isinstance(transform, A.BaseCompose):
        return all(uint16_safe(t) for t in transform.transforms)
    return isinstance(transform, _UINT16_SAFE) and _fills_zero(transform)


def accepts_uint16(transform: Any) -> bool:
    """Whether `transform` takes uint16 images (value = round(65535 x pixel)) as well as float32
    ones: the pipelines of `build_transforms`, which hold a top-level `ToUnitFloat`."""
    return isinstance(transform, A.Compose) and any(
        isinstance(t, ToUnitFloat) for t in transform.transforms
    )


class ImagenetNormalize(A.ImageOnlyTransform):
    """(image - mean) / std for images in [0, 1], float32 [H, W, C].

    C == 3: the ImageNet RGB mean / std. Any other C (1 slice, a 5-slice stack): the grey ImageNet
    mean / std (GREY_MEAN, GREY_STD) on every channel, because smp / timm adapt a pretrained first
    convolution to C != 3 inputs by repeating or summing its RGB filters, so each channel should
    look like an ImageNet luminance channel.
    """

    def __init__(self, p: float = 1.0):
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        if img.ndim == 3 and img.shape[-1] == 3:
            mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
            std = np.asarray(IMAGENET_STD, dtype=np.float32)
        else:
            mean, std = np.float32(GREY_MEAN), np.float32(GREY_STD)
        return ((img - mean) / std).astype(np.float32, copy=False)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


class InvertUnit(A.ImageOnlyTransform):
    """1 - image for float32 images in [0, 1] (albumentations' InvertImg assumes uint8 ranges
    for some dtypes)."""

    def __init__(self, p: float = 0.5):
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return (1.0 - img).astype(np.float32, copy=False)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


class BrightnessContrast(A.ImageOnlyTransform):
    """image * (1 + contrast) + brightness, clipped to [0, 1], for float32 [H, W, C] images.

    The same as albumentations' RandomBrightnessContrast with brightness_by_max=True on float
    images (brightness in units of the [0, 1] range), but about 40x faster: albumentations 2.0.8
    computes float images in float64 through full-size temporary arrays (6 ms at 320x384x3, the
    dearest op of the heavy preset), where one cv2 pass in float32 takes ~0.15 ms.
    """

    def __init__(
        self,
        brightness_limit: tuple[float, float] = (-0.2, 0.2),
        contrast_limit: tuple[float, float] = (-0.2, 0.2),
        p: float = 0.5,
    ):
        super().__init__(p=p)
        self.brightness_limit = brightness_limit
        self.contrast_limit = contrast_limit

    def get_params(self) -> dict[str, Any]:
        return {
            "alpha": 1.0 + self.py_random.uniform(*self.contrast_limit),
            "beta": self.py_random.uniform(*self.brightness_limit),
        }

    def apply(self, img: np.ndarray, alpha: float, beta: float, **params: Any) -> np.ndarray:
        out = cv2.addWeighted(img, alpha, img, 0.0, beta)
        out = out.reshape(img.shape)  # cv2 drops a trailing channel axis of 1
        return np.clip(out, 0.0, 1.0, out=out)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_limit", "contrast_limit")


class FastElasticTransform(A.ElasticTransform):
    """albumentations' ElasticTransform with its displacement maps built in float32.

    The same fields (uniform noise in [-1, 1) per pixel and axis, smoothed by the same Gaussian,
    times alpha, added to the pixel grid), but drawn and summed in float32: albumentations 2.0.8
    draws the noise in float64 and adds an int64 grid in float64, ~2 of the ~3 ms a warp takes
    at 320x384. Other settings (Gaussian noise, same_dxdy) defer to albumentations.
    """

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        if self.noise_distribution != "uniform" or self.same_dxdy:
            return super().get_params_dependent_on_data(params, data)
        height, width = params["shape"][:2]
        fields = self.random_generator.random((2 * height, width), dtype=np.float32)
        fields *= 2.0
        fields -= 1.0
        kernel_size = (17, 17) if self.approximate else (0, 0)
        cv2.GaussianBlur(
            fields, kernel_size, self.sigma, dst=fields, borderType=cv2.BORDER_REPLICATE
        )
        fields *= np.float32(self.alpha)
        map_x, map_y = fields[:height], fields[height:]
        map_x += np.arange(width, dtype=np.float32)
        map_y += np.arange(height, dtype=np.float32)[:, None]
        return {"map_x": map_x, "map_y": map_y}


class FastGaussNoise(A.GaussNoise):
    """albumentations' GaussNoise with the noise drawn in float32.

    The same noise (one mean and std per call, drawn as albumentations draws them; per-pixel,
    per-channel normal noise at noise_scale_factor x the size, resized back bilinearly), but
    `cv2.randn` fills a float32 array directly: albumentations 2.0.8 fills a float64 one and
    converts it, ~half the ~0.6 ms a call takes at 320x384x3. Shared (per_channel=False) noise
    and non-float32 images defer to albumentations.
    """

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        image = data.get("image")
        if image is None or image.dtype != np.float32 or not self.per_channel:
            return super().get_params_dependent_on_data(params, data)
        std = self.py_random.uniform(*self.std_range)
        mean = self.py_random.uniform(*self.mean_range)
        cv2.setRNGSeed(int(self.random_generator.integers(0, 2**16)))
        height, width = image.shape[:2]
        channels = image.shape[2] if image.ndim == 3 else 1
        small = (max(1, int(height * self.noise_scale_factor)),
                 max(1, int(width * self.noise_scale_factor)))  # fmt: skip
        # One channel of width x channels: cv2.randn takes a mean / std per channel only up to 4.
        noise = np.empty((small[0], small[1] * channels), dtype=np.float32)
        cv2.randn(noise, mean, std)
        noise = noise.reshape(small[0], small[1], channels)
        if small != (height, width):
            noise = fgeometric.resize(noise, (height, width), interpolation=cv2.INTER_LINEAR)
        return {"noise_map": noise if image.ndim == 3 else noise[..., 0]}
