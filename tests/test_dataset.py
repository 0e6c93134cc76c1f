"""Dataset (2.5D stacks, targets, errors), ImageStore (decode once, memmap reuse), sampler."""

from __future__ import annotations

import json
import os
import pickle
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
from kaggle_seg.data.cache import ImageStore, fingerprint, from_uint16
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
    with pytest.raises(KsegError, match="stack_depth 3 needs slices grouped by case_day"):
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


# --- ImageStore ---------------------------------------------------------------------------------


def counting(read_fn):
    calls: list[int] = []

    def wrapped(i: int) -> np.ndarray:
        calls.append(i)
        return read_fn(i)

    return wrapped, calls


@pytest.mark.parametrize("mode", ["memory", "memmap"])
def test_store_matches_direct_reads_and_decodes_each_image_once(dsb_table, tmp_path, mode):
    competition = get_competition("dsb2018")
    rows = dsb_table.head(12).to_dict("records")  # several sizes
    read, calls = counting(lambda i: competition.read_image(rows[i]))
    store = ImageStore(mode, "image", folder=tmp_path, name="dsb-images")
    store.fill(
        read,
        len(rows),
        sizes=[(r["height"], r["width"]) for r in rows],
        ids=[r["id"] for r in rows],
        sources=[fingerprint([r["image_path"]]) for r in rows],
        threads=2,
    )
    assert sorted(calls) == list(range(len(rows)))
    assert store.nbytes == sum(r["height"] * r["width"] * 3 for r in rows) * 2  # uint16
    for i, row in enumerate(rows):
        got = store.get(i)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, competition.read_image(row), rtol=1e-3, atol=1e-6)
    assert len(calls) == len(rows)


def test_store_without_sizes_packs_items_of_any_shape():
    arrays = [np.full((4 + i, 3 + 2 * i, 1 + i % 2), i, dtype=np.uint8) for i in range(5)]
    store = ImageStore("memory", "mask").fill(lambda i: arrays[i], 5, threads=2)
    for i, array in enumerate(arrays):
        np.testing.assert_array_equal(store.get(i), array)
    store.get(2)[...] = 99  # a copy: the store itself is untouched
    np.testing.assert_array_equal(store.get(2), arrays[2])


def test_image_store_holds_uint16_exact_for_16_bit_slices_divided_by_their_max():
    # UW-Madison: 16-bit values / the slice maximum; stored as round(65535 x value).
    rng = np.random.default_rng(0)
    raws = [rng.integers(0, peak, (7, 9, 1), endpoint=True) for peak in (1, 255, 3000, 65535)]
    images = [(raw / max(raw.max(), 1)).astype(np.float32) for raw in raws]
    store = ImageStore("memory", "image").fill(lambda i: images[i], len(images), threads=2)
    for i, image in enumerate(images):
        view = store.view(i)
        assert view.dtype == np.uint16
        np.testing.assert_allclose(from_uint16(view), image, rtol=0, atol=0.5 / 65535 + 1e-7)
        got = store.get(i)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, from_uint16(view))
        # Distinct 16-bit levels stay distinct.
        assert len(np.unique(view)) == len(np.unique(raws[i]))


def test_image_store_rejects_values_outside_0_1():
    store = ImageStore("memory", "image")
    with pytest.raises(InputError, match=r"must be in \[0, 1\]"):
        store.fill(lambda i: np.full((4, 4, 1), 255.0, np.float32), 1)
    # Rounding just outside the range is clipped.
    store = ImageStore("memory", "image").fill(lambda i: np.full((4, 4, 1), 1.0001, np.float32), 1)
    assert store.view(0).max() == 65535


def test_store_rejects_items_of_another_size():
    store = ImageStore("memory", "image")
    with pytest.raises(InputError, match="b: decoded image is"):
        store.fill(
            lambda i: np.zeros((8, 8 + i, 1), np.float32), 2, sizes=[(8, 8), (8, 8)], ids="ab"
        )


def test_memmap_index_reused_and_rebuilt_when_a_file_changes(tmp_path):
    sources = []
    for i in range(4):
        path = tmp_path / "src" / f"{i}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * (i + 1))
        sources.append(path)
    arrays = [np.random.default_rng(i).random((6, 5, 2), dtype=np.float32) for i in range(4)]
    cache = tmp_path / "cache"

    def fill() -> tuple[ImageStore, list[int]]:
        read, calls = counting(lambda i: arrays[i])
        store = ImageStore("memmap", "image", folder=cache, name="imgs").fill(
            read,
            4,
            sizes=[(6, 5)] * 4,
            ids=[f"id{i}" for i in range(4)],
            sources=[fingerprint([p]) for p in sources],
        )
        return store, calls

    first, calls = fill()
    assert not first.reused and sorted(calls) == [0, 1, 2, 3]
    index = json.loads((cache / "imgs.json").read_text())
    assert index["ids"] == ["id0", "id1", "id2", "id3"] and index["shapes"][0] == [6, 5, 2]
    second, calls = fill()
    assert second.reused and calls == []
    for i in range(4):
        np.testing.assert_allclose(second.get(i), arrays[i], rtol=0, atol=1e-5)
    # A source file edited: new mtime and size.
    sources[2].write_bytes(b"changed!")
    os.utime(sources[2], ns=(1, 1))
    arrays[2] = arrays[2] * 0.5
    third, calls = fill()
    assert not third.reused and sorted(calls) == [0, 1, 2, 3]
    np.testing.assert_allclose(third.get(2), arrays[2], rtol=0, atol=1e-5)
    assert len(list(cache.glob("imgs.*.bin"))) == 1  # the old data file is gone
    # The first store still reads its (now unlinked) file through its mapping.
    np.testing.assert_allclose(first.get(0), arrays[0], rtol=0, atol=1e-5)


def test_interrupted_fill_keeps_the_previous_cache_trusted_and_complete(tmp_path):
    arrays = [np.full((3, 3, 1), i, dtype=np.uint8) for i in range(6)]

    def store() -> ImageStore:
        return ImageStore("memmap", "mask", folder=tmp_path, name="masks")

    store().fill(lambda i: arrays[i], 6, sizes=[(3, 3)] * 6, sources=list("abcdef"))

    def broken(i: int) -> np.ndarray:
        if i == 4:
            raise OSError("disk gone")
        return arrays[i]

    with pytest.raises(OSError, match="disk gone"):
        store().fill(broken, 6, sizes=[(3, 3)] * 6, sources=list("abcdeX"))
    assert not list(tmp_path.glob(".*tmp"))  # no partial file left behind
    read, calls = counting(lambda i: arrays[i])
    again = store().fill(read, 6, sizes=[(3, 3)] * 6, sources=list("abcdef"))
    assert again.reused and calls == []
    np.testing.assert_array_equal(again.get(5), arrays[5])


def test_memmap_store_pickles_without_its_data(tmp_path):
    big = [np.ones((200, 200, 1), dtype=np.uint8) for _ in range(5)]
    store = ImageStore("memmap", "mask", folder=tmp_path).fill(lambda i: big[i], 5)
    payload = pickle.dumps(store)
    assert len(payload) < 10_000
    np.testing.assert_array_equal(pickle.loads(payload).get(3), big[3])


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


def test_weighted_sampler_unknown_column_lists_columns(lgg_table):
    with pytest.raises(KsegError, match=r"'organ'.*columns: id, group"):
        weighted_sampler(lgg_table, "organ", seed=0)
