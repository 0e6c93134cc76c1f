"""Post-processing rules on hand-made masks, settings validation, and the JSON settings file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.postprocess import (
    PostprocessConfig,
    apply_z_continuity,
    binarize,
    default_postprocess,
    load_postprocess,
    postprocess_instances,
    postprocess_masks,
    remove_small_instances,
    save_postprocess,
    split_instances,
)


def settings_for(n: int = 1, **update) -> PostprocessConfig:
    values = default_postprocess([f"class{k}" for k in range(n)]).model_dump()
    values.update(update)
    return PostprocessConfig(**values)


# Components of sizes 1, 2 (two pixels touching at a corner: one component under
# 8-connectivity), 4 and 6.
BLOBS = np.array(
    [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 0, 1, 1, 1],
    ],
    dtype=np.float32,
)
SINGLE = np.zeros_like(BLOBS)
SINGLE[0, 0] = 1
PAIR = np.zeros_like(BLOBS)
PAIR[3, 1] = PAIR[4, 2] = 1
SQUARE = np.zeros_like(BLOBS)
SQUARE[1:3, 3:5] = 1
BLOCK = np.zeros_like(BLOBS)
BLOCK[4:6, 5:8] = 1


def masks_of(probabilities: np.ndarray, **update) -> np.ndarray:
    return postprocess_masks(probabilities[None], settings_for(1, **update))[0]


# ----------------------------------------------------------------------------- masks


def test_thresholds_apply_per_class_strictly_above() -> None:
    probabilities = np.array([[[0.2, 0.4, 0.6, 0.8]], [[0.2, 0.4, 0.6, 0.8]]], dtype=np.float32)
    masks = postprocess_masks(probabilities, settings_for(2, thresholds=[0.3, 0.6]))
    assert masks.dtype == np.uint8
    np.testing.assert_array_equal(masks, [[[0, 1, 1, 1]], [[0, 0, 0, 1]]])


def test_default_settings_are_plain_binarize() -> None:
    probabilities = np.random.default_rng(0).random((3, 17, 23), dtype=np.float32)
    settings = default_postprocess(["a", "b", "c"])
    np.testing.assert_array_equal(
        postprocess_masks(probabilities, settings), binarize(probabilities)
    )


def test_min_area_removes_exactly_the_smaller_components() -> None:
    np.testing.assert_array_equal(masks_of(BLOBS, min_area=[0]), BLOBS)
    np.testing.assert_array_equal(masks_of(BLOBS, min_area=[2]), BLOBS - SINGLE)
    np.testing.assert_array_equal(masks_of(BLOBS, min_area=[3]), SQUARE + BLOCK)
    np.testing.assert_array_equal(masks_of(BLOBS, min_area=[6]), BLOCK)
    assert not masks_of(BLOBS, min_area=[7]).any()


def test_largest_component_keeps_only_the_largest() -> None:
    np.testing.assert_array_equal(masks_of(BLOBS, largest_component=True), BLOCK)
    # The largest among those min_area keeps: none when it is too small itself.
    assert not masks_of(BLOBS, largest_component=True, min_area=[7]).any()
    tie = np.zeros((3, 7), np.float32)
    tie[0, :2] = tie[2, 5:] = 1
    first = np.zeros_like(tie)
    first[0, :2] = 1
    np.testing.assert_array_equal(masks_of(tie, largest_component=True), first)


def test_gate_empties_a_class_with_too_few_pixels_after_min_area() -> None:
    # 13 pixels in all, 12 after min_area 2, 10 after min_area 3.
    np.testing.assert_array_equal(masks_of(BLOBS, gate_pixels=[13]), BLOBS)
    assert not masks_of(BLOBS, gate_pixels=[14]).any()
    np.testing.assert_array_equal(masks_of(BLOBS, min_area=[3], gate_pixels=[10]), SQUARE + BLOCK)
    assert not masks_of(BLOBS, min_area=[3], gate_pixels=[11]).any()


def test_rules_apply_per_class() -> None:
    probabilities = np.stack([BLOBS, BLOBS])
    settings = settings_for(2, min_area=[3, 0], gate_pixels=[0, 14])
    masks = postprocess_masks(probabilities, settings)
    np.testing.assert_array_equal(masks[0], SQUARE + BLOCK)
    assert not masks[1].any()


def test_gate_probability_needs_both_the_setting_and_class_probabilities() -> None:
    probabilities = np.stack([BLOBS, BLOBS])
    settings = settings_for(2, gate_probability=[0.5, 0.5])
    masks = postprocess_masks(probabilities, settings, class_probabilities=np.array([0.2, 0.9]))
    assert not masks[0].any()
    np.testing.assert_array_equal(masks[1], BLOBS)
    # Probability equal to the gate passes; no class probabilities or no setting: no gating.
    at_gate = postprocess_masks(probabilities, settings, class_probabilities=[0.5, 0.5])
    np.testing.assert_array_equal(at_gate, np.stack([BLOBS, BLOBS]))
    np.testing.assert_array_equal(postprocess_masks(probabilities, settings), at_gate)
    ungated = postprocess_masks(probabilities, settings_for(2), class_probabilities=[0.0, 0.0])
    np.testing.assert_array_equal(ungated, at_gate)
    with pytest.raises(InputError, match="3 class probabilities for 2 class"):
        postprocess_masks(probabilities, settings, class_probabilities=[0.1, 0.2, 0.3])


def test_probabilities_with_other_channels_are_refused_naming_both() -> None:
    settings = default_postprocess(["large_bowel", "small_bowel", "stomach"])
    with pytest.raises(InputError, match=r"2 channel\(s\).*3 class\(es\).*large_bowel"):
        postprocess_masks(np.zeros((2, 4, 4), np.float32), settings)
    with pytest.raises(InputError, match=r"\[K, H, W\]"):
        postprocess_masks(np.zeros((4, 4), np.float32), settings)
    with pytest.raises(InputError, match=r"2 channel\(s\).*1 class\(es\) \(nuclei\)"):
        postprocess_instances(np.zeros((2, 4, 4), np.float32), default_postprocess(["nuclei"]))


# ----------------------------------------------------------------------------- z-continuity


def test_z_continuity_removes_a_class_absent_from_both_neighbours() -> None:
    masks = np.zeros((4, 2, 3, 3), np.uint8)
    masks[[0, 2, 3], 0, 1, 1] = 1  # class 0: slice 0 alone, slices 2-3 together
    masks[1, 1, 0, :] = 1  # class 1: slice 1 alone
    result = apply_z_continuity(masks)
    assert result.shape == masks.shape and result.dtype == np.uint8
    expected = masks.copy()
    expected[0, 0] = 0
    expected[1, 1] = 0
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(masks[0, 0, 1, 1], 1)  # the input is left alone


def test_z_continuity_keeps_a_single_slice_and_checks_the_shape() -> None:
    single = np.ones((1, 2, 3, 3), np.uint8)
    np.testing.assert_array_equal(apply_z_continuity(single), single)
    with pytest.raises(InputError, match=r"\[D, K, H, W\]"):
        apply_z_continuity(np.ones((2, 3, 3), np.uint8))


# ----------------------------------------------------------------------------- DSB instances


def touching_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """[2, 10, 22] probabilities: two 6x7 nuclei touching along columns 8 | 9, their seam
    marked as border, plus a 2x2 speck; and the truth labels."""
    truth = np.zeros((10, 22), np.int32)
    truth[2:8, 2:9] = 1
    truth[2:8, 9:16] = 2
    truth[4:6, 19:21] = 3
    probabilities = np.zeros((2, 10, 22), np.float32)
    probabilities[0][truth > 0] = 0.9
    probabilities[1][2:8, 8:10] = 0.8
    return probabilities, truth


def test_instance_split_separates_touching_nuclei_along_the_border() -> None:
    probabilities, truth = touching_nuclei()
    labels = postprocess_instances(probabilities, default_postprocess(["nuclei", "border"]))
    assert labels.dtype == np.int32 and labels.shape == truth.shape
    # The 4-pixel speck is below min_nucleus (8); the two nuclei come apart, labelled 1 and 2.
    assert sorted(np.unique(labels)) == [0, 1, 2]
    np.testing.assert_array_equal(labels > 0, (truth == 1) | (truth == 2))
    assert len(np.unique(labels[2:8, 2:8])) == 1 and len(np.unique(labels[2:8, 10:16])) == 1
    assert labels[2, 2] != labels[2, 15]
    np.testing.assert_array_equal(np.bincount(labels.ravel())[1:], [42, 42])


def test_instance_split_without_border_channel_keeps_touching_nuclei_together() -> None:
    probabilities, _ = touching_nuclei()
    settings = default_postprocess(["nuclei"]).model_copy(update={"min_nucleus": 4})
    labels = postprocess_instances(probabilities[:1], settings)
    assert sorted(np.unique(labels)) == [0, 1, 2]
    np.testing.assert_array_equal(np.bincount(labels.ravel())[1:], [84, 4])


def test_instance_split_rules() -> None:
    probabilities, _ = touching_nuclei()
    base = default_postprocess(["nuclei", "border"]).model_dump()
    # Border probability 0.8 is not above a border threshold of 0.8: no split.
    no_split = PostprocessConfig(**{**base, "thresholds": [0.5, 0.8], "min_nucleus": 0})
    assert np.bincount(postprocess_instances(probabilities, no_split).ravel())[1:].tolist() == [
        84,
        4,
    ]
    # A nucleus that is all border has no seed: it still becomes an instance.
    probabilities[1, 4:6, 19:21] = 0.9
    kept = PostprocessConfig(**{**base, "min_nucleus": 0})
    assert np.bincount(postprocess_instances(probabilities, kept).ravel())[1:].tolist() == [
        42,
        42,
        4,
    ]
    # Threshold, then the component rules of postprocess_masks on the nuclei mask.
    high = PostprocessConfig(**{**base, "thresholds": [0.95, 0.5]})
    assert not postprocess_instances(probabilities, high).any()
    gated = PostprocessConfig(**{**base, "gate_pixels": [100, 0]})
    assert not postprocess_instances(probabilities, gated).any()


def test_split_instances_keeps_its_signature_and_defaults() -> None:
    probabilities, _ = touching_nuclei()
    channels = ["nuclei", "border"]
    assert np.bincount(split_instances(probabilities, channels=channels).ravel())[1:].tolist() == [
        42,
        42,
    ]
    # The border is found by its name, never by the number of channels.
    with pytest.raises(InputError, match="without their names"):
        split_instances(probabilities)
    flipped = probabilities[::-1]
    assert np.bincount(split_instances(flipped, channels=channels[::-1]).ravel())[1:].tolist() == [
        42,
        42,
    ]
    assert np.bincount(split_instances(probabilities[:1], min_size=0).ravel())[1:].tolist() == [
        84,
        4,
    ]
    labels = np.array([[1, 1, 0, 2], [3, 3, 3, 0]])
    np.testing.assert_array_equal(remove_small_instances(labels, 2), [[1, 1, 0, 0], [3, 3, 3, 0]])


# ----------------------------------------------------------------------------- settings


def test_settings_lists_must_match_the_classes() -> None:
    with pytest.raises(ValidationError, match=r"thresholds has 1 value\(s\) but classes has 2"):
        PostprocessConfig(classes=["a", "b"], thresholds=[0.5], min_area=[0, 0], gate_pixels=[0, 0])
    with pytest.raises(ValidationError, match=r"gate_pixels has 3 value\(s\)"):
        PostprocessConfig(
            classes=["a", "b"], thresholds=[0.5, 0.5], min_area=[0, 0], gate_pixels=[0, 0, 0]
        )
    with pytest.raises(ValidationError, match="gate_probability has 1"):
        settings_for(2, gate_probability=[0.5])
    with pytest.raises(ValidationError, match="must lie in"):
        settings_for(1, thresholds=[1.5])
    with pytest.raises(ValidationError, match=">= 0 pixels"):
        settings_for(1, min_area=[-1])
    with pytest.raises(ValidationError, match="twice"):
        PostprocessConfig(
            classes=["a", "a"], thresholds=[0.5] * 2, min_area=[0] * 2, gate_pixels=[0] * 2
        )
    with pytest.raises(ValidationError) as info:
        settings_for(1, threshold=0.5)
    # pydantic's structured error, not its wording: the misspelt key is the one refused
    assert [error["loc"] for error in info.value.errors()] == [("threshold",)]


def test_settings_round_trip_through_json(tmp_path: Path) -> None:
    settings = PostprocessConfig(
        classes=["large_bowel", "small_bowel", "stomach"],
        thresholds=[0.45, 0.35, 0.6],
        min_area=[16, 0, 64],
        gate_pixels=[0, 128, 256],
        gate_probability=[0.2, 0.3, 0.4],
        largest_component=True,
        z_continuity=True,
        min_nucleus=12,
    )
    path = save_postprocess(settings, tmp_path / "runs" / "exp" / "postprocess.json")
    assert path == tmp_path / "runs" / "exp" / "postprocess.json"
    assert json.loads(path.read_text())["thresholds"] == [0.45, 0.35, 0.6]
    assert load_postprocess(path) == settings
    assert sorted(p.name for p in path.parent.iterdir()) == ["postprocess.json"]


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(KsegError, match=f"{missing}: post-processing settings not found"):
        load_postprocess(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"classes": ["a"], ')
    with pytest.raises(KsegError, match=f"{broken}: not valid JSON"):
        load_postprocess(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(KsegError, match=f"{listed}: .*JSON object"):
        load_postprocess(listed)
    typo = tmp_path / "typo.json"
    values = default_postprocess(["nuclei"]).model_dump()
    typo.write_text(json.dumps({**values, "treshold": 0.5}))
    with pytest.raises(KsegError, match=f"{typo}: invalid .*unknown key 'treshold'"):
        load_postprocess(typo)
    short = tmp_path / "short.json"
    short.write_text(json.dumps({**values, "min_area": [0, 0]}))
    with pytest.raises(KsegError, match=rf"{short}: invalid .*min_area has 2 value\(s\)"):
        load_postprocess(short)
    wrong_type = tmp_path / "wrong_type.json"
    wrong_type.write_text(json.dumps({**values, "z_continuity": "often"}))
    with pytest.raises(KsegError, match=f"{wrong_type}: invalid .*'z_continuity'"):
        load_postprocess(wrong_type)
