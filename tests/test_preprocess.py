"""data.preprocess: N4 restores a biased LGG slice, zscore / clahe, configs resolved and
checked, stores filled once with the stored steps, and the same model input in training and
prediction."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kaggle_seg.competitions import get_competition
from kaggle_seg.config import ExperimentConfig, build_data_config, load_experiment
from kaggle_seg.errors import KsegError
from kaggle_seg.preprocess import (
    SIMPLEITK_REQUIREMENT,
    clahe,
    extra_requirements,
    foreground_mask,
    n4_correct,
    resolve_steps,
    zscore,
)

pytest.importorskip("SimpleITK")

# A mid-volume slice with a large brain section.
LGG_SLICE = "TCGA_FG_5964_20010511/TCGA_FG_5964_20010511_20.tif"


@pytest.fixture(scope="module")
def lgg_slice(shared_data: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(shared_data / "lgg" / "kaggle_3m" / LGG_SLICE).astype(np.float32) / 255


def smooth_bias(height: int, width: int) -> np.ndarray:
    """A multiplicative field from x0.7 to x1.5 across the image, smooth as a coil's."""
    y, x = np.mgrid[0:height, 0:width] / np.float32(max(height, width))
    return np.exp(0.6 * (x - 0.5) + 0.4 * (y - 0.5)).astype(np.float32)


def test_n4_restores_a_biased_lgg_slice(lgg_slice: np.ndarray):
    bias = smooth_bias(*lgg_slice.shape[:2])
    biased = lgg_slice * bias[..., None]
    biased /= biased.max()
    corrected = n4_correct(biased)
    assert corrected.shape == biased.shape and corrected.dtype == np.float32
    assert corrected.min() >= 0 and corrected.max() <= biased.max() + 1e-6
    brain = foreground_mask(lgg_slice.mean(axis=-1), "otsu")
    for c in range(3):
        tissue = brain & (lgg_slice[..., c] > 0.05)

        def variation(image: np.ndarray, c: int = c) -> float:
            values = image[..., c][brain]
            return float(values.std() / values.mean())

        def residual_bias(image: np.ndarray, c: int = c, tissue: np.ndarray = tissue) -> float:
            return float(np.log(image[..., c][tissue] / lgg_slice[..., c][tissue]).std())

        # The bias adds intensity spread inside the brain; N4 takes most of it out again.
        assert variation(biased) > variation(lgg_slice) * 1.1
        assert variation(corrected) < variation(biased) * 0.9, c
        assert residual_bias(corrected) < residual_bias(biased) * 0.8, c


def test_n4_leaves_blank_channels_alone():
    image = np.zeros((64, 64, 2), np.float32)
    image[16:48, 16:48, 1] = 0.5
    out = n4_correct(image)
    assert np.array_equal(out[..., 0], image[..., 0])
    assert np.isfinite(out).all()


def test_zscore_standardises_each_channel_over_its_foreground():
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64, 2), np.float32)
    image[8:56, 8:56, 0] = rng.uniform(0.4, 0.8, (48, 48))
    image[..., 1] = 0.3  # constant
    out = zscore(image)
    inside = out[8:56, 8:56, 0]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-3
    assert out[0, 0, 0] < inside.min()  # the background is standardised too, with its stats
    assert np.all(out[..., 1] == 0)
    whole = zscore(image, foreground="all")[..., 0]
    assert abs(whole.mean()) < 1e-4 and abs(whole.std() - 1) < 1e-3


def test_clahe_keeps_range_and_sixteen_bit_levels():
    rng = np.random.default_rng(1)
    y = np.linspace(0, 1, 256, dtype=np.float32)
    image = (np.outer(y, y) * 0.3 + rng.normal(0, 0.01, (256, 256))).clip(0, 1)
    out = clahe(image.astype(np.float32))
    assert out.shape == (256, 256, 1) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert out.std() > image.std()  # contrast stretched
    assert len(np.unique(out)) > 256  # not quantised to 8 bits


def test_steps_are_resolved_and_checked():
    steps = resolve_steps(["n4", {"name": "zscore", "foreground": "nonzero"}])
    assert steps[0] == {
        "name": "n4",
        "shrink": 4,
        "iterations": [50, 50, 30, 20],
        "convergence_threshold": 0.001,
    }
    assert steps[1] == {"name": "zscore", "foreground": "nonzero"}
    for bad, said in [
        (["nope"], "unknown preprocessing step 'nope'"),
        ([{"name": "n4", "shrink": 0}], "shrink"),
        ([{"name": "clahe", "tile": 8}], "tile"),
        (["zscore", "n4"], "'n4' after 'zscore'"),
        (["clahe", "clahe"], "2 times"),
    ]:
        with pytest.raises(ValueError, match=said):
            resolve_steps(bad)


def test_config_errors_name_the_key(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text("data: {competition: lgg, preprocess: [n4, {name: zscore, foo: 1}]}\n")
    with pytest.raises(KsegError, match=r"data\.preprocess.*foo"):
        load_experiment(path)
    path.write_text(
        "data: {competition: lgg, preprocess: [zscore]}\naugment: {normalize: imagenet}\n"
    )
    with pytest.raises(KsegError, match="both standardise"):
        load_experiment(path)
    config = build_data_config("lgg", overrides=["data.preprocess=[n4, zscore]"])
    assert [s["name"] for s in config.preprocess] == ["n4", "zscore"]


def test_extra_requirements_match_the_n4_extra():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras["n4"] == [SIMPLEITK_REQUIREMENT]
    with_n4 = build_data_config("lgg", overrides=["data.preprocess=[n4, zscore]"])
    assert extra_requirements(with_n4) == [SIMPLEITK_REQUIREMENT]
    assert extra_requirements(build_data_config("lgg", overrides=["data.preprocess=[clahe]"])) == []
    assert extra_requirements(build_data_config("lgg")) == []


def test_n4_without_simpleitk_is_one_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    with pytest.raises(KsegError, match=r"kaggle-seg\[n4\]"):
        n4_correct(np.ones((32, 32, 1), np.float32))


@pytest.fixture(scope="module")
def lgg_rows(shared_data: Path) -> pd.DataFrame:
    """Four slices of one patient: two with a lesion, two without."""
    competition = get_competition("lgg")
    table = competition.read_table(shared_data / "lgg", build_data_config("lgg"))
    patient = table[table["group"] == table["group"].iloc[0]]
    return pd.concat([patient[~patient["empty"]].head(2), patient[patient["empty"]].head(2)])


def lgg_config(preprocess: list) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "data": {"competition": "lgg", "preprocess": preprocess},
            "augment": {"preset": "lgg", "height": 128, "width": 128},
            "model": {"architecture": "seed_unet", "params": {"base_channels": 4, "depth": 2}},
        }
    )


def test_store_runs_stored_steps_once(lgg_rows: pd.DataFrame, tmp_path: Path, monkeypatch):
    from kaggle_seg import preprocess
    from kaggle_seg.data.dataset import build_stores

    competition = get_competition("lgg")
    steps = lgg_config([{"name": "n4", "iterations": [20, 10]}, "zscore"]).data.preprocess
    calls = []
    real_n4 = preprocess.STEPS["n4"]
    monkeypatch.setitem(
        preprocess.STEPS,
        "n4",
        real_n4.__class__(
            real_n4.params,
            real_n4.stage,
            lambda image, **kw: calls.append(1) or real_n4.apply(image, **kw),
        ),
    )
    # cache "none" would run N4 on every read: the store is filled once instead.
    images, _ = build_stores(competition, lgg_rows, "none", folder=tmp_path, preprocess=steps)
    assert images.mode == "memmap" and len(calls) == len(lgg_rows)
    assert images.name.startswith("lgg-images-")
    row = lgg_rows.to_dict("records")[0]
    expected = n4_correct(competition.read_image(row), iterations=[20, 10])
    np.testing.assert_allclose(images.get(0), expected, atol=1e-4)  # zscore is not stored
    again, _ = build_stores(competition, lgg_rows, "memmap", folder=tmp_path, preprocess=steps)
    assert again.reused and len(calls) == len(lgg_rows)
    plain, _ = build_stores(competition, lgg_rows, "memmap", folder=tmp_path)
    assert plain.name == "lgg-images" and not plain.reused
    np.testing.assert_allclose(plain.get(0), competition.read_image(row), atol=1e-5)


def test_training_and_prediction_give_the_same_input(lgg_rows: pd.DataFrame):
    from kaggle_seg.data.dataset import SegmentationDataset, build_stores
    from kaggle_seg.data.input_steps import with_input_steps
    from kaggle_seg.data.transforms import build_transforms
    from kaggle_seg.predict import PredictionDataset
    from kaggle_seg.spec import ModelSpec

    competition = get_competition("lgg")
    config = lgg_config([{"name": "n4", "iterations": [20, 10]}, "clahe", "zscore"])
    images, masks = build_stores(competition, lgg_rows, "memory", preprocess=config.data.preprocess)
    valid = SegmentationDataset(
        competition,
        lgg_rows,
        with_input_steps(build_transforms(config.augment, False), config.data.preprocess),
        image_store=images,
        mask_store=masks,
    )
    spec = ModelSpec.for_training(config, competition)
    assert [s["name"] for s in spec.preprocess_steps] == ["n4", "clahe", "zscore"]
    predicted = PredictionDataset(competition, lgg_rows, [spec])
    for i in range(len(lgg_rows)):
        trained = valid[i]["image"]
        given = predicted[i]["inputs"][0]
        assert trained.shape == given.shape == (3, 128, 128)
        assert float(given.min()) < -0.5 < 0.5 < float(given.max())  # standardised, not [0, 1]
        torch.testing.assert_close(trained, given, atol=2e-3, rtol=0)
    raw_spec = ModelSpec.for_training(lgg_config([]), competition)
    raw = PredictionDataset(competition, lgg_rows, [raw_spec])
    assert not torch.allclose(raw[0]["inputs"][0], predicted[0]["inputs"][0], atol=0.1)


@pytest.mark.slow
def test_trained_oof_equals_prediction_with_n4_and_zscore(shared_data: Path, tmp_path: Path):
    """Train (store filled with N4 once), OOF and `predict` see the same inputs: the fold's
    out-of-fold probabilities are what prediction from its best.pt gives."""
    from kaggle_seg.predict import load_ensemble, predict_probabilities
    from kaggle_seg.train import load_oof, train_fold

    competition = get_competition("lgg")
    table = competition.read_table(shared_data / "lgg", build_data_config("lgg"))
    patients = sorted(table["group"].unique())[:2]
    table = pd.concat([table[table["group"] == p].head(10) for p in patients], ignore_index=True)
    table.to_csv(tmp_path / "table.csv", index=False)
    folds = pd.DataFrame(
        {"id": table["id"], "fold": (table["group"] == patients[1]).astype(int),
         "group": table["group"]}
    )  # fmt: skip
    folds.to_csv(tmp_path / "folds.csv", index=False)
    config = ExperimentConfig.model_validate(
        {
            "name": "n4run",
            "data": {
                "competition": "lgg",
                "table": str(tmp_path / "table.csv"),
                "folds": str(tmp_path / "folds.csv"),
                "preprocess": [{"name": "n4", "iterations": [10, 5]}, "zscore"],
            },
            "augment": {"preset": "lgg", "height": 64, "width": 64},
            "model": {"architecture": "seed_unet", "params": {"base_channels": 4, "depth": 2}},
            # float32: OOF and prediction batch differently, and bf16 rounds them differently
            "train": {
                "epochs": 1,
                "batch_size": 4,
                "num_workers": 0,
                "cache": "memmap",
                "amp": "off",
            },
        }
    )
    train_fold(config, 0, run_root=tmp_path / "runs", device="cpu")
    run = tmp_path / "runs" / "n4run"
    assert list((run / "cache").glob("lgg-images-*.json"))  # the N4 store, on disk
    oof = load_oof(run / "fold_0" / "oof.npz")
    members = load_ensemble([run / "fold_0"])
    assert [s["name"] for s in members[0].spec.preprocess_steps] == ["n4", "zscore"]
    valid = table[folds["fold"] == 0].reset_index(drop=True)
    predicted = predict_probabilities(members, competition, valid, num_workers=0)
    for _, image_id, probabilities in predicted:
        np.testing.assert_allclose(probabilities, oof[image_id], atol=2e-3)


def test_grey_dark_maps_brightfield_and_fluorescence_to_one_look():
    from kaggle_seg.preprocess import grey_dark

    rng = np.random.default_rng(0)
    nuclei = np.zeros((64, 64), bool)
    nuclei[20:30, 20:30] = True
    fluorescence = np.where(nuclei, 0.8, 0.05)[..., None] * np.ones(3, np.float32)
    brightfield = np.where(nuclei[..., None], [0.4, 0.2, 0.5], [0.95, 0.9, 0.92])
    for image in (fluorescence, brightfield):
        image = (image + rng.normal(0, 0.01, image.shape)).astype(np.float32)
        out = grey_dark(image)
        assert out.shape == image.shape and np.allclose(out[..., 0], out[..., 2])
        assert out[nuclei, 0].mean() > out[~nuclei, 0].mean() + 0.3  # nuclei bright, ground dark
        assert out[~nuclei, 0].mean() < 0.15


def test_grey_dark_stretch_gives_a_dim_slide_the_contrast_of_a_bright_one():
    from kaggle_seg.preprocess import grey_dark, resolve_steps

    nuclei = np.zeros((64, 64), bool)
    nuclei[20:30, 20:30] = True
    dim = (np.where(nuclei, 0.12, 0.02)[..., None] * np.ones(3)).astype(np.float32)
    bright = (np.where(nuclei, 0.9, 0.05)[..., None] * np.ones(3)).astype(np.float32)
    plain = grey_dark(dim)
    assert plain[nuclei, 0].mean() - plain[~nuclei, 0].mean() < 0.15
    for image in (dim, bright):
        out = grey_dark(image, stretch=(1.0, 99.9))
        assert out[nuclei, 0].mean() > 0.95 and out[~nuclei, 0].mean() < 0.05
    flat = np.full((8, 8, 3), 0.3, np.float32)
    assert np.allclose(grey_dark(flat, stretch=(1.0, 99.9)), flat)
    with pytest.raises(ValueError, match="stretch"):
        resolve_steps([{"name": "grey_dark", "stretch": [99, 1]}])


def test_grey_dark_gamma_lifts_a_dim_nucleus_toward_a_bright_one_in_order():
    from kaggle_seg.preprocess import grey_dark, resolve_steps

    image = np.zeros((32, 32, 3), np.float32)
    image[4:12, 4:12] = 1.0  # a bright nucleus
    image[20:28, 20:28] = 0.2  # a dim one beside it
    image[20:28, 27] = 0.1  # a dip at its edge
    plain = grey_dark(image, stretch=(0.0, 100.0))
    lifted = grey_dark(image, stretch=(0.0, 100.0), gamma=0.5)
    assert lifted[24, 24, 0] > plain[24, 24, 0] + 0.2  # the dim nucleus is brighter
    assert lifted[8, 8, 0] == pytest.approx(1.0) and lifted[0, 0, 0] == 0.0
    assert lifted[24, 27, 0] < lifted[24, 24, 0]  # the dip stays a dip
    with pytest.raises(ValueError, match="gamma"):
        resolve_steps([{"name": "grey_dark", "gamma": 0}])
