"""The sizing rule and its inverse (spec.py): tiles, tiled forward passes, shape batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kaggle_seg.spec import (
    SIZE_DIVISOR,
    ModelSpec,
    forward_tiled,
    pad_to_divisor,
    restore_size,
    shape_batches,
    tile_starts,
)

TILINGS = [(1056, 512, 0.25), (640, 256, 0.5), (256, 256, 0.25), (1408, 1024, 0.25)]


@pytest.mark.parametrize(("length", "tile", "overlap"), TILINGS)
def test_tiles_cover_the_image_overlap_and_stay_inside(length, tile, overlap) -> None:
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
    covered = np.zeros(length, bool)
    for start in starts:
        covered[start : start + tile] = True
        assert start % SIZE_DIVISOR == 0 or start + tile == length
    assert covered.all()
    gaps = np.diff(starts)
    assert (gaps <= tile * (1 - overlap) + SIZE_DIVISOR).all()


def test_tiled_forward_of_a_pixelwise_model_equals_the_whole_forward() -> None:
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, kernel_size=1)
    images = torch.rand(2, 3, 320, 448)
    with torch.no_grad():
        whole = model(images)
        tiled = forward_tiled(model, images, tile_size=128, overlap=0.25)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


def test_tiled_forward_keeps_leading_dims_and_skips_small_images() -> None:
    calls = []

    def views(tiles: torch.Tensor) -> torch.Tensor:  # like tta_logits: [T, B, K, h, w]
        calls.append(tuple(tiles.shape[-2:]))
        return torch.stack([tiles[:, :1], tiles[:, :1] * 2])

    images = torch.rand(1, 3, 256, 640)
    out = forward_tiled(views, images, tile_size=256, overlap=0.25)
    assert out.shape == (2, 1, 1, 256, 640) and len(calls) > 1
    assert set(calls) == {(256, 256)}
    torch.testing.assert_close(out[1], 2 * images[:, :1])
    calls.clear()
    forward_tiled(views, images, tile_size=None, overlap=0.25)
    assert calls == [(256, 640)]


def test_crop_mode_feeds_whole_images_and_restores_by_cropping() -> None:
    spec = ModelSpec(
        in_channels=3,
        outputs=("mask",),
        height=256,
        width=256,
        resize_mode="crop",
        normalize="imagenet",
        tile_size=512,
    )
    assert spec.input_shape(520, 696) == (520, 696)
    padded, h, w = pad_to_divisor(torch.zeros(1, 3, 520, 696))
    assert padded.shape[-2:] == (544, 704) and (h, w) == (520, 696)
    probabilities = np.random.default_rng(0).random((2, 544, 704)).astype(np.float32)
    restored = restore_size(probabilities, 520, 696, "crop")
    np.testing.assert_array_equal(restored, probabilities[:, :520, :696])


def test_shape_batches_group_mixed_sizes_unless_order_matters() -> None:
    table = pd.DataFrame({"height": [256, 520, 256, 520, 256], "width": [256, 696, 256, 696, 256]})
    spec = ModelSpec(
        in_channels=3,
        outputs=("mask",),
        height=256,
        width=256,
        resize_mode="crop",
        normalize="none",
    )
    assert shape_batches(table, [spec], 8) == [[0], [1], [2], [3], [4]]
    assert shape_batches(table, [spec], 8, keep_order=False) == [[0, 2, 4], [1, 3]]
    assert shape_batches(table, [spec], 2, keep_order=False) == [[0, 2], [4], [1, 3]]


# ---- ModelSpec: the model's contract, built at training time and stored in checkpoints ------


def _config(competition: str, **data):
    from kaggle_seg.config import ExperimentConfig

    return ExperimentConfig.model_validate(
        {
            "data": {"competition": competition, **data},
            "augment": {"height": 128, "width": 160, "resize_mode": "pad"},
        }
    )


def test_spec_for_training_names_the_outputs_and_counts_the_input_channels() -> None:
    from kaggle_seg.competitions import get_competition

    dsb = ModelSpec.for_training(
        _config("dsb2018", targets="mask_border"), get_competition("dsb2018")
    )
    assert dsb.outputs == ("nuclei", "border") and dsb.classes == ("nuclei",)
    assert dsb.in_channels == 3 and dsb.divisor == SIZE_DIVISOR
    uwmgi = ModelSpec.for_training(
        _config("uwmgi", stack_depth=5, stack_stride=2), get_competition("uwmgi")
    )
    assert uwmgi.outputs == ("large_bowel", "small_bowel", "stomach")
    assert uwmgi.in_channels == 5 and (uwmgi.height, uwmgi.width) == (128, 160)


def test_spec_survives_a_checkpoint_as_plain_data(tmp_path) -> None:
    from kaggle_seg.checkpoints import load_checkpoint, save_checkpoint
    from kaggle_seg.competitions import get_competition

    config = _config("lgg", preprocess=["zscore"])
    spec = ModelSpec.for_training(config, get_competition("lgg"))
    path = save_checkpoint({"spec": spec.as_dict()}, tmp_path / "best.pt")
    state = torch.load(path, weights_only=True)  # plain data: the safe loader takes it
    assert ModelSpec.from_dict(state["spec"]) == spec
    assert ModelSpec.from_checkpoint(load_checkpoint(path), config) == spec
    assert [s["name"] for s in spec.preprocess_steps] == ["zscore"]


def test_spec_of_an_old_checkpoint_comes_from_its_config() -> None:
    config = _config("dsb2018", targets="mask_border")
    old = {"classes": ["nuclei", "border"], "in_channels": 3}  # what kseg stored before specs
    spec = ModelSpec.from_checkpoint(old, config)
    assert spec.outputs == ("nuclei", "border") and spec.in_channels == 3
    assert spec.resize_mode == "pad" and (spec.height, spec.width) == (128, 160)


def test_channels_are_found_by_name() -> None:
    from kaggle_seg.errors import KsegError
    from kaggle_seg.spec import channel_indices

    assert channel_indices(("border", "nuclei"), ("nuclei",)) == [1]
    with pytest.raises(KsegError, match="no channel stomach"):
        channel_indices(("nuclei", "border"), ("stomach",))
