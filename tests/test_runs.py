"""Run folders are never replaced by accident: refuse, --force moves aside, a failed resume
writes nothing, Ctrl-C then --resume does exactly the configured epochs (real DSB images)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_train import write_config

from kaggle_seg.config import load_experiment
from kaggle_seg.errors import KsegError
from kaggle_seg.train import Trainer, start_runtime, train_fold

# Wall-clock columns differ between any two runs; everything else must be equal.
TIMING = ("train_seconds", "images_per_s")


@pytest.fixture(scope="module")
def dsb_small(write_dsb_subset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 training + 16 validation DSB images (256x256): 4 steps per epoch at batch 8."""
    return write_dsb_subset(tmp_path_factory.mktemp("dsb_runs"), 48, 16)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_training_over_a_run_is_refused_and_force_moves_it_aside(dsb_small: Path, tmp_path: Path):
    config = load_experiment(write_config(dsb_small, "guarded", epochs=1))
    train_fold(config, 0, run_root=tmp_path, device="cpu")
    run = tmp_path / "guarded" / "fold_0"
    before = snapshot(run)
    with pytest.raises(KsegError, match=r"fold_0 already holds a run: pass --resume .* --force"):
        train_fold(config, 0, run_root=tmp_path, device="cpu")
    assert snapshot(run) == before

    train_fold(config, 0, run_root=tmp_path, device="cpu", force=True)
    (old,) = (tmp_path / "guarded").glob("fold_0.old-*")
    assert snapshot(old) == before  # moved, not deleted, not changed
    assert (run / "best.pt").is_file() and (run / "history.csv").is_file()
    # Predicting from the experiment ignores the moved-aside run.
    from kaggle_seg.runs import experiment_folds, find_checkpoints

    assert find_checkpoints(tmp_path / "guarded") == [run / "best.pt"]
    assert experiment_folds(tmp_path, ["guarded"], None) == {"guarded": [run]}


def test_force_with_a_config_error_leaves_the_old_run_in_place(dsb_small: Path, tmp_path: Path):
    """--force moves the old run aside only once the new one is built: a typo in the model,
    loss, augmentation or monitor fails first, naming its option, and the old run stays."""
    path = write_config(dsb_small, "typo", epochs=1)
    train_fold(load_experiment(path), 0, run_root=tmp_path, device="cpu")
    run = tmp_path / "typo" / "fold_0"
    before = snapshot(run)
    smp = "model.architecture=Unet"
    for overrides in [
        ["model.architecture=Unett"],
        [smp, "model.encoder=resnet35"],
        [smp, "model.encoder=tu-resnet35"],
        ["train.loss=[{name: dicee}]"],
        ["augment.preset=heavyy"],
        ["train.monitor=valid_dice"],
    ]:
        with pytest.raises((KeyError, KsegError)) as caught:
            train_fold(load_experiment(path, overrides), 0, run_root=tmp_path, device="cpu",
                       force=True)  # fmt: skip
        error = caught.value
        message = error.args[0] if isinstance(error, KeyError) else str(error)
        assert message.startswith(overrides[-1].split("=")[0] + ": "), message
        assert snapshot(run) == before
        assert not list((tmp_path / "typo").glob("fold_0.old-*"))


@pytest.mark.slow
def test_cli_refusal_is_one_line(dsb_small: Path, tmp_path: Path):
    run = tmp_path / "cli_guard" / "fold_0"
    run.mkdir(parents=True)
    (run / "history.csv").write_text("epoch,train_loss\n1,0.5\n")
    result = subprocess.run(
        [sys.executable, "-m", "kaggle_seg", "train", "--config",
         str(write_config(dsb_small, "cli_guard")), "--fold", "0", "--device", "cpu",
         "--runs-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "--resume" in result.stderr
    assert "--force" in result.stderr and "fold_0" in result.stderr
    assert (run / "history.csv").read_text() == "epoch,train_loss\n1,0.5\n"


def test_failed_resume_changes_nothing_on_disk(dsb_small: Path, tmp_path: Path):
    config = load_experiment(write_config(dsb_small, "changed", epochs=2),
                             ["train.epochs=1"])  # fmt: skip
    train_fold(config, 0, run_root=tmp_path, device="cpu")
    run = tmp_path / "changed" / "fold_0"
    before = snapshot(run)
    wider = load_experiment(write_config(dsb_small, "changed", epochs=2),
                            ["model.params.base_channels=16"])  # fmt: skip
    with pytest.raises(KsegError) as caught:
        train_fold(wider, 0, run_root=tmp_path, device="cpu", resume=True)
    message = str(caught.value)
    assert "\n" not in message and "last.pt" in message
    assert "model.params" in message and "--force" in message
    assert snapshot(run) == before  # config.yaml not rewritten, nothing else touched
    # The weights' input: another normalisation or preprocessing is another model's.
    for override, key in [("augment.normalize=imagenet", "augment.normalize"),
                          ("data.preprocess=[grey_dark]", "data.preprocess")]:  # fmt: skip
        other = load_experiment(write_config(dsb_small, "changed", epochs=2), [override])
        with pytest.raises(KsegError, match=rf"--resume: .*{key}"):
            train_fold(other, 0, run_root=tmp_path, device="cpu", resume=True)
        assert snapshot(run) == before
    # A last.pt of a kseg that wrote no data.preprocess had none.
    from kaggle_seg.runs import changed_keys

    saved = config.model_dump(mode="json")
    del saved["data"]["preprocess"]
    assert changed_keys(saved, config.model_dump(mode="json")) == []


def test_resume_with_another_split_is_refused_and_a_moved_folds_file_is_not(
    dsb_small: Path, tmp_path: Path
):
    """last.pt remembers its validation images: a folds file of another split (another
    --seed, say) would validate on images the run trained on."""
    path = write_config(dsb_small, "split", epochs=2)
    train_fold(load_experiment(path, ["train.epochs=1"]), 0, run_root=tmp_path, device="cpu")
    run = tmp_path / "split" / "fold_0"
    before = snapshot(run)
    folds = pd.read_csv(dsb_small / "folds.csv")
    moved, other = tmp_path / "moved_folds.csv", tmp_path / "other_folds.csv"
    folds.to_csv(moved, index=False)
    folds.assign(fold=1 - folds["fold"]).to_csv(other, index=False)
    with pytest.raises(KsegError, match=r"--resume: .*last\.pt was validated on other images"):
        train_fold(load_experiment(path, [f"data.folds={other}"]), 0, run_root=tmp_path,
                   device="cpu", resume=True)  # fmt: skip
    assert snapshot(run) == before
    result = train_fold(load_experiment(path, [f"data.folds={moved}"]), 0, run_root=tmp_path,
                        device="cpu", resume=True)  # fmt: skip
    assert len(result.history) == 2


def test_resume_from_a_best_pt_or_a_foreign_checkpoint_says_what_it_is(
    dsb_small: Path, tmp_path: Path
):
    """A last.pt replaced by the best.pt, or by another tool's state dict, is named for what
    it is, not as a config whose every key changed."""
    config = load_experiment(write_config(dsb_small, "swapped", epochs=1))
    train_fold(config, 0, run_root=tmp_path, device="cpu")
    run = tmp_path / "swapped" / "fold_0"
    shutil.copy(run / "best.pt", run / "last.pt")
    before = snapshot(run)
    with pytest.raises(KsegError) as caught:
        train_fold(config, 0, run_root=tmp_path, device="cpu", resume=True)
    message = str(caught.value)
    assert "no training state" in message and "train_model" in message
    assert "\n" not in message and "last.pt" in message and "--force" in message
    torch.save({"state_dict": {"conv.weight": torch.zeros(3)}, "epoch": 3}, run / "last.pt")
    with pytest.raises(KsegError, match=r"last\.pt is not a kseg checkpoint \(no config"):
        train_fold(config, 0, run_root=tmp_path, device="cpu", resume=True)
    assert {k: v for k, v in snapshot(run).items() if k != "last.pt"} == {
        k: v for k, v in before.items() if k != "last.pt"
    }


def test_resume_without_a_checkpoint_says_so(dsb_small: Path, tmp_path: Path):
    config = load_experiment(write_config(dsb_small, "fresh", epochs=1))
    with pytest.raises(KsegError, match=r"--resume: no checkpoint at .*last\.pt"):
        train_fold(config, 0, run_root=tmp_path, device="cpu", resume=True)
    assert not (tmp_path / "fresh" / "fold_0").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sampler", [[], ["train.sampler_weight_column=empty"]])
def test_ctrl_c_mid_epoch_then_resume_equals_an_uninterrupted_run(
    dsb_small: Path, tmp_path: Path, sampler: list[str]
):
    """Also with the weighted sampler, whose draws must go on from the interrupted run's."""
    config = load_experiment(write_config(dsb_small, "sigint", epochs=3), sampler)
    straight = train_fold(config, 0, run_root=tmp_path / "straight", device="cpu")

    trainer = Trainer(config, 0, tmp_path / "stopped", start_runtime("cpu"))
    forward, calls = trainer.criterion.forward, {"train": 0}

    def interrupt_mid_epoch_2(logits, masks):
        if trainer.model.training and trainer.epoch == 1:
            calls["train"] += 1
            if calls["train"] == 3:  # Ctrl-C after two optimizer steps of epoch 2
                raise KeyboardInterrupt
        return forward(logits, masks)

    trainer.criterion.forward = interrupt_mid_epoch_2
    run = tmp_path / "stopped" / "sigint" / "fold_0"
    with pytest.raises(KsegError, match=r"interrupted in epoch 2: .*last\.pt .*--resume"):
        trainer.fit()
    end_of_epoch_1 = torch.load(run / "last.pt", weights_only=True)
    assert end_of_epoch_1["epoch"] == 1  # the clean end-of-epoch checkpoint was kept

    resumed = train_fold(config, 0, run_root=tmp_path / "stopped", device="cpu", resume=True)
    columns = [c for c in straight.history.columns if c not in TIMING]
    pd.testing.assert_frame_equal(resumed.history[columns], straight.history[columns])
    a = torch.load(tmp_path / "straight" / "sigint" / "fold_0" / "last.pt", weights_only=True)
    b = torch.load(run / "last.pt", weights_only=True)
    for key, value in a["train_model"].items():
        assert torch.equal(value, b["train_model"][key]), key
    # Exactly 3 epochs x 4 steps of updates, as configured: Adam counts them.
    steps = {float(s["step"]) for s in b["optimizer"]["state"].values()}
    assert steps == {12.0}


def test_interrupt_in_the_oof_pass_says_resume_writes_it_without_training(
    dsb_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A Ctrl-C in the pass over best.pt after the last epoch is named as such, and --resume
    then writes oof.npz without another epoch."""
    config = load_experiment(write_config(dsb_small, "oof_cut", epochs=1), ["train.oof_tta=flip"])
    predict_valid = Trainer.predict_valid

    def interrupted_in_the_oof_pass(self: Trainer, keep: bool = False, tta: str = "none"):
        if tta != "none":
            raise KeyboardInterrupt
        return predict_valid(self, keep=keep, tta=tta)

    monkeypatch.setattr(Trainer, "predict_valid", interrupted_in_the_oof_pass)
    with pytest.raises(KsegError, match=r"interrupted while writing the OOF.*--resume writes"):
        train_fold(config, 0, run_root=tmp_path, device="cpu")
    run = tmp_path / "oof_cut" / "fold_0"
    assert not (run / "oof.npz").exists()
    monkeypatch.setattr(Trainer, "predict_valid", predict_valid)
    result = train_fold(config, 0, run_root=tmp_path, device="cpu", resume=True)
    assert len(result.history) == 1 and (run / "oof.npz").is_file()


def test_interrupt_before_any_epoch_leaves_nothing_to_resume(dsb_small: Path, tmp_path: Path):
    config = load_experiment(write_config(dsb_small, "early", epochs=1))
    trainer = Trainer(config, 0, tmp_path, start_runtime("cpu"))

    def interrupted() -> dict:
        raise KeyboardInterrupt

    trainer.train_one_epoch = interrupted
    with pytest.raises(KsegError, match=r"before any epoch finished.*same command again"):
        trainer.fit()
    train_fold(config, 0, run_root=tmp_path, device="cpu")  # no --force needed: nothing lost


def test_bad_monitor_is_refused_before_the_first_epoch(dsb_small: Path, tmp_path: Path):
    config = load_experiment(write_config(dsb_small, "monitor", epochs=1),
                             ["train.monitor=valid_dice"])  # fmt: skip
    trainer = Trainer(config, 0, tmp_path, start_runtime("cpu"))

    def never() -> dict:
        raise AssertionError("an epoch ran before train.monitor was checked")

    trainer.train_one_epoch = never
    with pytest.raises(KsegError, match=r"train.monitor: 'valid_dice' is not measured.*dice"):
        trainer.fit()
    assert not (tmp_path / "monitor" / "fold_0").exists()
    # Every column an epoch writes can be monitored (here: one of the loss terms).
    ok = load_experiment(write_config(dsb_small, "monitor", epochs=1),
                         ["train.monitor=train_dice", "train.monitor_mode=min"])  # fmt: skip
    result = train_fold(ok, 0, run_root=tmp_path, device="cpu")
    assert "train_dice" in result.history.columns


@pytest.mark.parametrize("name", ["../../escape", "/abs/exp", "a/b", "..", "a\\b", ""])
def test_experiment_names_that_leave_the_runs_folder_are_refused(
    dsb_small: Path, tmp_path: Path, name: str
):
    with pytest.raises(KsegError, match=r"'name'.*plain folder name"):
        load_experiment(write_config(dsb_small, "ok"), [f"name={name!r}" if name else "name=''"])
    assert list(tmp_path.iterdir()) == []


def test_read_run_value_reads_one_key_and_leaves_the_rest_unchecked(tmp_path: Path):
    """A stand-in config (no data section required by anyone) still gives one key; missing
    files and keys are None, not errors."""
    from kaggle_seg.runs import read_run_value

    fold = tmp_path / "exp" / "fold_0"
    fold.mkdir(parents=True)
    assert read_run_value(fold, "data", "preprocess") is None
    (fold / "config.yaml").write_text("name: stand_in\n")
    assert read_run_value(fold, "data", "preprocess") is None
    assert read_run_value(fold, "name") == "stand_in"
    (fold / "config.yaml").write_text("name: x\ndata: {preprocess: [clahe], bogus: 1}\n")
    assert read_run_value(fold, "data", "preprocess") == ["clahe"]
    with pytest.raises(KsegError, match="not a valid experiment config"):
        from kaggle_seg.runs import read_run_config

        read_run_config(fold)  # the full reader still refuses it


def test_a_run_moved_aside_is_no_fold_of_its_experiment_but_is_itself_when_named(
    tmp_path: Path,
):
    """`kseg tune / report / show` on runs/x read fold_<k> only; named on its own (to tune or
    report the old run), fold_0.old-<time> is that run's fold 0, as kseg predict already
    takes its best.pt."""
    from kaggle_seg.runs import list_folds

    experiment = tmp_path / "x"
    old = experiment / "fold_0.old-20260101-000000"
    for folder in (experiment / "fold_0", old, experiment / "fold_12"):
        folder.mkdir(parents=True)
        (folder / "oof.npz").write_bytes(b"")
    (old / "best.pt").write_bytes(b"")
    assert list_folds(experiment, "oof.npz") == [
        (0, experiment / "fold_0"),
        (12, experiment / "fold_12"),
    ]
    assert list_folds(experiment, "best.pt") == []
    assert list_folds(old, "oof.npz") == list_folds(old) == [(0, old)]
    assert list_folds(experiment / "fold_12") == [(12, experiment / "fold_12")]
    assert list_folds(experiment / "fold_0.old") == []  # not a name kseg train gives
