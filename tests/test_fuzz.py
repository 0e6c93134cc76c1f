"""Property tests of the input surface: arbitrary text or bytes into the RLE decoder, the CSV
readers and the submission validators give a correct result or one line of KsegError, never
another exception. (benchmarks/fuzz_inputs.py runs the same targets under atheris.)"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaggle_seg.data.rle import decode_rle, decode_rles_to_labels, encode_rle, validate_rle
from kaggle_seg.errors import KsegError

WHITESPACE = " \t\n\r\f\v"
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


def reference_pixels(text: str, n_pixels: int) -> list[int] | None:
    """The 0-based pixels an RLE sets, by the format's definition; None when it is invalid."""
    body = text.strip(WHITESPACE)
    tokens = re.split(f"[{WHITESPACE}]+", body) if body else []
    if len(tokens) % 2 or not all(re.fullmatch("[0-9]+", t) for t in tokens):
        return None
    pixels: list[int] = []
    previous_end = 0
    for start, length in zip(map(int, tokens[::2]), map(int, tokens[1::2]), strict=True):
        end = start + length - 1
        if start < 1 or length < 1 or end > n_pixels or start <= previous_end:
            return None
        pixels.extend(range(start - 1, end))
        previous_end = end
    return pixels


def one_line_error(exc: BaseException) -> None:
    assert isinstance(exc, KsegError), f"{type(exc).__name__}: {exc}"
    assert "\n" not in str(exc) and str(exc)


@st.composite
def rle_texts(draw: st.DrawFn) -> str:
    """Mostly well-formed runs with odd spacing, sometimes damaged, sometimes any text."""
    kind = draw(st.sampled_from(["runs", "damaged", "any"]))
    if kind == "any":
        return draw(st.text(max_size=40))
    runs = draw(st.lists(st.tuples(st.integers(0, 70), st.integers(0, 12)), max_size=6))
    tokens = [str(v) for run in runs for v in run]
    if kind == "damaged" and tokens:
        at = draw(st.integers(0, len(tokens) - 1))
        tokens[at] = draw(st.sampled_from(["", "-3", "1.5", "x", "１", "\x00", "9" * 25, "+2"]))
    separators = st.text(alphabet=WHITESPACE, min_size=1, max_size=3)
    text = draw(st.text(alphabet=WHITESPACE, max_size=2))
    for token in tokens:
        text += token + draw(separators)
    return text


@FUZZ
@given(text=rle_texts(), height=st.integers(1, 8), width=st.integers(1, 8),
       order=st.sampled_from(["C", "F"]))  # fmt: skip
def test_rle_decoder_is_exact_or_refuses_in_one_line(text: str, height: int, width: int, order):
    expected = reference_pixels(text, height * width)
    try:
        mask = decode_rle(text, (height, width), order)
    except Exception as exc:
        one_line_error(exc)
        assert expected is None, f"valid RLE {text!r} refused: {exc}"
        with pytest.raises(KsegError):
            validate_rle(text, height * width)
        return
    assert expected is not None, f"invalid RLE {text!r} accepted"
    flat = np.zeros(height * width, np.uint8)
    flat[expected] = 1
    assert np.array_equal(mask, flat.reshape((height, width), order=order))
    validate_rle(text, height * width)
    assert np.array_equal(decode_rle(encode_rle(mask, order), (height, width), order), mask)


@FUZZ
@given(texts=st.lists(rle_texts(), min_size=1, max_size=4), order=st.sampled_from(["C", "F"]))
def test_instance_decoder_labels_or_refuses_in_one_line(texts: list[str], order):
    shape = (5, 6)
    try:
        labels = decode_rles_to_labels(texts, shape, order, labels=[f"line {i}" for i in range(9)])
    except Exception as exc:
        one_line_error(exc)
        return
    for k, text in enumerate(texts, start=1):
        pixels = reference_pixels(text, 30)
        assert pixels is not None
        assert set(np.flatnonzero(labels.reshape(-1, order=order) == k)) == set(pixels)


CSV_BYTES = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.lists(st.sampled_from(["id", "class", "segmentation", "predicted", "ImageId",
                                  "EncodedPixels", "fold", "height", "width", "empty", "1 2",
                                  "a", '"', '""', "\x00", "True", "-1", "", "é"]),
                 min_size=1, max_size=5),
        max_size=6,
    ).map(lambda rows: "\n".join(",".join(row) for row in rows).encode()),
)  # fmt: skip


def csv_file(tmp_path: Path, data: bytes, name: str = "input.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@FUZZ
@given(data=CSV_BYTES)
def test_csv_readers_read_or_refuse_in_one_line(tmp_path: Path, data: bytes):
    from kaggle_seg.competitions.uwmgi import read_train_csv
    from kaggle_seg.data.folds import read_folds
    from kaggle_seg.io import read_csv_checked
    from kaggle_seg.prepare import read_table

    path = csv_file(tmp_path, data)
    readers = {
        "read_csv_checked": lambda: read_csv_checked(path, ["id"]),
        "read_train_csv": lambda: read_train_csv(path),
        "read_folds": lambda: read_folds(path),
        "read_table": lambda: read_table(path),
    }
    for name, read in readers.items():
        try:
            frame = read()
        except Exception as exc:
            one_line_error(exc)
            continue
        assert isinstance(frame, pd.DataFrame), name
        if name == "read_csv_checked":
            assert "id" in frame.columns
            assert all(isinstance(v, str) for v in frame["id"])
        if name == "read_folds":
            assert frame["fold"].dtype.kind == "i"
        if name == "read_table":
            assert len(frame) and not frame["id"].duplicated().any()
            assert (frame[["height", "width"]] > 0).all().all()


UWMGI_CLASSES = ("large_bowel", "small_bowel", "stomach")
SHAPES = {"s1": (4, 5), "s2": (3, 3)}


@st.composite
def uwmgi_frames(draw: st.DrawFn) -> pd.DataFrame:
    rows = [(i, c, "") for i in SHAPES for c in UWMGI_CLASSES]
    rows = draw(st.permutations(rows))
    keep = draw(st.integers(len(rows) - 2, len(rows)))
    ids = st.sampled_from([*SHAPES, "s3", ""])
    classes = st.sampled_from([*UWMGI_CLASSES, "liver"])
    rows = [
        (draw(ids) if draw(st.integers(0, 9)) == 0 else i,
         draw(classes) if draw(st.integers(0, 9)) == 0 else c, draw(rle_texts()))
        for i, c, _ in rows[:keep]
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["id", "class", "predicted"])


@FUZZ
@given(frame=uwmgi_frames())
def test_uwmgi_submission_validator_accepts_only_decodable_complete_frames(frame: pd.DataFrame):
    from kaggle_seg.competitions.uwmgi_kaggle import (
        validate_submission as validate_uwmgi_submission,
    )

    try:
        checked = validate_uwmgi_submission(frame, list(SHAPES), SHAPES, UWMGI_CLASSES)
    except Exception as exc:
        one_line_error(exc)
        return
    pairs = list(zip(checked["id"], checked["class"], strict=True))
    assert sorted(pairs) == sorted((i, c) for i in SHAPES for c in UWMGI_CLASSES)
    for image_id, rle in zip(checked["id"], checked["predicted"], strict=True):
        assert reference_pixels(rle, SHAPES[image_id][0] * SHAPES[image_id][1]) is not None


@FUZZ
@given(rows=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), rle_texts()), max_size=6))
def test_dsb_submission_validator_accepts_only_decodable_disjoint_nuclei(rows):
    from kaggle_seg.competitions.dsb2018_kaggle import (
        validate_submission as validate_dsb_submission,
    )

    shapes = {"a": (4, 4), "b": (2, 7)}
    frame = pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"])
    try:
        checked = validate_dsb_submission(frame, shapes)
    except Exception as exc:
        one_line_error(exc)
        return
    assert set(checked["ImageId"]) == set(shapes)
    for image_id, group in checked.groupby("ImageId"):
        rles = [r for r in group["EncodedPixels"] if r.strip(WHITESPACE)]  # blank = no nucleus
        seen: set[int] = set()
        for rle in rles:
            pixels = set(reference_pixels(rle, shapes[image_id][0] * shapes[image_id][1]) or [])
            assert pixels and not pixels & seen
            seen |= pixels


@FUZZ
@given(data=CSV_BYTES)
def test_score_reads_any_submission_file_or_refuses_in_one_line(tmp_path: Path, data: bytes):
    from kaggle_seg.scoring import score_submission

    truth = csv_file(tmp_path, b"ImageId,EncodedPixels,Height,Width\na,1 2,4,4\nb,,2,7\n", "t.csv")
    try:
        result = score_submission("dsb2018", truth, csv_file(tmp_path, data, "s.csv"))
    except Exception as exc:
        one_line_error(exc)
        return
    assert 0.0 <= result["score"] <= 1.0
