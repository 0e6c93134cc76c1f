"""ImageStore (data/cache.py): decode once, exact uint16 images, memmap reuse and rebuild,
interrupted fills, pickling without the data."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_seg.competitions import get_competition
from kaggle_seg.config import build_data_config
from kaggle_seg.data.cache import ImageStore, fingerprint, from_uint16
from kaggle_seg.errors import InputError


@pytest.fixture(scope="module")
def dsb_table(shared_data: Path) -> pd.DataFrame:
    return get_competition("dsb2018").read_table(
        shared_data / "dsb2018", build_data_config("dsb2018")
    )


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
