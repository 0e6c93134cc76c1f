"""Dataset (2.5D stacks, targets, errors), the dataset over decoded-image stores, sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from kaggle_seg.competitions import get_competition
from kaggle_seg.config import AugmentConfig, build_data_config
from kaggle_seg.data.dataset import (
    SegmentationDataset,
    build_stores,
    instance_targets,
    weighted_sampler,
)
from kaggle_seg.data.transforms import build_transforms
from kaggle_seg.errors import InputError, KsegError


def read_table(name: str, data_dir: Path) -> pd.DataFrame:
    return get_competition(name).read_table(data_dir, build_data_config(name))


@pytest.fixture(scope="module")
def uw_table(phantom_dir: Path) -> pd.DataFrame:
    return read_table("uwmgi", phantom_dir)


@pytest.fixture(scope="module")
def dsb_table(shared_data: Path) -> pd.DataFrame:
    return read_table("dsb2018", shared_data / "dsb2018")


@pytest.fixture(scope="module")
def lgg_table(shared_data: Path) -> pd.DataFrame:
    return read_table("lgg", shared_data / "lgg")


class Flat:
    """A stand-in competition: constant images of the table's sizes, masks of `mask_size`."""

    name = "flat"
    classes = ("thing",)
    rle_order = None

    def __init__(self, mask_size: tuple[int, int] | None = None):
        self.mask_size = mask_size

    def read_image(self, row: Any) -> np.ndarray:
        return np.full((row["height"], row["width"], 1), 0.5, dtype=np.float32)

    def read_mask(self, row: Any) -> np.ndarray:
        height, width = self.mask_size or (row["height"], row["width"])
        return np.zeros((height, width, 1), dtype=np.uint8)


def flat_table(n: int, height: int = 32, width: int = 40) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"img{i}" for i in range(n)],
            "group": [f"img{i}" for i in range(n)],
            "image_path": [f"/data/img{i}.png" for i in range(n)],
            "height": height,
            "width": width,
            "empty": True,
        }
    )


# --- 2.5D stacks (uwmgi phantom) ----------------------------------------------------------------


def test_stack_channels_are_neighbours_minus2_to_plus2_clamped_in_case_day(uw_table):
    competition = get_competition("uwmgi")
    dataset = SegmentationDataset(competition, uw_table, None, stack_depth=3, stack_stride=2)
    rows = uw_table.to_dict("records")
    for i in range(len(uw_table)):
        sample = dataset[i]
        image = sample["image"].numpy()
        assert image.shape == (3, rows[i]["height"], rows[i]["width"])
        assert sample["mask"].shape == (3, rows[i]["height"], rows[i]["width"])
        assert sample["index"] == i and sample["id"] == rows[i]["id"]
        same_day = uw_table.index[uw_table["case_day"] == rows[i]["case_day"]]
        for k, offset in enumerate((-2, 0, 2)):
            expected = int(np.clip(i + offset, same_day.min(), same_day.max()))
            assert rows[expected]["case_day"] == rows[i]["case_day"]
            np.testing.assert_array_equal(
                image[k], competition.read_image(rows[expected])[..., 0], err_msg=f"{i} {k}"
            )
        if rows[i]["slice_index"] == 1:
            # First slice: the clamped -2 neighbour is the slice itself.
            np.testing.assert_array_equal(image[0], image[1])


def test_stack_needs_case_days_and_sorted_slices(uw_table, lgg_table):
    with pytest.raises(KsegError, match="stack_depth 3 needs slices grouped by volume"):
        SegmentationDataset(get_competition("lgg"), lgg_table, None, stack_depth=3)
    shuffled = uw_table.sample(frac=1.0, random_state=0)
    with pytest.raises(InputError, match="sorted by case_day then slice_index"):
        SegmentationDataset(get_competition("uwmgi"), shuffled, None, stack_depth=3)


def test_phantom_training_sample_at_320x384(uw_table):
    config = AugmentConfig(preset="heavy", height=320, width=384, resize_mode="pad")
    dataset = SegmentationDataset(
        get_competition("uwmgi"),
        uw_table,
        build_transforms(config, train=True),
        stack_depth=5,
        stack_stride=1,
    )
    sample = dataset[5]
    assert sample["image"].shape == (5, 320, 384) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (3, 320, 384) and sample["mask"].dtype == torch.float32
    assert set(torch.unique(sample["mask"]).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("compact", [False, True])
def test_store_samples_match_direct_reads_through_the_uint16_path(uw_table, compact):
    # With stores, build_transforms' pipelines take the stacks as uint16 (geometric ops on
    # uint16): the sample equals the direct float32 reads' up to rounding.
    competition = get_competition("uwmgi")
    config = AugmentConfig(preset="heavy", height=320, width=384, resize_mode="pad")
    transform = build_transforms(config, train=False)
    kwargs: dict[str, Any] = {"stack_depth": 3, "stack_stride": 2, "compact": compact}
    direct = SegmentationDataset(competition, uw_table, transform, **kwargs)
    images, masks = build_stores(competition, uw_table, "memory", threads=2)
    stored = SegmentationDataset(
        competition, uw_table, transform, image_store=images, mask_store=masks, **kwargs
    )
    assert stored._stack(0).dtype == np.uint16
    for i in (0, 3, len(uw_table) - 1):
        want, got = direct[i], stored[i]
        assert got["image"].dtype == (torch.float16 if compact else torch.float32)
        assert got["mask"].dtype == (torch.uint8 if compact else torch.float32)
        assert got["image"].is_contiguous() and got["mask"].is_contiguous()
        torch.testing.assert_close(got["mask"], want["mask"], rtol=0, atol=0)
        torch.testing.assert_close(
            got["image"].float(), want["image"].float(), rtol=0, atol=1e-3 if compact else 1e-5
        )


# --- DSB instance targets -----------------------------------------------------------------------


def test_dsb_mask_border_targets(dsb_table):
    from skimage.measure import label

    competition = get_competition("dsb2018")
    # Small images crowded with nuclei, where some touch.
    small = dsb_table[dsb_table["height"] * dsb_table["width"] <= 256 * 320]
    subset = small.sort_values("n_nuclei", ascending=False).head(4)
    dataset = SegmentationDataset(competition, subset, None, targets="mask_border")
    touching_seen = 0
    for i, row in enumerate(subset.to_dict("records")):
        sample = dataset[i]
        assert sample["image"].shape == (3, row["height"], row["width"])
        union, border = sample["mask"].numpy().astype(bool)
        labels = competition.read_instances(row)
        np.testing.assert_array_equal(union, labels > 0)
        assert border.any() and not (border & ~union).any()  # border ⊂ union
        # Seeds (union minus border) never join two nuclei, even 8-connected.
        seeds = label(union & ~border, connectivity=2)
        pairs = pd.DataFrame({"seed": seeds[seeds > 0], "nucleus": labels[seeds > 0]})
        assert (pairs.groupby("seed")["nucleus"].nunique() == 1).all()
        # Where two nuclei touch, both sides are border.
        a, b = labels[:, :-1], labels[:, 1:]
        touching = (a > 0) & (b > 0) & (a != b)
        touching_seen += int(touching.sum())
        assert border[:, :-1][touching].all() and border[:, 1:][touching].all()
    assert touching_seen > 0


def test_instance_targets_by_hand():
    labels = np.zeros((9, 14), dtype=np.int32)
    labels[1:8, 1:7] = 1
    labels[1:8, 7:13] = 2  # touches nucleus 1 along a column
    union, border = np.moveaxis(instance_targets(labels), -1, 0).astype(bool)
    np.testing.assert_array_equal(union, labels > 0)
    # Outlines (outer ring and the contact columns 6 | 7) dilated one pixel into each nucleus:
    # what stays is a 3x2 seed per nucleus.
    seeds = np.zeros_like(union)
    seeds[3:6, 3:5] = seeds[3:6, 9:11] = True
    np.testing.assert_array_equal(union & ~border, seeds)


def test_mask_border_needs_instances(lgg_table):
    with pytest.raises(KsegError, match="need instance masks"):
        SegmentationDataset(get_competition("lgg"), lgg_table, None, targets="mask_border")


# --- LGG, errors --------------------------------------------------------------------------------


def test_lgg_samples(lgg_table):
    competition = get_competition("lgg")
    config = AugmentConfig(preset="lgg", height=128, width=128, normalize="imagenet")
    dataset = SegmentationDataset(competition, lgg_table, build_transforms(config, train=True))
    for i in (0, len(lgg_table) // 2):
        sample = dataset[i]
        assert sample["image"].shape == (3, 128, 128) and sample["mask"].shape == (1, 128, 128)
    raw = SegmentationDataset(competition, lgg_table, None)
    lesion = int(np.flatnonzero(~lgg_table["empty"].to_numpy())[0])
    sample = raw[lesion]
    assert sample["image"].shape == (3, 256, 256)
    assert float(sample["image"].min()) >= 0.0 and float(sample["image"].max()) <= 1.0
    assert sample["mask"].sum() > 0


def test_compact_samples_are_half_precision_copies(lgg_table):
    competition = get_competition("lgg")
    full = SegmentationDataset(competition, lgg_table, None)
    compact = SegmentationDataset(competition, lgg_table, None, compact=True)
    lesion = int(np.flatnonzero(~lgg_table["empty"].to_numpy())[0])
    a, b = full[lesion], compact[lesion]
    assert b["image"].dtype == torch.float16 and b["mask"].dtype == torch.uint8
    assert torch.allclose(b["image"].float(), a["image"], atol=1e-3)
    assert torch.equal(b["mask"].float(), a["mask"])


def test_image_and_mask_of_different_sizes_name_the_image():
    dataset = SegmentationDataset(Flat(mask_size=(30, 40)), flat_table(2), None)
    with pytest.raises(InputError, match=r"/data/img1\.png: image is 40x32 but its mask is 40x30"):
        dataset[1]


# --- stores over a table (ImageStore itself: test_cache.py) ----------------------------------


def test_build_stores_serve_fold_subsets_identically(uw_table, tmp_path):
    competition = get_competition("uwmgi")
    images, masks = build_stores(competition, uw_table, "memmap", folder=tmp_path, threads=2)
    again_images, again_masks = build_stores(competition, uw_table, "memmap", folder=tmp_path)
    assert again_images.reused and again_masks.reused
    # A fold's validation part, in the dataset's own positions.
    part = uw_table[uw_table["case_id"] == uw_table["case_id"].iloc[-1]]
    cached = SegmentationDataset(
        competition, part, None, stack_depth=3, stack_stride=2, image_store=images,
        mask_store=masks,
    )  # fmt: skip
    direct = SegmentationDataset(competition, part, None, stack_depth=3, stack_stride=2)
    for i in (0, 1, len(part) - 1):
        a, b = cached[i], direct[i]
        assert a["id"] == b["id"]
        torch.testing.assert_close(a["image"], b["image"], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(a["mask"], b["mask"], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["memory", "memmap"])
def test_dataloader_workers_share_a_filled_store_and_draw_different_augmentations(tmp_path, mode):
    table = flat_table(8)
    competition = Flat()
    images, masks = build_stores(competition, table, mode, folder=tmp_path)
    noise = A.Compose([A.GaussNoise(std_range=(0.1, 0.1), p=1.0)])
    dataset = SegmentationDataset(competition, table, noise, image_store=images, mask_store=masks)
    loader = DataLoader(dataset, batch_size=1, num_workers=2, shuffle=False)
    batches = list(loader)
    assert [b["id"][0] for b in batches] == list(table["id"])
    assert all(b["image"].shape == (1, 1, 32, 40) for b in batches)
    # Items 0 and 1 are each the first item of a different worker: with the augmentation
    # generators inherited through fork unreseeded, their noise would be identical.
    assert not torch.equal(batches[0]["image"], batches[1]["image"])


# --- weighted sampler ---------------------------------------------------------------------------


def test_weighted_sampler_balances_empty_slices(lgg_table):
    assert 0.6 < lgg_table["empty"].mean() < 0.7
    sampler = weighted_sampler(lgg_table, "empty", num_samples=4000, seed=0)
    drawn = lgg_table["empty"].to_numpy()[list(sampler)]
    assert len(drawn) == 4000
    assert 0.46 < drawn.mean() < 0.54
    again = weighted_sampler(lgg_table, "empty", num_samples=4000, seed=0)
    assert list(again) == list(weighted_sampler(lgg_table, "empty", num_samples=4000, seed=0))
    # Each epoch draws anew, and an epoch's draws depend on (seed, epoch) alone (resume).
    again.set_epoch(1)
    epoch_1 = list(again)
    again.set_epoch(1)
    assert epoch_1 != list(sampler) and list(again) == epoch_1


def test_weighted_sampler_unknown_column_lists_columns(lgg_table):
    with pytest.raises(KsegError, match=r"'organ'.*columns: id, group"):
        weighted_sampler(lgg_table, "organ", seed=0)


def test_weighted_sampler_over_image_kinds_with_a_power():
    """Several columns make one value (DSB's image kinds, [height, width]); power 0.5 narrows
    the gap between common and rare kinds without drawing them all equally."""
    import pandas as pd

    sizes = [(256, 256)] * 90 + [(512, 640)] * 9 + [(1040, 1388)] * 1
    table = pd.DataFrame({"height": [h for h, _ in sizes], "width": [w for _, w in sizes]})
    kinds = table["height"].astype(str) + "x" + table["width"].astype(str)

    def shares(power: float) -> pd.Series:
        sampler = weighted_sampler(
            table, ["height", "width"], num_samples=20000, seed=0, power=power
        )
        return kinds.to_numpy()[list(sampler)]

    equal = pd.Series(shares(1.0)).value_counts(normalize=True)
    assert all(abs(equal[k] - 1 / 3) < 0.02 for k in equal.index)
    # Weights 90 ** -0.5 : 9 ** -0.5 : 1 per row, so kind shares 90 ** 0.5 : 9 ** 0.5 : 1.
    half = pd.Series(shares(0.5)).value_counts(normalize=True)
    expected = {"256x256": 90**0.5, "512x640": 3.0, "1040x1388": 1.0}
    total = sum(expected.values())
    for kind, weight in expected.items():
        assert abs(half[kind] - weight / total) < 0.02
    none = pd.Series(shares(0.0)).value_counts(normalize=True)
    assert abs(none["256x256"] - 0.9) < 0.02  # power 0: the table's own mix
    with pytest.raises(KsegError, match=r"'depth' is not in the table"):
        weighted_sampler(table, ["height", "depth"], seed=0)
