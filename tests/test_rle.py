"""RLE: hand-computed cases, round-trip properties, validation messages, real DSB 2018 data."""

from __future__ import annotations

import csv
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from kaggle_seg.data.rle import (
    decode_rle,
    decode_rles,
    decode_rles_to_labels,
    encode_rle,
    encode_rles,
    rle_area,
    validate_rle,
)
from kaggle_seg.errors import RLEError

REPO = Path(__file__).resolve().parents[1]
DSB = shared_data_dir() / "dsb2018"
NON_SQUARE_ID = "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e"  # 320x256

# 3 x 4, non-square so that a transposed order cannot pass by accident.
MASK_3X4 = np.array(
    [
        [0, 1, 1, 0],
        [0, 0, 1, 1],
        [1, 0, 0, 0],
    ],
    dtype=np.uint8,
)
# Row-major pixels: 0 1 1 0 | 0 0 1 1 | 1 0 0 0 -> runs at 2-3 and 7-9.
RLE_3X4_C = "2 2 7 3"
# Column-major pixels: 0 0 1 | 1 0 0 | 1 1 0 | 0 1 0 -> runs at 3-4, 7-8 and 11.
RLE_3X4_F = "3 2 7 2 11 1"


def reference_encode(mask: np.ndarray, order: str) -> str:
    """The usual numpy recipe, with the order made explicit."""
    pixels = np.concatenate([[0], np.ravel(mask != 0, order=order).astype(np.int8), [0]])
    changes = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    return " ".join(f"{s} {e - s}" for s, e in zip(changes[::2], changes[1::2], strict=True))


def reference_decode(rle: str, shape: tuple[int, int], order: str) -> np.ndarray:
    flat = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    numbers = [int(x) for x in rle.split()]
    for start, length in zip(numbers[::2], numbers[1::2], strict=False):
        flat[start - 1 : start - 1 + length] = 1
    return flat.reshape(shape, order=order)


# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("order", "expected"), [("C", RLE_3X4_C), ("F", RLE_3X4_F)])
def test_hand_computed_3x4(order: str, expected: str) -> None:
    assert encode_rle(MASK_3X4, order) == expected
    decoded = decode_rle(expected, (3, 4), order)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (3, 4)
    assert decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, MASK_3X4)


def test_orders_differ_on_non_square() -> None:
    assert not np.array_equal(decode_rle(RLE_3X4_C, (3, 4), "F"), MASK_3X4)


@pytest.mark.parametrize("order", ["C", "F"])
def test_empty_and_full(order: str) -> None:
    assert encode_rle(np.zeros((3, 5), np.uint8), order) == ""
    assert encode_rle(np.ones((3, 5), bool), order) == "1 15"
    np.testing.assert_array_equal(decode_rle("", (3, 5), order), np.zeros((3, 5)))
    np.testing.assert_array_equal(decode_rle("1 15", (3, 5), order), np.ones((3, 5)))


@pytest.mark.parametrize("missing", [None, float("nan"), np.float64("nan"), "", "   "])
def test_missing_decodes_empty(missing: object) -> None:
    np.testing.assert_array_equal(decode_rle(missing, (2, 3), "C"), np.zeros((2, 3)))
    assert rle_area(missing) == 0
    validate_rle(missing, 6)


@pytest.mark.parametrize(
    "mask",
    [
        MASK_3X4.astype(bool),
        MASK_3X4 * 255,
        MASK_3X4.astype(np.int64) * -3,
        MASK_3X4.astype(np.float32) * 0.5,
        MASK_3X4.astype(np.int8),
        np.asfortranarray(MASK_3X4),  # F-contiguous: "F" encodes without a copy
        MASK_3X4.tolist(),
    ],
    ids=["bool", "uint8-255", "int64", "float32", "int8", "fortran", "list"],
)
def test_encode_any_dtype_and_layout(mask: np.ndarray) -> None:
    assert encode_rle(mask, "C") == RLE_3X4_C
    assert encode_rle(mask, "F") == RLE_3X4_F


def test_encode_strided_views() -> None:
    big = np.zeros((6, 8), np.uint8)
    big[::2, ::2] = MASK_3X4
    view = big[::2, ::2]
    assert encode_rle(view, "C") == RLE_3X4_C
    assert encode_rle(view, "F") == RLE_3X4_F
    assert encode_rle(MASK_3X4.T.T, "C") == RLE_3X4_C
    assert encode_rle(np.ascontiguousarray(MASK_3X4.T), "C") == encode_rle(MASK_3X4, "F")


def test_encode_long_runs_and_block_edges() -> None:
    # Runs that start / end at the 8- and 64-pixel boundaries the kernel works in.
    for n in (1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 1000):
        for first, last in [(0, n), (1, n), (0, n - 1), (n // 2, n), (n - 1, n)]:
            row = np.zeros((1, n), bool)
            row[0, first:last] = True
            assert encode_rle(row, "C") == reference_encode(row, "C"), (n, first, last)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_many_runs(order: str, layout: str) -> None:
    # More run boundaries than the kernels buffer (4096) before writing text.
    mask = np.random.default_rng(7).random((203, 301)) < 0.4
    if layout == "F":
        mask = np.asfortranarray(mask)
    elif layout == "strided":
        mask = np.repeat(mask, 2, axis=1)[:, ::2]
    rle = encode_rle(mask, order)
    assert rle == reference_encode(mask, order)
    np.testing.assert_array_equal(decode_rle(rle, mask.shape, order), mask)


def test_large_numbers() -> None:
    # 8 digits (the widest the SWAR writer / parser handle) and 9 (their fallbacks).
    row = np.zeros((1, 12_345_680), bool)
    row[0, 12_345_677:] = True
    assert encode_rle(row, "C") == "12345678 3"
    assert decode_rle("12345678 3", row.shape, "F")[0, 12_345_677:].all()
    mask = np.zeros((10_000, 10_001), bool)  # 100 010 000 pixels
    mask[-1, -5:] = True
    mask[0, 0] = True
    rle = encode_rle(mask, "C")
    assert rle == "1 1 100009996 5"
    decoded = decode_rle(rle, mask.shape, "C")
    assert decoded.sum() == 6 and decoded[0, 0] == 1 and decoded[-1, -5:].all()
    assert rle_area("100009996 5 100010001 0000000000000000000000001") == 6


def test_text_writer_tiers_in_one_mask() -> None:
    # The text writer packs numbers below 10**6 in one word with their byte count and
    # handles 10**6..10**8 separately; it chooses per batch of runs, by the batch's last end,
    # so that one mask can use both. Runs around the switch, and starts / lengths of every
    # digit count on both sides of it.
    n = 1_000_300
    row = np.zeros((1, n), bool)
    edges = [0, 1, 9, 10, 99, 100, 999, 1000, 9999, 10_000, 99_999, 100_000, 100_001]
    for k, edge in enumerate(edges):  # runs ending at 1-6 digit positions, lengths growing
        row[0, edge : edge + k + 1] = True
    row[0, 200_000:299_999] = True  # a 5-digit length
    row[0, 300_000:400_000] = True  # a 6-digit length
    for start in range(500_000, 999_000, 3_000):  # > 128 short runs: several batches
        row[0, start : start + 7] = True
    row[0, 999_990:999_999] = True  # ends at 999 999 (1-indexed), just below 10**6
    row[0, 999_999:1_000_000] = False
    row[0, 1_000_000:1_000_002] = True  # starts at 1 000 001
    row[0, 1_000_100:n] = True  # open to the end
    rle = encode_rle(row, "C")
    assert rle == reference_encode(row, "C")
    np.testing.assert_array_equal(decode_rle(rle, row.shape, "C"), row)
    assert encode_rle(row[:, :999_999], "C") == reference_encode(row[:, :999_999], "C")


def test_digit_kernels_exhaustive_below_10_6() -> None:
    import numba

    from kaggle_seg.data import rle as rle_module

    ascii8, spaced6 = rle_module._ascii_digits8, rle_module._spaced_digits6

    @numba.njit
    def first_wrong(lo: int, hi: int, step: int) -> int:
        for value in range(lo, hi, step):
            v = np.uint64(value)
            digits = np.uint64(0)  # the reference: one digit at a time, first in byte 0
            n_digits = 0
            while True:
                digits = (digits << np.uint64(8)) | np.uint64(48 + value // 10**n_digits % 10)
                n_digits += 1
                if value < 10**n_digits:
                    break
            if ascii8(v) != digits:
                return value
            if value < 10**6:
                expected = (digits << np.uint64(8)) | np.uint64(32)
                expected |= np.uint64(n_digits + 1) << np.uint64(56)
                if spaced6(v) != expected:
                    return value
        return 0

    assert first_wrong(1, 10**6, 1) == 0
    assert first_wrong(10**6, 10**8, 997) == 0
    assert first_wrong(10**8 - 1000, 10**8, 1) == 0


@pytest.mark.parametrize("n_runs", [1, 2, 63, 64, 127, 128, 129, 255, 256, 257, 1000])
@pytest.mark.parametrize("open_end", [False, True])
def test_run_counts_around_text_batches(n_runs: int, open_end: bool) -> None:
    # The encoder writes text every few hundred boundaries; a run may stay open across one.
    width = 3 * n_runs + (0 if open_end else 1)
    row = np.zeros((1, width), bool)
    for r in range(n_runs):
        row[0, 3 * r + 1 : 3 * r + 3] = True
    if open_end:
        row[0, -1] = True
    rle = encode_rle(row, "C")
    assert rle == reference_encode(row, "C")
    # The same pixels folded into rows of 7: tails of 0-6 pixels past the 64-pixel blocks.
    pad = -width % 7
    folded = np.concatenate([row, np.zeros((1, pad), bool)], axis=1).reshape(-1, 7)
    for order in ("C", "F"):
        assert encode_rle(folded, order) == reference_encode(folded, order)


def test_runs_across_word_and_block_edges() -> None:
    # Runs that start, end or span at every offset around the 8- and 64-pixel words.
    n = 3 * 64 + 5
    for length in (1, 2, 7, 8, 9, 63, 64, 65, 130):
        for start in range(0, n - length + 1, 3):
            row = np.zeros((1, n), np.uint8)
            row[0, start : start + length] = 1
            row[0, -1] = 1  # and a second run at the very end
            assert encode_rle(row, "C") == reference_encode(row, "C"), (length, start)
    for n in range(1, 200):  # every tail length, all-ones and alternating
        assert encode_rle(np.ones((1, n), bool), "C") == f"1 {n}"
        alternating = (np.arange(n) % 2).astype(bool)[None]
        assert encode_rle(alternating, "C") == reference_encode(alternating, "C")


def test_encode_returns_plain_str_from_threads() -> None:
    # The kernels build the str themselves and release the GIL while they scan.
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    masks = [rng.random((int(h), int(w))) < rng.random() for h, w in rng.integers(1, 90, (60, 2))]
    masks.insert(30, np.zeros((0, 5), bool))
    expected = [reference_encode(m, "C") for m in masks]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda m: encode_rle(m, "C"), masks))
            assert got == expected
    assert all(type(text) is str and text.isascii() for text in got)
    assert encode_rle(np.zeros((0, 5), bool), "F") == "" == encode_rle([[0, 0]], "F")
    subclass = type("MaskArray", (np.ndarray,), {})
    assert encode_rle(np.array([[0, 1], [1, 1]], np.uint8).view(subclass), "C") == "2 3"


def test_adjacent_runs_accepted_on_decode_never_emitted() -> None:
    decoded = decode_rle("1 2 3 2", (2, 3), "C")
    np.testing.assert_array_equal(decoded, [[1, 1, 1], [1, 0, 0]])
    assert encode_rle(decoded, "C") == "1 4"


def test_decode_whitespace_is_lenient() -> None:
    np.testing.assert_array_equal(decode_rle(" 2  2\t7 3\n", (3, 4), "C"), MASK_3X4)


def test_decode_leading_zeros() -> None:
    np.testing.assert_array_equal(decode_rle("00000002 0002 7 003", (3, 4), "C"), MASK_3X4)


def test_bad_order_and_shape() -> None:
    with pytest.raises(ValueError, match=r"'C'.*'F'"):
        encode_rle(MASK_3X4, "row")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'C'.*'F'"):
        decode_rle("1 1", (3, 4), "c")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        encode_rle(np.zeros((2, 3, 4)), "C")
    with pytest.raises(RLEError, match="positive"):
        decode_rle("1 1", (0, 4), "C")
    with pytest.raises(RLEError, match="two integers"):
        decode_rle("1 1", (3.0, 4), "C")  # type: ignore[arg-type]
    with pytest.raises(RLEError, match="must be a string"):
        decode_rle(12, (3, 4), "C")  # type: ignore[arg-type]


def test_rle_area_and_validate() -> None:
    assert rle_area(RLE_3X4_C) == 5
    assert rle_area(RLE_3X4_F) == 5
    validate_rle(RLE_3X4_C, 12)
    with pytest.raises(RLEError, match="past the image end"):
        validate_rle(RLE_3X4_C, 8)
    with pytest.raises(RLEError, match="odd number of tokens"):
        rle_area("1 2 3")


@pytest.mark.slow
def test_warmup_runs() -> None:
    """In a fresh process (where nothing has compiled them yet), warmup() leaves every kernel the
    public functions call compiled or loaded from numba's cache, so a first real call pays
    nothing."""
    code = (
        "from kaggle_seg.data import rle\n"
        "rle.warmup()\n"
        "entry = ('_encode_text', '_encode_columns_text', '_decode_kernel', "
        "'_decode_rows_kernel', '_decode_labels_kernel', '_scan_kernel')\n"
        "print(sorted(name for name in entry if not getattr(rle, name).signatures))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@st.composite
def masks(draw: st.DrawFn) -> np.ndarray:
    """[H, W] bool masks, 1..40 each side, from all-zero through speckle to all-one."""
    height = draw(st.integers(1, 40))
    width = draw(st.integers(1, 40))
    density = draw(st.sampled_from([0.0, 0.02, 0.3, 0.5, 0.9, 1.0]) | st.floats(0, 1))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random((height, width)) < density


@settings(max_examples=300, deadline=None)
@given(mask=masks(), order=st.sampled_from(["C", "F"]))
def test_round_trip_and_reference(mask: np.ndarray, order: str) -> None:
    rle = encode_rle(mask, order)
    assert rle == reference_encode(mask, order)
    np.testing.assert_array_equal(decode_rle(rle, mask.shape, order), mask)
    assert rle_area(rle) == mask.sum()
    # Batch forms agree with the single ones.
    assert encode_rles([mask, ~mask], order) == [rle, encode_rle(~mask, order)]
    for got, want in zip(decode_rles([rle, ""], mask.shape, order), [mask, 0 * mask], strict=True):
        np.testing.assert_array_equal(got, want)


@settings(max_examples=200, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    cuts=st.lists(st.floats(0, 1), max_size=20),
    order=st.sampled_from(["C", "F"]),
)
def test_decode_matches_reference_with_touching_runs(
    shape: tuple[int, int], cuts: list[float], order: str
) -> None:
    # Any sorted, non-overlapping runs, touching ones included, decode as the reference does.
    n = shape[0] * shape[1]
    bounds = sorted({int(c * n) for c in cuts} | {0, n})
    pairs = [(a + 1, b - a) for a, b in itertools.pairwise(bounds)][::2]
    rle = " ".join(f"{s} {length}" for s, length in pairs)
    decoded = decode_rle(rle, shape, order)
    np.testing.assert_array_equal(decoded, reference_decode(rle, shape, order))
    assert encode_rle(decoded, order) == reference_encode(decoded, order)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="0123456789 -.a\t", max_size=30))
def test_arbitrary_text_decodes_or_raises_rle_error(text: str) -> None:
    try:
        decoded = decode_rle(text, (5, 7), "F")
    except RLEError:
        return
    np.testing.assert_array_equal(decoded, reference_decode(text, (5, 7), "F"))


# ---------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("1 2 3", r"odd number of tokens \(3\): the last start '3' \(token 2\)"),
        ("5", r"odd number of tokens \(1\)"),
        ("1 a", r"token 1 \('a'\) at pair 0 \('1 a', tokens 0-1\) is not a non-negative integer"),
        ("1 2 1.5 3", r"token 2 \('1.5'\) at pair 1 \('1.5 3', tokens 2-3\) is not a non-neg"),
        ("1 2 3 +4", r"token 3 \('\+4'\) at pair 1 .* is not a non-negative integer"),
        ("4 -2", r"token 1 \('-2'\) at pair 0 \('4 -2', tokens 0-1\) is negative"),
        ("-4 2", r"token 0 \('-4'\) .* is negative"),
        ("1 2 3x 4", r"token 2 \('3x'\)"),
        ("0 3", r"start 0 < 1 at pair 0 \('0 3', tokens 0-1\) \(starts are 1-indexed\)"),
        ("1 1 5 0", r"length 0 < 1 at pair 1 \('5 0', tokens 2-3\)"),
        ("10 3", r"run past the image end at pair 0 \('10 3'.*ends at pixel 12, .* 11 pixels"),
        ("11 1 12 1", r"run past the image end at pair 1 \('12 1', tokens 2-3\)"),
        ("1 99999999999999999999999", r"past the image end.*ends at pixel 99999999999999999999999"),
        (
            "2 3 4 1",
            r"runs overlap at pair 1 \('4 1', tokens 2-3\): start 4 is inside the previous",
        ),
        ("2 3 2 1", r"runs overlap at pair 1 \('2 1'.*previous run '2 3' \(pixels 2-4\)"),
        ("5 1 2 1", r"runs not sorted at pair 1 \('2 1', tokens 2-3\): start 2 comes before"),
        ("1 1 3 1 2 1", r"runs not sorted at pair 2 \('2 1', tokens 4-5\)"),
    ],
)
def test_decode_errors(rle: str, message: str) -> None:
    with pytest.raises(RLEError, match=message):
        decode_rle(rle, (1, 11), "C")
    with pytest.raises(RLEError, match=message):
        decode_rle(rle, (11, 1), "F")
    with pytest.raises(RLEError, match=message):
        validate_rle(rle, 11)


def test_run_past_the_end_names_the_image_width_by_height() -> None:
    # 310 rows x 360 columns, the non-square uwmgi scan: its size reads as kseg writes sizes
    # elsewhere (W x H), whether the caller knows the shape (validate) or decodes it.
    says = r"the image has 111600 pixels \(360x310, W x H\)"
    with pytest.raises(RLEError, match=says):
        validate_rle("111600 2", (310, 360))
    with pytest.raises(RLEError, match=says):
        decode_rle("111600 2", (310, 360), "C")
    with pytest.raises(RLEError, match=rf"row 1 \(id=b\): .*{says}"):
        decode_rles(["", "111600 2"], (310, 360), "C", labels=["a", "b"])
    validate_rle("111599 2", (310, 360))


def test_rle_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        decode_rle("1", (2, 2), "C")


def test_batch_errors_name_the_row() -> None:
    rles = ["1 2", "3 1", "2 2 3 1"]
    with pytest.raises(RLEError, match=r"^row 2 \(id=abc\): runs overlap at pair 1 \('3 1'"):
        decode_rles(rles, (2, 3), "C", labels=["x", "y", "abc"])
    with pytest.raises(RLEError, match=r"^row 2: runs overlap"):
        decode_rles(rles, (2, 3), "C")
    with pytest.raises(RLEError, match=r"^row 1 \(id=b\): run past the image end"):
        decode_rles(["1 1", "6 2"], [(2, 3), (1, 6)], "F", labels=["a", "b"])
    with pytest.raises(RLEError, match=r"^row 1: shape must be two positive integers"):
        decode_rles(["1 1", "1 1"], [(2, 3), (0, 6)], "F")
    with pytest.raises(RLEError, match="2 RLE strings but 3 shapes"):
        decode_rles(["1 1", "1 1"], [(2, 3), (2, 3), (2, 3)], "C")


def test_pandas_column() -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "rle": [RLE_3X4_F, np.nan, "1 1"],
            "height": [3, 2, 1],
            "width": [4, 2, 1],
        },
        index=[10, 11, 12],  # positions, not labels, must be used
    )
    shapes = list(zip(frame["height"], frame["width"], strict=True))
    got = decode_rles(frame["rle"], shapes, "F", labels=frame["id"])
    np.testing.assert_array_equal(got[0], MASK_3X4)
    np.testing.assert_array_equal(got[1], np.zeros((2, 2)))
    strings = pd.Series([RLE_3X4_C, None], dtype="string")  # missing is pd.NA here
    assert [m.sum() for m in decode_rles(strings, (3, 4), "C")] == [5, 0]
    frame.loc[12, "rle"] = "1 2"
    with pytest.raises(RLEError, match=r"^row 2 \(id=c\): run past the image end"):
        decode_rles(frame["rle"], frame[["height", "width"]].to_numpy(), "F", labels=frame["id"])


def test_decode_rles_per_row_shapes() -> None:
    got = decode_rles([RLE_3X4_F, None, "1 2"], [(3, 4), (2, 2), (1, 2)], "F")
    np.testing.assert_array_equal(got[0], MASK_3X4)
    np.testing.assert_array_equal(got[1], np.zeros((2, 2)))
    np.testing.assert_array_equal(got[2], [[1, 1]])


@pytest.mark.parametrize("order", ["C", "F"])
def test_decode_into_the_callers_buffer(order: str) -> None:
    rle = RLE_3X4_C if order == "C" else RLE_3X4_F
    out = np.zeros((3, 4), np.uint8)
    assert decode_rle(rle, (3, 4), order, out=out) is out
    np.testing.assert_array_equal(out, MASK_3X4)
    # Only the runs are written: a pixel already set stays set (an OR), bool works too.
    flags = np.zeros((3, 4), bool)
    flags[2, 3] = True
    decode_rle(rle, (3, 4), order, out=flags)
    np.testing.assert_array_equal(
        flags, MASK_3X4.astype(bool) | (np.arange(12) == 11).reshape(3, 4)
    )
    stack = np.zeros((2, 3, 4), np.uint8)
    decode_rle(rle, (3, 4), order, out=stack[1])  # a contiguous slot of a stack
    np.testing.assert_array_equal(stack[1], MASK_3X4)
    assert not stack[0].any()


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (np.zeros((4, 3), np.uint8), r"shape \(3, 4\), got uint8 \(4, 3\)"),
        (np.zeros((3, 4), np.int32), r"uint8 array of shape \(3, 4\), got int32"),
        (np.zeros((4, 3), np.uint8).T, "not C-contiguous"),
        ([[0] * 4] * 3, "must be a numpy array, got list"),
    ],
)
def test_decode_out_must_fit(out: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_rle(RLE_3X4_C, (3, 4), "C", out=out)  # type: ignore[arg-type]
    read_only = np.zeros((3, 4), np.uint8)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        decode_rle(RLE_3X4_C, (3, 4), "C", out=read_only)


@pytest.mark.parametrize("order", ["C", "F"])
def test_decode_rles_stack_out_and_index(order: str) -> None:
    rle = RLE_3X4_C if order == "C" else RLE_3X4_F
    stack = decode_rles([rle, "", "1 1"], (3, 4), order)
    assert stack.shape == (3, 3, 4) and stack.dtype == np.uint8 and stack.flags.c_contiguous
    np.testing.assert_array_equal(stack[0], MASK_3X4)
    assert not stack[1].any() and stack[2].sum() == 1 and stack[2, 0, 0] == 1
    # Rows into chosen slots of a caller's stack; two rows in one slot are united.
    out = np.zeros((4, 3, 4), bool)
    assert decode_rles([rle, "1 1", None], (3, 4), order, out=out, index=[2, 2, 0]) is out
    np.testing.assert_array_equal(out[2], MASK_3X4 | (np.arange(12) == 0).reshape(3, 4))
    assert not out[0].any() and not out[1].any() and not out[3].any()
    # Without out, the stack is as deep as the largest slot.
    assert decode_rles(["1 1"], (3, 4), order, index=[3]).shape == (4, 3, 4)
    with pytest.raises(ValueError, match=r"index must lie in \[0, 4\)"):
        decode_rles(["1 1"], (3, 4), order, out=out, index=[4])
    with pytest.raises(ValueError, match="index has 1 entries for 2 RLE strings"):
        decode_rles(["1 1", ""], (3, 4), order, index=[0])
    with pytest.raises(ValueError, match="need one"):
        decode_rles(["1 1"], [(3, 4)], order, out=out)


def test_decode_rles_per_row_shapes_share_one_buffer() -> None:
    got = decode_rles(["1 2", "3 1"], [(2, 2), (1, 3)], "C")
    assert got[0].base is not None and got[0].base is got[1].base
    np.testing.assert_array_equal(got[1], [[0, 0, 1]])


def test_labels_into_the_callers_buffer() -> None:
    out = np.zeros((3, 4), np.int32)
    assert decode_rles_to_labels([RLE_3X4_C, "1 1"], (3, 4), "C", out=out) is out
    np.testing.assert_array_equal(out, MASK_3X4 + 2 * (np.arange(12) == 0).reshape(3, 4))
    with pytest.raises(ValueError, match="int32 array of shape"):
        decode_rles_to_labels(["1 1"], (3, 4), "C", out=np.zeros((3, 4), np.uint8))


@settings(max_examples=100, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    seeds=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=6),
    order=st.sampled_from(["C", "F"]),
    slots=st.data(),
)
def test_decode_rles_index_is_an_or_of_the_rows(
    shape: tuple[int, int], seeds: list[int], order: str, slots: st.DataObject
) -> None:
    masks = [np.random.default_rng(seed).random(shape) < 0.4 for seed in seeds]
    index = slots.draw(st.lists(st.integers(0, 2), min_size=len(masks), max_size=len(masks)))
    stack = decode_rles([encode_rle(m, order) for m in masks], shape, order, index=index)
    expected = np.zeros((max(index) + 1, *shape), bool)
    for mask, slot in zip(masks, index, strict=True):
        expected[slot] |= mask
    np.testing.assert_array_equal(stack, expected)


def test_encode_rles_stack() -> None:
    stack = np.stack([MASK_3X4, 1 - MASK_3X4, 0 * MASK_3X4])
    assert encode_rles(stack, "C") == [RLE_3X4_C, "1 1 4 3 10 3", ""]


# ---------------------------------------------------------------------------------------------
# Instance label maps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["C", "F"])
def test_labels(order: str) -> None:
    first = np.zeros((3, 4), bool)
    first[0, :2] = True
    second = np.zeros((3, 4), bool)
    second[1:, 3] = True
    rles = [encode_rle(first, order), None, encode_rle(second, order)]
    labels = decode_rles_to_labels(rles, (3, 4), order)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, first * 1 + second * 3)


@pytest.mark.parametrize("order", ["C", "F"])
def test_labels_overlap_names_both_rows(order: str) -> None:
    rles = ["1 2", "6 1", "5 3"]  # row 2 covers pixel 6, which row 1 already has
    row, col = divmod(5, 4) if order == "C" else (5 % 3, 5 // 3)
    with pytest.raises(
        RLEError,
        match=rf"^row 2 \(id=c\) overlaps row 1 \(id=b\) at pixel \(row {row}, col {col}\)",
    ):
        decode_rles_to_labels(rles, (3, 4), order, labels=["a", "b", "c"])
    with pytest.raises(RLEError, match=r"^row 2 overlaps row 1 "):
        decode_rles_to_labels(rles, (3, 4), order)


def test_labels_malformed_row() -> None:
    with pytest.raises(RLEError, match=r"^row 1 \(id=q\): odd number of tokens"):
        decode_rles_to_labels(["1 2", "4"], (3, 4), "F", labels=["p", "q"])


# ---------------------------------------------------------------------------------------------
# Real data: DSB 2018 (column-major), checked against the per-nucleus mask PNGs
# ---------------------------------------------------------------------------------------------

needs_dsb = pytest.mark.skipif(
    not (DSB / "stage1_train_labels.csv").is_file(),
    reason=f"DSB 2018 shared data not found under {DSB} (set KSEG_SHARED_DATA)",
)


def read_rows(path: Path) -> dict[str, list[dict[str, str]]]:
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            rows[row["ImageId"]].append(row)
    return rows


@pytest.fixture(scope="module")
def train_rows() -> dict[str, list[dict[str, str]]]:
    return read_rows(DSB / "stage1_train_labels.csv")


def image_shape(path: Path) -> tuple[int, int]:
    width, height = Image.open(path).size
    return height, width


def load_masks(folder: Path) -> list[np.ndarray]:
    masks = [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]
    assert all(set(np.unique(m)) <= {0, 255} for m in masks)
    return [m > 0 for m in masks]


def check_image(image_id: str, rles: list[str], shape: tuple[int, int], masks: list) -> None:
    """Every CSV row decodes to exactly one mask PNG, together they give the union, and
    every mask PNG re-encodes to exactly a CSV string."""
    assert len(rles) == len(masks), image_id
    decoded = decode_rles(rles, shape, "F", labels=[image_id] * len(rles))
    by_bytes = defaultdict(int)
    for mask in masks:
        by_bytes[np.packbits(mask).tobytes()] += 1
    for i, mask in enumerate(decoded):
        assert mask.shape == shape
        assert by_bytes[np.packbits(mask.astype(bool)).tobytes()] == 1, (image_id, i)
    np.testing.assert_array_equal(
        np.logical_or.reduce(decoded), np.logical_or.reduce(masks), err_msg=image_id
    )
    assert sorted(encode_rles(masks, "F")) == sorted(rles), image_id
    labels = decode_rles_to_labels(rles, shape, "F", labels=[image_id] * len(rles))
    assert labels.max() == len(rles)
    np.testing.assert_array_equal(labels > 0, np.logical_or.reduce(masks))


def sample_train_ids() -> list[str]:
    """~15 images, deterministic: the first of every size, the non-square 00ae65c1, three of
    the 1024x1024 ones, and every 100th id."""
    ids = sorted(p.name for p in (DSB / "stage1_train").iterdir())
    by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    for image_id in ids:
        by_size[image_shape(DSB / "stage1_train" / image_id / "images" / f"{image_id}.png")].append(
            image_id
        )
    picks = [group[0] for group in by_size.values()] + by_size[(1024, 1024)][:3] + ids[::100]
    if NON_SQUARE_ID in ids:
        picks.append(NON_SQUARE_ID)
    return sorted(set(picks))


def check_train_image(image_id: str, train_rows: dict[str, list[dict[str, str]]]) -> None:
    """The labels CSV rows of one training image against its mask PNGs."""
    folder = DSB / "stage1_train" / image_id
    shape = image_shape(folder / "images" / f"{image_id}.png")
    rles = [row["EncodedPixels"] for row in train_rows[image_id]]
    check_image(image_id, rles, shape, load_masks(folder / "masks"))


@needs_dsb
@pytest.mark.slow
def test_dsb_train_sample(train_rows: dict[str, list[dict[str, str]]]) -> None:
    image_ids = sample_train_ids()
    assert NON_SQUARE_ID in image_ids
    assert 12 <= len(image_ids) <= 20
    for image_id in image_ids:
        check_train_image(image_id, train_rows)


@needs_dsb
def test_dsb_non_square_is_column_major(train_rows: dict[str, list[dict[str, str]]]) -> None:
    folder = DSB / "stage1_train" / NON_SQUARE_ID
    shape = image_shape(folder / "images" / f"{NON_SQUARE_ID}.png")
    assert shape == (256, 320)
    masks = {np.packbits(m).tobytes() for m in load_masks(folder / "masks")}
    for row in train_rows[NON_SQUARE_ID]:
        as_c = decode_rle(row["EncodedPixels"], shape, "C").astype(bool)
        assert np.packbits(as_c).tobytes() not in masks


@needs_dsb
@pytest.mark.slow
def test_dsb_train_all(train_rows: dict[str, list[dict[str, str]]]) -> None:
    image_ids = sorted(p.name for p in (DSB / "stage1_train").iterdir())
    assert len(image_ids) == len(train_rows) == 570
    for image_id in image_ids:
        check_train_image(image_id, train_rows)


@needs_dsb
def test_dsb_stage1_solution_with_height_width() -> None:
    rows = read_rows(DSB / "stage1_solution.csv")
    for image_id in sorted(rows)[::13]:  # 5 of the 65 test images
        group = rows[image_id]
        shapes = [(int(r["Height"]), int(r["Width"])) for r in group]
        rles = [r["EncodedPixels"] for r in group]
        decoded = decode_rles(rles, shapes, "F", labels=[image_id] * len(group))
        masks = load_masks(DSB / "stage1_test" / image_id / "masks")
        assert len(masks) == len(decoded)
        assert {np.packbits(m.astype(bool)).tobytes() for m in decoded} == {
            np.packbits(m).tobytes() for m in masks
        }
        assert shapes[0] == image_shape(
            DSB / "stage1_test" / image_id / "images" / f"{image_id}.png"
        )


# ---------------------------------------------------------------------------------------------
# JIT cache fallback: the package on a read-only file system (Kaggle's /kaggle/input)
# ---------------------------------------------------------------------------------------------

READ_ONLY_PROBE = textwrap.dedent(
    """
    import numba, numpy as np
    import rle_copy
    assert rle_copy._CACHE is False, "cache should be off"
    try:  # the scenario is real: numba itself would refuse to cache this module
        numba.njit(cache=True)(rle_copy._check_run.py_func)
    except RuntimeError as error:
        assert "cannot cache" in str(error), error
    else:
        raise AssertionError("numba could cache: the directory is not read-only")
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    rle = rle_copy.encode_rle(mask, "C")  # the cache decision is module-wide: one order will do
    assert (rle_copy.decode_rle(rle, mask.shape, "C") == mask).all()
    print("ok")
    """
)


@pytest.mark.slow
def test_jit_cache_fallback_on_read_only_directory() -> None:
    root = Path(tempfile.mkdtemp(prefix="kseg-ro-"))
    site = root / "site"
    site.mkdir()
    try:
        shutil.copy(REPO / "kaggle_seg" / "data" / "rle.py", site / "rle_copy.py")
        # Root ignores file modes, so also make every cache location impossible to create:
        # a regular file where numba wants a directory.
        (site / "__pycache__").write_text("")
        blocker = root / "not-a-dir"
        blocker.write_text("")
        site.chmod(0o555)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
            "NUMBA_CACHE_DIR": str(blocker / "numba"),
            "HOME": str(blocker),
            "XDG_CACHE_HOME": str(blocker / "cache"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        result = subprocess.run(
            [sys.executable, "-c", READ_ONLY_PROBE],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "ok"
        assert sorted(p.name for p in site.iterdir()) == ["__pycache__", "rle_copy.py"]
    finally:
        site.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)
