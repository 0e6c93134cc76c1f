"""`kseg tune` on the blended OOF of several experiments (kaggle_seg.blend): the blend is the
weighted mean of the members' probabilities, tuned like one experiment; members that do not
share folds, images or outputs are refused with the file at fault."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kaggle_seg.blend import BLEND_FILE, blend_oof, default_blend_dir
from kaggle_seg.cli import app
from kaggle_seg.competitions import get_competition
from kaggle_seg.config import DataConfig, ExperimentConfig, save_config
from kaggle_seg.errors import KsegError
from kaggle_seg.postprocess import load_postprocess
from kaggle_seg.prepare import prepare_table, read_table
from kaggle_seg.probabilities import load_oof, save_oof
from kaggle_seg.tune import tune_experiment

CASE_DAYS = ("case1_day0", "case1_day1", "case2_day0")


def write_member(root: Path, name: str, config: ExperimentConfig, parts: list[dict]) -> Path:
    experiment = root / "runs" / name
    for fold, part in enumerate(parts):
        save_config(config, experiment / f"fold_{fold}" / "config.yaml")
        save_oof(part, experiment / f"fold_{fold}" / "oof.npz", "float16")
    return experiment


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A uwmgi phantom and two two-fold experiments on it: one whose masks are too wide
    (truth blurred, everything raised), one too narrow (everything lowered)."""
    import cv2

    from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom

    root = tmp_path_factory.mktemp("blend")
    make_uwmgi_phantom(root / "data", case_days=CASE_DAYS, n_slices=8, seed=3)
    prepare_table("uwmgi", root / "data", root / "table.csv")
    competition = get_competition("uwmgi")
    config = ExperimentConfig(data=DataConfig(competition="uwmgi", table=root / "table.csv"))
    experiments = []
    for name, shift in (("wide", 0.25), ("narrow", -0.25)):
        rng = np.random.default_rng(len(name))
        parts: list[dict] = [{}, {}]
        for row in read_table(root / "table.csv").to_dict("records"):
            truth = np.moveaxis(competition.read_mask(row), -1, 0).astype(np.float32)
            soft = np.stack([cv2.GaussianBlur(t, (0, 0), 2.0) for t in truth])
            noise = rng.normal(0.0, 0.05, soft.shape)
            probabilities = np.clip(soft + shift + noise, 0.0, 1.0).astype(np.float32)
            parts[0 if row["id"].startswith("case1_") else 1][row["id"]] = probabilities
        experiments.append(write_member(root, name, config, parts))
    return root, experiments


def test_blend_is_the_weighted_mean_and_tunes_like_one_experiment(
    members: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    _, (wide, narrow) = members
    out = blend_oof([wide, narrow], tmp_path / "blend", weights=[3, 1])
    assert json.loads((out / BLEND_FILE).read_text())["weights"] == [0.75, 0.25]
    for fold in (0, 1):
        a = load_oof(wide / f"fold_{fold}" / "oof.npz")
        b = load_oof(narrow / f"fold_{fold}" / "oof.npz")
        blended = load_oof(out / f"fold_{fold}" / "oof.npz")
        assert blended.keys() == a.keys()
        for image_id, probabilities in blended.items():
            expected = 0.75 * a[image_id] + 0.25 * b[image_id]
            np.testing.assert_allclose(probabilities, expected, atol=1e-3)  # stored float16
    result = tune_experiment(out)
    assert result.folds == [0, 1] and result.n_images == len(CASE_DAYS) * 8
    assert result.after["score"] >= result.before["score"]
    # The equal blend of a too-wide and a too-narrow member beats either member alone.
    equal = tune_experiment(blend_oof([wide, narrow], tmp_path / "equal"))
    for member in (wide, narrow):
        copy = tmp_path / member.name
        shutil.copytree(member, copy)
        assert equal.before["score"] > tune_experiment(copy).before["score"]


def test_blend_refuses_members_that_do_not_match(
    members: tuple[Path, list[Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, (wide, narrow) = members
    with pytest.raises(KsegError, match="two experiments or more"):
        blend_oof([wide], tmp_path / "b")
    with pytest.raises(KsegError, match=r"--weights: 1 weight\(s\) for 2 experiment\(s\)"):
        blend_oof([wide, narrow], tmp_path / "b", weights=[1])
    with pytest.raises(KsegError, match="non-negative weights"):
        blend_oof([wide, narrow], tmp_path / "b", weights=[1, -1])
    with pytest.raises(KsegError, match="would overwrite one of its members"):
        blend_oof([wide, narrow], narrow)
    # Trained on other folds: only fold 0.
    one_fold = tmp_path / "one_fold"
    shutil.copytree(wide / "fold_0", one_fold / "fold_0")
    with pytest.raises(KsegError, match=r"one_fold: out-of-fold predictions of folds \[0\]"):
        blend_oof([wide, one_fold], tmp_path / "b")
    # The same folds holding other images: a slice dropped from fold 1.
    fewer = tmp_path / "fewer"
    shutil.copytree(narrow, fewer)
    oof = load_oof(fewer / "fold_1" / "oof.npz")
    dropped = sorted(oof)[0]
    del oof[dropped]
    save_oof(oof, fewer / "fold_1" / "oof.npz", "float16")
    with pytest.raises(KsegError, match=rf"fewer/fold_1/oof\.npz: lacks '{dropped}'"):
        blend_oof([wide, fewer], tmp_path / "b")
    # OOF predicted with another TTA: blended, with a warning naming both.
    flipped = tmp_path / "flipped"
    shutil.copytree(narrow, flipped)
    config = ExperimentConfig(data=DataConfig(competition="uwmgi", table=root / "table.csv"))
    config.train.oof_tta = "flip"
    for fold in (0, 1):
        save_config(config, flipped / f"fold_{fold}" / "config.yaml")
    with caplog.at_level(logging.WARNING, logger="kaggle_seg.blend"):
        blend_oof([wide, flipped], tmp_path / "mixed")
    assert "train.oof_tta flip" in caplog.text and "with none" in caplog.text
    # Another competition's model.
    other = tmp_path / "other"
    shutil.copytree(narrow, other)
    config = ExperimentConfig(data=DataConfig(competition="lgg", table=root / "table.csv"))
    save_config(config, other / "fold_0" / "config.yaml")
    with pytest.raises(KsegError, match=r"data\.competition 'lgg' differs"):
        blend_oof([wide, other], tmp_path / "b")


def test_kseg_tune_with_several_experiments(
    members: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    _, (wide, narrow) = members
    runner = CliRunner()
    out = tmp_path / "blend"
    args = ["tune", "--experiment", str(wide), "--experiment", str(narrow), "--blend-dir", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_postprocess(out / "postprocess.json").classes == list(
        get_competition("uwmgi").classes
    )
    assert f"kseg submit --checkpoints {wide} --checkpoints {narrow} --postprocess" in result.output
    assert default_blend_dir([wide, narrow]) == wide.parent / "blend_wide_narrow"
    # Tuned on a weighted blend: the submission line weighs its members the same way.
    weighted = runner.invoke(app, [*args, "--weights", "3,1"])
    assert weighted.exit_code == 0, weighted.output
    assert (
        f"kseg submit --checkpoints {wide} --checkpoints {narrow} --weights 3,1 --postprocess "
        in weighted.output
    )
    single = subprocess.run(
        [sys.executable, "-m", "kaggle_seg", "tune", "--experiment", str(wide), "--weights", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 1
    assert single.stderr.strip() == (
        "error: --weights and --blend-dir need two --experiment folders or more"
    )


def test_blend_never_overwrites_a_folder_that_is_no_blend(
    members: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """`--blend-dir runs/<another experiment>` would replace that experiment's config.yaml and
    oof.npz with the blend's: refused, nothing touched. An earlier blend is rewritten, and its
    folds that the new members no longer hold are not left to be tuned with the new ones."""
    _, (wide, narrow) = members
    trained = tmp_path / "trained"
    shutil.copytree(narrow, trained)
    (trained / "fold_0" / "best.pt").write_bytes(b"weights")
    before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    with pytest.raises(KsegError, match=rf"^{trained}: not empty and not an earlier blend"):
        blend_oof([wide, narrow], trained)
    assert {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()} == before
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(KsegError, match="a_file: not a folder"):
        blend_oof([wide, narrow], tmp_path / "a_file")
    # An earlier blend of members with three folds, blended again from members with two.
    out = blend_oof([wide, narrow], tmp_path / "blend")
    shutil.copytree(out / "fold_1", out / "fold_2")
    blend_oof([wide, narrow], out, weights=[1, 3])
    assert sorted(p.name for p in out.iterdir()) == [BLEND_FILE, "fold_0", "fold_1"]
    assert json.loads((out / BLEND_FILE).read_text())["weights"] == [0.25, 0.75]
    assert tune_experiment(out).folds == [0, 1]


def test_a_blend_elsewhere_still_finds_its_table(
    members: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members trained with a relative data.table, blended into a --blend-dir outside their
    root: the blend can be tuned (and reported) again later from any folder."""
    root, experiments = members
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(root / "table.csv", project / "table.csv")
    copies = []
    for experiment in experiments:
        copy = project / "runs" / experiment.name
        shutil.copytree(experiment, copy)
        config = ExperimentConfig(data=DataConfig(competition="uwmgi", table=Path("table.csv")))
        for fold_dir in copy.glob("fold_*"):
            save_config(config, fold_dir / "config.yaml")
        copies.append(copy)
    monkeypatch.chdir(project)
    out = blend_oof(copies, tmp_path / "elsewhere" / "blend")
    monkeypatch.chdir(tmp_path)
    assert tune_experiment(out).folds == [0, 1]


def test_report_of_a_blend_names_its_members(
    members: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """A blend's config.yaml is its first member's: the report says it is a blend, of whom."""
    from kaggle_seg.report_data import read_run

    _, (wide, narrow) = members
    out = blend_oof([wide, narrow], tmp_path / "blend", weights=[3, 1])
    run = read_run(out)
    assert any("wide (0.75), narrow (0.25)" in note for note in run.notes)
    assert run.config_text.startswith("# a blend of 2 experiments")
    assert not any("blend" in note for note in read_run(wide).notes)
    (out / BLEND_FILE).write_text("{}")
    with pytest.raises(KsegError, match=f"{BLEND_FILE}: not a blend record"):
        read_run(out)
