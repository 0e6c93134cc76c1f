"""Losses: every named term in every mode, weighted sums by hand, perfect predictions, AMP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch import losses as smp_losses

from kaggle_seg.config import LossTerm
from kaggle_seg.errors import KsegError
from kaggle_seg.losses import LOSSES, WeightedLoss, build_loss

CHANNELS = {"binary": 1, "multilabel": 3, "multiclass": 4}
SIGMOID_ONLY = {"bce", "weighted_bce"}
SOFTMAX_ONLY = {"ce", "weighted_ce"}


def _params(name: str, channels: int) -> dict:
    if name == "weighted_bce":
        return {"pos_weight": 3.0}
    if name == "weighted_ce":
        return {"class_weights": [1.0 + k for k in range(channels)]}
    if name == "tversky":
        return {"alpha": 0.7, "beta": 0.3}
    return {}


def _batch(mode: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits `[2, K, 16, 16]` and matching targets (one-hot for multiclass)."""
    generator = torch.Generator().manual_seed(seed)
    channels = CHANNELS[mode]
    logits = torch.randn(2, channels, 16, 16, generator=generator)
    if mode == "multiclass":
        labels = torch.randint(0, channels, (2, 16, 16), generator=generator)
        targets = F.one_hot(labels, channels).permute(0, 3, 1, 2).float()
    else:
        targets = (torch.rand(2, channels, 16, 16, generator=generator) > 0.6).float()
    return logits, targets


def _cases() -> list[tuple[str, str]]:
    cases = []
    for mode in CHANNELS:
        for name in LOSSES:
            if (mode == "multiclass" and name in SIGMOID_ONLY) or (
                mode != "multiclass" and name in SOFTMAX_ONLY
            ):
                continue
            cases.append((name, mode))
    return cases


@pytest.mark.parametrize(("name", "mode"), _cases())
def test_every_loss_is_a_finite_scalar_with_gradient(name: str, mode: str) -> None:
    loss = build_loss([LossTerm(name=name, params=_params(name, CHANNELS[mode]))], mode)
    logits, targets = _batch(mode)
    logits = logits.to(memory_format=torch.channels_last).requires_grad_(True)

    value = loss(logits, targets)

    assert value.ndim == 0 and value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0
    assert loss.last_terms == {name: pytest.approx(value.item())}


@pytest.mark.parametrize(("name", "mode"), _cases())
def test_every_loss_under_bfloat16_autocast(name: str, mode: str) -> None:
    loss = build_loss([LossTerm(name=name, params=_params(name, CHANNELS[mode]))], mode)
    logits, targets = _batch(mode)
    reference = loss(logits, targets)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = logits.to(torch.bfloat16).requires_grad_(True)
        value = loss(low, targets)

    assert value.dtype == torch.float32 and torch.isfinite(value)
    # the only difference is the bf16 rounding of the logits themselves
    assert value.item() == pytest.approx(reference.item(), rel=0.05, abs=0.02)
    value.backward()
    assert low.grad is not None and torch.isfinite(low.grad.float()).all()


def test_weighted_sum_matches_smp_losses_by_hand() -> None:
    logits, targets = _batch("multilabel", seed=1)
    loss = build_loss(
        [LossTerm(name="dice", weight=0.4), LossTerm(name="bce", weight=0.6)], "multilabel"
    )

    value = loss(logits, targets)

    dice = smp_losses.DiceLoss("multilabel")(logits, targets)
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    assert value.item() == pytest.approx(0.4 * dice.item() + 0.6 * bce.item(), rel=1e-6)
    assert loss.last_terms == {
        "dice": pytest.approx(dice.item()),
        "bce": pytest.approx(bce.item()),
    }


def test_bce_plus_tversky_and_weighted_bce_plus_dice() -> None:
    logits, targets = _batch("binary", seed=2)
    tversky = build_loss(
        [
            LossTerm(name="bce", weight=0.5),
            LossTerm(name="tversky", weight=0.5, params={"alpha": 0.7, "beta": 0.3}),
        ],
        "binary",
    )
    expected = 0.5 * F.binary_cross_entropy_with_logits(logits, targets) + 0.5 * (
        smp_losses.TverskyLoss("binary", alpha=0.7, beta=0.3)(logits, targets)
    )
    assert tversky(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)

    lgg = build_loss(
        [LossTerm(name="weighted_bce", params={"pos_weight": 3.0}), LossTerm(name="dice")],
        "binary",
    )
    weighted = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor(3.0))
    dice = smp_losses.DiceLoss("binary")(logits, targets)
    assert lgg(logits, targets).item() == pytest.approx((weighted + dice).item(), rel=1e-6)


def test_per_class_bce_weights_broadcast_over_channels() -> None:
    logits, targets = _batch("multilabel", seed=3)
    loss = build_loss(
        [LossTerm(name="weighted_bce", params={"pos_weight": [1.0, 2.0, 4.0]})], "multilabel"
    )
    per_pixel = [
        F.binary_cross_entropy_with_logits(
            logits[:, k], targets[:, k], pos_weight=torch.tensor(w), reduction="sum"
        )
        for k, w in enumerate([1.0, 2.0, 4.0])
    ]
    assert loss(logits, targets).item() == pytest.approx(
        (sum(per_pixel) / targets.numel()).item(), rel=1e-6
    )
    with pytest.raises(KsegError, match="3 per-class values for 2 output channels"):
        loss(logits[:, :2], targets[:, :2])


def test_perfect_logits_give_zero_dice_and_bce() -> None:
    _, targets = _batch("multilabel", seed=4)
    logits = (targets * 2 - 1) * 30.0
    loss = build_loss([LossTerm(name="dice"), LossTerm(name="bce")], "multilabel")

    assert loss(logits, targets).item() == pytest.approx(0.0, abs=1e-5)
    assert loss.last_terms["dice"] == pytest.approx(0.0, abs=1e-5)


def test_multiclass_accepts_one_hot_or_index_targets() -> None:
    logits, one_hot = _batch("multiclass", seed=5)
    loss = build_loss(
        [LossTerm(name="ce"), LossTerm(name="dice"), LossTerm(name="lovasz")], "multiclass"
    )
    from_one_hot = loss(logits, one_hot)
    from_index = loss(logits, one_hot.argmax(dim=1))
    assert from_one_hot.item() == pytest.approx(from_index.item())
    expected_ce = F.cross_entropy(logits, one_hot.argmax(dim=1))
    assert loss.last_terms["ce"] == pytest.approx(expected_ce.item())


def test_weighted_ce_uses_class_weights() -> None:
    logits, one_hot = _batch("multiclass", seed=6)
    weights = [1.0, 2.0, 0.5, 3.0]
    loss = build_loss(
        [LossTerm(name="weighted_ce", params={"class_weights": weights})], "multiclass"
    )
    expected = F.cross_entropy(logits, one_hot.argmax(dim=1), weight=torch.tensor(weights))
    assert loss(logits, one_hot).item() == pytest.approx(expected.item(), rel=1e-6)


def test_multilabel_lovasz_is_the_mean_over_channels() -> None:
    logits, targets = _batch("multilabel", seed=7)
    loss = build_loss([LossTerm(name="lovasz")], "multilabel")
    binary = smp_losses.LovaszLoss("binary")
    expected = sum(binary(logits[:, k : k + 1], targets[:, k : k + 1]) for k in range(3)) / 3
    assert loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_repeated_terms_get_distinct_labels() -> None:
    logits, targets = _batch("binary", seed=8)
    loss = build_loss(
        [
            LossTerm(name="focal", params={"gamma": 2.0}),
            LossTerm(name="focal", params={"gamma": 1}),
        ],
        "binary",
    )
    loss(logits, targets)
    assert list(loss.last_terms) == ["focal", "focal_2"]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(KeyError) as info:
        build_loss([LossTerm(name="dicee")], "binary")
    for name in LOSSES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("term", "mode", "match"),
    [
        (LossTerm(name="dice", params={"smoth": 1.0}), "binary", "loss 'dice': bad params"),
        (LossTerm(name="tversky", params={"gama": 1.0}), "binary", "loss 'tversky': bad params"),
        (LossTerm(name="weighted_bce"), "binary", "loss 'weighted_bce': needs pos_weight"),
        (LossTerm(name="bce"), "multiclass", "loss 'bce': for sigmoid outputs"),
        (
            LossTerm(name="weighted_ce", params={"class_weights": [1]}),
            "binary",
            "loss 'weighted_ce': for multiclass",
        ),
        (
            LossTerm(name="weighted_bce", params={"class_weights": "abc"}),
            "binary",
            "loss 'weighted_bce': class_weights must be",
        ),
        (LossTerm(name="weighted_ce"), "multiclass", "loss 'weighted_ce': bad params"),
        (LossTerm(name="dice"), "softmax", "loss mode must be one of"),
    ],
)
def test_bad_terms_raise_ksegerror_naming_the_term(term: LossTerm, mode: str, match: str) -> None:
    with pytest.raises(KsegError, match=match):
        build_loss([term], mode)  # type: ignore[arg-type]


def test_no_terms_and_mismatched_targets() -> None:
    with pytest.raises(KsegError, match="at least one"):
        build_loss([], "binary")
    loss = build_loss([LossTerm(name="bce")], "multilabel")
    with pytest.raises(KsegError, match=r"targets \[2, 2, 16, 16\] do not match"):
        loss(torch.zeros(2, 3, 16, 16), torch.zeros(2, 2, 16, 16))


def test_binary_accepts_targets_without_channel_axis() -> None:
    logits, targets = _batch("binary", seed=9)
    loss = build_loss([LossTerm(name="bce")], "binary")
    assert loss(logits, targets[:, 0]).item() == pytest.approx(loss(logits, targets).item())


def test_weighted_loss_is_a_module_whose_buffers_move() -> None:
    loss = build_loss([LossTerm(name="weighted_bce", params={"pos_weight": [2.0]})], "binary")
    assert isinstance(loss, WeightedLoss)
    assert [b.dtype for b in loss.buffers()] == [torch.float32]
    loss = loss.to(torch.float64)  # .to() reaches the pos_weight buffer
    assert next(loss.buffers()).dtype == torch.float64
