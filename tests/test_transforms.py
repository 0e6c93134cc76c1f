"""Augmentation presets: any channel count, masks binary and moving with the image, no warnings."""

from __future__ import annotations

import warnings

import albumentations as A
import numpy as np
import pytest

from kaggle_seg.config import AugmentConfig
from kaggle_seg.data.cache import to_uint16
from kaggle_seg.data.transforms import (
    GREY_MEAN,
    GREY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    ChannelCLAHE,
    FastGaussNoise,
    ToUnitFloat,
    accepts_uint16,
    build_transforms,
    get_preset,
    pad_offsets,
)

# Presets that only move pixels: the image follows the mask up to interpolation at edges.
GEOMETRIC_PRESETS = ("none", "light", "lgg")


def blobs(height: int, width: int, k: int, seed: int) -> np.ndarray:
    """uint8 0/1 [H, W, K]: a few discs and rectangles per channel (smooth shapes, not noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    mask = np.zeros((height, width, k), dtype=np.uint8)
    for c in range(k):
        for _ in range(3):
            cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
            r = rng.uniform(0.08, 0.2) * min(height, width)
            if rng.random() < 0.5:
                mask[..., c] |= ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).astype(np.uint8)
            else:
                mask[..., c] |= ((abs(yy - cy) <= r) & (abs(xx - cx) <= r / 2)).astype(np.uint8)
    return mask


def centroid(binary: np.ndarray) -> tuple[float, float]:
    yy, xx = np.nonzero(binary)
    return float(yy.mean()), float(xx.mean())


def image_from_mask(mask: np.ndarray, channels: int) -> np.ndarray:
    """float32 [H, W, C] whose channel c is mask channel c % K."""
    return np.stack([mask[..., c % mask.shape[-1]] for c in range(channels)], -1).astype(np.float32)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("resize_mode", ["resize", "pad"])
def test_every_preset_any_channels_fixed_size_binary_masks_no_warnings(preset, resize_mode):
    rng = np.random.default_rng(0)
    # Non-square target (the UW 320x384 case, scaled down), inputs smaller and larger than it.
    for height, width in ((48, 64), (64, 64)):
        config = AugmentConfig(
            preset=preset, height=height, width=width, resize_mode=resize_mode, normalize="none"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            transform = build_transforms(config, train=True)
            for channels in (1, 3, 5):
                for k in (1, 3):
                    for in_h, in_w in ((40, 50), (70, 90)):
                        image = rng.random((in_h, in_w, channels), dtype=np.float32)
                        mask = blobs(in_h, in_w, k, seed=channels * 10 + k)
                        for _ in range(6):
                            out = transform(image=image, mask=mask)
                            assert out["image"].shape == (height, width, channels)
                            assert out["image"].dtype == np.float32
                            assert out["mask"].shape == (height, width, k)
                            assert out["mask"].dtype == np.uint8
                            assert set(np.unique(out["mask"])) <= {0, 1}


@pytest.mark.parametrize("preset", GEOMETRIC_PRESETS)
def test_geometric_presets_move_mask_with_image(preset):
    config = AugmentConfig(preset=preset, height=96, width=96, resize_mode="resize")
    transform = build_transforms(config, train=True)
    for channels, k in ((1, 1), (3, 3), (5, 3), (5, 1)):
        mask = blobs(120, 100, k, seed=channels + k)
        image = image_from_mask(mask, channels)
        for _ in range(10):
            out = transform(image=image, mask=mask)
            follows = image_from_mask(out["mask"], channels) > 0
            seen = out["image"] > 0.5
            # Linear interpolation of the image vs nearest for the mask: thresholded, they
            # differ at edges (soft edges resampled twice shift by up to a pixel), but a flip or
            # rotation applied to one and not the other would move shapes by far more.
            assert np.mean(seen != follows) < 0.03, (preset, channels, k)
            for c in range(channels):
                if follows[..., c].sum() > 50:
                    gap = np.subtract(centroid(seen[..., c]), centroid(follows[..., c]))
                    assert np.hypot(*gap) < 2.0, (preset, channels, k, c, gap)


@pytest.mark.parametrize("size", [(96, 96), (30, 25), (300, 260)])
def test_resized_masks_stay_centred_on_their_image(size):
    # cv2's INTER_NEAREST would shift masks by ~0.3-0.4 px against the linearly resized image.
    yy, xx = np.mgrid[:120, :100]
    mask = (((yy - 60) ** 2 + (xx - 50) ** 2) <= 30**2).astype(np.uint8)[..., None]
    config = AugmentConfig(preset="none", height=size[0], width=size[1], resize_mode="resize")
    out = build_transforms(config, train=False)(image=mask.astype(np.float32), mask=mask)
    gap = np.subtract(centroid(out["image"][..., 0] > 0.5), centroid(out["mask"][..., 0] > 0))
    assert np.abs(gap).max() < 0.2


def test_heavy_preset_geometry_matches_with_only_geometric_ops_left():
    # heavy = light + photometric ops + dropout (which blanks image and mask alike) + warps.
    transform = build_transforms(AugmentConfig(preset="heavy", height=96, width=96), train=True)
    mask = blobs(96, 96, 1, seed=4)
    image = mask.astype(np.float32)
    worst = []
    for _ in range(20):
        out = transform(image=image, mask=mask)
        # Noise, blur and contrast move values around 0.5 little for a 0/1 image.
        worst.append(np.mean((out["image"][..., 0] > 0.5) != (out["mask"][..., 0] > 0)))
    assert np.median(worst) < 0.03


def test_pad_offsets_formula():
    assert pad_offsets(310, 360, 320, 384) == (5, 12)
    assert pad_offsets(266, 266, 320, 384) == (27, 59)  # odd pixel to the bottom / right
    assert pad_offsets(400, 400, 320, 384) == (0, 0)  # never negative: no crop in validation


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_validation_pad_keeps_pixels_at_the_centre_offset(channels):
    config = AugmentConfig(preset="heavy", height=320, width=384, resize_mode="pad")
    transform = build_transforms(config, train=False)
    rng = np.random.default_rng(1)
    image = rng.random((310, 360, channels), dtype=np.float32) + 0.01
    mask = blobs(310, 360, 3, seed=2)
    out = transform(image=image, mask=mask)
    top, left = pad_offsets(310, 360, 320, 384)
    assert out["image"].shape == (320, 384, channels)
    np.testing.assert_array_equal(out["image"][top : top + 310, left : left + 360], image)
    np.testing.assert_array_equal(out["mask"][top : top + 310, left : left + 360], mask)
    padding = np.ones((320, 384), dtype=bool)
    padding[top : top + 310, left : left + 360] = False
    assert not out["image"][padding].any() and not out["mask"][padding].any()


def test_validation_resize_is_deterministic():
    config = AugmentConfig(preset="heavy", height=64, width=80, resize_mode="resize")
    transform = build_transforms(config, train=False)
    image = np.random.default_rng(0).random((100, 90, 3), dtype=np.float32)
    first = transform(image=image)["image"]
    assert first.shape == (64, 80, 3)
    np.testing.assert_array_equal(first, transform(image=image)["image"])


def test_training_pad_crops_larger_images_to_the_target():
    config = AugmentConfig(preset="none", height=64, width=64, resize_mode="pad")
    transform = build_transforms(config, train=True)
    image = np.random.default_rng(0).random((100, 50, 1), dtype=np.float32)
    out = transform(image=image)["image"]
    assert out.shape == (64, 64, 1)


def test_imagenet_normalisation_rgb_and_other_channel_counts():
    config = AugmentConfig(preset="none", height=16, width=16, normalize="imagenet")
    transform = build_transforms(config, train=False)
    rgb = np.ones((16, 16, 3), dtype=np.float32) * np.asarray(IMAGENET_MEAN, dtype=np.float32)
    np.testing.assert_allclose(transform(image=rgb)["image"], 0.0, atol=1e-6)
    ones = np.ones((16, 16, 3), dtype=np.float32)
    expected = (1 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    np.testing.assert_allclose(transform(image=ones)["image"][0, 0], expected, rtol=1e-5)
    for channels in (1, 5):
        out = transform(image=np.ones((16, 16, channels), dtype=np.float32))["image"]
        assert out.shape == (16, 16, channels) and out.dtype == np.float32
        np.testing.assert_allclose(out, (1 - GREY_MEAN) / GREY_STD, rtol=1e-5)


def test_channel_clahe_is_per_channel_for_any_channel_count():
    rng = np.random.default_rng(0)
    stack = rng.random((64, 64, 5), dtype=np.float32) ** 3
    clahe = A.Compose([ChannelCLAHE(clip_limit=(2.0, 2.0), p=1.0)])
    out = clahe(image=stack)["image"]
    assert out.shape == stack.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    for c in range(5):
        alone = clahe(image=stack[..., c : c + 1])["image"]
        np.testing.assert_array_equal(out[..., c], alone[..., 0])


def test_get_preset_lists_names():
    assert get_preset("gi") is PRESETS["gi"]
    with pytest.raises(KeyError, match="light"):
        get_preset("medium")
    with pytest.raises(KeyError, match="heavy"):
        build_transforms(AugmentConfig(preset="medium"), train=True)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("train", [True, False])
def test_uint16_input_gives_the_float_result(preset, train):
    # The store's uint16 images (65535 x pixel) go through the leading geometric ops as uint16:
    # with the same random draws the output is the float32 input's, up to rounding.
    config = AugmentConfig(preset=preset, height=64, width=80, resize_mode="pad")
    transform = build_transforms(config, train=train)
    assert accepts_uint16(transform)
    names = [type(t).__name__ for t in transform.transforms]
    assert names.count("ToUnitFloat") == 1
    rng = np.random.default_rng(3)
    for seed in range(8):
        image = cv_smooth(rng.random((60, 70, 3), dtype=np.float32))
        mask = blobs(60, 70, 3, seed=seed)
        as_uint16 = to_uint16(image)
        transform.set_random_seed(seed)
        want = transform(image=as_uint16.astype(np.float32) / 65535, mask=mask)
        transform.set_random_seed(seed)
        got = transform(image=as_uint16, mask=mask)
        assert got["image"].dtype == np.float32 and got["image"].shape == want["image"].shape
        np.testing.assert_array_equal(got["mask"], want["mask"])
        # gi's CLAHE quantises to 8 bits first, before any uint16 op: identical there too.
        np.testing.assert_allclose(got["image"], want["image"], rtol=0, atol=2e-4)


def cv_smooth(image: np.ndarray) -> np.ndarray:
    """A smooth image (interpolation differences stay at the rounding level)."""
    import cv2

    return cv2.GaussianBlur(image, (0, 0), 3).reshape(image.shape)


def test_to_unit_float_passes_float_through():
    image = np.random.default_rng(0).random((5, 6, 2), dtype=np.float32)
    assert ToUnitFloat(p=1.0).apply(image) is image
    out = ToUnitFloat(p=1.0).apply(np.full((5, 6, 2), 65535, np.uint16))
    assert out.dtype == np.float32 and np.all(out == 1.0)
    assert not accepts_uint16(A.Compose([A.HorizontalFlip()])) and not accepts_uint16(None)


@pytest.mark.parametrize("shape", [(320, 384, 3), (64, 80), (48, 40, 5)])
def test_fast_gauss_noise_draws_albumentations_noise_in_float32(shape):
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    settings = {"std_range": (0.01, 0.04), "noise_scale_factor": 0.5, "p": 1.0}
    fast, stock = FastGaussNoise(**settings), A.GaussNoise(**settings)
    fast.set_random_seed(5)
    stock.set_random_seed(5)
    for _ in range(3):  # the generators advance alike too
        a, b = fast(image=image)["image"], stock(image=image)["image"]
        assert a.dtype == np.float32 and a.shape == image.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert 0.003 < float(np.std(a - image)) < 0.05


# ----------------------------------------------------------------------------- "crop" input mode


def test_crop_mode_trains_on_native_scale_crops_and_validates_whole_images() -> None:
    height, width = 520, 696
    # each pixel's value says where it is, so a crop tells where it was taken
    position = np.arange(height * width, dtype=np.float64).reshape(height, width)
    image = np.repeat((position / position.size)[..., None], 3, axis=-1).astype(np.float32)
    mask = ((position % 7) < 3).astype(np.uint8)[..., None]
    config = AugmentConfig(preset="none", height=128, width=160, resize_mode="crop")
    for _ in range(5):
        out = build_transforms(config, train=True)(image=image, mask=mask)
        assert out["image"].shape == (128, 160, 3) and out["mask"].shape == (128, 160, 1)
        top, left = divmod(round(float(out["image"][0, 0, 0]) * position.size), width)
        # native scale: a window of the image pixel for pixel, its mask aligned with it
        np.testing.assert_allclose(out["image"], image[top : top + 128, left : left + 160])
        np.testing.assert_array_equal(out["mask"], mask[top : top + 128, left : left + 160])
    whole = build_transforms(config, train=False)(image=image, mask=mask)
    assert whole["image"].shape == image.shape  # validation: the whole image, unresampled


def test_crop_larger_than_the_image_pads_it_and_jitter_rescales() -> None:
    image = np.ones((60, 50, 1), np.float32)
    mask = np.ones((60, 50, 1), np.uint8)
    config = AugmentConfig(preset="none", height=96, width=96, resize_mode="crop")
    out = build_transforms(config, train=True)(image=image, mask=mask)
    assert out["image"].shape == (96, 96, 1)
    assert int(out["mask"].sum()) == 60 * 50  # padded with background, nothing lost
    jittered = AugmentConfig(preset="none", height=96, width=96, resize_mode="crop",
                             scale_jitter=0.5)  # fmt: skip
    transform = build_transforms(jittered, train=True)
    areas = {int(transform(image=image, mask=mask)["mask"].sum()) for _ in range(20)}
    assert len(areas) > 3  # the object's size changes with the drawn scale


def test_nuclei_robust_blurs_images_but_keeps_masks_sharp_and_aligned():
    # The preset's point: a defocused or dim nucleus keeps its full, sharp outline as target.
    config = AugmentConfig(preset="nuclei_robust", height=64, width=64, normalize="none")
    transform = build_transforms(config, train=True)
    mask = blobs(64, 64, 1, seed=7)
    image = np.repeat(mask.astype(np.float32), 3, axis=-1)
    dihedral = [np.rot90(m, r) for r in range(4) for m in (mask, mask.transpose(1, 0, 2))]
    softened = 0
    for _ in range(60):
        out = transform(image=image, mask=mask)
        assert any(np.array_equal(out["mask"], d) for d in dihedral)  # moved, never resampled
        values, inside = out["image"][..., 0], out["mask"][..., 0] > 0
        # Blur and noise leave many grey levels; flips, inversion, brightness and gamma alone
        # leave the two of a binary image.
        softened += len(np.unique(values.round(3))) > 8
        bright_nuclei = values[inside].mean() > values[~inside].mean()
        seen = (values > values.mean()) if bright_nuclei else (values < values.mean())
        assert np.mean(seen != inside) < 0.1
    assert softened >= 10
