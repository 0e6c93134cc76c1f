"""Probability files: the mapped OOF layout and reading every npz kseg has written."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from kaggle_seg.errors import KsegError
from kaggle_seg.probabilities import (
    ALIGNMENT,
    ProbabilityWriter,
    load_oof,
    open_probabilities,
    save_oof,
)


def sample(rng: np.random.Generator) -> dict[str, np.ndarray]:
    # Odd sizes and id lengths, so that no alignment happens by chance.
    return {
        "a": rng.random((3, 5, 7), np.float32),
        "case1_day0_slice_0001": rng.random((1, 13, 3), np.float32),
        "bb": rng.random((2, 1, 1), np.float32),
    }


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_oof_is_mapped_aligned_and_loads_as_before(tmp_path: Path, dtype: str) -> None:
    arrays = sample(np.random.default_rng(0))
    path = tmp_path / "oof.npz"
    save_oof(arrays, path, dtype)
    with zipfile.ZipFile(path) as archive:
        assert {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}
    loaded = load_oof(path)  # the plain np.load path still reads it
    stored = open_probabilities(path)
    assert sorted(stored) == sorted(arrays) and len(stored) == 3
    for image_id, probabilities in arrays.items():
        array = stored[image_id]
        assert stored.is_mapped(image_id)
        assert array.dtype == np.dtype(dtype) and array.shape == probabilities.shape
        assert not array.flags.writeable and not array.flags.owndata  # a view of the file
        assert array.ctypes.data % ALIGNMENT == 0
        with np.load(path) as reference:
            np.testing.assert_array_equal(array, reference[image_id])
        tolerance = 1 / 255 if dtype == "uint8" else 1e-3
        np.testing.assert_allclose(loaded[image_id], probabilities, atol=tolerance)


def test_compressed_and_streamed_npz_still_open(tmp_path: Path) -> None:
    arrays = {k: v.astype(np.float16) for k, v in sample(np.random.default_rng(1)).items()}
    np.savez_compressed(tmp_path / "old.npz", **arrays)  # oof.npz of earlier versions
    with ProbabilityWriter(tmp_path / "pred.npz", "float16") as writer:  # kseg predict --save
        for image_id, array in arrays.items():
            writer.add(image_id, array)
    np.savez(tmp_path / "plain.npz", **arrays)  # stored, not aligned
    for name in ("old.npz", "pred.npz", "plain.npz"):
        stored = open_probabilities(tmp_path / name)
        for image_id, array in arrays.items():
            np.testing.assert_array_equal(stored[image_id], array)
            assert stored.header(image_id) == (array.shape, array.dtype)
    assert not open_probabilities(tmp_path / "old.npz").is_mapped("a")
    assert open_probabilities(tmp_path / "plain.npz").is_mapped("a")


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "oof.npz").write_text("not a zip")
    with pytest.raises(KsegError, match=r"oof\.npz: not a readable npz"):
        open_probabilities(tmp_path / "oof.npz")


def test_every_reader_names_a_truncated_or_foreign_file(tmp_path: Path) -> None:
    """A truncated oof.npz (a copy cut short), a file of another format and a single .npy:
    `kseg tune`, `show`, `report` and the class-head reader each name the file in one line."""
    from kaggle_seg.probabilities import NpzProbabilities, load_class_oof, save_class_oof

    save_oof(sample(np.random.default_rng(0)), tmp_path / "whole.npz", "float16")
    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "oof.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.npz").write_text("not a zip")
    np.save(tmp_path / "single.npy", np.zeros((2, 3)))
    save_class_oof({"a": np.ones(2)}, tmp_path / "classes.npz")
    classes = (tmp_path / "classes.npz").read_bytes()
    (tmp_path / "oof_classes.npz").write_bytes(classes[: len(classes) // 2])
    readers = (open_probabilities, lambda p: NpzProbabilities([p]), load_class_oof)
    for path in (tmp_path / "oof.npz", tmp_path / "text.npz", tmp_path / "oof_classes.npz"):
        for read in readers:
            with pytest.raises(KsegError, match=rf"^{path}: not a readable npz \(no zip archive"):
                read(path)
    with pytest.raises(KsegError, match=r"single\.npy: a single array, expected an npz"):
        NpzProbabilities([tmp_path / "single.npy"])
    with pytest.raises(KsegError, match=r"single\.npy: not a readable npz"):
        load_class_oof(tmp_path / "single.npy")


def test_npy_headers_are_parsed_one_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """numpy's header parse (ast.literal_eval) is not thread-safe on CPython 3.11 before
    3.11.8 (gh-106905; kseg tune's pool failed with a SystemError once in CI): the mapped and
    the compressed readers both parse under kaggle_seg.probabilities.HEADER_LOCK."""
    import kaggle_seg.probabilities as probabilities

    parse = np.lib.format.read_array_header_1_0
    held: list[bool] = []

    def spy(member):
        held.append(probabilities.HEADER_LOCK.locked())
        return parse(member)

    monkeypatch.setattr(np.lib.format, "read_array_header_1_0", spy)
    save_oof({"a": np.zeros((1, 4, 4), np.float32)}, tmp_path / "mapped.npz", "uint8")
    np.savez_compressed(tmp_path / "packed.npz", b=np.zeros((1, 4, 4), np.float32))
    for name, image_id in (("mapped.npz", "a"), ("packed.npz", "b")):
        file = open_probabilities(tmp_path / name)
        assert file.header(image_id)[0] == (1, 4, 4)
    assert held and all(held)
