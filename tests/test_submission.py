"""Submission validators: every rule, with the line at fault named."""

from __future__ import annotations

import pandas as pd
import pytest

from kaggle_seg.competitions.dsb2018_kaggle import validate_submission as validate_dsb_submission
from kaggle_seg.competitions.uwmgi_kaggle import validate_submission as validate_uwmgi_submission
from kaggle_seg.errors import InputError

CLASSES = ("large_bowel", "small_bowel", "stomach")
SHAPES = {"case1_day0_slice_0001": (4, 5), "case1_day0_slice_0002": (4, 5)}


def _uwmgi(predicted: list[str] | None = None) -> pd.DataFrame:
    rows = [(i, c) for i in SHAPES for c in CLASSES]
    predicted = predicted or [""] * len(rows)
    return pd.DataFrame(
        {"id": [r[0] for r in rows], "class": [r[1] for r in rows], "predicted": predicted}
    )


def test_a_valid_uwmgi_submission_passes():
    frame = _uwmgi(["1 3", "", "", "5 2 9 4", "", "20 1"])
    assert len(validate_uwmgi_submission(frame, list(SHAPES), SHAPES, CLASSES)) == 6


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.drop(columns="predicted"), r"missing column\(s\) predicted"),
        (
            lambda f: f.assign(**{"class": f["class"].replace("stomach", "liver")}),
            "line 4: unknown class 'liver'",
        ),
        (lambda f: pd.concat([f, f.iloc[[0]]]), r"line 8: second row for \(case1_day0_slice_0001"),
        (lambda f: f.iloc[:-1], r"1 \(id, class\) row\(s\) missing, first case1_day0_slice_0002"),
        (
            lambda f: f.assign(
                id=f["id"].replace("case1_day0_slice_0002", "case9_day0_slice_0002")
            ),
            "line 5: id 'case9_day0_slice_0002' is not expected",
        ),
        (lambda f: f.assign(predicted=["1 3 5"] + [""] * 5), "line 2 .*odd"),
        (
            lambda f: f.assign(predicted=["", "", "", "", "", "19 3"]),
            r"line 7 \(case1_day0_slice_0002, stomach\): .*past",
        ),
        (
            lambda f: f.assign(predicted=["", "5 3 6 2", "", "", "", ""]),
            r"line 3 \(case1_day0_slice_0001, small_bowel\): .*overlap",
        ),
        (lambda f: f.assign(predicted=["", "", "9 2 5 1", "", "", ""]), "line 4 .*(sorted|order)"),
    ],
)
def test_uwmgi_submission_errors_name_the_line(mutate, message):
    with pytest.raises(InputError, match=message):
        validate_uwmgi_submission(mutate(_uwmgi()), list(SHAPES), SHAPES, CLASSES, source="s.csv")


DSB_SHAPES = {"img_a": (4, 4), "img_b": (3, 5)}


def test_a_valid_dsb_submission_passes_with_empty_rows():
    frame = pd.DataFrame(
        {"ImageId": ["img_a", "img_a", "img_b"], "EncodedPixels": ["1 2", "5 3", ""]}
    )
    assert len(validate_dsb_submission(frame, DSB_SHAPES)) == 3


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"ImageId": ["img_a"], "EncodedPixels": ["1 2"]}, "1 image.* no row, first img_b"),
        (
            {"ImageId": ["img_a", "img_b", "img_c"], "EncodedPixels": ["1 2", "", ""]},
            "line 4: unknown ImageId 'img_c'",
        ),
        (
            {"ImageId": ["img_a", "img_a", "img_b"], "EncodedPixels": ["1 4", "3 2", ""]},
            r"img_a: line 3 overlaps line 2 at pixel \(row 2, col 0\)",
        ),
        ({"ImageId": ["img_a", "img_b"], "EncodedPixels": ["1 2", "14 3"]}, "line 3 .*past"),
        ({"ImageId": ["img_a", "img_b"], "EncodedPixels": ["x 2", ""]}, "line 2 .*integer"),
    ],
)
def test_dsb_submission_errors_name_the_line(frame, message):
    with pytest.raises(InputError, match=message):
        validate_dsb_submission(pd.DataFrame(frame), DSB_SHAPES, source="s.csv")
