"""Fold scores (evaluation.py) by the competition's scoring kind, on hand-computed cases: the
per-image Dice, the per-group volume Dice, the GI score of volumes, the mAP of instances; mask
channels taken by name; DDP parts merged."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from kaggle_seg.competitions.base import BaseCompetition
from kaggle_seg.evaluation import (
    FoldEvaluator,
    fold_metric_names,
    summarize_fold,
    summarize_validation,
)
from kaggle_seg.metrics import PIXEL_METRICS, dsb_image_score, uwmgi_score_volumes


class Stub(BaseCompetition):
    """A competition whose truths are given: ids -> uint8 [H, W, 1] masks or int labels."""

    name = "stub"
    classes = ("organ",)
    channels = 1

    def __init__(self, scoring: str, truths: dict[str, np.ndarray], volume_key=None):
        self.scoring = scoring
        self.truths = truths
        self.volume_key = volume_key
        self.slice_key = "slice_index" if volume_key else None
        self.instance_masks = scoring == "instances"

    def read_mask(self, row: Any) -> np.ndarray:
        truth = self.truths[row["id"]]
        return (truth > 0).astype(np.uint8)[..., None] if truth.ndim == 2 else truth

    def read_instances(self, row: Any) -> np.ndarray:
        return self.truths[row["id"]]


def _mask(pixels: list[tuple[int, int]], shape=(4, 4)) -> np.ndarray:
    mask = np.zeros((*shape, 1), np.uint8)
    for y, x in pixels:
        mask[y, x, 0] = 1
    return mask


def _score(competition: Stub, table: pd.DataFrame, predictions: dict[str, np.ndarray], **kw):
    evaluator = FoldEvaluator(competition, table, **kw)
    for position, image_id in enumerate(table["id"]):
        evaluator.add(position, predictions[image_id])
    return summarize_fold([evaluator.finish()], competition)


TRUTHS = {"a": _mask([(0, 0), (0, 1), (1, 0), (1, 1)]), "b": _mask([])}
# a: 2 of its 4 pixels predicted, nothing else; b: empty and predicted empty.
PREDICTIONS = {
    "a": np.moveaxis(_mask([(0, 0), (0, 1)]), -1, 0).astype(np.float32),
    "b": np.zeros((1, 4, 4), np.float32),
}
TABLE = pd.DataFrame({"id": ["a", "b"], "group": ["p1", "p1"]})


def test_images_score_the_mean_image_dice() -> None:
    summary = _score(Stub("images", TRUTHS), TABLE, PREDICTIONS)
    # a: 2 x 2 / (4 + 2); b: empty in both, a perfect 1.
    assert summary["dice"] == pytest.approx((4 / 6 + 1.0) / 2)
    assert summary["score"] == summary["dice"]
    assert set(fold_metric_names(Stub("images", TRUTHS))) == {*PIXEL_METRICS, "score"}


def test_groups_pool_their_images_pixels() -> None:
    summary = _score(Stub("groups", TRUTHS), TABLE, PREDICTIONS)
    # One patient: its pixels pooled, the empty slice adds nothing (no free 1 for it).
    assert summary["patient_dice"] == pytest.approx(4 / 6)
    assert summary["score"] == summary["patient_dice"] < summary["dice"]


def test_mask_channels_are_taken_by_name() -> None:
    # The model outputs a border channel first: the class's channel is found by its name.
    swapped = {k: np.concatenate([np.ones_like(v), v]) for k, v in PREDICTIONS.items()}
    summary = _score(Stub("images", TRUTHS), TABLE, swapped, outputs=["border", "organ"])
    assert summary["dice"] == pytest.approx((4 / 6 + 1.0) / 2)


def test_volumes_score_the_gi_score_of_each_volume() -> None:
    rng = np.random.default_rng(0)
    truths = {f"s{i}": (rng.random((6, 6, 1)) > 0.6).astype(np.uint8) for i in range(4)}
    predictions = {k: (rng.random((1, 6, 6)) > 0.5).astype(np.float32) for k in truths}
    table = pd.DataFrame(
        {"id": list(truths), "volume": ["v1", "v1", "v2", "v2"], "slice_index": [0, 1, 0, 1]}
    )
    competition = Stub("volumes", truths, volume_key="volume")
    summary = _score(competition, table, predictions)
    volumes = [
        (
            name,
            np.stack([truths[i] for i in ids]),
            np.stack([np.moveaxis(predictions[i], 0, -1) for i in ids]),
        )
        for name, ids in (("v1", ["s0", "s1"]), ("v2", ["s2", "s3"]))
    ]
    expected = uwmgi_score_volumes(volumes, competition.classes)
    assert summary["score"] == pytest.approx(expected["score"])
    assert summary["hausdorff"] == pytest.approx(expected["hausdorff"])
    assert {"gi_dice", "hausdorff"} <= set(fold_metric_names(competition))


def test_instances_score_the_map_of_the_split() -> None:
    labels = np.zeros((9, 9), np.int32)
    labels[1:4, 1:4], labels[5:8, 5:8] = 1, 2  # 9 pixels each: above the minimum nucleus
    probabilities = (labels > 0).astype(np.float32)[None]
    probabilities[0, 5:8, 5:8] = 0.0  # one nucleus missed
    competition = Stub("instances", {"n": labels})
    summary = _score(competition, pd.DataFrame({"id": ["n"]}), {"n": probabilities})
    assert (
        summary["map"]
        == summary["score"]
        == pytest.approx(dsb_image_score(labels, np.where(labels == 1, 1, 0)))
    )


def test_validation_losses_are_averaged_over_every_ranks_images() -> None:
    evaluator = FoldEvaluator(Stub("images", TRUTHS), TABLE)
    evaluator.add(0, PREDICTIONS["a"])
    first = {**evaluator.finish(), "loss": (2.0, 1)}
    evaluator = FoldEvaluator(Stub("images", TRUTHS), TABLE)
    evaluator.add(1, PREDICTIONS["b"])
    second = {**evaluator.finish(), "loss": (6.0, 3)}
    summary = summarize_validation([first, second], Stub("images", TRUTHS))
    assert summary["valid_loss"] == pytest.approx(8.0 / 4)
    assert summary["dice"] == pytest.approx((4 / 6 + 1.0) / 2)
    assert "valid_class_bce" not in summary


def test_lgg_fold_score_never_prefers_predicting_nothing(shared_data) -> None:
    """The LGG score is the mean per-patient volume Dice: an empty prediction scores 0 on every
    patient with a lesion, however many of the slices are empty (64 % here), where the mean
    per-image Dice would give it ~0.65."""
    from kaggle_seg.competitions import get_competition
    from kaggle_seg.config import build_data_config
    from kaggle_seg.evaluation import FoldEvaluator, summarize_fold

    competition = get_competition("lgg")
    table = competition.read_table(shared_data / "lgg", build_data_config("lgg"))
    evaluator = FoldEvaluator(competition, table)
    perfect = FoldEvaluator(competition, table)
    for position, row in enumerate(table.to_dict("records")):
        mask = competition.read_mask(row)
        evaluator.add(position, np.zeros((1, *mask.shape[:2]), np.float32))
        perfect.add(position, np.moveaxis(mask, -1, 0).astype(np.float32))
    nothing = summarize_fold([evaluator.finish()], competition)
    assert nothing["dice"] > 0.6  # the per-image mean that used to be the score
    assert nothing["score"] == nothing["patient_dice"] == 0.0
    assert summarize_fold([perfect.finish()], competition)["score"] == 1.0
