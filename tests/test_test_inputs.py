"""Test sets as users hand them over: zipped DSB test sets extracted fresh, `--on-error skip`
skipping at every stage (headers included) and listing what it skipped, another competition's
data named as such, `predict --save` stopped mid-way leaving no temporary file, and `show`
without an experiment."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from test_predict import write_checkpoint

from kaggle_seg.competitions import get_competition
from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.predict_folder import predict_folder
from kaggle_seg.submit import write_submission

UWMGI_CLASSES = ("large_bowel", "small_bowel", "stomach")


@pytest.fixture(scope="module")
def dsb_ids(shared_data: Path) -> list[str]:
    return sorted(p.name for p in (shared_data / "dsb2018" / "stage1_test").iterdir())[:6]


def copy_dsb_test(shared_data: Path, ids: list[str], root: Path) -> Path:
    """`root/stage1_test/<id>/images/<id>.png` for `ids` (real stage-1 test images)."""
    source = shared_data / "dsb2018" / "stage1_test"
    for image_id in ids:
        shutil.copytree(source / image_id / "images", root / "stage1_test" / image_id / "images")
    return root


def test_zipped_test_sets_are_extracted_fresh_each_run_and_removed(
    shared_data: Path, dsb_ids: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    results = []
    for run, ids in (("first", dsb_ids[:5]), ("second", dsb_ids[5:])):
        built = copy_dsb_test(shared_data, ids, tmp_path / f"{run}_src")
        mounted = tmp_path / f"{run}_input"
        mounted.mkdir()
        shutil.make_archive(str(mounted / "stage1_test"), "zip", built / "stage1_test")
        out = tmp_path / f"{run}.csv"
        results.append(write_submission([checkpoint], mounted, out, num_workers=0))
        frame = pd.read_csv(out, dtype=str, keep_default_na=False)
        assert sorted(set(frame["ImageId"])) == ids  # nothing from the earlier zip
        assert not list(scratch.glob("kseg_*"))  # the extracted folder is gone
    assert [r.images for r in results] == [5, 1]


def break_images(root: Path, ids: list[str]) -> dict[str, Path]:
    """One empty file, one that is not an image, one whose pixels are cut off."""
    paths = {i: root / "stage1_test" / i / "images" / f"{i}.png" for i in ids}
    paths[ids[0]].write_bytes(b"")
    paths[ids[1]].write_bytes(b"not a png at all")
    paths[ids[2]].write_bytes(paths[ids[2]].read_bytes()[:200])  # header intact, pixels cut
    return {"empty": paths[ids[0]], "garbage": paths[ids[1]], "truncated": paths[ids[2]]}


def test_dsb_on_error_skip_skips_unreadable_headers_and_lists_them(
    shared_data: Path, dsb_ids: list[str], tmp_path: Path
):
    root = copy_dsb_test(shared_data, dsb_ids[:5], tmp_path)
    broken = break_images(root, dsb_ids[:3])
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    with pytest.raises(InputError, match=str(broken["empty"])) as failed:
        write_submission([checkpoint], root, tmp_path / "fail.csv", num_workers=0)
    # The file once (PIL's own message names it again), and the way past it.
    assert str(failed.value).count(str(broken["empty"])) == 1
    assert str(failed.value).endswith("(pass --on-error skip to predict it as empty)")

    out = tmp_path / "skip.csv"
    result = write_submission([checkpoint], root, out, num_workers=0, on_error="skip")
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert sorted(set(frame["ImageId"])) == dsb_ids[:5]  # every image has its row
    for image_id in dsb_ids[:3]:  # skipped images are predicted empty: `<id>,`
        assert frame.loc[frame["ImageId"] == image_id, "EncodedPixels"].tolist() == [""]
    assert sorted(s.path for s in result.skipped) == sorted(str(p) for p in broken.values())
    assert all(s.reason for s in result.skipped)


def test_lgg_on_error_skip_skips_unreadable_slices(shared_data: Path, tmp_path: Path):
    source = shared_data / "lgg" / "kaggle_3m" / "TCGA_CS_4942_19970222"
    test_dir = tmp_path / "lgg_test" / source.name
    test_dir.mkdir(parents=True)
    for path in sorted(source.glob("*.tif"))[:8]:
        shutil.copy(path, test_dir / path.name)
    slices = sorted(p for p in test_dir.glob("*.tif") if not p.stem.endswith("_mask"))
    slices[0].write_bytes(b"")
    slices[1].write_bytes(slices[1].read_bytes()[:300])
    checkpoint = write_checkpoint(tmp_path / "best.pt", competition="lgg",
                                  classes=("abnormality",))  # fmt: skip
    with pytest.raises(InputError, match=slices[0].name):
        predict_folder([checkpoint], test_dir.parent, num_workers=0)
    result = predict_folder([checkpoint], test_dir.parent, tmp_path / "p.npz", num_workers=0,
                            on_error="skip")  # fmt: skip
    assert {Path(s.path).name for s in result["skipped"]} == {slices[0].name, slices[1].name}
    assert result["images"] == len(slices) - 2  # left out of the table, listed instead


@pytest.mark.slow
def test_cli_lists_skipped_files_at_the_end(shared_data: Path, dsb_ids: list[str], tmp_path: Path):
    root = copy_dsb_test(shared_data, dsb_ids[:4], tmp_path)
    broken = break_images(root, dsb_ids[:3])
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    result = subprocess.run(
        [sys.executable, "-m", "kaggle_seg", "predict", "--checkpoints", str(checkpoint),
         "--test-dir", str(root / "stage1_test"), "--num-workers", "0", "--on-error", "skip"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-4] == "skipped 3 unreadable image(s), predicted empty:"
    assert sorted(line.split(": ")[0].strip() for line in lines[-3:]) == sorted(
        str(p) for p in broken.values()
    )


def test_a_uwmgi_checkpoint_on_dsb_data_says_the_competitions_differ(
    shared_data: Path, dsb_ids: list[str], tmp_path: Path
):
    root = copy_dsb_test(shared_data, dsb_ids[:2], tmp_path)
    checkpoint = write_checkpoint(tmp_path / "best.pt", competition="uwmgi",
                                  classes=UWMGI_CLASSES)  # fmt: skip
    with pytest.raises(KsegError, match=r"holds dsb2018 data.*for uwmgi: the competitions differ"):
        write_submission([checkpoint], root, tmp_path / "s.csv", num_workers=0)
    with pytest.raises(KsegError, match=r"holds dsb2018 data.*for uwmgi: the competitions differ"):
        predict_folder([checkpoint], root / "stage1_test", num_workers=0)
    dsb = write_checkpoint(tmp_path / "dsb.pt")
    with pytest.raises(KsegError, match=r"holds lgg data.*for dsb2018: the competitions differ"):
        predict_folder([dsb], shared_data / "lgg" / "kaggle_3m", num_workers=0)


@pytest.mark.slow
def test_predict_save_stopped_mid_way_leaves_no_temporary_file(
    shared_data: Path, dsb_ids: list[str], tmp_path: Path
):
    root = copy_dsb_test(shared_data, dsb_ids[:4], tmp_path)
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    save = tmp_path / "out" / "preds.npz"
    # The prediction stalls after its first image, so the signal lands while the npz is being
    # written however slowly the machine runs (a 0.5 s pause let a loaded CI run finish first).
    # A shell's background job starts with SIGINT ignored, and Python then keeps it ignored:
    # the child restores Ctrl-C's default, as an interactive terminal gives it.
    script = f"""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import kaggle_seg.predict as predict
original = predict.predict_probabilities
def slow(*args, **kwargs):
    for item in original(*args, **kwargs):
        yield item
        time.sleep(30)  # the npz is open, one array in: the signal lands here
predict.predict_probabilities = slow
sys.argv = ["kseg", "predict", "--checkpoints", {str(checkpoint)!r}, "--test-dir",
            {str(root / "stage1_test")!r}, "--save", {str(save)!r}, "--num-workers", "0"]
from kaggle_seg.cli import main
main()
"""
    for stop in (signal.SIGTERM, signal.SIGINT):
        process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE,
                                   text=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while not list(save.parent.glob("*.tmp")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1]
            time.sleep(0.02)
        process.send_signal(stop)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stderr
        assert list(save.parent.iterdir()) == []  # neither the npz nor its temporary file


@pytest.mark.slow
def test_show_predictions_without_an_experiment(shared_data: Path, tmp_path: Path):
    from kaggle_seg.config import build_data_config
    from kaggle_seg.io import write_csv_atomic
    from kaggle_seg.train import save_oof

    source = shared_data / "dsb2018" / "stage1_train"
    image_id = sorted(p.name for p in source.iterdir())[0]
    (tmp_path / "data" / "stage1_train").mkdir(parents=True)
    (tmp_path / "data" / "stage1_train" / image_id).symlink_to(source / image_id)
    competition = get_competition("dsb2018")
    table = competition.read_table(tmp_path / "data", build_data_config("dsb2018"))
    write_csv_atomic(table, tmp_path / "table.csv")
    labels = competition.read_instances(table.iloc[0])
    save_oof({image_id: (labels > 0)[None].astype("float32")}, tmp_path / "p.npz", "uint8")

    def show(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "kaggle_seg", "show", "--predictions", str(tmp_path / "p.npz"),
             "--out", str(tmp_path / "png"), "--random", "1", *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    done = show("--table", str(tmp_path / "table.csv"), "-c", "dsb2018")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [
        f"{image_id}_overlay.png",
        f"{image_id}_panel.png",
    ]
    missing = show("-c", "dsb2018")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "--table" in missing.stderr and "TypeError" not in missing.stderr
