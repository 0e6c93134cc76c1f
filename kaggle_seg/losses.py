"""Losses: weighted sums of named terms, mostly smp's losses.

A config lists terms, e.g. `[{name: dice, weight: 0.4}, {name: bce, weight: 0.6}]`;
`build_loss(terms, mode)` returns one module computing `sum(weight * term(logits, targets))`
and keeping each term's last value for logging.

Modes: "binary" (one sigmoid channel), "multilabel" (one sigmoid per channel, classes may
overlap: uwmgi organs, DSB mask + border), "multiclass" (softmax over channels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

from kaggle_seg.config import LossTerm
from kaggle_seg.errors import KsegError

LossMode = Literal["binary", "multilabel", "multiclass"]
MODES: tuple[str, ...] = ("binary", "multilabel", "multiclass")
SIGMOID_MODES = ("binary", "multilabel")


def _per_class_tensor(values: float | Sequence[float], name: str) -> torch.Tensor:
    """A scalar, or `[K, 1, 1]` so per-class values broadcast over `[B, K, H, W]`."""
    if isinstance(values, int | float):
        return torch.tensor(float(values))
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise KsegError(f"{name} must be a number or a non-empty list of numbers, got {values!r}")
    return torch.tensor([float(v) for v in values]).reshape(-1, 1, 1)


def _sigmoid_only(mode: str) -> None:
    if mode not in SIGMOID_MODES:
        raise KsegError(f"for sigmoid outputs (binary / multilabel), not {mode}; use 'ce'")


def _bce(
    mode: str,
    pos_weight: float | Sequence[float] | None = None,
    smooth_factor: float | None = None,
) -> nn.Module:
    """Binary cross-entropy on logits; `pos_weight` (scalar or per class) scales positives."""
    _sigmoid_only(mode)
    return smp_losses.SoftBCEWithLogitsLoss(
        pos_weight=None if pos_weight is None else _per_class_tensor(pos_weight, "pos_weight"),
        smooth_factor=smooth_factor,
    )


def _weighted_bce(
    mode: str,
    pos_weight: float | Sequence[float] | None = None,
    class_weights: Sequence[float] | None = None,
    smooth_factor: float | None = None,
) -> nn.Module:
    """BCE with positive weights (scalar or per class) and / or per-class weights.

    `pos_weight: 3.0` counts each foreground pixel 3 times (rare lesions, LGG);
    `class_weights: [1, 2, 1]` scales each channel's term.
    """
    _sigmoid_only(mode)
    if pos_weight is None and class_weights is None:
        raise KsegError("needs pos_weight and/or class_weights; else use 'bce'")
    return smp_losses.SoftBCEWithLogitsLoss(
        weight=None if class_weights is None else _per_class_tensor(class_weights, "class_weights"),
        pos_weight=None if pos_weight is None else _per_class_tensor(pos_weight, "pos_weight"),
        smooth_factor=smooth_factor,
    )


def _dice(mode: str, **params: Any) -> nn.Module:
    """smp soft Dice (1 - Dice) per class, averaged; classes empty in the whole batch count 0."""
    return smp_losses.DiceLoss(mode, **params)


def _jaccard(mode: str, **params: Any) -> nn.Module:
    """smp soft Jaccard (1 - IoU), like Dice."""
    return smp_losses.JaccardLoss(mode, **params)


def _tversky(mode: str, alpha: float = 0.5, beta: float = 0.5, **params: Any) -> nn.Module:
    """smp Tversky: `alpha` weights false positives, `beta` false negatives (0.5, 0.5 = Dice)."""
    return smp_losses.TverskyLoss(mode, alpha=alpha, beta=beta, **params)


def _focal(mode: str, **params: Any) -> nn.Module:
    """smp focal loss (`gamma`, `alpha`), per class for multilabel / multiclass."""
    return smp_losses.FocalLoss(mode, **params)


class PerChannel(nn.Module):
    """Mean over channels of a binary loss: `[B, K, H, W]` logits and targets -> scalar."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_channel = [
            self.loss(logits[:, k : k + 1], targets[:, k : k + 1]) for k in range(logits.shape[1])
        ]
        return torch.stack(per_channel).mean()


def _lovasz(mode: str, **params: Any) -> nn.Module:
    """smp Lovasz hinge (sigmoid) / Lovasz softmax (multiclass).

    Multilabel: the mean of each channel's binary Lovasz hinge (smp would pool every channel
    into one set, so a large organ would drown a small one).
    """
    if mode == "multilabel":
        return PerChannel(smp_losses.LovaszLoss("binary", **params))
    return smp_losses.LovaszLoss(mode, **params)


def _cross_entropy(
    mode: str,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> nn.Module:
    if mode != "multiclass":
        raise KsegError(f"for multiclass (softmax) models, not {mode}; use 'bce'")
    weight = None
    if class_weights is not None:
        weight = _per_class_tensor(list(class_weights), "class_weights").flatten()
    return nn.CrossEntropyLoss(
        weight=weight, label_smoothing=label_smoothing, ignore_index=ignore_index
    )


def _ce(mode: str, **params: Any) -> nn.Module:
    """Softmax cross-entropy for multiclass models (`class_weights`, `label_smoothing`)."""
    return _cross_entropy(mode, **params)


def _weighted_ce(mode: str, class_weights: Sequence[float], **params: Any) -> nn.Module:
    """Cross-entropy with per-class weights `class_weights: [w0, w1, ...]` (one per channel)."""
    return _cross_entropy(mode, class_weights=class_weights, **params)


# Each factory takes the mode and the term's params and returns a module
# `(logits [B, K, H, W] float32, targets) -> scalar`; targets as `WeightedLoss` prepares them.
LOSSES: dict[str, Callable[..., nn.Module]] = {
    "bce": _bce,
    "weighted_bce": _weighted_bce,
    "dice": _dice,
    "jaccard": _jaccard,
    "tversky": _tversky,
    "focal": _focal,
    "lovasz": _lovasz,
    "ce": _ce,
    "weighted_ce": _weighted_ce,
}

# Params whose list length must equal the number of channels.
_PER_CLASS_PARAMS = ("pos_weight", "class_weights")


class WeightedLoss(nn.Module):
    """`sum(weight_i * term_i(logits, targets))`, computed in float32 outside autocast.

    `forward(logits [B, K, H, W], targets)`: targets are `[B, K, H, W]` floats in {0, 1} (or
    soft labels) for binary / multilabel; for multiclass either one-hot `[B, K, H, W]` or
    class indices `[B, H, W]`. Returns a float32 scalar. `last_terms` maps each term's label
    (its name; `name_2`, ... for repeats) to its last unweighted value.
    """

    def __init__(
        self,
        terms: Sequence[nn.Module],
        weights: Sequence[float],
        labels: Sequence[str],
        mode: LossMode,
        per_class: Sequence[tuple[str, int]] = (),
    ):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.weights = [float(w) for w in weights]
        self.labels = list(labels)
        self.mode = mode
        self.per_class = list(per_class)
        self._last: dict[str, torch.Tensor] = {}

    @property
    def last_terms(self) -> dict[str, float]:
        # converted on access, so a step that does not log does not wait for the GPU
        return {label: float(value) for label, value in self._last.items()}

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        channels = logits.shape[1]
        for label, length in self.per_class:
            if length != channels:
                raise KsegError(
                    f"loss '{label}': {length} per-class values for {channels} output channels"
                )
        # buffers (pos_weight, class weights) follow the logits, even if nobody moved the loss
        buffer = next(self.buffers(), None)
        if buffer is not None and buffer.device != logits.device:
            self.to(logits.device)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            targets = self._prepare_targets(logits, targets)
            total = logits.new_zeros(())
            last = {}
            for label, weight, term in zip(self.labels, self.weights, self.terms, strict=True):
                value = term(logits, targets)
                last[label] = value.detach()
                total = total + weight * value
        self._last = last
        return total

    def _prepare_targets(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.mode == "multiclass":
            if targets.shape == logits.shape:
                return targets.argmax(dim=1)
            if targets.ndim == 4 and targets.shape[1] == 1:
                targets = targets[:, 0]
            if targets.shape != logits.shape[:1] + logits.shape[2:]:
                raise KsegError(
                    f"multiclass loss: targets {list(targets.shape)} are neither one-hot like "
                    f"the logits {list(logits.shape)} nor class indices [B, H, W]"
                )
            return targets.long()
        if targets.ndim == 3 and logits.shape[1] == 1:
            targets = targets.unsqueeze(1)
        if targets.shape != logits.shape:
            raise KsegError(
                f"{self.mode} loss: targets {list(targets.shape)} do not match "
                f"logits {list(logits.shape)}"
            )
        return targets.float()


def build_loss(terms: Sequence[LossTerm], mode: LossMode) -> WeightedLoss:
    """The weighted sum of `terms` (names from `LOSSES`) for a model's output `mode`.

    Raises KeyError for an unknown name (listing the valid ones) and KsegError for an unknown
    mode, no terms, or params a term does not take.
    """
    if mode not in MODES:
        raise KsegError(f"loss mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not terms:
        raise KsegError("train.loss: at least one loss term is needed")
    modules, weights, labels, per_class = [], [], [], []
    for term in terms:
        if term.name not in LOSSES:
            raise KeyError(f"train.loss: unknown loss '{term.name}'; valid: {', '.join(LOSSES)}")
        label = term.name
        repeat = 2
        while label in labels:
            label, repeat = f"{term.name}_{repeat}", repeat + 1
        try:
            module = LOSSES[term.name](mode, **term.params)
        except KsegError as exc:
            raise KsegError(f"loss '{term.name}': {exc}") from exc
        except (TypeError, ValueError, AssertionError) as exc:
            raise KsegError(
                f"loss '{term.name}': bad params {term.params} for mode {mode} ({exc})"
            ) from exc
        for param in _PER_CLASS_PARAMS:
            value = term.params.get(param)
            if isinstance(value, Sequence) and not isinstance(value, str):
                per_class.append((label, len(value)))
        modules.append(module)
        weights.append(term.weight)
        labels.append(label)
    return WeightedLoss(modules, weights, labels, mode, per_class)
