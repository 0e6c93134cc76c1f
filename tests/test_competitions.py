"""Readers of the three competitions' raw layouts, on the phantom and on the real data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_seg.competitions import COMPETITIONS, get_competition
from kaggle_seg.competitions.uwmgi_files import (
    RLE_COLUMNS,
    parse_slice_filename,
    scan_slices,
)
from kaggle_seg.config import build_data_config
from kaggle_seg.data.rle import decode_rle
from kaggle_seg.data.stacks import stack_positions
from kaggle_seg.errors import InputError


def test_unknown_competition_lists_the_valid_names():
    with pytest.raises(KeyError, match="uwmgi, dsb2018, lgg"):
        get_competition("kvasir")


def test_every_competition_has_the_protocol():
    for competition in COMPETITIONS.values():
        for attribute in ("name", "classes", "rle_order", "read_table", "read_image", "read_mask"):
            assert hasattr(competition, attribute)


# ---- uwmgi ------------------------------------------------------------------------------------


def test_slice_file_name_gives_width_then_height():
    info = parse_slice_filename("slice_0065_360_310_1.50_1.63.png")
    assert info == {
        "slice_index": 65,
        "width": 360,
        "height": 310,
        "spacing_w": 1.5,
        "spacing_h": 1.63,
    }
    with pytest.raises(InputError, match=r"slice_0065\.png"):
        parse_slice_filename("slice_0065.png")


def test_uwmgi_table_excludes_the_configured_case_days(phantom_dir: Path):
    uwmgi = get_competition("uwmgi")
    table = uwmgi.read_table(phantom_dir, build_data_config("uwmgi"))
    assert "case7_day0" not in set(table["case_day"])
    assert len(table) == 6 * 12
    everything = uwmgi.read_table(
        phantom_dir, build_data_config("uwmgi", overrides=["data.exclude_case_days=[]"])
    )
    assert len(everything) == 7 * 12
    # Sorted by case-day then slice number, one row per slice id.
    assert table["id"].is_unique
    assert (table.groupby("case_day")["slice_index"].diff().dropna() == 1).all()


def test_uwmgi_reads_non_square_slices_and_their_masks(phantom_dir: Path):
    uwmgi = get_competition("uwmgi")
    table = uwmgi.read_table(phantom_dir, build_data_config("uwmgi"))
    row = table[table["case_id"] == "case12"].iloc[6]
    assert (row["width"], row["height"]) == (360, 310)
    image = uwmgi.read_image(row)
    assert image.shape == (310, 360, 1) and image.dtype == np.float32
    assert image.max() == pytest.approx(1.0) and image.min() >= 0.0
    mask = uwmgi.read_mask(row)
    assert mask.shape == (310, 360, 3) and mask.dtype == np.uint8
    for k, column in enumerate(RLE_COLUMNS):
        assert np.array_equal(mask[..., k], decode_rle(row[column], (310, 360), "C"))
    # Organs are brighter than the body in the phantom: the mask sits on the image.
    organ = mask.any(axis=-1)
    assert image[organ, 0].mean() > image[~organ & (image[..., 0] > 0.1), 0].mean()


def test_phantom_body_keeps_its_size_in_pixels_across_scan_sizes():
    # Real scans share 1.5 mm pixels: a larger scan shows more background, not a larger body.
    # A phantom that stretched its body to fill every scan would reward resizing over padding.
    from kaggle_seg.competitions.uwmgi_phantom import SCAN_SIZES, phantom_volume

    extents = set()
    for width, height in SCAN_SIZES:
        image, masks = phantom_volume(4, height, width, np.random.default_rng(0))
        rows, cols = np.nonzero(image[2] > 4000)
        extents.add((rows.max() - rows.min(), cols.max() - cols.min()))
        assert rows.min() > 0 and cols.min() > 0 and rows.max() < height - 1
        assert masks.shape == (4, height, width, 3)
    assert len(extents) == 1


def test_stack_positions_clamp_within_each_case_day():
    table = pd.DataFrame({"case_day": ["a"] * 4 + ["b"] * 3})
    positions = stack_positions(table, depth=3, stride=2, volume_key="case_day")
    expected = [[0, 0, 2], [0, 1, 3], [0, 2, 3], [1, 3, 3], [4, 4, 6], [4, 5, 6], [4, 6, 6]]
    assert positions.tolist() == expected
    assert stack_positions(
        table, depth=1, stride=1, volume_key="case_day"
    ).ravel().tolist() == list(range(7))


def test_uwmgi_image_stack_has_depth_channels(phantom_dir: Path):
    uwmgi = get_competition("uwmgi")
    table = uwmgi.read_table(phantom_dir, build_data_config("uwmgi"))
    positions = stack_positions(table, depth=5, stride=2, volume_key="case_day")
    stack = uwmgi.read_image_stack(table, positions[0])
    assert stack.shape == (int(table.loc[0, "height"]), int(table.loc[0, "width"]), 5)
    # Slice 0's stack repeats slice 0 where it is clamped at the start of the scan.
    assert np.array_equal(stack[..., 0], stack[..., 2])


def test_uwmgi_missing_image_names_the_slice(phantom_dir: Path, tmp_path: Path):
    copy = tmp_path / "uwmgi"
    shutil.copytree(phantom_dir, copy)
    victim = next((copy / "train" / "case45").glob("*/scans/slice_0003_*.png"))
    victim.unlink()
    with pytest.raises(InputError, match="case45_day0_slice_0003"):
        get_competition("uwmgi").read_table(copy, build_data_config("uwmgi"))


def test_uwmgi_corrupt_image_names_the_file(phantom_dir: Path, tmp_path: Path):
    uwmgi = get_competition("uwmgi")
    table = uwmgi.read_table(phantom_dir, build_data_config("uwmgi"))
    row = table.iloc[0].copy()
    broken = tmp_path / Path(row["image_path"]).name
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    row["image_path"] = str(broken)
    with pytest.raises(InputError, match=str(broken)):
        uwmgi.read_image(row)


def test_uwmgi_train_csv_without_a_column_is_named(phantom_dir: Path, tmp_path: Path):
    copy = tmp_path / "uwmgi"
    shutil.copytree(phantom_dir, copy)
    labels = pd.read_csv(copy / "train.csv").rename(columns={"segmentation": "rle"})
    labels.to_csv(copy / "train.csv", index=False)
    with pytest.raises(InputError, match=r"train.csv: missing column\(s\) segmentation"):
        get_competition("uwmgi").read_table(copy, build_data_config("uwmgi"))


def test_uwmgi_malformed_rle_names_slice_and_class(phantom_dir: Path, tmp_path: Path):
    copy = tmp_path / "uwmgi"
    shutil.copytree(phantom_dir, copy)
    labels = pd.read_csv(copy / "train.csv", keep_default_na=False)
    labels.loc[(labels["id"] == "case12_day0_slice_0002") & (labels["class"] == "stomach"),
               "segmentation"] = "5 10 8 3"  # fmt: skip
    labels.to_csv(copy / "train.csv", index=False)
    line = int(np.flatnonzero((labels["id"] == "case12_day0_slice_0002")
                              & (labels["class"] == "stomach"))[0]) + 2  # fmt: skip
    with pytest.raises(InputError, match=rf"train\.csv: line {line} \(case12_day0_slice_0002, "
                       r"stomach\): .*overlap"):  # fmt: skip
        get_competition("uwmgi").read_table(copy, build_data_config("uwmgi"))
    # case12 is the 360 x 310 scan: a run past its end gives its size as W x H, not "n_pixels".
    labels.loc[line - 2, "segmentation"] = "111600 2"
    labels.to_csv(copy / "train.csv", index=False)
    with pytest.raises(InputError, match=rf"line {line} .*111600 pixels \(360x310, W x H\)"):
        get_competition("uwmgi").read_table(copy, build_data_config("uwmgi"))


def test_uwmgi_slice_missing_a_class_row_is_named(phantom_dir: Path, tmp_path: Path):
    copy = tmp_path / "uwmgi"
    shutil.copytree(phantom_dir, copy)
    labels = pd.read_csv(copy / "train.csv", keep_default_na=False)
    labels.iloc[:-1].to_csv(copy / "train.csv", index=False)  # cut before the last stomach row
    last = labels["id"].iloc[-1]
    with pytest.raises(InputError, match=rf"line {len(labels) - 1}: {last} has rows for "
                       r"large_bowel, small_bowel only"):  # fmt: skip
        get_competition("uwmgi").read_table(copy, build_data_config("uwmgi"))


def test_uwmgi_scan_reads_sizes_without_decoding(phantom_dir: Path):
    slices = scan_slices(phantom_dir / "train")
    assert len(slices) == 7 * 12
    assert set(zip(slices["width"], slices["height"], strict=True)) >= {(266, 266), (360, 310)}


# ---- dsb2018 ----------------------------------------------------------------------------------

NON_SQUARE_DSB = "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e"


@pytest.fixture(scope="module")
def dsb_table(shared_data: Path) -> pd.DataFrame:
    return get_competition("dsb2018").read_table(
        shared_data / "dsb2018", build_data_config("dsb2018")
    )


def test_dsb_table_has_every_training_image(dsb_table: pd.DataFrame):
    assert len(dsb_table) == 570
    assert dsb_table["id"].equals(dsb_table["group"])
    row = dsb_table.set_index("id").loc[NON_SQUARE_DSB]
    assert (row["width"], row["height"]) == (320, 256)
    assert not dsb_table["empty"].any()


def test_dsb_reads_rgb_and_instances(dsb_table: pd.DataFrame, shared_data: Path):
    dsb = get_competition("dsb2018")
    row = dsb_table.set_index("id").loc[NON_SQUARE_DSB].copy()
    row["id"] = NON_SQUARE_DSB
    image = dsb.read_image(row)
    assert image.shape == (256, 320, 3) and image.dtype == np.float32
    labels = dsb.read_instances(row)
    assert labels.shape == (256, 320)
    assert len(np.unique(labels)) - 1 == row["n_nuclei"]
    assert np.array_equal(dsb.read_mask(row)[..., 0], (labels > 0).astype(np.uint8))


def test_dsb_instances_from_the_labels_csv_match_the_pngs(shared_data: Path, tmp_path: Path):
    """A layout with images only plus stage1_train_labels.csv gives the same nuclei."""
    source = shared_data / "dsb2018"
    ids = sorted(p.name for p in (source / "stage1_train").iterdir())[:4]
    ids = list(dict.fromkeys([*ids, NON_SQUARE_DSB]))
    for image_id in ids:
        (tmp_path / "stage1_train" / image_id).mkdir(parents=True)
        (tmp_path / "stage1_train" / image_id / "images").symlink_to(
            source / "stage1_train" / image_id / "images"
        )
    shutil.copy(source / "stage1_train_labels.csv", tmp_path / "stage1_train_labels.csv")
    dsb = get_competition("dsb2018")
    from_csv = dsb.read_table(tmp_path, build_data_config("dsb2018")).set_index("id")
    from_png = dsb.read_table(source, build_data_config("dsb2018")).set_index("id")
    for image_id in ids:
        a = dsb.read_instances({**from_csv.loc[image_id].to_dict(), "id": image_id})
        b = dsb.read_instances({**from_png.loc[image_id].to_dict(), "id": image_id})
        assert np.array_equal(a > 0, b > 0)
        assert len(np.unique(a)) == len(np.unique(b))


def test_dsb_processed_layout(shared_data: Path, tmp_path: Path):
    import cv2

    source = shared_data / "dsb2018" / "stage1_train" / NON_SQUARE_DSB
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    shutil.copy(source / "images" / f"{NON_SQUARE_DSB}.png", tmp_path / "images" / "a.png")
    union = np.zeros((256, 320), np.uint8)
    for path in (source / "masks").glob("*.png"):
        union |= cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), union)
    dsb = get_competition("dsb2018")
    table = dsb.read_table(tmp_path, build_data_config("dsb2018"))
    assert table["id"].tolist() == ["a"]
    mask = dsb.read_mask(table.iloc[0])
    assert np.array_equal(mask[..., 0], (union > 127).astype(np.uint8))


def test_dsb_mask_of_another_size_is_reported(dsb_table: pd.DataFrame, tmp_path: Path):
    import cv2

    row = dsb_table.set_index("id").loc[NON_SQUARE_DSB].to_dict()
    masks = tmp_path / "masks"
    masks.mkdir()
    cv2.imwrite(str(masks / "wrong.png"), np.full((10, 10), 255, np.uint8))
    row["mask_dir"] = str(masks)
    with pytest.raises(InputError, match=r"wrong.png: mask is 10x10 but image .* is 320x256"):
        get_competition("dsb2018").read_instances(row)


# ---- lgg --------------------------------------------------------------------------------------


def test_lgg_table_groups_by_patient_and_sorts_slices_numerically(shared_data: Path):
    lgg = get_competition("lgg")
    table = lgg.read_table(shared_data / "lgg", build_data_config("lgg"))
    assert len(table) == 205 and table["group"].nunique() == 9
    assert int((~table["empty"]).sum()) == 73
    for _, series in table.groupby("series"):
        assert series["slice_index"].tolist() == list(range(1, len(series) + 1))
    row = table[~table["empty"]].iloc[0]
    image, mask = lgg.read_image(row), lgg.read_mask(row)
    assert image.shape == (256, 256, 3) and image.dtype == np.float32 and image.max() <= 1.0
    assert mask.shape == (256, 256, 1) and set(np.unique(mask)) == {0, 1}


def test_lgg_missing_mask_is_named(shared_data: Path, tmp_path: Path):
    folder = shared_data / "lgg" / "kaggle_3m" / "TCGA_CS_4942_19970222"
    copy = tmp_path / "kaggle_3m" / folder.name
    shutil.copytree(folder, copy)
    (copy / f"{folder.name}_7_mask.tif").unlink()
    with pytest.raises(InputError, match=f"{folder.name}_7.tif: no mask file"):
        get_competition("lgg").read_table(tmp_path, build_data_config("lgg"))
