"""Checkpoints load through the safe loader only: a malicious .pt runs no code on any path
(predict, submit, --resume, model.weights_path); kseg's own checkpoints hold plain data; every
failure is one line naming the file."""

from __future__ import annotations

import errno
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_predict import write_checkpoint
from test_train import write_config

from kaggle_seg.checkpoints import (
    UnsafeCheckpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kaggle_seg.config import load_experiment
from kaggle_seg.errors import KsegError
from kaggle_seg.train import train_fold


class WritesAFile:
    """Unpickling this calls exec: what a hostile checkpoint on a Kaggle dataset could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def poison(source: Path, target: Path, marker: Path) -> Path:
    """`source` (a kseg checkpoint) with one extra entry whose unpickling writes `marker`."""
    state = torch.load(source, weights_only=True)
    state["note"] = WritesAFile(marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


@pytest.fixture(scope="module")
def dsb_small(write_dsb_subset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dsb_subset(tmp_path_factory.mktemp("dsb_ckpt"), 24, 8)


@pytest.fixture(scope="module")
def dsb_test_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real stage-1 test images in Kaggle's layout (what `submit --data-dir` reads)."""
    source = shared_data / "dsb2018" / "stage1_test"
    root = tmp_path_factory.mktemp("dsb_test_root")
    for image_id in sorted(p.name for p in source.iterdir())[:3]:
        shutil.copytree(source / image_id / "images", root / "stage1_test" / image_id / "images")
    return root


def test_malicious_checkpoint_runs_no_code_through_predict_and_submit(
    dsb_test_root: Path, tmp_path: Path
):
    from kaggle_seg.predict_folder import predict_folder
    from kaggle_seg.submit import write_submission

    marker = tmp_path / "pwned"
    evil = poison(write_checkpoint(tmp_path / "good.pt"), tmp_path / "exp" / "fold_0" / "best.pt",
                  marker)  # fmt: skip
    with pytest.raises(UnsafeCheckpoint, match=r"best\.pt: refused: loading it would call .*exec"):
        predict_folder([evil], dsb_test_root / "stage1_test", num_workers=0)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpoint, match=r"best\.pt: refused"):
        write_submission([tmp_path / "exp"], dsb_test_root, tmp_path / "s.csv", num_workers=0)
    assert not marker.exists() and not (tmp_path / "s.csv").exists()


@pytest.mark.slow
def test_malicious_checkpoint_runs_no_code_through_the_cli(dsb_test_root: Path, tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = poison(write_checkpoint(tmp_path / "good.pt"), tmp_path / "evil.pt", marker)
    result = subprocess.run(
        [sys.executable, "-m", "kaggle_seg", "submit", "--checkpoints", str(evil), "--data-dir",
         str(dsb_test_root), "--out", str(tmp_path / "s.csv"), "--num-workers", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and not marker.exists()
    assert result.stderr.count("\n") == 1 and "evil.pt: refused" in result.stderr


def test_malicious_checkpoint_runs_no_code_through_resume_and_weights_path(
    dsb_small: Path, tmp_path: Path
):
    from kaggle_seg.models import build_model

    marker = tmp_path / "pwned"
    config = load_experiment(write_config(dsb_small, "victim", epochs=1))
    train_fold(config, 0, run_root=tmp_path, device="cpu")
    run = tmp_path / "victim" / "fold_0"
    poison(run / "last.pt", run / "last.pt", marker)
    before = (run / "config.yaml").read_bytes()
    with pytest.raises(UnsafeCheckpoint, match=r"last\.pt: refused"):
        train_fold(config, 0, run_root=tmp_path, device="cpu", resume=True)
    assert not marker.exists() and (run / "config.yaml").read_bytes() == before

    evil_best = poison(run / "best.pt", tmp_path / "shared" / "best.pt", marker)
    with pytest.raises(UnsafeCheckpoint, match=r"shared/best\.pt: refused"):
        build_model(config.model.model_copy(update={"weights_path": evil_best}), 3, 1)
    assert not marker.exists()
    # The same file without the hostile entry loads as weights: safe loading is not weaker.
    model = build_model(config.model.model_copy(update={"weights_path": run / "best.pt"}), 3, 1)
    saved = torch.load(run / "best.pt", weights_only=True)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_every_training_state_is_plain_data_and_resumes(dsb_small: Path, tmp_path: Path):
    """EMA, SGD momentum, a plateau scheduler, history and RNG states: all load with
    weights_only=True, with nothing added to torch.serialization's allow-list."""
    overrides = [
        "train.ema_decay=0.9",
        "train.optimizer.name=sgd",
        "train.optimizer.params={momentum: 0.9}",
        "train.scheduler.name=plateau",
    ]
    config = load_experiment(write_config(dsb_small, "states", epochs=1), overrides)
    train_fold(config, 0, run_root=tmp_path, device="cpu")
    last = torch.load(tmp_path / "states" / "fold_0" / "last.pt", weights_only=True)
    assert last["ema"] and last["optimizer"]["state"] and last["scheduler"]
    assert isinstance(last["rng"]["numpy"]["state"]["key"], list)
    # Plain Python values: numpy scalars would need the allow-list.
    assert {type(v) for v in last["history"][0].values()} <= {float, int, str, bool}
    more = load_experiment(write_config(dsb_small, "states", epochs=2), overrides)
    result = train_fold(more, 0, run_root=tmp_path, device="cpu", resume=True)
    assert len(result.history) == 2


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path: Path):
    import random

    path = save_checkpoint({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_old_checkpoint_with_numpy_state_says_what_to_do(tmp_path: Path):
    path = tmp_path / "last.pt"
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, path)
    with pytest.raises(UnsafeCheckpoint) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert "older kseg" in message and "--force" in message


def test_checkpoint_config_with_an_extra_key_is_one_line_naming_the_file(tmp_path: Path):
    from kaggle_seg.predict import load_ensemble

    path = write_checkpoint(tmp_path / "best.pt")
    state = torch.load(path, weights_only=True)
    state["config"]["train"]["warp_speed"] = 9
    torch.save(state, path)
    with pytest.raises(KsegError) as caught:
        load_ensemble([path])
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "train.warp_speed" in message


def test_truncated_and_foreign_files_are_named(tmp_path: Path):
    good = write_checkpoint(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    for cut in (1000, len(good.read_bytes()) - 100):  # early, or only the archive's end
        truncated.write_bytes(good.read_bytes()[:cut])
        with pytest.raises(KsegError, match=r"truncated\.pt: not a readable checkpoint "
                           rf"\(truncated or damaged: {cut:,} bytes"):  # fmt: skip
            load_checkpoint(truncated)
    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(pickle.dumps({"model": 1}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's protocol warning is not let through
        with pytest.raises(KsegError, match=r"pickled\.pt: not a readable checkpoint"):
            load_checkpoint(pickled)
    listing = tmp_path / "list.pt"
    torch.save([1, 2], listing)
    with pytest.raises(KsegError, match=r"list\.pt: not a kseg checkpoint"):
        load_checkpoint(listing)


class _FullDisk:
    """A file whose writes fail as on a full disk once `budget` bytes are written."""

    budget = 0

    def __init__(self, path, mode="wb"):
        self.handle = open(path, mode)  # noqa: SIM115 - closed by __exit__
        self.written = 0

    def write(self, data):
        self.written += len(data)
        if self.written > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.handle.write(data)

    def flush(self):
        self.handle.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


@pytest.mark.parametrize("budget", [0, 2000])  # the first write fails, or one inside torch.save
def test_full_disk_names_the_checkpoint_and_leaves_no_partial_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, budget: int
):
    import kaggle_seg.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "open", _FullDisk, raising=False)
    monkeypatch.setattr(_FullDisk, "budget", budget)
    target = tmp_path / "run" / "last.pt"
    with pytest.raises(KsegError) as caught:
        save_checkpoint({"model": {"w": torch.zeros(10_000)}}, target)
    message = str(caught.value)
    assert message.startswith(f"{target}: cannot write") and "\n" not in message
    assert message.endswith("(No space left on device)")
    assert list(target.parent.iterdir()) == []


class _InterruptedMidSave(_FullDisk):
    """A SIGTERM / Ctrl-C whose handler runs inside one of torch.save's writes."""

    def write(self, data):
        self.written += len(data)
        if self.written > self.budget:
            raise KeyboardInterrupt
        return self.handle.write(data)


def test_an_interruption_mid_save_unwinds_as_one_and_leaves_the_old_checkpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """torch.save turns any exception from its writer into a RuntimeError; a kill during the
    save of last.pt must still reach training as an interruption (which prints how to
    resume), not as "cannot write the checkpoint"."""
    import kaggle_seg.checkpoints as checkpoints

    target = save_checkpoint({"epoch": 3}, tmp_path / "last.pt")
    monkeypatch.setattr(checkpoints, "open", _InterruptedMidSave, raising=False)
    monkeypatch.setattr(_InterruptedMidSave, "budget", 2000)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(10_000)}, "epoch": 4}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert torch.load(target, weights_only=True)["epoch"] == 3


def test_full_disk_during_training_names_the_file(
    dsb_small: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    import kaggle_seg.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "open", _FullDisk, raising=False)
    config = load_experiment(write_config(dsb_small, "full", epochs=1))
    with pytest.raises(KsegError, match=r"fold_0/(best|last)\.pt: cannot write .*No space left"):
        train_fold(config, 0, run_root=tmp_path, device="cpu")
    assert not list((tmp_path / "full" / "fold_0").glob("*.pt"))
    assert not list((tmp_path / "full" / "fold_0").glob(".*.tmp"))


def test_full_disk_names_the_csv_being_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from kaggle_seg.io import write_csv_atomic

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    target = tmp_path / "history.csv"
    with pytest.raises(KsegError, match=r"history\.csv: cannot write \(No space left on device\)"):
        write_csv_atomic(pd.DataFrame({"a": [1]}), target)
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_get_the_mode_a_plain_write_would(tmp_path: Path):
    """Outputs (checkpoints, postprocess.json, reports, submissions) go through a temporary
    file; it must not leave them private to the owner (mkstemp's 0o600) where the umask says
    otherwise, and a file replaced keeps its own mode."""
    import os

    from kaggle_seg.io import write_csv_atomic
    from kaggle_seg.postprocess import default_postprocess, save_postprocess

    old = os.umask(0o022)
    try:
        fresh = write_csv_atomic(pd.DataFrame({"a": [1]}), tmp_path / "table.csv")
        settings = save_postprocess(default_postprocess(["x"]), tmp_path / "postprocess.json")
        assert fresh.stat().st_mode & 0o777 == 0o644
        assert settings.stat().st_mode & 0o777 == 0o644
        os.chmod(fresh, 0o640)
        write_csv_atomic(pd.DataFrame({"a": [2]}), fresh)
        assert fresh.stat().st_mode & 0o777 == 0o640
        os.umask(0o077)
        assert (
            save_postprocess(default_postprocess(["x"]), tmp_path / "private.json").stat().st_mode
            & 0o777
            == 0o600
        )
    finally:
        os.umask(old)


def test_an_output_named_as_a_folder_is_refused_in_one_line(tmp_path: Path):
    """`kseg report --out runs`, `kseg predict --save runs`: named, before anything is written
    (predict: before predicting), not an OS error from the final rename."""
    from kaggle_seg.io import write_csv_atomic
    from kaggle_seg.probabilities import ProbabilityWriter

    with pytest.raises(KsegError, match=rf"^{tmp_path}: is a folder; name the file to write$"):
        write_csv_atomic(pd.DataFrame({"a": [1]}), tmp_path)
    with pytest.raises(KsegError, match=rf"^{tmp_path}: is a folder; name the file to write$"):
        ProbabilityWriter(tmp_path)
    assert list(tmp_path.iterdir()) == []
