"""The `kseg` command as users run it: fast start, one-line errors, the commands end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml


def kseg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m kaggle_seg ARGS` as a user would run `kseg ARGS`."""
    result = subprocess.run(
        [sys.executable, "-m", "kaggle_seg", *args], capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kseg {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.mark.slow
def test_start_up_imports_no_heavy_package():
    code = (
        "import sys, kaggle_seg.cli; "
        "print([m for m in ('torch', 'numba', 'kaggle', 'sklearn', 'pandas', 'cv2') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


HEAVY = ("torch", "numba", "sklearn", "kaggle", "kagglehub", "timm", "segmentation_models_pytorch",
         "cv2", "pandas", "matplotlib", "albumentations", "scipy")  # fmt: skip


@pytest.mark.parametrize(
    "args", [["--version"], ["--help"], ["predict", "--help"], ["kernel", "build", "--help"]]
)
@pytest.mark.slow
def test_version_and_help_import_nothing_heavy(args: list[str]):
    """What makes `kseg --help` instant is what it does not import (a wall time would flake on
    a busy machine): the command line runs in-process and the heavy modules it loaded are
    listed."""
    code = (
        "import sys\n"
        "from kaggle_seg.cli import app\n"
        "try:\n"
        f"    app({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ("kseg " in done.stdout) if args == ["--version"] else ("--help" in done.stdout)
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


@pytest.mark.slow
def test_errors_are_one_line_without_traceback(tmp_path: Path):
    result = kseg(
        "prepare",
        "-c",
        "uwmgi",
        "--data-dir",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "t.csv"),
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "nope" in result.stderr
    unknown = kseg(
        "prepare",
        "-c",
        "kvasir",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "t.csv"),
        check=False,
    )
    assert "unknown competition 'kvasir'" in unknown.stderr
    debug = kseg(
        "--debug",
        "prepare",
        "-c",
        "kvasir",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "t.csv"),
        check=False,
    )
    assert "Traceback" in debug.stderr


@pytest.mark.slow
def test_a_wrong_config_key_is_named(phantom_dir: Path, tmp_path: Path):
    config = tmp_path / "exp.yaml"
    config.write_text("data:\n  exclude_case_day: [case7_day0]\n  n_folds: many\n")
    result = kseg(
        "prepare",
        "-c",
        "uwmgi",
        "--data-dir",
        str(phantom_dir),
        "--out",
        str(tmp_path / "t.csv"),
        "--config",
        str(config),
        check=False,
    )
    assert f"{config}: invalid config" in result.stderr  # the file, not "defaults"
    assert "unknown key 'data.exclude_case_day' (did you mean data.exclude_case_days?)" in (
        result.stderr
    )
    assert "'data.n_folds'" in result.stderr
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.slow
def test_prepare_folds_score_on_the_phantom(phantom_dir: Path, tmp_path: Path):
    table = tmp_path / "table.csv"
    out = kseg("prepare", "-c", "uwmgi", "--data-dir", str(phantom_dir), "--out", str(table))
    assert "72 images in 5 groups" in out.stdout and "360x310" in out.stdout
    folds = tmp_path / "folds.csv"
    kseg("folds", "-c", "uwmgi", "--table", str(table), "--out", str(folds), "--n-folds", "5")
    assert (
        "reused"
        in kseg(
            "folds", "-c", "uwmgi", "--table", str(table), "--out", str(folds), "--n-folds", "5"
        ).stdout
    )
    frame = pd.read_csv(folds)
    assert list(frame.columns) == ["id", "fold", "group"]
    assert frame.groupby("group")["fold"].nunique().max() == 1

    # A perfect submission (train.csv renamed) scores exactly 1.
    truth = phantom_dir / "train.csv"
    perfect = pd.read_csv(truth).rename(columns={"segmentation": "predicted"})
    perfect.to_csv(tmp_path / "perfect.csv", index=False)
    result = kseg(
        "score",
        "-c",
        "uwmgi",
        str(truth),
        str(tmp_path / "perfect.csv"),
        "--images",
        str(phantom_dir / "train"),
        "--json",
    )
    assert json.loads(result.stdout)["score"] == pytest.approx(1.0)


@pytest.mark.slow
def test_score_rejects_a_broken_submission_by_line(phantom_dir: Path, tmp_path: Path):
    truth = phantom_dir / "train.csv"
    broken = pd.read_csv(truth).rename(columns={"segmentation": "predicted"})
    broken.loc[4, "predicted"] = "10 5 12 3"
    broken.to_csv(tmp_path / "broken.csv", index=False)
    result = kseg(
        "score",
        "-c",
        "uwmgi",
        str(truth),
        str(tmp_path / "broken.csv"),
        "--images",
        str(phantom_dir / "train"),
        check=False,
    )
    assert result.returncode == 1
    assert "broken.csv: line 6" in result.stderr


@pytest.mark.slow
def test_score_dsb_solution_against_itself(shared_data: Path, tmp_path: Path):
    solution = shared_data / "dsb2018" / "stage1_solution.csv"
    result = kseg("score", "-c", "dsb2018", str(solution), str(solution), "--json")
    assert json.loads(result.stdout)["score"] == pytest.approx(1.0)
    sample = shared_data / "dsb2018" / "stage1_sample_submission.csv"
    assert (
        json.loads(kseg("score", "-c", "dsb2018", str(solution), str(sample), "--json").stdout)[
            "score"
        ]
        == 0.0
    )
    tables = kseg(
        "score", "-c", "dsb2018", str(solution), str(sample), "--tables", str(tmp_path / "t")
    )
    per_image = pd.read_csv(tmp_path / "t" / "per_image.csv")
    assert f"wrote {tmp_path / 't' / 'per_image.csv'}" in tables.stdout
    assert len(per_image) == 65 and (per_image["score"] == 0).all()
    swapped = kseg("score", "-c", "dsb2018", str(sample), str(solution), check=False)
    assert swapped.returncode == 1
    assert "the truth comes first (kseg score TRUTH SUBMISSION)" in swapped.stderr


@pytest.mark.parametrize("competition", ["uwmgi", "dsb2018"])
@pytest.mark.slow
def test_demo_runs_the_whole_path(tmp_path: Path, competition: str):
    # Two epochs keep the test short; the README's `kseg demo` trains longer.
    out = kseg(
        "demo", "-c", competition, "--out", str(tmp_path), "--epochs", "2", "--seed", "7"
    ).stdout
    for step in ("kseg prepare", "kseg folds", "kseg train", "kseg tune", "kseg submit",
                 "kseg score", "kseg show", "kseg report"):  # fmt: skip
        assert step in out
    cv, test = re.search(r"CV (\d\.\d+), test score (\d\.\d+)", out).groups()
    assert 0.0 <= float(cv) <= 1.0 and 0.0 <= float(test) <= 1.0
    experiment = tmp_path / "runs" / f"demo_{competition}"
    for name in ("fold_0/best.pt", "fold_0/oof.npz", "fold_0/history.csv", "postprocess.json"):
        assert (experiment / name).is_file()
    (submission,) = (tmp_path / "submissions").glob("*.csv")
    assert submission.stat().st_size > 0
    typical = {p.name for p in (tmp_path / "show" / "typical").glob("*_panel.png")}
    worst = {p.name for p in (tmp_path / "show" / "worst").glob("*_panel.png")}
    assert len(typical) == 3 and len(worst) == 3
    assert f"kseg report: {tmp_path / 'report.html'}" in out
    build = f"kseg kernel build -c {competition} -e demo_{competition} --runs-dir {tmp_path}/runs"
    assert f"next: {build}" in out
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    # Epochs asked for are trained in full, with no time budget cutting them.
    assert len(pd.read_csv(experiment / "fold_0" / "history.csv")) == 2
    saved = yaml.safe_load((tmp_path / f"demo_{competition}.yaml").read_text())
    assert saved["train"]["time_budget_minutes"] is None
    assert saved["train"]["seed"] == 7
    if competition == "dsb2018":
        # Scored on every test image the package ships, not a handful.
        truth = pd.read_csv(tmp_path / "kaggle" / "dsb2018" / "stage1_solution.csv")
        assert f"mAP over {truth['ImageId'].nunique()} images" in out
        assert truth["ImageId"].nunique() >= 20


def test_demo_fits_its_own_epochs_to_its_minutes(tmp_path: Path, monkeypatch):
    """Without --epochs the demo trains its recipe's epochs under DEMO_TRAIN_MINUTES, so it
    finishes in about 3 minutes on a slower machine too."""
    import kaggle_seg.train
    from kaggle_seg.demo import DEMO_TRAIN_MINUTES, run_demo

    trained = []

    def stop_before_training(config, *args, **kwargs):
        trained.append(config)
        raise KeyboardInterrupt

    monkeypatch.setattr(kaggle_seg.train, "train_fold", stop_before_training)
    with pytest.raises(KeyboardInterrupt):
        list(run_demo(tmp_path, "dsb2018"))
    (config,) = trained
    assert config.train.time_budget_minutes == DEMO_TRAIN_MINUTES
    assert config.train.epochs == 90


@pytest.mark.parametrize(
    ("competition", "decoder"),
    [("uwmgi", [128, 64, 32, 16, 16]), ("dsb2018", [128, 64, 32, 32, 16])],
)
def test_demo_builds_its_decoder_from_the_competitions_recipe(
    tmp_path: Path, competition: str, decoder: list[int]
):
    """The uwmgi demo's thinner high-resolution block is what lets a float32-only CPU train its
    16 epochs in the demo's minutes; DSB keeps the wider one its nuclei outlines need."""
    from kaggle_seg.competitions import COMPETITIONS
    from kaggle_seg.demo import demo_experiment

    recipe = COMPETITIONS[competition].demo
    config = demo_experiment(competition, recipe, tmp_path, recipe.epochs, 2.25)
    assert config.model.params["decoder_channels"] == decoder


def test_competition_option_help_names_every_registered_competition():
    import re as _re

    from kaggle_seg.cli import COMPETITION_NAMES
    from kaggle_seg.competitions import COMPETITIONS

    assert set(_re.split(r",\s*|\s+or\s+", COMPETITION_NAMES)) == set(COMPETITIONS)


class _CorruptAt:
    """A dataset whose second image cannot be read, as a truncated PNG in a test folder."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int):
        from kaggle_seg.errors import InputError

        if i == 1:
            raise InputError("test/b.png: cannot decode image (corrupt or not an image)")
        return i


def test_an_error_in_a_loader_worker_prints_as_its_own_one_line_message():
    """torch re-raises a worker's InputError with its whole traceback as the message; the
    user sees the worker's one line, as with no workers."""
    import torch

    from kaggle_seg.errors import InputError, error_line

    loader = torch.utils.data.DataLoader(_CorruptAt(), batch_size=1, num_workers=1)
    with pytest.raises(InputError) as raised:
        list(loader)
    assert "Traceback" in str(raised.value)  # what torch hands back
    assert error_line(raised.value) == "test/b.png: cannot decode image (corrupt or not an image)"
    assert error_line("a: b\n c") == "a: b c"


def test_a_device_torch_does_not_know_names_the_option():
    from kaggle_seg.errors import KsegError
    from kaggle_seg.runtime import parse_device, start_runtime

    with pytest.raises(KsegError, match=r"^--device gpu: not a device; use cpu, cuda or cuda:N$"):
        start_runtime("gpu")
    with pytest.raises(KsegError, match=r"^--device gpu"):
        parse_device("gpu")
    assert parse_device("cpu").type == "cpu"


def test_more_torchrun_processes_than_gpus_says_how_many_to_start(monkeypatch):
    import torch

    from kaggle_seg.errors import KsegError
    from kaggle_seg.runtime import start_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(KsegError, match=r"process 1 .* 1 visible; use --nproc_per_node 1$"):
        start_runtime("cuda")
