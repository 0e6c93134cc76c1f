"""Training on real DSB images, tiny and on CPU: run files, loss falls, resume, faults, DDP."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from kaggle_seg.config import load_experiment
from kaggle_seg.errors import KsegError
from kaggle_seg.train import NonFiniteLoss, Trainer, start_runtime, train_fold

TINY = """
name: {name}
data:
  competition: dsb2018
  table: {table}
  folds: {folds}
  targets: {targets}
augment: {{preset: light, height: 64, width: 64}}
model: {{architecture: seed_unet, params: {{base_channels: 8, depth: 3}}}}
train:
  epochs: {epochs}
  batch_size: 8
  num_workers: 0
  optimizer: {{name: adam, lr: 0.01}}
  scheduler: {{name: cosine, warmup_epochs: 0.5}}
  loss: [{{name: bce, weight: 0.6}}, {{name: dice, weight: 0.4}}]
  cache: memory
"""


@pytest.fixture(scope="module")
def dsb_small(write_dsb_subset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48-image DSB table (256x256 images) with two folds."""
    return write_dsb_subset(tmp_path_factory.mktemp("dsb_small"), 48, 16)


def write_config(root: Path, name: str, epochs: int = 2, targets: str = "mask") -> Path:
    path = root / f"{name}.yaml"
    path.write_text(TINY.format(name=name, table=root / "table.csv", folds=root / "folds.csv",
                                epochs=epochs, targets=targets))  # fmt: skip
    return path


def test_smoke_training_writes_every_run_file_and_learns(dsb_small: Path, tmp_path: Path):
    config = load_experiment(write_config(dsb_small, "smoke", epochs=3))
    result = train_fold(config, 0, run_root=tmp_path, device="cpu")
    run = tmp_path / "smoke" / "fold_0"
    for name in ("config.yaml", "best.pt", "last.pt", "history.csv", "oof.npz"):
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 3
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    for column in ("valid_loss", "score", "map", "dice", "iou", "lr", "images_per_s"):
        assert column in history.columns
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert checkpoint["config"]["name"] == "smoke" and checkpoint["in_channels"] == 3
    assert result.best_epoch >= 0
    from kaggle_seg.train import load_oof

    oof = load_oof(run / "oof.npz")
    assert len(oof) == 16
    probs = next(iter(oof.values()))
    assert probs.shape == (1, 256, 256) and probs.min() >= 0.0 and probs.max() <= 1.0


def test_nan_loss_names_step_and_batch(dsb_small: Path, tmp_path: Path):
    config = load_experiment(write_config(dsb_small, "nan", epochs=1))
    trainer = Trainer(config, 0, tmp_path, start_runtime("cpu"))
    trainer.criterion = lambda logits, masks: logits.mean() * float("nan")
    with pytest.raises(NonFiniteLoss, match=r"epoch 1, step 0; batch ids: [0-9a-f]{64}"):
        trainer.fit()


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(dsb_small: Path, tmp_path: Path):
    config = load_experiment(write_config(dsb_small, "interrupt", epochs=2))
    train_fold(config, 0, run_root=tmp_path / "straight", device="cpu")
    straight = torch.load(tmp_path / "straight" / "interrupt" / "fold_0" / "last.pt",
                          weights_only=True)  # fmt: skip

    trainer = Trainer(config, 0, tmp_path / "stopped", start_runtime("cpu"))
    original = trainer.train_one_epoch

    def interrupted() -> dict:
        if trainer.epoch == 1:  # Ctrl-C as the second epoch starts
            raise KeyboardInterrupt
        return original()

    trainer.train_one_epoch = interrupted
    with pytest.raises(KsegError, match=r"interrupted in epoch 2.*--resume"):
        trainer.fit()
    run = tmp_path / "stopped" / "interrupt" / "fold_0"
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 1  # the clean end of epoch 1, not the interrupted state
    result = train_fold(config, 0, run_root=tmp_path / "stopped", device="cpu", resume=True)
    assert len(result.history) == 2
    resumed = torch.load(run / "last.pt", weights_only=True)
    for key, value in straight["train_model"].items():
        assert torch.equal(value, resumed["train_model"][key]), key
    assert resumed["history"][1]["train_loss"] == straight["history"][1]["train_loss"]


def test_missing_folds_file_is_named(dsb_small: Path, tmp_path: Path):
    config = load_experiment(write_config(dsb_small, "nofolds"),
                             [f"data.folds={tmp_path / 'missing.csv'}"])  # fmt: skip
    with pytest.raises(KsegError, match=r"missing\.csv: folds file not found"):
        train_fold(config, 0, run_root=tmp_path, device="cpu")
    # The table a shipped config names (runs/dsb2018/table.csv) is the user's to write: the
    # error says it came from the config, and how to write it or point elsewhere.
    config = load_experiment(write_config(dsb_small, "notable"),
                             [f"data.table={tmp_path / 'table.csv'}"])  # fmt: skip
    with pytest.raises(KsegError) as failed:
        train_fold(config, 0, run_root=tmp_path, device="cpu")
    assert str(failed.value).startswith(f"{tmp_path / 'table.csv'} (the config's data.table)")
    assert "kseg prepare -c dsb2018" in str(failed.value) and "--set data.table=" in str(
        failed.value
    )


def run_torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` on CPU (gloo), one thread a rank."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", *args],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_ddp_on_cpu_with_gloo_and_two_processes(dsb_small: Path, tmp_path: Path):
    config = write_config(dsb_small, "ddp", epochs=1, targets="mask_border")
    result = run_torchrun("-m", "kaggle_seg", "train", "--config", str(config), "--fold", "0",
                          "--device", "cpu", "--runs-dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "ddp" / "fold_0"
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 1 and {"score", "map"} <= set(history.columns)
    # Only rank 0 wrote: one summary line, and the OOF file holds every validation image once.
    assert result.stdout.count("fold 0: best") == 1
    from kaggle_seg.train import load_oof

    oof = load_oof(run / "oof.npz")
    assert len(oof) == 16 and next(iter(oof.values())).shape[0] == 2


RANK_HISTORY = """
import json, os, sys
from kaggle_seg.config import load_experiment
from kaggle_seg.train import train_fold
config = load_experiment(sys.argv[1], ["train.monitor=train_loss", "train.monitor_mode=min"])
result = train_fold(config, 0, run_root=sys.argv[2], device="cpu", full=True)
out = os.path.join(sys.argv[2], "rank_" + os.environ["RANK"] + ".json")
with open(out, "w") as handle:
    json.dump(result.history.drop(columns=["weights"]).to_dict("list"), handle)
"""


def test_ddp_ranks_record_and_judge_the_same_training_metrics(dsb_small: Path, tmp_path: Path):
    """Each rank trains on its shard; the epoch's train_loss (a --full run's monitor, which
    picks best.pt, early stopping and a plateau schedule on every rank) must be all ranks'
    mean, or the ranks' decisions part and one waits on the other for ever."""
    import json

    config = write_config(dsb_small, "ddp_full", epochs=2)
    script = tmp_path / "rank_history.py"
    script.write_text(RANK_HISTORY)
    result = run_torchrun(str(script), str(config), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert list(ranks[0])[:4] == ["epoch", "train_loss", "train_bce", "train_dice"]
    for key in ("train_loss", "train_bce", "train_dice", "train_seconds", "images_per_s"):
        assert ranks[0][key] == ranks[1][key], key
    assert (
        ranks[0]["train_loss"]
        == pd.read_csv(tmp_path / "ddp_full" / "full" / "history.csv")["train_loss"].tolist()
    )


@pytest.mark.slow
def test_cli_train_two_folds_then_plot(dsb_small: Path, tmp_path: Path):
    config = write_config(dsb_small, "cli", epochs=1)
    run = [sys.executable, "-m", "kaggle_seg"]
    result = subprocess.run(
        [*run, "train", "--config", str(config), "--folds", "0,1", "--device", "cpu",
         "--runs-dir", str(tmp_path), "--set", "train.tensorboard=true",
         "--set", "train.optimizer.lr=3e-3"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for fold in (0, 1):
        run_dir = tmp_path / "cli" / f"fold_{fold}"
        saved = (run_dir / "config.yaml").read_text()
        assert "lr: 0.003" in saved
        assert any((run_dir / "tensorboard").iterdir())
    plotted = subprocess.run([*run, "plot", str(tmp_path / "cli" / "fold_0")],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert plotted.returncode == 0, plotted.stderr
    png = tmp_path / "cli" / "fold_0" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_folds_job_with_resume_skips_finished_folds_and_starts_unreached_ones(
    dsb_small: Path, tmp_path: Path
):
    """The usual rescue of an interrupted 5-fold job: the same command again with --resume."""
    config = write_config(dsb_small, "rerun", epochs=1)
    train_fold(load_experiment(config), 0, run_root=tmp_path, device="cpu")
    oof_0 = tmp_path / "rerun" / "fold_0" / "oof.npz"
    written = oof_0.stat().st_mtime_ns
    result = subprocess.run(
        [sys.executable, "-m", "kaggle_seg", "train", "--config", str(config), "--folds", "0,1",
         "--resume", "--device", "cpu", "--runs-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fold 0: finished, with its oof.npz; nothing to do" in result.stdout
    assert "fold 1: no run to resume yet, training it from the start" in result.stdout
    assert oof_0.stat().st_mtime_ns == written  # no second OOF pass over a finished fold
    assert (tmp_path / "rerun" / "fold_1" / "oof.npz").is_file()
    # A lone fold still says there is nothing to resume, rather than starting quietly.
    lone = subprocess.run(
        [sys.executable, "-m", "kaggle_seg", "train", "--config", str(config), "--fold", "1",
         "--resume", "--device", "cpu", "--runs-dir", str(tmp_path / "empty")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert lone.returncode == 1 and "--resume: no checkpoint at" in lone.stderr


@pytest.mark.slow
def test_cli_train_needs_exactly_one_fold_option(dsb_small: Path):
    config = write_config(dsb_small, "cli_bad", epochs=1)
    result = subprocess.run(
        [sys.executable, "-m", "kaggle_seg", "train", "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "exactly one of --fold K or --folds" in result.stderr


@pytest.mark.slow
def test_kill_of_the_process_group_with_loader_workers_says_how_to_resume(
    dsb_small: Path, tmp_path: Path
):
    """`timeout`, Kaggle and batch schedulers SIGTERM the whole process group: the DataLoader
    workers die with the trainer, and that must not bury the resume hint under torch's
    "worker killed by signal" error or a traceback at exit."""
    import signal
    import time

    config = write_config(dsb_small, "killed", epochs=200)
    process = subprocess.Popen(
        [sys.executable, "-m", "kaggle_seg", "train", "--config", str(config), "--fold", "0",
         "--device", "cpu", "--runs-dir", str(tmp_path), "--set", "train.num_workers=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    last = tmp_path / "killed" / "fold_0" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.is_file() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(1.0)  # into a later epoch, workers busy
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "RuntimeError" not in stderr, stderr[-3000:]
    assert "holds the end of the last finished epoch; continue with --resume" in stderr


@pytest.mark.slow
def test_uwmgi_25d_padded_training_scores_volumes(phantom_dir: Path, tmp_path: Path):
    """2.5D phantom slices padded to 320x384: the fold is scored with the uwmgi metric and the
    OOF probabilities come back at each scan's own size (266x266, 360x310...)."""
    from kaggle_seg.prepare import folds_for_table, prepare_table

    prepare_table("uwmgi", phantom_dir, tmp_path / "table.csv")
    folds_for_table("uwmgi", tmp_path / "table.csv", tmp_path / "folds.csv", 5, 0, force=False)
    config_path = tmp_path / "gi.yaml"
    config_path.write_text(f"""
name: gi
data: {{competition: uwmgi, table: {tmp_path / "table.csv"}, folds: {tmp_path / "folds.csv"},
        stack_depth: 3, stack_stride: 2}}
augment: {{preset: gi, height: 320, width: 384, resize_mode: pad}}
model: {{architecture: seed_unet, params: {{base_channels: 4, depth: 2}}}}
train: {{epochs: 1, batch_size: 4, num_workers: 0, loss: [{{name: bce}}, {{name: dice}}],
         sampler_weight_column: empty}}
""")
    config = load_experiment(config_path)
    train_fold(config, 0, run_root=tmp_path, device="cpu")
    history = pd.read_csv(tmp_path / "gi" / "fold_0" / "history.csv")
    assert {"score", "gi_dice", "hausdorff", "dice"} <= set(history.columns)
    assert 0.0 <= history["score"].iloc[0] <= 1.0
    from kaggle_seg.train import load_oof

    table = pd.read_csv(tmp_path / "table.csv").set_index("id")
    oof = load_oof(tmp_path / "gi" / "fold_0" / "oof.npz")
    assert oof
    for slice_id, probs in oof.items():
        assert probs.shape == (3, table.loc[slice_id, "height"], table.loc[slice_id, "width"])


@pytest.mark.slow
def test_lgg_bunet_with_weighted_loss_and_sampler(shared_data: Path, tmp_path: Path):
    """The LGG seed system in miniature: BU-Net, weighted BCE + Dice, balanced sampling."""
    from kaggle_seg.prepare import folds_for_table, prepare_table

    prepare_table("lgg", shared_data / "lgg", tmp_path / "table.csv")
    folds_for_table("lgg", tmp_path / "table.csv", tmp_path / "folds.csv", 3, 0, force=False)
    config = load_experiment(
        Path(__file__).resolve().parents[1] / "configs" / "lgg_bunet.yaml",
        [f"data.table={tmp_path / 'table.csv'}", f"data.folds={tmp_path / 'folds.csv'}",
         "augment.height=64", "augment.width=64", "model.params.base_channels=4",
         "train.epochs=1", "train.batch_size=8", "train.num_workers=0"],
    )  # fmt: skip
    result = train_fold(config, 0, run_root=tmp_path, device="cpu")
    row = result.history.iloc[0]
    assert {"train_weighted_bce", "train_dice"} <= set(result.history.columns)
    assert row["score"] == row["patient_dice"]  # LGG is scored per patient volume


def test_autocast_follows_train_amp_and_the_device(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    from kaggle_seg import runtime

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert runtime.autocast_settings("auto", cpu) == (True, torch.bfloat16)
    runtime._warn_cpu_fp16.cache_clear()
    with caplog.at_level("WARNING", logger="kaggle_seg.runtime"):
        assert runtime.autocast_settings("fp16", cpu) == (False, torch.float32)  # emulated
        runtime.autocast_settings("fp16", cpu)
    said = [r.getMessage() for r in caplog.records if "fp16 runs in float32" in r.getMessage()]
    assert len(said) == 1  # said, and once, not per ensemble member
    assert runtime.autocast_settings("off", cpu) == (False, torch.float32)
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert runtime.autocast_settings("auto", cpu) == (False, torch.float32)
    assert runtime.autocast_settings("bf16", cpu) == (True, torch.bfloat16)
    # A T4 (Kaggle's default GPU) emulates bf16, though torch.cuda.is_bf16_supported() says
    # yes: "auto" is fp16 there, bf16 from Ampere (8.0) on.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    assert runtime.autocast_settings("auto", gpu) == (True, torch.float16)
    assert runtime.autocast_settings("bf16", gpu) == (True, torch.bfloat16)  # asked for
    assert runtime.autocast_settings("off", gpu) == (False, torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    assert runtime.autocast_settings("auto", gpu) == (True, torch.bfloat16)


def test_bf16_training_on_cpu_runs_the_model_in_bf16_and_learns(dsb_small: Path, tmp_path: Path):
    """`train.amp: bf16` on CPU: the convolutions run in bf16 (channels_last), the loss is
    float32 and falls; `off` keeps every convolution in float32."""
    dtypes = {}
    for amp in ("bf16", "off"):
        config = load_experiment(write_config(dsb_small, f"amp_{amp}"), [f"train.amp={amp}"])
        trainer = Trainer(config, 0, tmp_path, start_runtime("cpu"))
        seen: set[torch.dtype] = set()
        conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, inputs, output, seen=seen: seen.add(output.dtype))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        losses = []
        for epoch in range(2):
            trainer.epoch = epoch
            losses.append(trainer.train_one_epoch()["train_loss"])
        assert losses[1] < losses[0], (amp, losses)
        dtypes[amp] = seen
    assert dtypes == {"bf16": {torch.bfloat16}, "off": {torch.float32}}


def test_ema_with_warmup_validates_no_worse_than_the_raw_weights(dsb_small: Path, tmp_path: Path):
    """A short real-DSB run (24 optimizer steps): the EMA (decay 0.998, as the DSB recipe had)
    warms up with the step count, so the weights validated and kept are not mostly the random
    initialisation, and the BN statistics of the validated weights are recomputed (precise BN);
    history.csv says which weights were validated."""
    config = load_experiment(
        write_config(dsb_small, "ema", epochs=6), ["train.ema_decay=0.998", "train.batch_size=8"]
    )
    trainer = Trainer(config, 0, tmp_path, start_runtime("cpu"))
    trainer.fit()
    history = pd.read_csv(tmp_path / "ema" / "fold_0" / "history.csv")
    assert (history["weights"] == "ema").all()
    assert history["ema_decay"].is_monotonic_increasing and history["ema_decay"].max() < 0.998
    last = torch.load(tmp_path / "ema" / "fold_0" / "last.pt", weights_only=True)
    assert last["optimizer_steps"] == 24 and (history["bn_batches"] > 0).all()
    trainer.ema.module.load_state_dict(last["model"])
    ema_scores, _, _ = trainer.predict_valid()
    trainer.model.load_state_dict(last["train_model"])
    trainer.ema = None
    stale_scores, _, _ = trainer.predict_valid()  # the raw weights' running BN averages
    trainer.recalibrate_batchnorm()
    raw_scores, _, _ = trainer.predict_valid()
    assert ema_scores["dice"] >= raw_scores["dice"] - 0.02, (ema_scores, raw_scores)
    assert ema_scores["dice"] > 0.6
    # Recomputed statistics are what made short runs validate (measured 0.36 -> 0.75).
    assert raw_scores["dice"] > stale_scores["dice"] + 0.1, (raw_scores, stale_scores)


def test_crop_mode_trains_on_crops_and_validates_whole_tiled_images(dsb_mixed: Path, tmp_path):
    config = load_experiment(
        write_config(dsb_mixed, "crop", epochs=1, targets="mask_border"),
        ["augment.resize_mode=crop", "augment.scale_jitter=0.2", "augment.tile_size=256"],
    )
    train_fold(config, 0, run_root=tmp_path, device="cpu")
    from kaggle_seg.train import load_oof

    oof = load_oof(tmp_path / "crop" / "fold_0" / "oof.npz")
    table = pd.read_csv(dsb_mixed / "table.csv").set_index("id")
    assert len(oof) == 3
    for image_id, probabilities in oof.items():
        row = table.loc[image_id]
        assert probabilities.shape == (2, row["height"], row["width"])  # native size, no resize
    history = pd.read_csv(tmp_path / "crop" / "fold_0" / "history.csv")
    assert {"score", "map", "dice"} <= set(history.columns)


def test_full_run_trains_every_row_without_validation(dsb_small: Path, tmp_path: Path):
    config = load_experiment(
        write_config(dsb_small, "fullrun", epochs=2),
        ["train.monitor=train_loss", "train.monitor_mode=min"],
    )
    train_fold(config, 0, run_root=tmp_path, device="cpu", full=True)
    run = tmp_path / "fullrun" / "full"
    assert (run / "best.pt").is_file() and not (run / "oof.npz").exists()
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 2 and "score" not in history.columns and "valid_loss" not in history
    assert (history["bn_batches"] > 0).all()
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["optimizer_steps"] == 2 * (48 // 8)  # all 48 rows, both folds, every epoch


def test_full_run_refuses_a_validation_monitor(dsb_small: Path, tmp_path: Path):
    config = load_experiment(write_config(dsb_small, "fullscore", epochs=1))
    with pytest.raises(KsegError, match=r"--full .*train\.monitor 'score' is never measured"):
        train_fold(config, 0, run_root=tmp_path, device="cpu", full=True)
    assert not (tmp_path / "fullscore").exists()


@pytest.mark.slow
def test_validate_every_and_early_stopping_counted_in_steps(dsb_small: Path, tmp_path: Path):
    config = load_experiment(write_config(dsb_small, "every", epochs=4), ["train.validate_every=2"])
    history = train_fold(config, 0, run_root=tmp_path, device="cpu").history
    assert history["score"].isna().tolist() == [True, False, True, False]
    # Which weights were validated (and with how many BN batches): only where one ran.
    for column in ("weights", "ema_decay", "bn_batches"):
        assert history[column].isna().tolist() == [True, False, True, False], column
    # "valid_loss" watched for a rise never improves after epoch 1: patience 1 stops at once,
    # unless fewer optimizer steps than early_stopping_min_steps have passed since the best.
    watch = ["train.monitor=valid_loss", "train.monitor_mode=max",
             "train.early_stopping_patience=1"]  # fmt: skip
    stopped = train_fold(load_experiment(write_config(dsb_small, "stop", epochs=4), watch),
                         0, run_root=tmp_path, device="cpu").history  # fmt: skip
    assert len(stopped) == 2
    patient = load_experiment(write_config(dsb_small, "patient", epochs=4),
                              [*watch, "train.early_stopping_min_steps=10"])  # fmt: skip
    assert len(train_fold(patient, 0, run_root=tmp_path, device="cpu").history) == 4


@pytest.mark.parametrize("last_is_best", [True, False])
def test_the_oof_is_the_best_checkpoints_with_one_pass_less_when_it_is_the_last(
    dsb_small: Path, tmp_path: Path, last_is_best: bool
):
    import numpy as np

    from kaggle_seg.train import load_oof

    config = load_experiment(write_config(dsb_small, "last", epochs=2),
                             ["train.validate_every=1", "train.oof_dtype=float16"])  # fmt: skip
    trainer = Trainer(config, 0, tmp_path, start_runtime("cpu"))
    judged: list[float] = []
    # Every validation improves, or only the first: the best is epoch 2 or epoch 1.
    trainer._improved = lambda value: judged.append(value) or last_is_best or len(judged) == 1
    passes: list[bool] = []
    predict_valid = trainer.predict_valid
    trainer.predict_valid = lambda keep=False, tta="none": (
        passes.append(keep) or predict_valid(keep=keep, tta=tta)
    )
    result = trainer.fit()
    assert result.best_epoch == (1 if last_is_best else 0)
    # The last validation keeps its probabilities; a pass over best.pt follows only when an
    # earlier epoch is the best.
    assert passes == ([False, True] if last_is_best else [False, True, True])
    run = tmp_path / "last" / "fold_0"
    oof = load_oof(run / "oof.npz")
    best = torch.load(run / "best.pt", weights_only=True)
    trainer.eval_model().load_state_dict(best["model"])
    _, again, _ = predict_valid(keep=True)
    assert oof.keys() == again.keys() and len(oof) == 16
    for image_id, probabilities in again.items():
        np.testing.assert_allclose(oof[image_id], probabilities, atol=2e-3)


def test_oof_tta_writes_the_oof_that_submit_would_predict(dsb_small: Path, tmp_path: Path):
    import numpy as np

    from kaggle_seg.train import load_oof

    config = load_experiment(write_config(dsb_small, "ooftta", epochs=1),
                             ["train.oof_tta=d4", "train.oof_dtype=float16"])  # fmt: skip
    trainer = Trainer(config, 0, tmp_path, start_runtime("cpu"))
    passes: list[tuple[bool, str]] = []
    predict_valid = trainer.predict_valid
    trainer.predict_valid = lambda keep=False, tta="none": (
        passes.append((keep, tta)) or (predict_valid(keep=keep, tta=tta))
    )
    trainer.fit()
    # The last validation keeps nothing: the OOF is a second, d4, pass over best.pt.
    assert passes == [(False, "none"), (True, "d4")]
    oof = load_oof(tmp_path / "ooftta" / "fold_0" / "oof.npz")
    _, d4, _ = predict_valid(keep=True, tta="d4")
    _, plain, _ = predict_valid(keep=True)
    assert oof.keys() == d4.keys() and len(oof) == 16
    for image_id, probabilities in d4.items():
        np.testing.assert_allclose(oof[image_id], probabilities, atol=2e-3)
    assert max(np.abs(oof[i] - plain[i]).max() for i in oof) > 0.01


def test_a_run_out_of_time_stops_validated_with_its_oof(dsb_small: Path, tmp_path: Path):
    budget = ["train.validate_every=2", "train.time_budget_minutes=0.0001"]
    config = load_experiment(write_config(dsb_small, "budget", epochs=5), budget)
    result = train_fold(config, 0, run_root=tmp_path, device="cpu")
    run = tmp_path / "budget" / "fold_0"
    history = pd.read_csv(run / "history.csv")
    # Epoch 1 is not a validation epoch, but it spent the budget: it validates and the run
    # stops there, rather than training one more epoch past the budget only to validate.
    assert len(history) == 1 and history["score"].notna().tolist() == [True]
    assert result.best_epoch == 0 and (run / "oof.npz").is_file()
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["planned_epochs"] == 1 and len(last["clock"]["train"]) == 1
    assert last["clock"]["elapsed"] > 0
    # The validation's parts, which project the OOF pass: forward passes, BN recalibration.
    forward, recalibration, bn_batch = last["clock"]["parts"]
    assert forward > 0 and recalibration >= bn_batch > 0
    assert forward + recalibration <= last["clock"]["validation"][0]
    # Resuming a finished, cut run does not train on to train.epochs.
    resumed = train_fold(config, 0, run_root=tmp_path, device="cpu", resume=True)
    assert len(resumed.history) == 1
    # Given more minutes, the resumed run plans again and goes on to train.epochs.
    more = load_experiment(
        write_config(dsb_small, "budget", epochs=5),
        ["train.validate_every=2", "train.time_budget_minutes=60"],
    )
    assert len(train_fold(more, 0, run_root=tmp_path, device="cpu", resume=True).history) == 5


def test_no_budget_runs_every_epoch(dsb_small: Path, tmp_path: Path):
    config = load_experiment(write_config(dsb_small, "nobudget", epochs=2))
    assert config.train.time_budget_minutes is None
    assert len(train_fold(config, 0, run_root=tmp_path, device="cpu").history) == 2


RANK_FAILS = """
import os
import torch.distributed as dist
import kaggle_seg.cli as cli
from kaggle_seg.errors import KsegError

def command():
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise KsegError("broken.png: cannot decode")  # one rank's own bad input
    dist.barrier()  # rank 0 waits on a rank that has gone

cli.app = command
cli.main()
"""


@pytest.mark.slow
def test_under_torchrun_each_rank_labels_its_lines_and_a_lost_peer_is_no_second_error(
    tmp_path: Path,
):
    """The rank that failed says why, labelled; the rank left waiting in a collective says
    it stopped because another rank ended, not an error of its own."""
    script = tmp_path / "rank_fails.py"
    script.write_text(RANK_FAILS)
    result = run_torchrun(str(script))
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert "rank 1: error: broken.png: cannot decode" in lines
    # Rank 0 either meets the closed connection in its barrier, or torchrun's SIGTERM (sent
    # once rank 1 has exited) reaches it first: either way one line, and no error of its own.
    (stopped,) = [line for line in lines if line.startswith("rank 0: ")]
    assert stopped.startswith(("rank 0: stopped: another rank ended", "rank 0: interrupted"))
    # torchrun's own failure summary names the same cause, not a link to its docs.
    root_cause = result.stderr.split("Root Cause", 1)[1]
    assert "traceback : error: broken.png: cannot decode" in root_cause
    assert "To enable traceback" not in result.stderr


def test_a_rank_that_lost_its_peer_says_it_stopped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    import kaggle_seg.cli as cli

    def barrier() -> None:
        raise RuntimeError(
            "[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:5325"
        )

    import signal

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's SIGTERM handler
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(cli, "app", barrier)
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 1
    assert capsys.readouterr().err == "rank 0: stopped: another rank ended; its own line says why\n"

    monkeypatch.setenv("WORLD_SIZE", "1")  # alone, the same failure is an error of its own
    with pytest.raises(SystemExit):
        cli.main()
    assert capsys.readouterr().err.startswith("error: RuntimeError: [gloo/")


def test_an_error_under_torchrun_is_left_for_its_failure_summary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    import json
    import signal

    import kaggle_seg.cli as cli
    from kaggle_seg.errors import KsegError

    def command() -> None:
        raise KsegError("broken.png: cannot decode")

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's SIGTERM handler
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setattr(cli, "app", command)
    with pytest.raises(SystemExit):
        cli.main()
    assert json.loads(error_file.read_text())["message"] == "error: broken.png: cannot decode"
    # A rank that only lost its peer is dated after it, so it is never taken for the root cause.
    lost = tmp_path / "lost.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(lost))
    monkeypatch.setattr(cli, "app", lambda: (_ for _ in ()).throw(RuntimeError("closed by peer")))
    with pytest.raises(SystemExit):
        cli.main()
    stamps = [json.loads(file.read_text())["timestamp"] for file in (error_file, lost)]
    assert stamps[1] > stamps[0]
