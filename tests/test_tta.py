"""TTA: exact undo round trips, equivariant and ramp models, batched == unbatched, merges."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kaggle_seg.tta import (
    MERGE_MODES,
    TTA_MODES,
    TTAModel,
    TTATransform,
    get_tta,
    merge_probabilities,
    predict_tta,
    tta_logits,
)

D4 = TTA_MODES["d4"]
ALL_TRANSFORMS = {t.name: t for t in D4}


def _images(height: int = 5, width: int = 7, batch: int = 2, channels: int = 3) -> torch.Tensor:
    """Distinct values everywhere, so any misplaced pixel shows."""
    return torch.arange(batch * channels * height * width, dtype=torch.float32).reshape(
        batch, channels, height, width
    )


class RampModel(torch.nn.Module):
    """Not equivariant: multiplies every pixel by its column index in the frame it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return x * torch.arange(x.shape[-1], dtype=x.dtype)


# --- the transforms ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_TRANSFORMS))
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 7, 5), (2, 2, 4, 4)])
def test_undo_inverts_augment_exactly(name: str, shape: tuple[int, ...]) -> None:
    transform = ALL_TRANSFORMS[name]
    images = torch.randn(shape)
    assert torch.equal(transform.undo(transform.augment(images)), images)


# What each name means, against numpy on one [H, W] plane (np.rot90 is counter-clockwise).
NUMPY_REFERENCE = {
    "identity": lambda a: a,
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1, :],
    "rot90": lambda a: np.rot90(a, 1),
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),
    "transpose": lambda a: a.T,
    "anti_transpose": lambda a: a[::-1, ::-1].T,
}


@pytest.mark.parametrize("name", list(ALL_TRANSFORMS))
def test_augment_matches_its_name(name: str) -> None:
    images = _images(height=5, width=7)
    augmented = ALL_TRANSFORMS[name].augment(images)
    for b, c in itertools.product(range(2), range(3)):
        expected = NUMPY_REFERENCE[name](images[b, c].numpy())
        np.testing.assert_array_equal(augmented[b, c].numpy(), expected)


def test_d4_is_eight_distinct_transforms() -> None:
    assert len(D4) == 8
    assert len({t.name for t in D4}) == 8
    square = _images(height=4, width=4)
    views = [t.augment(square) for t in D4]
    for a, b in itertools.combinations(range(8), 2):
        assert not torch.equal(views[a], views[b]), (D4[a].name, D4[b].name)


def test_modes_nest_and_start_with_identity() -> None:
    assert [t.name for t in get_tta("none")] == ["identity"]
    assert [t.name for t in get_tta("hflip")] == ["identity", "hflip"]
    assert [t.name for t in get_tta("flip")] == ["identity", "hflip", "vflip"]
    for transforms in TTA_MODES.values():
        assert transforms[0].name == "identity"
        assert all(isinstance(t, TTATransform) for t in transforms)


def test_unknown_names_raise_key_error_listing_valid_ones() -> None:
    with pytest.raises(KeyError, match="none, hflip, flip, d4"):
        get_tta("d8")
    with pytest.raises(KeyError, match="mean, gmean, max, tsharpen"):
        merge_probabilities(torch.rand(2, 1, 1, 2, 2), "median")


# --- tta_logits -------------------------------------------------------------------------------


@pytest.mark.parametrize("tta", list(TTA_MODES))
@pytest.mark.parametrize("merge", ["mean", "gmean", "max"])
def test_equivariant_model_is_unchanged_by_tta(tta: str, merge: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, kernel_size=1).eval()  # a 1x1 conv commutes with every view
    images = torch.randn(2, 3, 6, 9)
    with torch.inference_mode():
        plain = torch.sigmoid(model(images))
        merged = predict_tta(model, images, tta=tta, merge=merge)
    torch.testing.assert_close(merged, plain)


def test_equivariant_model_under_tsharpen_gives_sqrt() -> None:
    model = torch.nn.Identity()
    images = torch.randn(1, 2, 4, 6)
    merged = predict_tta(model, images, tta="d4", merge="tsharpen")
    torch.testing.assert_close(merged, torch.sigmoid(images).sqrt())


def test_hflip_mean_of_ramp_model_by_hand() -> None:
    # identity view: x * j; hflip view undone: flip(flip(x) * j) = x * (W - 1 - j).
    # Their mean is x * (W - 1) / 2 at every pixel; a missing undo would not be.
    images = _images(height=3, width=5)
    logits = tta_logits(RampModel(), images, get_tta("hflip"))
    assert logits.shape == (2, 2, 3, 3, 5)
    torch.testing.assert_close(logits.mean(0), images * 2.0, rtol=0, atol=0)
    assert torch.equal(logits[1], images * torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]))


# The ramp the model applied along its own W, seen back in the original [H, W] frame (i = row,
# j = column): worked out by hand from each view's pixel map.
RAMP_IN_ORIGINAL_FRAME = {
    "identity": lambda i, j, h, w: j,
    "hflip": lambda i, j, h, w: w - 1 - j,
    "vflip": lambda i, j, h, w: j,
    "rot90": lambda i, j, h, w: i,
    "rot180": lambda i, j, h, w: w - 1 - j,
    "rot270": lambda i, j, h, w: h - 1 - i,
    "transpose": lambda i, j, h, w: i,
    "anti_transpose": lambda i, j, h, w: h - 1 - i,
}


@pytest.mark.parametrize("batched", [True, False])
def test_each_d4_view_is_undone_into_the_original_frame(batched: bool) -> None:
    height, width = 4, 6
    images = _images(height=height, width=width)
    logits = tta_logits(RampModel(), images, D4, batched=batched)
    assert logits.shape == (8, 2, 3, height, width)
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for view, transform in enumerate(D4):
        ramp = RAMP_IN_ORIGINAL_FRAME[transform.name](i, j, height, width).float()
        assert torch.equal(logits[view], images * ramp), transform.name


@pytest.mark.parametrize("tta", list(TTA_MODES))
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 3, 6, 6)])
def test_batched_equals_unbatched(tta: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    # Non-equivariant: random 3x3 kernels, zero padding at the borders.
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3, padding=1)
    ).eval()
    images = torch.randn(shape)
    with torch.inference_mode():
        batched = tta_logits(model, images, get_tta(tta), batched=True)
        one_by_one = tta_logits(model, images, get_tta(tta), batched=False)
    torch.testing.assert_close(batched, one_by_one)


@pytest.mark.parametrize(
    ("shape", "expected_calls"),
    [
        ((2, 3, 5, 7), [(8, 3, 5, 7), (8, 3, 7, 5)]),  # 4 views keep H x W, 4 are W x H
        ((2, 3, 6, 6), [(16, 3, 6, 6)]),
    ],
)
def test_batched_runs_one_forward_per_view_shape(
    shape: tuple[int, ...], expected_calls: list[tuple[int, ...]]
) -> None:
    model = RampModel()
    tta_logits(model, torch.zeros(shape), D4, batched=True)
    assert model.calls == expected_calls


def test_batched_views_of_large_images_run_in_forwards_of_bounded_pixels() -> None:
    """d4 on 1024x1024 batches was killed for memory (67M pixels in one forward): the views
    run in consecutive slices of at most max_pixels, with the same logits."""
    model = RampModel()
    images = torch.randn(3, 3, 6, 6)
    whole = tta_logits(model, images, D4, batched=True)
    model.calls.clear()
    sliced = tta_logits(model, images, D4, batched=True, max_pixels=5 * 36)
    assert [call[0] for call in model.calls] == [5, 5, 5, 5, 4]  # 24 rows, at most 5 a forward
    torch.testing.assert_close(sliced, whole)
    model.calls.clear()
    tta_logits(model, images, D4, batched=True, max_pixels=1)  # never below one row
    assert [call[0] for call in model.calls] == [1] * 24


def test_unbatched_runs_one_forward_per_view() -> None:
    model = RampModel()
    tta_logits(model, torch.zeros(2, 3, 5, 7), D4, batched=False)
    assert [call[0] for call in model.calls] == [2] * 8


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_left_alone(training: bool) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.Dropout())
    model.train(training)
    tta_logits(model, torch.zeros(1, 1, 4, 4), D4)
    assert all(m.training == training for m in model.modules())


def test_empty_transforms_rejected() -> None:
    with pytest.raises(ValueError, match="at least one"):
        tta_logits(RampModel(), _images(), [])


# --- merge_probabilities ----------------------------------------------------------------------


def _two_views() -> torch.Tensor:
    """[T=2, B=1, K=1, H=1, W=2]: view 0 = (0.25, 0.64), view 1 = (1.0, 0.16)."""
    return torch.tensor([[0.25, 0.64], [1.0, 0.16]]).reshape(2, 1, 1, 1, 2)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("mean", [0.625, 0.4]),  # (0.25 + 1) / 2, (0.64 + 0.16) / 2
        ("gmean", [0.5, 0.32]),  # sqrt(0.25 * 1), sqrt(0.64 * 0.16) = sqrt(0.1024)
        ("max", [1.0, 0.64]),
        ("tsharpen", [0.75, 0.6]),  # (0.5 + 1) / 2, (0.8 + 0.4) / 2
    ],
)
def test_merge_by_hand(mode: str, expected: list[float]) -> None:
    merged = merge_probabilities(_two_views(), mode)
    assert merged.shape == (1, 1, 1, 2)
    torch.testing.assert_close(merged.flatten(), torch.tensor(expected))


def test_merge_modes_constant_matches_implementation() -> None:
    assert MERGE_MODES == ("mean", "gmean", "max", "tsharpen")
    for mode in MERGE_MODES:
        merge_probabilities(_two_views(), mode)


def test_gmean_of_a_zero_is_small_and_finite() -> None:
    # sqrt(1e-7 * 1): the clamp keeps one hard zero from giving -inf / nan.
    merged = merge_probabilities(torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1), "gmean")
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged.flatten(), torch.tensor([1e-7**0.5]))


def test_gmean_keeps_half_precision_dtype() -> None:
    merged = merge_probabilities(_two_views().half(), "gmean")
    assert merged.dtype == torch.float16
    expected = torch.tensor([0.5, 0.32])
    torch.testing.assert_close(merged.flatten().float(), expected, atol=1e-3, rtol=1e-3)


def test_merge_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"\[T, B, K, H, W\]"):
        merge_probabilities(torch.rand(1, 1, 2, 2), "mean")


def test_predict_tta_shape_and_range() -> None:
    images = torch.randn(2, 3, 5, 7)
    model = torch.nn.Conv2d(3, 4, 3, padding=1).eval()
    with torch.inference_mode():
        probabilities = predict_tta(model, images, tta="d4", merge="mean", batched=False)
    assert probabilities.shape == (2, 4, 5, 7)
    assert probabilities.dtype == torch.float32
    assert ((probabilities >= 0) & (probabilities <= 1)).all()


# --- TTAModel: validation and the OOF pass through the submission's TTA ------------------------


class HeadModel(torch.nn.Module):
    """Not equivariant: a random 3x3 convolution, and a class head reading the top-left pixel
    of the frame it is given."""

    def __init__(self, head: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)
        self.head = head

    def forward(self, x: torch.Tensor):
        logits = self.conv(x)
        return (logits, x[:, :2, 0, 0]) if self.head else logits


@pytest.mark.parametrize("tta", ["flip", "d4"])
def test_tta_model_gives_the_logits_of_predict_tta(tta: str) -> None:
    model = HeadModel(head=False).eval()
    images = torch.randn(2, 3, 8, 12)
    with torch.inference_mode():
        wrapped = torch.sigmoid(TTAModel(model, tta)(images))
        expected = predict_tta(model, images, tta)
        plain = torch.sigmoid(model(images))
    torch.testing.assert_close(wrapped, expected, atol=1e-5, rtol=1e-4)
    assert (wrapped - plain).abs().max() > 1e-3  # the views did change the answer


def test_tta_model_averages_a_class_heads_probabilities_over_the_views() -> None:
    model = HeadModel(head=True).eval()
    images = torch.randn(2, 3, 8, 12)
    transforms = get_tta("d4")
    with torch.inference_mode():
        logits, head = TTAModel(model, "d4")(images)
    expected = torch.stack([torch.sigmoid(t.augment(images)[:, :2, 0, 0]) for t in transforms])
    torch.testing.assert_close(torch.sigmoid(head), expected.mean(0), atol=1e-5, rtol=1e-4)
    assert logits.shape == (2, 2, 8, 12)
