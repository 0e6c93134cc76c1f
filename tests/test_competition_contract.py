"""The plug-in contract (kaggle_seg/competitions/base.py), checked the same way for every
competition in COMPETITIONS, in the style of segmentation_models_pytorch's base model tester: a
competition is covered by being in the dict and by a sample of its data in SAMPLES below.

Each sample is small real data (the packaged DSB example, the LGG subset) or the uwmgi phantom.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from kaggle_seg.competitions import COMPETITIONS, get_competition
from kaggle_seg.competitions.base import SCORING_KINDS, TABLE_COLUMNS, Competition
from kaggle_seg.config import DataConfig, ExperimentConfig
from kaggle_seg.errors import KsegError


@dataclass
class Sample:
    """A competition's data for the contract: its layout, the options it is set up with, and
    for a submission round trip, the test folder and the truth to score against."""

    data_dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    test_data_dir: Path | None = None  # what `kseg submit --data-dir` gets
    truth: Path | None = None  # what `kseg score` compares with
    score_images: Path | None = None  # `kseg score --images`


def _uwmgi_sample(tmp: Path, shared: Path | None) -> Sample:
    from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom

    root = make_uwmgi_phantom(
        tmp / "uwmgi", case_days=("case7_day0", "case12_day0", "case30_day2"), n_slices=6, seed=2
    )
    return Sample(root)


def _dsb2018_sample(tmp: Path, shared: Path | None) -> Sample:
    from importlib import resources

    with resources.as_file(resources.files("kaggle_seg") / "examples" / "dsb2018") as folder:
        shutil.copytree(folder, tmp / "dsb2018")
    return Sample(tmp / "dsb2018")


def _lgg_sample(tmp: Path, shared: Path | None) -> Sample:
    if shared is None or not (shared / "lgg").is_dir():
        pytest.skip("the LGG subset is not in the shared data")
    # No test split: `kseg submit` predicts the dataset's own layout, scored against its masks.
    return Sample(shared / "lgg", test_data_dir=shared / "lgg", truth=shared / "lgg")


def _folder_sample(tmp: Path, shared: Path | None) -> Sample:
    from folder_export import export

    dsb = _dsb2018_sample(tmp, shared).data_dir
    data_dir, truth = export("dsb2018", dsb, tmp / "folder", n_test=4)
    return Sample(data_dir, {"classes": ["nuclei"]}, data_dir, truth)


# How to get a sample of each competition's data; a competition without one fails
# `test_every_competition_has_a_sample`.
SAMPLES: dict[str, Callable[[Path, Path | None], Sample]] = {
    "uwmgi": _uwmgi_sample,
    "dsb2018": _dsb2018_sample,
    "lgg": _lgg_sample,
    "folder": _folder_sample,
}


@pytest.fixture(scope="module", params=list(COMPETITIONS))
def case(request, tmp_path_factory) -> tuple[Competition, Sample]:
    """(the competition set up by the sample's options, the sample)."""
    from conftest import shared_data_dir

    name = request.param
    shared = shared_data_dir() if shared_data_dir().is_dir() else None
    sample = SAMPLES[name](tmp_path_factory.mktemp(name), shared)
    return get_competition(name).configure(sample.options), sample


@pytest.fixture(scope="module")
def table(case) -> pd.DataFrame:
    competition, sample = case
    config = DataConfig(competition=competition.name, options=sample.options)
    return competition.read_table(sample.data_dir, config)


def test_every_competition_has_a_sample():
    assert set(SAMPLES) == set(COMPETITIONS)


def test_attributes_are_consistent(case):
    competition, _ = case
    assert COMPETITIONS[competition.name].name == competition.name
    assert competition.classes and all(isinstance(c, str) for c in competition.classes)
    assert len(set(competition.classes)) == len(competition.classes)
    assert competition.channels >= 1
    assert competition.rle_order in ("C", "F", None)
    assert competition.scoring in SCORING_KINDS
    # Volumes come with a slice order, and only volumes are scored by volume.
    assert (competition.volume_key is None) == (competition.slice_key is None)
    assert (competition.scoring == "volumes") <= (competition.volume_key is not None)
    assert (competition.scoring == "instances") <= competition.instance_masks
    if competition.code_competition:
        assert competition.kaggle_slug and competition.kernel is not None
    if competition.kernel is not None:
        assert competition.kernel.competition == competition.name
        assert competition.submission_columns is not None
    assert competition.submission_suffix.startswith(".") or competition.submission_suffix == ""


def test_unknown_options_are_refused(case):
    competition, _ = case
    with pytest.raises(KsegError, match="not_an_option"):
        competition.configure({"not_an_option": 1})


def test_table_has_the_common_columns_and_one_row_per_id(case, table):
    competition, _ = case
    assert set(TABLE_COLUMNS) <= set(table.columns)
    assert table["id"].is_unique and len(table) > 0
    assert table["empty"].dtype == bool and not table["empty"].all()
    if competition.volume_key is not None:
        from kaggle_seg.data.stacks import check_slice_order

        check_slice_order(table, competition.volume_key, competition.slice_key)
    labels = competition.stratify_labels(table)
    assert len(labels) == len(table)


def test_readers_give_the_documented_arrays(case, table):
    competition, _ = case
    rows = table[~table["empty"]].head(2).to_dict("records")
    for row in rows:
        size = (int(row["height"]), int(row["width"]))
        image = competition.read_image(row)
        assert image.dtype == np.float32 and image.shape == (*size, competition.channels)
        assert image.min() >= 0.0 and image.max() <= 1.0
        mask = competition.read_mask(row)
        assert mask.dtype == np.uint8 and mask.shape == (*size, len(competition.classes))
        assert set(np.unique(mask)) <= {0, 1} and mask.any()
        truth = competition.read_truth(row)
        if competition.scoring == "instances":
            assert truth.shape == size and np.array_equal(truth > 0, mask[..., 0] > 0)
        else:
            assert np.array_equal(truth, mask)
        assert competition.has_truth(pd.Series(row))
        competition.check_headers(row)
    volume = competition.read_mask_volume(rows[:1])  # [K, D, H, W]
    first = (int(rows[0]["height"]), int(rows[0]["width"]))
    assert volume.shape == (len(competition.classes), 1, *first)
    np.testing.assert_array_equal(np.moveaxis(volume[:, 0], 0, -1), competition.read_mask(rows[0]))


def test_demo_recipe_is_a_valid_experiment(case):
    competition, _ = case
    if competition.demo is None:
        pytest.skip(f"{competition.name} has no demo")
    recipe = competition.demo
    config = ExperimentConfig.model_validate(
        {"data": {"competition": competition.name, **recipe.data}, "augment": recipe.augment}
    )
    assert config.data.competition == competition.name
    from kaggle_seg.tta import get_tta

    get_tta(recipe.tta)


def _truth_stream(
    competition: Competition, table: pd.DataFrame, rows: pd.DataFrame, truth: Path | None
):
    """(position, id, float32 [K, H, W]) items of the true masks of `rows` (held back from the
    training table, or in the sample's truth folder), as a model would stream its
    probabilities."""
    by_id = {str(r["id"]): r for r in table.to_dict("records")}
    for position, row in enumerate(rows.to_dict("records")):
        image_id = str(row["id"])
        if image_id not in by_id:  # a test image: its mask is in the truth folder
            by_id[image_id] = {**row, "mask_path": str(truth / f"{image_id}.png")}
        mask = competition.read_mask(by_id[image_id]).astype(np.float32)
        yield position, image_id, np.moveaxis(mask, -1, 0)


def test_a_submission_of_the_truth_validates_and_scores(case, table, tmp_path):
    """test_set -> write_submission -> score_submission: the truth written as a submission is a
    valid file, scored perfect (instances: the union's components, so touching nuclei merge)."""
    from kaggle_seg.postprocess import default_postprocess

    competition, sample = case
    if competition.submission_columns is None:
        with pytest.raises(KsegError, match="no Kaggle submission format"):
            competition.test_set(sample.data_dir, None, scratch=ExitStack(), skipped=None)
        return
    if competition.kernel is not None:
        holdout = 1
        staged = competition.stage_test(sample.data_dir, tmp_path / "staged", holdout, tmp_path)
        data_dir, truth, score_images = tmp_path / "staged", staged.truth_csv, staged.test_images
    else:
        data_dir, truth, score_images = sample.test_data_dir, sample.truth, sample.score_images
    out = tmp_path / f"submission{competition.submission_suffix}"
    with ExitStack() as scratch:
        test = competition.test_set(data_dir, None, scratch=scratch, skipped=None)
        assert len(test.table) > 0
        stream = _truth_stream(competition, table, test.table, truth)
        settings = default_postprocess(list(competition.classes))
        rows, images = competition.write_submission(stream, test, settings, out, None)
    assert images == len(test.table) and rows >= images
    scored = competition.score_submission(truth, out, score_images)
    if competition.scoring == "instances":
        assert 0.5 < scored["score"] <= 1.0
    else:
        assert scored["score"] == pytest.approx(1.0)
