"""`kseg prepare` checks what it indexes (--check full|headers|none), on real DSB and LGG files
damaged the ways downloads are: every error one line naming the file and the CSV line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_seg.competitions import get_competition
from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.prepare import folds_for_table, prepare_table, read_table

NON_SQUARE_DSB = "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e"


@pytest.fixture
def dsb_dir(shared_data: Path, tmp_path: Path) -> Path:
    """Three real training images in Kaggle's layout, copied so they can be damaged."""
    source = shared_data / "dsb2018" / "stage1_train"
    ids = [*sorted(p.name for p in source.iterdir())[:2], NON_SQUARE_DSB]
    for image_id in ids:
        shutil.copytree(source / image_id, tmp_path / "dsb" / "stage1_train" / image_id)
    return tmp_path / "dsb"


def first_image(dsb_dir: Path) -> Path:
    folder = sorted((dsb_dir / "stage1_train").iterdir())[0]
    return folder / "images" / f"{folder.name}.png"


def prepare(competition: str, data_dir: Path, check: str | None = None) -> dict:
    return prepare_table(competition, data_dir, data_dir.parent / "table.csv", check=check)


def test_real_data_passes_the_full_check(dsb_dir: Path, shared_data: Path, tmp_path: Path):
    assert prepare("dsb2018", dsb_dir)["images"] == 3
    lgg = prepare_table("lgg", shared_data / "lgg", tmp_path / "lgg.csv", check="full")
    assert lgg["images"] == 205


def test_truncated_image_is_found_by_the_full_check_only(dsb_dir: Path):
    image = first_image(dsb_dir)
    image.write_bytes(image.read_bytes()[:300])  # header intact, pixels cut off
    with pytest.raises(InputError, match=rf"{image}: cannot decode image"):
        prepare("dsb2018", dsb_dir)  # the default is full
    prepare("dsb2018", dsb_dir, "headers")  # a header check cannot see it: documented


def test_corrupt_nucleus_mask_is_named(dsb_dir: Path):
    mask = sorted((first_image(dsb_dir).parents[1] / "masks").glob("*.png"))[0]
    mask.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for check in ("headers", "full"):
        with pytest.raises(InputError, match=rf"{mask}: cannot read image header"):
            prepare("dsb2018", dsb_dir, check)
    prepare("dsb2018", dsb_dir, "none")


def test_nucleus_mask_of_another_size_names_both_sizes_the_right_way_round(dsb_dir: Path):
    import cv2

    folder = dsb_dir / "stage1_train" / NON_SQUARE_DSB
    cv2.imwrite(str(folder / "masks" / "small.png"), np.full((64, 48), 255, np.uint8))
    with pytest.raises(InputError, match=r"small\.png: mask is 48x64 but image .* is 320x256"):
        prepare("dsb2018", dsb_dir, "headers")


def test_malformed_label_rle_names_the_csv_line_in_prepare_and_training(
    shared_data: Path, tmp_path: Path
):
    source = shared_data / "dsb2018"
    ids = sorted(p.name for p in (source / "stage1_train").iterdir())[:3]
    data = tmp_path / "dsb"
    for image_id in ids:  # images only: the nuclei come from the labels CSV
        shutil.copytree(source / "stage1_train" / image_id / "images",
                        data / "stage1_train" / image_id / "images")  # fmt: skip
    labels = pd.read_csv(source / "stage1_train_labels.csv", dtype=str)
    labels = labels[labels["ImageId"].isin(ids)].reset_index(drop=True)
    labels.loc[4, "EncodedPixels"] = "10 5 12 3"  # overlapping runs
    labels.to_csv(data / "stage1_train_labels.csv", index=False)
    csv = data / "stage1_train_labels.csv"
    with pytest.raises(InputError, match=rf"{csv}: line 6 \(ImageId {labels.loc[4, 'ImageId']}"):
        prepare("dsb2018", data)
    # Prepared without checks, the same RLE names its line when training reads it.
    prepare("dsb2018", data, "none")
    table = read_table(tmp_path / "table.csv")
    row = table[table["id"] == labels.loc[4, "ImageId"]].iloc[0]
    with pytest.raises(InputError, match=rf"{csv} line 6 \(ImageId"):
        get_competition("dsb2018").read_instances(row)


def test_processed_layout_with_two_files_of_one_name_is_refused(shared_data: Path, tmp_path: Path):
    import cv2

    image = cv2.imread(str(shared_data / "dsb2018" / "stage1_train" / NON_SQUARE_DSB / "images"
                           / f"{NON_SQUARE_DSB}.png"))  # fmt: skip
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    cv2.imwrite(str(tmp_path / "images" / "img0.png"), image)
    cv2.imwrite(str(tmp_path / "images" / "img0.jpg"), image)
    cv2.imwrite(str(tmp_path / "masks" / "img0.png"), np.zeros(image.shape[:2], np.uint8))
    with pytest.raises(InputError, match=r"img0\.(png|jpg): same name as img0\.(png|jpg)"):
        prepare_table("dsb2018", tmp_path, tmp_path / "table.csv")
    assert not (tmp_path / "table.csv").exists()


def test_processed_layout_mask_of_another_size_is_reported_the_right_way_round(
    shared_data: Path, tmp_path: Path
):
    import cv2

    source = shared_data / "dsb2018" / "stage1_train" / NON_SQUARE_DSB / "images"
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    shutil.copy(source / f"{NON_SQUARE_DSB}.png", tmp_path / "images" / "a.png")
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(InputError, match=r"masks/a\.png: mask is 64x64 but image .*a\.png is "
                       r"320x256"):  # fmt: skip
        prepare_table("dsb2018", tmp_path, tmp_path / "table.csv")


def test_lgg_truncated_mask_and_empty_patient_folder_are_named(shared_data: Path, tmp_path: Path):
    folder = shared_data / "lgg" / "kaggle_3m" / "TCGA_CS_4942_19970222"
    copy = tmp_path / "kaggle_3m" / folder.name
    shutil.copytree(folder, copy)
    mask = copy / f"{folder.name}_7_mask.tif"
    mask.write_bytes(mask.read_bytes()[:200])
    with pytest.raises(InputError, match=rf"{mask}: "):
        prepare_table("lgg", tmp_path, tmp_path / "table.csv", check="none")
    shutil.copy(folder / mask.name, mask)
    (tmp_path / "kaggle_3m" / "TCGA_XX_0000_20000101").mkdir()
    with pytest.raises(InputError, match=r"TCGA_XX_0000_20000101: no slices"):
        prepare_table("lgg", tmp_path, tmp_path / "table.csv", check="none")


def test_uwmgi_train_csv_with_only_a_header_writes_no_table(phantom_dir: Path, tmp_path: Path):
    copy = tmp_path / "uwmgi"
    shutil.copytree(phantom_dir, copy)
    (copy / "train.csv").write_text("id,class,segmentation\n")
    with pytest.raises(InputError, match=r"no images found for uwmgi"):
        prepare_table("uwmgi", copy, tmp_path / "table.csv")
    assert not (tmp_path / "table.csv").exists()


def test_table_with_a_duplicate_id_or_a_bad_number_names_the_line(dsb_dir: Path, tmp_path: Path):
    prepare("dsb2018", dsb_dir)
    table_path = dsb_dir.parent / "table.csv"
    table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
    duplicated = pd.concat([table, table.iloc[[1]]], ignore_index=True)
    duplicated.to_csv(table_path, index=False)
    with pytest.raises(InputError, match=rf"{table_path}: line 5: second row for id"):
        folds_for_table("dsb2018", table_path, tmp_path / "folds.csv", 2, 0, False)
    assert not (tmp_path / "folds.csv").exists()
    table.loc[2, "height"] = "abc"
    table.to_csv(table_path, index=False)
    with pytest.raises(InputError, match=rf"{table_path}: line 4: height 'abc' is not a positive"):
        read_table(table_path)
    table.iloc[:0].to_csv(table_path, index=False)
    with pytest.raises(InputError, match=r"the table has no rows"):
        read_table(table_path)


@pytest.mark.slow
def test_cli_check_option(dsb_dir: Path):
    out = dsb_dir.parent / "cli.csv"
    args = [sys.executable, "-m", "kaggle_seg", "prepare", "-c", "dsb2018", "--data-dir",
            str(dsb_dir), "--out", str(out)]  # fmt: skip
    bad = subprocess.run([*args, "--check", "most"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--check 'most': choose one of full, headers, none" in bad.stderr
    image = first_image(dsb_dir)
    image.write_bytes(image.read_bytes()[:300])
    failed = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1 and str(image) in failed.stderr
    assert not out.exists()
    done = subprocess.run([*args, "--check", "headers"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and "3 images" in done.stdout


def test_unknown_check_level_is_refused(dsb_dir: Path):
    with pytest.raises(KsegError, match=r"--check 'deep'"):
        prepare("dsb2018", dsb_dir, "deep")
    assert not (dsb_dir.parent / "table.csv").exists()


def test_lgg_truncated_tiffs_are_one_line_naming_file_and_cause(shared_data: Path, tmp_path: Path):
    # The LGG TIFFs keep their header at the end: a cut file loses it, and tifffile says why only
    # in a log warning, which reached stderr as a second line beside kseg's error.
    folder = shared_data / "lgg" / "kaggle_3m" / "TCGA_CS_4942_19970222"
    copy = tmp_path / "kaggle_3m" / folder.name
    shutil.copytree(folder, copy)
    args = [sys.executable, "-m", "kaggle_seg", "prepare", "-c", "lgg", "--data-dir",
            str(tmp_path), "--out", str(tmp_path / "table.csv")]  # fmt: skip
    for name, says in ((f"{folder.name}_7.tif", "cannot read TIFF header ("),
                       (f"{folder.name}_7_mask.tif", "cannot decode TIFF (")):  # fmt: skip
        damaged = copy / name
        damaged.write_bytes((folder / name).read_bytes()[:30000])
        failed = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert failed.returncode == 1
        assert failed.stderr.startswith(f"error: {damaged}: {says}")
        assert failed.stderr.count("\n") == 1, failed.stderr
        shutil.copy(folder / name, damaged)
