"""`kseg submit`: the exact CSV formats, validated, in Kaggle's row order; the public re-run
fallback; clear messages for mismatched inputs; `--upload` against the fake Kaggle API."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from test_predict import write_checkpoint

from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.postprocess import default_postprocess, save_postprocess
from kaggle_seg.scoring import score_submission
from kaggle_seg.submit import default_submission_path, write_submission

if TYPE_CHECKING:
    from fake_kaggle import FakeKaggle

pytest_plugins = ["fake_kaggle"]  # the fake_kaggle fixture

UWMGI_CLASSES = ("large_bowel", "small_bowel", "stomach")


@pytest.fixture(scope="module")
def uwmgi_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kaggle's uwmgi folder: train.csv + train/, and a hidden test/ listed by
    sample_submission.csv in an order that is not the folder order."""
    from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom

    base = tmp_path_factory.mktemp("uwmgi_root")
    root = make_uwmgi_phantom(base / "comp", case_days=("case1_day0", "case2_day1"), n_slices=6)
    hidden = make_uwmgi_phantom(
        base / "hidden", case_days=("case9_day3", "case8_day0"), n_slices=5, seed=4
    )
    shutil.move(str(hidden / "train"), str(root / "test"))
    truth = pd.read_csv(hidden / "train.csv", dtype=str, keep_default_na=False)
    truth.to_csv(base / "truth.csv", index=False)
    sample = truth[["id", "class"]].iloc[::-1].assign(predicted="")  # reversed on purpose
    sample.to_csv(root / "sample_submission.csv", index=False)
    return root


@pytest.fixture(scope="module")
def uwmgi_experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    experiment = tmp_path_factory.mktemp("runs") / "tiny_uwmgi"
    for fold in range(2):
        write_checkpoint(experiment / f"fold_{fold}" / "best.pt", competition="uwmgi",
                         classes=UWMGI_CLASSES, stack_depth=3, seed=fold,
                         resize_mode="pad", size=64, name="tiny_uwmgi")  # fmt: skip
    return experiment


def test_uwmgi_hidden_test_follows_the_sample_order_and_scores(
    uwmgi_root: Path, uwmgi_experiment: Path, tmp_path: Path
):
    out = tmp_path / "submission.csv"
    result = write_submission([uwmgi_experiment], uwmgi_root, out, tta="flip", num_workers=0)
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    sample = pd.read_csv(uwmgi_root / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["id", "class", "predicted"]
    assert frame[["id", "class"]].equals(sample[["id", "class"]])
    assert result.images == 10 and result.rows == 30
    assert (frame["predicted"] != "").any()
    scored = score_submission("uwmgi", uwmgi_root.parent / "truth.csv", out, uwmgi_root / "test")
    assert 0.0 <= scored["score"] <= 1.0


def test_uwmgi_public_rerun_predicts_train_slices(
    uwmgi_root: Path, uwmgi_experiment: Path, tmp_path: Path
):
    root = tmp_path / "public"
    shutil.copytree(uwmgi_root, root, ignore=shutil.ignore_patterns("test"))
    (root / "test").mkdir()
    pd.DataFrame(columns=["id", "class", "predicted"]).to_csv(
        root / "sample_submission.csv", index=False
    )
    result = write_submission([uwmgi_experiment], root, tmp_path / "s.csv", num_workers=0,
                              fallback_case_days=1)  # fmt: skip
    assert "public re-run" in result.notes[0] and "case1_day0" in result.notes[0]
    assert f"{root / 'test'} is empty" in result.notes[0]
    frame = pd.read_csv(tmp_path / "s.csv", dtype=str, keep_default_na=False)
    assert frame["id"].str.startswith("case1_day0_slice_").all()
    assert len(frame) == 6 * 3
    (root / "test").rmdir()  # no test/ at all: the note says so rather than "empty"
    result = write_submission([uwmgi_experiment], root, tmp_path / "s.csv", num_workers=0,
                              fallback_case_days=1)  # fmt: skip
    assert f"{root / 'test'} does not exist (Kaggle's public re-run)" in result.notes[0]


def test_uwmgi_sample_mismatch_and_missing_test_are_named(
    uwmgi_root: Path, uwmgi_experiment: Path, tmp_path: Path
):
    root = tmp_path / "mismatch"
    shutil.copytree(uwmgi_root, root)
    sample = pd.read_csv(root / "sample_submission.csv", dtype=str, keep_default_na=False)
    sample.loc[0, "id"] = "case77_day7_slice_0001"
    sample.to_csv(root / "sample_submission.csv", index=False)
    with pytest.raises(InputError, match=r"sample_submission.csv does not match.*case77_day7"):
        write_submission([uwmgi_experiment], root, tmp_path / "s.csv", num_workers=0)
    shutil.rmtree(root / "test")
    (root / "test").mkdir()
    with pytest.raises(InputError, match=r"test: no slices, but .*sample_submission.csv lists"):
        write_submission([uwmgi_experiment], root, tmp_path / "s.csv", num_workers=0)
    assert not (tmp_path / "s.csv").exists()


def test_postprocess_for_other_classes_is_refused(uwmgi_root: Path, uwmgi_experiment: Path,
                                                  tmp_path: Path):  # fmt: skip
    settings = tmp_path / "pp.json"
    save_postprocess(default_postprocess(["nuclei"]), settings)
    with pytest.raises(KsegError, match=r"pp.json is for classes \['nuclei'\]"):
        write_submission([uwmgi_experiment], uwmgi_root, tmp_path / "s.csv", postprocess=settings)


@pytest.fixture(scope="module")
def dsb_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five real stage-1 test images with their solution rows."""
    source = shared_data / "dsb2018"
    root = tmp_path_factory.mktemp("dsb_root")
    ids = sorted(p.name for p in (source / "stage1_test").iterdir())[:5]
    for image_id in ids:
        shutil.copytree(source / "stage1_test" / image_id / "images",
                        root / "stage1_test" / image_id / "images")  # fmt: skip
    solution = pd.read_csv(source / "stage1_solution.csv")
    solution[solution["ImageId"].isin(ids)].to_csv(root / "solution.csv", index=False)
    return root


def test_dsb_submission_is_one_row_per_nucleus_and_scores(dsb_root: Path, tmp_path: Path):
    checkpoint = write_checkpoint(tmp_path / "exp" / "fold_0" / "best.pt", size=64)
    out = tmp_path / "dsb.csv"
    write_submission([tmp_path / "exp"], dsb_root, out, num_workers=0)
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["ImageId", "EncodedPixels"]
    assert frame["ImageId"].nunique() == 5
    scored = score_submission("dsb2018", dsb_root / "solution.csv", out)
    assert 0.0 <= scored["score"] <= 1.0
    # A threshold no probability reaches: every image gets its `<id>,` row.
    settings = default_postprocess(["nuclei"]).model_copy(update={"thresholds": [1.0]})
    save_postprocess(settings, checkpoint.parent.parent / "postprocess.json")
    write_submission([tmp_path / "exp"], dsb_root, out, num_workers=0)
    empty = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(empty) == 5 and (empty["EncodedPixels"] == "").all()
    assert score_submission("dsb2018", dsb_root / "solution.csv", out)["score"] == 0.0


def test_lgg_submit_writes_the_datasets_mask_layout_and_score_takes_it_per_patient(
    shared_data: Path, tmp_path: Path
):
    from test_cli import kseg

    # Two new patients, in the dataset's own layout (LGG has no test split).
    patients = tmp_path / "patients"
    for folder in sorted((shared_data / "lgg" / "kaggle_3m").glob("TCGA_*"))[:2]:
        shutil.copytree(folder, patients / folder.name)
    checkpoint = write_checkpoint(tmp_path / "exp" / "fold_0" / "best.pt", competition="lgg",
                                  classes=("abnormality",), size=64)  # fmt: skip
    out = tmp_path / "masks"
    result = write_submission([checkpoint], patients, out, tta="none", num_workers=0)
    slices = sorted(p.name for p in patients.rglob("*_mask.tif"))
    assert result.images == result.rows == len(slices)
    assert sorted(p.name for p in out.rglob("*_mask.tif")) == slices
    assert {p.parent.name for p in out.rglob("*_mask.tif")} == {p.name for p in patients.iterdir()}
    scored = score_submission("lgg", patients, out)
    assert scored["n_groups"] == 2 and scored["n_images"] == len(slices)
    assert len(scored["per_image"]) == len(slices) and 0.0 <= scored["score"] <= 1.0
    # The truth's own masks as the submission score 1; against the whole dataset folder only the
    # patients the submission holds are scored.
    perfect = score_submission("lgg", shared_data / "lgg", patients)
    assert perfect["score"] == 1.0 and perfect["n_groups"] == 2
    printed = kseg("score", "-c", "lgg", str(patients), str(out)).stdout
    assert f"score: {scored['score']:.6f}" in printed and "n_groups: 2" in printed
    # A slice without its predicted mask, and a mask of another size, are named.
    victim = next(out.rglob("*_mask.tif"))
    victim.unlink()
    with pytest.raises(InputError, match=rf"no predicted mask for 1 slice\(s\).*{victim.name}"):
        score_submission("lgg", patients, out)
    import tifffile

    tifffile.imwrite(victim, np.zeros((10, 12), np.uint8))
    with pytest.raises(InputError, match=rf"{victim.name}: mask is 12x10, the truth 256x256"):
        score_submission("lgg", patients, out)


def test_default_path_names_competition_experiment_and_date():
    path = default_submission_path("uwmgi", "effb3", dt.date(2026, 11, 22))
    assert path == Path("submissions/uwmgi_effb3_2026-11-22.csv")


@pytest.mark.slow
def test_cli_submit_writes_the_default_path_and_upload_needs_a_kernel_for_code_competitions(
    uwmgi_root: Path, uwmgi_experiment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from test_cli import kseg

    monkeypatch.chdir(tmp_path)
    out = kseg("submit", "--checkpoints", str(uwmgi_experiment), "--data-dir", str(uwmgi_root),
               "--tta", "none", "--num-workers", "0").stdout  # fmt: skip
    expected = default_submission_path("uwmgi", "tiny_uwmgi")
    assert f"wrote {expected}: 30 rows for 10 images" in out
    assert (tmp_path / expected).is_file()
    upload = kseg("submit", "--checkpoints", str(uwmgi_experiment), "--data-dir",
                  str(uwmgi_root), "--tta", "none", "--upload", check=False)  # fmt: skip
    assert upload.returncode == 1 and "code competition" in upload.stderr
    assert "--kernel" in upload.stderr


def test_upload_of_a_file_competition_goes_through_the_kaggle_api(
    dsb_root: Path, tmp_path: Path, fake_kaggle: FakeKaggle
):
    from kaggle_seg.submit import upload_submission

    checkpoint = write_checkpoint(tmp_path / "best.pt")
    csv = tmp_path / "dsb.csv"
    result = write_submission([checkpoint], dsb_root, csv, num_workers=0)
    upload_submission(csv, result.competition, "first try")
    assert "dsb.csv" in fake_kaggle.uploaded()
    (call,) = fake_kaggle.calls("CreateSubmission")
    assert call["competitionName"] == "data-science-bowl-2018"
    assert "first try" in str(call)


def test_dsb_test_zip_is_extracted_where_kaggle_mounts_only_the_archive(
    dsb_root: Path, tmp_path: Path
):
    mounted = tmp_path / "input"
    mounted.mkdir()
    shutil.make_archive(str(mounted / "stage1_test"), "zip", dsb_root / "stage1_test")
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    result = write_submission([checkpoint], mounted, tmp_path / "s.csv", num_workers=0)
    assert result.images == 5
    assert sorted(p.name for p in mounted.iterdir()) == ["stage1_test.zip"]  # input untouched


def test_submit_warns_when_its_tta_is_not_the_one_the_oof_was_tuned_on():
    from types import SimpleNamespace

    from kaggle_seg.submit import oof_tta_mismatch

    def member(oof_tta: str) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(oof_tta=oof_tta)))

    assert oof_tta_mismatch([member("d4")], "d4") is None
    assert oof_tta_mismatch([member("none")], "flip") is None  # no TTA'd OOF: nothing to say
    warning = oof_tta_mismatch([member("d4"), member("none")], "flip")
    assert warning is not None and "--tta flip" in warning and "--tta d4" in warning


def test_default_tta_is_the_one_the_oof_was_predicted_with():
    from types import SimpleNamespace

    from kaggle_seg.predict import default_tta

    def member(oof_tta: str) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(oof_tta=oof_tta)))

    assert default_tta([member("d4")]) == "d4"  # the DSB recipe's: its thresholds fit d4
    assert default_tta([member("d4"), member("none")]) == "d4"
    assert default_tta([member("none")]) == "flip"
    assert default_tta([member("d4"), member("flip")]) == "flip"  # members disagree


def test_prediction_option_values_are_checked_before_anything_is_read(tmp_path: Path):
    from test_cli import kseg

    missing = str(tmp_path / "nowhere")
    for command in ("submit", "predict"):
        target = ["--data-dir", missing] if command == "submit" else ["--test-dir", missing]
        for option, value in (("--tta", "d8"), ("--merge", "median"), ("--ensemble", "vote")):
            result = kseg(command, "--checkpoints", missing, *target, option, value, check=False)
            assert result.returncode == 1
            assert f"error: {option} {value!r}: choose one of" in result.stderr, result.stderr


def test_submit_warns_when_an_ensemble_takes_one_members_settings():
    from types import SimpleNamespace

    from kaggle_seg.submit import single_member_settings

    def fold(experiment: str, k: int) -> SimpleNamespace:
        return SimpleNamespace(source=Path(f"runs/{experiment}/fold_{k}/best.pt"))

    assert single_member_settings([fold("a", 0), fold("a", 1)]) is None  # folds of one experiment
    warning = single_member_settings([fold("a", 0), fold("a", 1), fold("b", 0)])
    assert warning is not None
    assert "kseg tune --experiment runs/a --experiment runs/b" in warning


def test_several_folds_take_the_experiments_settings_and_a_lone_fold_its_own(tmp_path: Path):
    """After `kseg tune -e runs/x/fold_0` and `kseg tune -e runs/x`, the experiment's folds
    together take runs/x/postprocess.json (tuned on all their OOF), fold 0 alone its own."""
    from types import SimpleNamespace

    from kaggle_seg.submit import load_settings

    def fold(k: int) -> SimpleNamespace:
        return SimpleNamespace(source=tmp_path / "x" / f"fold_{k}" / "best.pt", classes=["nuclei"])

    for folder, threshold in ((tmp_path / "x", 0.4), (tmp_path / "x" / "fold_0", 0.7)):
        folder.mkdir(parents=True, exist_ok=True)
        settings = default_postprocess(["nuclei"]).model_copy(update={"thresholds": [threshold]})
        save_postprocess(settings, folder / "postprocess.json")
    together, source = load_settings([fold(0), fold(1)], None)
    assert together.thresholds == [0.4] and source == str(tmp_path / "x" / "postprocess.json")
    alone, source = load_settings([fold(0)], None)
    assert alone.thresholds == [0.7] and source.endswith("fold_0/postprocess.json")


def test_out_naming_an_existing_folder_is_refused_before_predicting(
    dsb_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import kaggle_seg.predict

    checkpoint = write_checkpoint(tmp_path / "best.pt")
    (tmp_path / "runs").mkdir()

    def never(*args, **kwargs):
        raise AssertionError("predicted before refusing --out")

    monkeypatch.setattr(kaggle_seg.predict, "predict_probabilities", never)
    with pytest.raises(KsegError, match=r"runs: is a folder; name the file to write"):
        write_submission([checkpoint], dsb_root, tmp_path / "runs", num_workers=0)


def test_a_blends_settings_warn_when_the_checkpoints_are_not_that_blend(tmp_path: Path):
    import json
    from types import SimpleNamespace

    from kaggle_seg.submit import blend_mismatch

    def folds(experiment: str, weight: float) -> list[SimpleNamespace]:
        source = tmp_path / experiment
        return [SimpleNamespace(source=source / f"fold_{k}" / "best.pt", weight=weight / 2)
                for k in range(2)]  # fmt: skip

    blend = tmp_path / "blend_a_b"
    blend.mkdir()
    record = {"experiments": [str(tmp_path / "a"), str(tmp_path / "b")], "weights": [2 / 3, 1 / 3]}
    (blend / "blend.json").write_text(json.dumps(record))
    settings = blend / "postprocess.json"
    assert blend_mismatch(folds("a", 2) + folds("b", 1), settings) is None
    equal = blend_mismatch(folds("a", 1) + folds("b", 1), settings)
    assert equal is not None and "tuned on the blend a 0.667, b 0.333" in equal
    assert "these checkpoints are a 0.5, b 0.5" in equal
    assert "these checkpoints are a 1" in (blend_mismatch(folds("a", 1), settings) or "")
    assert blend_mismatch(folds("a", 1), tmp_path / "a" / "postprocess.json") is None


def test_shares_are_whole_volumes_balanced_by_rows_and_cover_the_test_once():
    from kaggle_seg.competitions.base import TestSet
    from kaggle_seg.submit_shards import shard_of

    sizes = {"case1_day0": 5, "case2_day0": 3, "case3_day0": 3, "case4_day0": 2, "case5_day0": 1}
    table = pd.DataFrame(
        [(f"{case}_slice_{k:04d}", case) for case, n in sizes.items() for k in range(n)],
        columns=["id", "case_day"],
    )
    sample = table[["id"]].iloc[::-1].assign(**{"class": "stomach"})
    shares = [shard_of(TestSet(table, [], sample), "case_day", r, 2) for r in range(2)]
    ids = [list(share.table["id"]) for share in shares]
    assert sorted(ids[0] + ids[1]) == sorted(table["id"])
    assert [len(i) for i in ids] == [7, 7]  # 5 + 2 against 3 + 3 + 1: largest first
    for share in shares:
        # Whole volumes, in table order, with their own sample rows only.
        assert share.table["case_day"].map(sizes).eq(share.table.groupby("case_day")["id"]
                                                     .transform("size")).all()  # fmt: skip
        assert list(share.table["id"]) == [i for i in table["id"] if i in set(share.table["id"])]
        assert set(share.sample["id"]) == set(share.table["id"])
    # Images alone when the competition has no volumes; four ranks for five rows.
    alone = [shard_of(TestSet(table), None, r, 4).table for r in range(4)]
    assert sorted(len(t) for t in alone) == [3, 3, 4, 4]


def _torchrun_submit(*args: str) -> subprocess.CompletedProcess:
    """`kseg submit ARGS` as two torchrun processes on CPU (gloo), one thread each."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    return subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "kaggle_seg", "submit",
         *args, "--device", "cpu", "--num-workers", "0"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_submit_under_torchrun_joins_the_shares_into_the_one_process_file(
    uwmgi_root: Path, uwmgi_experiment: Path, dsb_root: Path, tmp_path: Path
):
    # uwmgi: whole volumes per process, the hidden test's sample order (reversed on purpose).
    alone = tmp_path / "uwmgi_alone.csv"
    write_submission([uwmgi_experiment], uwmgi_root, alone, tta="flip", num_workers=0,
                     device="cpu")  # fmt: skip
    shared = tmp_path / "uwmgi_shared.csv"
    result = _torchrun_submit("--checkpoints", str(uwmgi_experiment), "--data-dir",
                              str(uwmgi_root), "--out", str(shared), "--tta", "flip")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert shared.read_bytes() == alone.read_bytes()
    assert result.stdout.count(f"wrote {shared}: 30 rows for 10 images") == 1  # rank 0 only
    assert "2 processes under torchrun" in result.stdout
    assert not list(tmp_path.glob("*.part*"))
    # dsb2018 with --on-error skip: one image whose header cannot be read (rank 0 reports it)
    # and one that fails to decode while predicting (reported by the rank that owns it).
    root = tmp_path / "dsb"
    shutil.copytree(dsb_root, root)
    images = sorted((root / "stage1_test").glob("*/images/*.png"))
    images[1].write_bytes(b"not a png")
    images[3].write_bytes(images[3].read_bytes()[:200])
    checkpoint = write_checkpoint(tmp_path / "exp" / "fold_0" / "best.pt", size=64)
    alone = tmp_path / "dsb_alone.csv"
    single = write_submission([checkpoint], root, alone, num_workers=0, device="cpu",
                              on_error="skip", tta="none")  # fmt: skip
    assert len(single.skipped) == 2
    shared = tmp_path / "dsb_shared.csv"
    result = _torchrun_submit("--checkpoints", str(checkpoint), "--data-dir", str(root), "--out",
                              str(shared), "--on-error", "skip", "--tta", "none")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert shared.read_bytes() == alone.read_bytes()
    assert f"for {single.images} images" in result.stdout
    # Both skips, whichever rank met them, in rank 0's one report.
    assert "skipped 2 unreadable image(s), predicted empty:" in result.stdout
    assert all(result.stdout.count(f"  {image}: ") == 1 for image in (images[1], images[3]))
