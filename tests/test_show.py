"""`kseg show`: panels and overlays from a fake run folder (real DSB images, a uwmgi phantom)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_seg.competitions import get_competition
from kaggle_seg.config import DataConfig, ExperimentConfig, build_data_config, save_config
from kaggle_seg.errors import KsegError
from kaggle_seg.io import write_csv_atomic
from kaggle_seg.panels import DPI, PANEL_INCHES, write_panels
from kaggle_seg.prepare import prepare_table, read_table
from kaggle_seg.show import image_scores, select_ids, show_experiment
from kaggle_seg.train import save_oof


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} does not decode"
    return image


def panel_columns(path: Path) -> float:
    return read_rgb(path).shape[1] / (PANEL_INCHES * DPI)


def fake_experiment(
    root: Path, competition: str, table: Path, oof: dict[str, np.ndarray], targets: str = "mask"
) -> Path:
    data = DataConfig(competition=competition, table=table, targets=targets)
    config = ExperimentConfig(name="fake", data=data)
    fold = root / "fake" / "fold_0"
    fold.mkdir(parents=True)
    save_config(config, fold / "config.yaml")
    save_oof(oof, fold / "oof.npz", "float16")
    return root / "fake"


# ---- dsb2018: real images, fake probabilities ---------------------------------------------------


@pytest.fixture(scope="module")
def dsb(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four real DSB images; probabilities perfect (two with their borders, two with an empty
    border channel), one inverted (bad); the run's models output nuclei and border."""
    from skimage.segmentation import find_boundaries

    root = tmp_path_factory.mktemp("dsb_show")
    source = shared_data / "dsb2018" / "stage1_train"
    ids = sorted(p.name for p in source.iterdir())[:4]
    for image_id in ids:
        (root / "data" / "stage1_train").mkdir(parents=True, exist_ok=True)
        (root / "data" / "stage1_train" / image_id).symlink_to(source / image_id)
    competition = get_competition("dsb2018")
    table = competition.read_table(root / "data", build_data_config("dsb2018"))
    table_path = write_csv_atomic(table, root / "table.csv")
    table = read_table(table_path)
    oof = {}
    for position, image_id in enumerate(ids):
        labels = competition.read_instances(table.iloc[position])
        union = (labels > 0).astype(np.float32)
        border = np.zeros_like(union)
        if position < 2:
            border = find_boundaries(labels, mode="inner").astype(np.float32)
        oof[image_id] = np.stack([1 - union if position == 2 else union, border])
    experiment = fake_experiment(root / "runs", "dsb2018", table_path, oof, "mask_border")
    return {"ids": ids, "bad": ids[2], "table": table, "experiment": experiment, "oof": oof}


def test_image_scores_rank_the_bad_image_last(dsb: dict):
    scores = image_scores("dsb2018", dsb["table"], dsb["oof"])
    assert list(scores.columns) == ["id", "score", "dice"]
    assert scores["id"].tolist() == dsb["ids"]
    by_id = scores.set_index("id")
    assert by_id.loc[dsb["bad"], "score"] < 0.05 and by_id.loc[dsb["bad"], "dice"] < 0.5
    good = by_id.drop(dsb["bad"])
    assert (good["dice"] == 1.0).all()
    # With the border channel the instance split recovers the nuclei exactly.
    assert (by_id.loc[dsb["ids"][:2], "score"] > 0.9).all()


def test_worst_picks_the_bad_image_and_writes_both_pngs(dsb: dict, tmp_path: Path):
    written = show_experiment(dsb["experiment"], tmp_path, worst=1)
    bad = dsb["bad"]
    assert written == [tmp_path / f"{bad}_panel.png", tmp_path / f"{bad}_overlay.png"]
    assert panel_columns(written[0]) == pytest.approx(3)
    assert panel_columns(written[1]) == pytest.approx(1)
    overlay = read_rgb(written[1])  # BGR
    red = (overlay[..., 2] > 200) & (overlay[..., 1] < 60) & (overlay[..., 0] < 60)
    green = (overlay[..., 1] > 200) & (overlay[..., 2] < 60) & (overlay[..., 0] < 60)
    assert red.any() and green.any()


def test_show_masks_with_the_tuned_settings_unless_a_threshold_is_given(dsb: dict, tmp_path: Path):
    """With postprocess.json beside the run, `kseg show` scores and draws what `kseg report`
    and `kseg submit` would: here settings that drop every nucleus (min_nucleus huge)."""
    import shutil

    from kaggle_seg.postprocess import default_postprocess, save_postprocess
    from kaggle_seg.show import show_masking

    experiment = tmp_path / "fake"
    shutil.copytree(dsb["experiment"], experiment)
    assert show_masking(experiment, None) == 0.5
    tuned = default_postprocess(["nuclei", "border"]).model_copy(update={"min_nucleus": 10**6})
    save_postprocess(tuned, experiment / "postprocess.json")

    masking = show_masking(experiment, None)
    assert masking == tuned and show_masking(experiment, 0.3) == 0.3
    for bad in (2.0, -0.1, float("nan")):  # every mask would be empty (or full), said nowhere
        with pytest.raises(KsegError, match=r"^--threshold .*: need a probability in \[0, 1\]$"):
            show_masking(experiment, bad)
    by_tuned = image_scores("dsb2018", dsb["table"], dsb["oof"], masking=masking)
    by_threshold = image_scores("dsb2018", dsb["table"], dsb["oof"], masking=0.5)
    assert (by_tuned["score"] == 0).all()
    assert (by_threshold.set_index("id").loc[dsb["ids"][:2], "score"] > 0.9).all()
    written = show_experiment(experiment, tmp_path / "out", ids=[dsb["ids"][0]])
    assert len(written) == 2


def test_show_refuses_settings_tuned_for_other_outputs(dsb: dict, tmp_path: Path):
    """A postprocess.json for mask targets (classes: nuclei) beside a mask + border run: kseg
    submit refuses it, so kseg show must not draw masks with it as "tuned"."""
    import shutil

    from kaggle_seg.postprocess import default_postprocess, save_postprocess
    from kaggle_seg.show import show_masking

    experiment = tmp_path / "fake"
    shutil.copytree(dsb["experiment"], experiment)
    settings = save_postprocess(default_postprocess(["nuclei"]), experiment / "postprocess.json")
    expected = rf"^{settings}: post-processing for classes nuclei, the run's model outputs "
    with pytest.raises(KsegError, match=expected + "nuclei, border"):
        show_experiment(experiment, tmp_path / "out", worst=1)
    with pytest.raises(KsegError, match=expected):
        show_experiment(
            experiment,
            tmp_path / "out",
            ids=[dsb["ids"][0]],
            masking=show_masking(experiment, None),
        )
    assert not (tmp_path / "out").exists()
    assert len(show_experiment(experiment, tmp_path / "out", worst=1, masking=0.5)) == 2


def test_random_is_reproducible_with_a_seed(dsb: dict, tmp_path: Path):
    available = list(reversed(dsb["ids"]))
    first = select_ids(None, available, random=2, seed=7)
    assert len(first) == 2 and len(set(first)) == 2 and set(first) <= set(dsb["ids"])
    assert select_ids(None, dsb["ids"], random=2, seed=7) == first
    draws = {tuple(select_ids(None, dsb["ids"], random=2, seed=s)) for s in range(10)}
    assert len(draws) > 1
    written = show_experiment(dsb["experiment"], tmp_path, random=2, seed=7)
    assert [p.name for p in written] == [f"{i}_{kind}.png" for i in first
                                         for kind in ("panel", "overlay")]  # fmt: skip
    assert all(read_rgb(p).size for p in written)


def test_panel_omits_the_truth_column_without_labels(dsb: dict, tmp_path: Path):
    image_id = dsb["ids"][0]
    unlabelled = dsb["table"].copy()
    unlabelled[["mask_dir", "labels_csv", "mask_path"]] = ""
    [labelled_panel, _] = write_panels("dsb2018", dsb["table"], dsb["oof"], [image_id], tmp_path)
    [test_panel, _] = write_panels("dsb2018", unlabelled, dsb["oof"], [image_id], tmp_path / "t")
    assert panel_columns(labelled_panel) == pytest.approx(3)
    assert panel_columns(test_panel) == pytest.approx(2)
    assert image_scores("dsb2018", unlabelled, dsb["oof"]).empty


def test_predictions_and_table_override_the_oof(dsb: dict, tmp_path: Path):
    image_id = dsb["ids"][3]
    save_oof({image_id: dsb["oof"][image_id]}, tmp_path / "pred.npz", "uint8")
    table = tmp_path / "table.csv"
    write_csv_atomic(dsb["table"], table)
    written = show_experiment(
        tmp_path / "no_run", tmp_path / "out", worst=3, predictions=tmp_path / "pred.npz",
        table=table, competition="dsb2018",
    )  # fmt: skip
    assert [p.name for p in written] == [f"{image_id}_panel.png", f"{image_id}_overlay.png"]
    with pytest.raises(KsegError, match="not in the predictions: " + dsb["ids"][0]):
        show_experiment(dsb["experiment"], tmp_path, ids=[dsb["ids"][0]],
                        predictions=tmp_path / "pred.npz")  # fmt: skip


def test_clear_errors(dsb: dict, tmp_path: Path):
    with pytest.raises(KsegError, match="not in the predictions: nope, nada"):
        show_experiment(dsb["experiment"], tmp_path, ids=[dsb["ids"][0], "nope", "nada"])
    with pytest.raises(KsegError, match="train first"):
        show_experiment(tmp_path / "empty", tmp_path, worst=1)
    with pytest.raises(KsegError, match="exactly one of"):
        show_experiment(dsb["experiment"], tmp_path, random=1, worst=1)
    with pytest.raises(KsegError, match="exactly one of"):
        select_ids(None, dsb["ids"])
    with pytest.raises(KsegError, match="worst: needs per-image scores"):
        select_ids(None, dsb["ids"], worst=1)
    with pytest.raises(KsegError, match="table not found"):
        show_experiment(dsb["experiment"], tmp_path, worst=1, table=tmp_path / "missing.csv")
    moved = tmp_path / "moved"
    fake_experiment(moved, "dsb2018", tmp_path / "gone.csv", {"x": np.zeros((1, 4, 4))})
    with pytest.raises(KsegError, match=r"gone\.csv: table not found.*data\.table"):
        show_experiment(moved / "fake", tmp_path, random=1)


def test_show_finds_a_relative_table_from_another_folder(
    dsb: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """data.table is relative to where kseg train ran; run from elsewhere, kseg show finds it
    above the run folder, as kseg tune and kseg report do."""
    root = tmp_path / "project"
    write_csv_atomic(dsb["table"], root / "table.csv")
    oof = {i: dsb["oof"][i] for i in dsb["ids"][:2]}
    experiment = fake_experiment(root / "runs", "dsb2018", Path("table.csv"), oof, "mask_border")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    written = show_experiment(experiment, tmp_path / "out", worst=1)
    assert len(written) == 2 and written[0].name.removesuffix("_panel.png") in oof


def test_worst_ranks_by_score_then_id():
    scores = pd.DataFrame({"id": ["c", "a", "b", "d"], "score": [0.5, 0.2, 0.2, np.nan]})
    assert select_ids(scores, ["a", "b", "c", "d"], worst=2) == ["a", "b"]
    assert select_ids(scores, ["b", "c", "d"], worst=5) == ["b", "c"]


def test_typical_takes_the_scores_nearest_the_median():
    scores = pd.DataFrame({"id": list("abcdefg"), "score": [0.0, 0.1, 0.5, 0.52, 0.6, 0.9, np.nan]})
    # median of the six scores: 0.51; c and d are 0.01 from it, e 0.09, b 0.41
    assert select_ids(scores, list("abcdefg"), typical=3) == ["c", "d", "e"]
    with pytest.raises(KsegError, match="typical: needs per-image scores"):
        select_ids(None, list("abc"), typical=1)
    with pytest.raises(KsegError, match="exactly one of"):
        select_ids(scores, list("abc"), worst=1, typical=1)


# ---- uwmgi: a phantom with three overlapping classes ---------------------------------------------


@pytest.fixture(scope="module")
def uwmgi(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom

    root = tmp_path_factory.mktemp("uwmgi_show")
    data = make_uwmgi_phantom(root / "data", case_days=("case12_day0",), n_slices=6, seed=1)
    prepare_table("uwmgi", data, root / "table.csv")
    table = read_table(root / "table.csv")
    competition = get_competition("uwmgi")
    oof = {
        row["id"]: np.moveaxis(competition.read_mask(row), -1, 0).astype(np.float32)
        for _, row in table.iterrows()
    }
    labelled = table[~table["empty"]]
    bad = labelled["id"].iloc[len(labelled) // 2]
    oof[bad] = np.roll(oof[bad], 40, axis=2)
    experiment = fake_experiment(root / "runs", "uwmgi", root / "table.csv", oof)
    return {"table": table, "oof": oof, "bad": bad, "experiment": experiment}


def test_uwmgi_panels_show_three_classes_and_worst_finds_the_shifted_slice(
    uwmgi: dict, tmp_path: Path
):
    scores = image_scores("uwmgi", uwmgi["table"], uwmgi["oof"])
    assert len(scores) == len(uwmgi["table"])
    assert (scores["score"] == scores["dice"]).all()
    assert (scores.set_index("id").drop(uwmgi["bad"])["score"] == 1.0).all()
    panel, overlay = show_experiment(uwmgi["experiment"], tmp_path, worst=1)
    assert panel.name == f"{uwmgi['bad']}_panel.png"
    assert panel_columns(panel) == pytest.approx(3)
    image = read_rgb(overlay)
    assert image.shape[1] == PANEL_INCHES * DPI
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # gray scan + class fills


def test_show_applies_the_tuned_gate_on_the_oof_head_probabilities(uwmgi: dict, tmp_path: Path):
    """Settings with gate_probability (a model with a classification head): kseg show masks and
    scores as kseg submit and kseg report do, gating each image by its oof_classes.npz."""
    import shutil

    from kaggle_seg.postprocess import default_postprocess, save_postprocess
    from kaggle_seg.probabilities import save_class_oof

    experiment = tmp_path / "head"
    shutil.copytree(uwmgi["experiment"], experiment)
    classes = list(get_competition("uwmgi").classes)
    labelled = uwmgi["table"][~uwmgi["table"]["empty"]]["id"]
    gated = next(i for i in labelled if i != uwmgi["bad"])  # a perfect prediction, head says no
    heads = {i: np.full(3, 0.0 if i == gated else 1.0) for i in uwmgi["oof"]}
    save_class_oof(heads, experiment / "fold_0" / "oof_classes.npz")
    tuned = default_postprocess(classes).model_copy(update={"gate_probability": [0.5] * 3})
    save_postprocess(tuned, experiment / "postprocess.json")
    panel, _ = show_experiment(experiment, tmp_path / "out", worst=1)
    assert panel.name == f"{gated}_panel.png"


def test_uwmgi_test_rows_without_rle_columns_get_two_columns(uwmgi: dict, tmp_path: Path):
    table = uwmgi["table"].drop(columns=["rle_large_bowel", "rle_small_bowel", "rle_stomach"])
    [panel, _] = write_panels("uwmgi", table, uwmgi["oof"], [uwmgi["bad"]], tmp_path)
    assert panel_columns(panel) == pytest.approx(2)


def test_folder_predictions_without_their_run_say_to_pass_the_experiment(tmp_path: Path):
    with pytest.raises(KsegError, match=r"-c folder: .*pass --experiment runs/<experiment>"):
        show_experiment(
            None,
            tmp_path / "out",
            worst=1,
            predictions=tmp_path / "preds.npz",
            table=tmp_path / "table.csv",
            competition="folder",
        )


def test_ids_option_is_read_as_typed_and_an_empty_list_is_refused():
    from kaggle_seg.show_scores import parse_ids

    assert parse_ids(None) is None
    assert parse_ids("a, b,,a ") == ["a", "b"]
    for text in (",", " , ", ""):
        with pytest.raises(KsegError, match=r"--ids .*no id given"):
            parse_ids(text)
