"""benchmarks/dsb_outline_width.py: the area ratio and the grown scores it reports."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dsb_outline_width.py"


@pytest.fixture(scope="module")
def outline():
    spec = importlib.util.spec_from_file_location("dsb_outline_width", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_area_ratio_and_growth_find_truth_drawn_wider(outline):
    # Truth outlines two pixels outside the predicted nuclei: the ratio is below 1, and
    # growing the prediction by 2 px scores better than as it is.
    shape = (64, 64)
    truth = np.zeros(shape, np.int32)
    prediction = np.zeros(shape, np.int32)
    for k, centre in enumerate([(16, 16), (16, 46), (46, 30)], 1):
        truth[_disc(shape, centre, 9)] = k
        prediction[_disc(shape, centre, 7)] = k
    ratio = outline.matched_area_ratio(truth, prediction)
    assert 0.5 < ratio < 0.75
    row = outline.image_row("x", truth, prediction)
    assert row["grow2"] > row["grow0"]


def test_matching_outlines_are_best_ungrown(outline):
    shape = (48, 48)
    truth = np.zeros(shape, np.int32)
    truth[_disc(shape, (20, 20), 8)] = 1
    row = outline.image_row("x", truth, truth.copy())
    assert row["area_ratio"] == pytest.approx(1.0)
    assert row["grow0"] == pytest.approx(1.0) and row["grow1"] < 1.0
    assert np.isnan(outline.matched_area_ratio(truth, np.zeros_like(truth)))


def test_rle_rows_skip_empty_predictions(outline):
    import pandas as pd

    labels = outline.dsb_labels(pd.Series(["", None, "1 3"]), (4, 4))
    assert labels[:3, 0].tolist() == [1, 1, 1] and labels.max() == 1
