"""The folder competition: images/ + masks/ set up by data.options, on real data exported to
that layout (LGG, DSB), through prepare, folds, train, tune, submit, score and show."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from folder_export import export

from kaggle_seg.competitions import get_competition
from kaggle_seg.config import DataConfig
from kaggle_seg.errors import InputError, KsegError

LGG_PATIENT = "^(TCGA_[A-Z0-9]+_[A-Z0-9]+)_"


def test_options_name_the_classes_and_refuse_the_rest() -> None:
    folder = get_competition("folder")
    with pytest.raises(KsegError, match="name the mask classes"):
        folder.configure({})
    with pytest.raises(KsegError, match="'rle_order'"):
        folder.configure({"classes": ["polyp"], "rle_order": "X"})
    with pytest.raises(KsegError, match="group_pattern"):
        folder.configure({"classes": ["polyp"], "group_pattern": "no group"})
    with pytest.raises(KsegError, match=r"data\.options\.classes"):
        folder.read_table(Path("."), DataConfig(competition="folder"))
    polyps = folder.configure({"classes": ["polyp"], "rle_order": "F"})
    assert polyps.classes == ("polyp",) and polyps.rle_order == "F"
    assert get_competition("folder").classes == ()  # the plug-in itself stays unconfigured


def _write(path: Path, array: np.ndarray, suffix: str = ".png") -> Path:
    path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def test_binary_jpeg_and_multiclass_masks(tmp_path: Path) -> None:
    image = np.full((32, 40, 3), 90, np.uint8)
    _write(tmp_path / "binary/images/a", image, ".jpg")
    mask = np.zeros((32, 40), np.uint8)
    mask[8:20, 10:30] = 255
    _write(tmp_path / "binary/masks/a", mask, ".jpg")  # JPEG: values near 0 and 255
    polyps = get_competition("folder").configure({"classes": ["polyp"]})
    table = polyps.read_table(tmp_path / "binary", DataConfig(competition="folder"))
    read = polyps.read_mask(table.iloc[0])
    assert read.shape == (32, 40, 1) and abs(int(read.sum()) - 12 * 20) <= 12

    labels = np.zeros((32, 40), np.uint8)
    labels[2:10, 2:10], labels[20:30, 20:35] = 1, 2
    _write(tmp_path / "multi/images/b", image)
    _write(tmp_path / "multi/masks/b", labels)
    organs = get_competition("folder").configure({"classes": ["liver", "kidney"]})
    table = organs.read_table(tmp_path / "multi", DataConfig(competition="folder"))
    masks = organs.read_mask(table.iloc[0])
    assert masks[..., 0].sum() == 64 and masks[..., 1].sum() == 150
    assert table.loc[0, "labels"] == "11" and not table.loc[0, "empty"]
    labels[0, 0] = 7
    _write(tmp_path / "multi/masks/b", labels)
    with pytest.raises(InputError, match=r"b\.png: mask value 7 is no class"):
        organs.read_mask(table.iloc[0])
    _write(tmp_path / "multi/images/c", image)
    with pytest.raises(InputError, match=r"c\.png: no mask of that name"):
        organs.read_table(tmp_path / "multi", DataConfig(competition="folder"))


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("zero_one", lambda m: m.astype(np.uint8)),
        ("zero_255", lambda m: m.astype(np.uint8) * 255),
        ("value_100", lambda m: m.astype(np.uint8) * 100),
        ("uint16_255", lambda m: m.astype(np.uint16) * 255),
        ("uint16_full", lambda m: m.astype(np.uint16) * 65535),
        # cv2 writes BGR: (0, 255, 0) is green, (0, 0, 255) red, as a user's colour mask.
        ("green", lambda m: np.stack([m * 0, m * 255, m * 0], -1).astype(np.uint8)),
        ("red", lambda m: np.stack([m * 0, m * 0, m * 255], -1).astype(np.uint8)),
        ("white_rgba", lambda m: np.repeat(m[..., None] * 255, 4, -1).astype(np.uint8)),
    ],
)
def test_one_class_masks_in_every_common_storage_read_alike(name: str, stored, tmp_path: Path):
    """However a user's tool stored a one-class mask, the same pixels are foreground: a
    mask misread as empty would train on nothing and tune to a perfect CV."""
    truth = np.zeros((24, 30), bool)
    truth[5:15, 8:22] = True
    _write(tmp_path / "images/a", np.full((24, 30, 3), 80, np.uint8))
    _write(tmp_path / "masks/a", stored(truth))
    _write(tmp_path / "images/b", np.full((24, 30, 3), 80, np.uint8))
    _write(tmp_path / "masks/b", stored(np.zeros_like(truth)))
    polyps = get_competition("folder").configure({"classes": ["polyp"]})
    table = polyps.read_table(tmp_path, DataConfig(competition="folder"))
    assert (polyps.read_mask(table.iloc[0])[..., 0] == truth).all(), name
    assert table["empty"].tolist() == [False, True]


def test_every_mask_empty_or_a_colour_mask_of_several_classes_is_refused(tmp_path: Path):
    image = np.full((16, 16, 3), 80, np.uint8)
    _write(tmp_path / "empty/images/a", image)
    _write(tmp_path / "empty/masks/a", np.zeros((16, 16), np.uint8))
    polyps = get_competition("folder").configure({"classes": ["polyp"]})
    with pytest.raises(InputError, match=r"empty/masks: every one of the 1 masks is empty"):
        polyps.read_table(tmp_path / "empty", DataConfig(competition="folder"))

    colour = np.zeros((16, 16, 3), np.uint8)
    colour[2:6, 2:6] = (0, 255, 0)
    colour[9:12, 9:12] = (0, 0, 255)
    _write(tmp_path / "colour/images/c", image)
    _write(tmp_path / "colour/masks/c", colour)
    organs = get_competition("folder").configure({"classes": ["liver", "kidney"]})
    with pytest.raises(InputError, match=r"c\.png: a colour mask"):
        organs.read_table(tmp_path / "colour", DataConfig(competition="folder"))


def test_score_reads_submitted_mask_pngs_as_0_1_or_0_255(tmp_path: Path) -> None:
    truth = np.zeros((12, 14), np.uint8)
    truth[3:9, 4:10] = 1
    _write(tmp_path / "images/x", np.zeros((12, 14, 3), np.uint8))
    _write(tmp_path / "masks/x", truth * 255)
    polyps = get_competition("folder").configure({"classes": ["polyp"]})
    for name, stored in (("zero_one", truth), ("zero_255", truth * 255)):
        _write(tmp_path / name / "x", stored)
        assert polyps.score_submission(tmp_path / "masks", tmp_path / name, None)["score"] == 1.0
    _write(tmp_path / "shifted/x", np.roll(truth, 3, axis=1) * 255)
    assert polyps.score_submission(tmp_path / "masks", tmp_path / "shifted", None)["score"] < 1


def test_rle_submission_round_trip_in_either_order(tmp_path: Path) -> None:
    """The truth written as an RLE CSV, in the chosen order, scores 1; a mask of another class
    scores less."""
    from kaggle_seg.data.rle import encode_rle

    image = np.zeros((6, 9, 3), np.uint8)
    labels = np.zeros((6, 9), np.uint8)
    labels[1:4, 2:8] = 2
    _write(tmp_path / "images/x", image)
    truth = _write(tmp_path / "masks/x", labels)
    for order in ("C", "F"):
        organs = get_competition("folder").configure(
            {"classes": ["liver", "kidney"], "rle_order": order}
        )
        rle = encode_rle(labels == 2, order)
        frame = pd.DataFrame({"id": ["x", "x"], "class": ["liver", "kidney"], "rle": ["", rle]})
        csv = tmp_path / f"sub_{order}.csv"
        frame.to_csv(csv, index=False)
        assert organs.score_submission(truth.parent, csv, None)["score"] == 1.0
    swapped = frame.assign(rle=[rle, ""])
    swapped.to_csv(csv, index=False)
    result = organs.score_submission(truth.parent, csv, None)
    assert result["score"] == 0.0 and result["per_class"]["kidney"]["dice"] == 0.0


@pytest.mark.slow
def test_folder_end_to_end_on_exported_lgg(shared_data: Path, tmp_path: Path) -> None:
    """LGG exported to images/ + masks/: prepare (grouped by patient), folds, train a small seed
    U-Net, tune, submit as RLE and as PNGs, score both, and show the worst images."""
    from kaggle_seg.config import load_experiment
    from kaggle_seg.prepare import folds_for_table, prepare_table
    from kaggle_seg.scoring import score_submission
    from kaggle_seg.show import show_experiment
    from kaggle_seg.submit import write_submission
    from kaggle_seg.train import train_fold
    from kaggle_seg.tune import tune_experiment

    data_dir, truth = export("lgg", shared_data / "lgg", tmp_path / "lgg_folder", n_test=12)
    options = {"classes": ["abnormality"], "group_pattern": LGG_PATIENT, "rle_order": "F"}
    config_path = tmp_path / "folder_lgg.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "name": "folder_lgg",
                "data": {
                    "competition": "folder",
                    "options": options,
                    "table": str(tmp_path / "table.csv"),
                    "folds": str(tmp_path / "folds.csv"),
                    "n_folds": 3,
                },
                "augment": {"preset": "light", "height": 64, "width": 64},
                "model": {"architecture": "seed_unet", "params": {"base_channels": 4, "depth": 3}},
                "train": {"epochs": 2, "batch_size": 8, "num_workers": 0, "oof_dtype": "uint8"},
            }
        )
    )
    summary = prepare_table("folder", data_dir, tmp_path / "table.csv", config_path)
    table = pd.read_csv(tmp_path / "table.csv")
    assert summary["images"] == len(table) > 50
    assert table["group"].str.fullmatch(r"TCGA_[A-Z0-9]+_[A-Z0-9]+").all()
    assert table["group"].nunique() > 1
    folds, _ = folds_for_table(
        "folder", tmp_path / "table.csv", tmp_path / "folds.csv", 3, 0, force=True
    )
    by_group = table.merge(folds[["id", "fold"]], on="id")
    assert (by_group.groupby("group")["fold"].nunique() == 1).all()  # patients stay whole

    config = load_experiment(config_path)
    result = train_fold(config, 0, run_root=tmp_path / "runs", device="cpu")
    experiment = tmp_path / "runs" / "folder_lgg"
    assert 0.0 <= result.best_value <= 1.0
    tuned = tune_experiment(experiment)
    assert tuned.after["score"] >= tuned.before["score"]
    empty = by_group[by_group["fold"] == 0]["empty"].mean()
    assert tuned.empty_prediction_score == pytest.approx(empty)  # the floor tune prints

    csv = write_submission(
        [experiment], data_dir, tmp_path / "sub.csv", tta="none", device="cpu", num_workers=0
    )
    assert csv.images == 12 and csv.rows == 12
    rle_score = score_submission("folder", truth, csv.path, options=options)
    assert 0.0 <= rle_score["score"] <= 1.0 and rle_score["n_images"] == 12

    # The PNG format, chosen at submission (`kseg submit --format png`), scores as the CSV
    # does (same post-processing, same masks).
    written = tmp_path / "pngs"
    pngs = write_submission(
        [experiment], data_dir, written, tta="none", device="cpu", num_workers=0,
        submission_format="png",
    )  # fmt: skip
    assert pngs.path == written
    assert len(list(written.glob("*.png"))) == 12
    png_score = score_submission("folder", truth, written, options={**options, "submission": "png"})
    assert png_score["score"] == pytest.approx(rle_score["score"])
    # Two torchrun processes write their shares of the PNGs into the one folder.
    from test_submit import _torchrun_submit

    shared = tmp_path / "pngs_shared"
    run = _torchrun_submit("--checkpoints", str(experiment), "--data-dir", str(data_dir),
                           "--out", str(shared), "--format", "png", "--tta", "none")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {shared}: 12 rows for 12 images" in run.stdout
    assert {p.name: p.read_bytes() for p in shared.iterdir()} == {
        p.name: p.read_bytes() for p in written.iterdir()
    }

    pictures = show_experiment(experiment, tmp_path / "show", worst=2)
    assert len(pictures) == 4 and all(p.stat().st_size > 0 for p in pictures)


def test_submit_without_a_test_folder_refuses_to_predict_the_training_images(tmp_path: Path):
    from contextlib import ExitStack

    polyps = get_competition("folder").configure({"classes": ["polyp"]})
    _write(tmp_path / "data/images/a", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "data/masks/a", np.full((8, 8), 255, np.uint8))
    with ExitStack() as scratch, pytest.raises(InputError, match=r"data/test: not found"):
        polyps.test_set(tmp_path / "data", None, scratch=scratch, skipped=None)
    _write(tmp_path / "data/test/t", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "loose/u", np.zeros((8, 8, 3), np.uint8))  # a plain folder of test images
    with ExitStack() as scratch:
        assert polyps.test_set(tmp_path / "data", None, scratch=scratch, skipped=None).table[
            "id"
        ].tolist() == ["t"]
        loose = polyps.test_set(tmp_path / "loose", None, scratch=scratch, skipped=None)
        assert loose.table["id"].tolist() == ["u"]


def test_prepare_notes_masks_without_an_image(tmp_path: Path) -> None:
    from kaggle_seg.prepare import prepare_table

    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    _write(tmp_path / "data/images/a", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / "data/masks/a", mask)
    _write(tmp_path / "data/masks/a_copy", mask)  # renamed image, mask left behind
    config = tmp_path / "exp.yaml"
    config.write_text(
        yaml.safe_dump({"data": {"competition": "folder", "options": {"classes": ["polyp"]}}})
    )
    summary = prepare_table("folder", tmp_path / "data", tmp_path / "t.csv", config)
    assert summary["images"] == 1
    masks = tmp_path / "data" / "masks"
    assert summary["notes"] == [
        f"1 mask(s) in {masks} without an image of that name, left out: a_copy.png"
    ]


def test_score_by_group_pools_each_groups_pixels(tmp_path: Path) -> None:
    """`score_by: group` scores as LGG scores patients: each group's Dice over its pooled
    pixels, so a group's empty slices predicted empty do not count as perfect images."""
    with pytest.raises(KsegError, match="score_by: group needs a group_pattern"):
        get_competition("folder").configure({"classes": ["lesion"], "score_by": "group"})
    options = {"classes": ["lesion"], "group_pattern": "^(p[0-9])_", "score_by": "group"}
    lesions = get_competition("folder").configure(options)
    assert lesions.scoring == "groups"
    assert get_competition("folder").configure({"classes": ["lesion"]}).scoring == "images"

    lesion = np.zeros((10, 10), np.uint8)
    lesion[2:6, 2:6] = 255
    empty = np.zeros_like(lesion)
    for name, truth, predicted in [
        ("p1_a", lesion, lesion),  # p1: found exactly
        ("p1_b", empty, empty),
        ("p2_a", lesion, empty),  # p2: its lesion missed, two empty slices right
        ("p2_b", empty, empty),
        ("p2_c", empty, empty),
    ]:
        _write(tmp_path / "masks" / name, truth)
        _write(tmp_path / "pred" / name, predicted)
    result = lesions.score_submission(tmp_path / "masks", tmp_path / "pred", None)
    assert result["dice"] == pytest.approx(4 / 5)  # per image, empty pairs count 1
    assert result["group_dice"] == result["score"] == pytest.approx((1 + 0) / 2)
    assert result["per_group"]["group"].tolist() == ["p1", "p2"]


def test_submission_format_is_chosen_at_submission_for_the_folder_only() -> None:
    polyps = get_competition("folder").configure({"classes": ["polyp"], "rle_order": "F"})
    pngs = polyps.with_submission_format("png")
    assert pngs.submission_suffix == "" and pngs.rle_order == "F"
    assert polyps.submission_suffix == ".csv"  # the original is left as it was
    with pytest.raises(KsegError, match=r"--format 'jpg': choose one of rle, png"):
        polyps.with_submission_format("jpg")
    with pytest.raises(KsegError, match=r"--format: dsb2018 has one submission format"):
        get_competition("dsb2018").with_submission_format("png")
