"""The empty-slice gate from a classification head, end to end: an smp model with `aux_params`
returns (mask logits, class logits), training learns "this channel has foreground" and writes
the fold's class probabilities, prediction ensembles them, submission gates on them and
`kseg tune` chooses the gate on out-of-fold data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_predict import write_checkpoint
from test_tune import noisy, write_experiment

from kaggle_seg.competitions import get_competition
from kaggle_seg.config import DataConfig, ExperimentConfig, ModelConfig, load_experiment
from kaggle_seg.errors import KsegError
from kaggle_seg.models import build_model
from kaggle_seg.postprocess import PostprocessConfig, default_postprocess, save_postprocess
from kaggle_seg.predict import load_ensemble, predict_probabilities
from kaggle_seg.prepare import prepare_table, read_table
from kaggle_seg.probabilities import open_probabilities
from kaggle_seg.search import FastMaskSearch, collect_mask_stats
from kaggle_seg.submit import write_submission
from kaggle_seg.train import load_class_oof, load_oof, save_class_oof, train_fold
from kaggle_seg.tune import tune_experiment
from kaggle_seg.tune_masks import read_mask_source, score_uwmgi_settings

UWMGI_CLASSES = ("large_bowel", "small_bowel", "stomach")
# The smallest smp encoder that builds offline: a 0.3M-parameter model with its decoder.
HEAD_MODEL = {
    "architecture": "Unet",
    "encoder": "tu-mobilenetv3_small_050",
    "params": {"decoder_channels": [16, 8, 8, 8, 8], "aux_params": {"dropout": 0.2}},
}


def head_model_config(**aux: object) -> ModelConfig:
    params = {**HEAD_MODEL["params"], "aux_params": {"dropout": 0.2, **aux}}
    return ModelConfig.model_validate({**HEAD_MODEL, "params": params})


# -- models --


def test_aux_params_give_mask_and_class_logits() -> None:
    model = build_model(head_model_config(), in_channels=3, classes=3).eval()
    with torch.no_grad():
        mask_logits, class_logits = model(torch.randn(2, 3, 64, 64))
    assert mask_logits.shape == (2, 3, 64, 64)
    assert class_logits.shape == (2, 3)
    # classes given explicitly and equal: fine
    build_model(head_model_config(classes=3), in_channels=3, classes=3)


def test_a_head_that_does_not_fit_is_an_error() -> None:
    with pytest.raises(KsegError, match=r"aux_params\.classes is 1 but the model predicts 3"):
        build_model(head_model_config(classes=1), in_channels=3, classes=3)
    with pytest.raises(KsegError, match="logits"):
        build_model(head_model_config(activation="sigmoid"), in_channels=3, classes=3)
    seed = ModelConfig(architecture="seed_unet", params={"base_channels": 4, "aux_params": {}})
    with pytest.raises(KsegError, match="seed models have no classification head"):
        build_model(seed, in_channels=1, classes=3)


def test_class_loss_weight_must_not_be_negative() -> None:
    config = {"data": {"competition": "uwmgi"}, "train": {"class_loss_weight": -0.1}}
    with pytest.raises(ValueError, match="class_loss_weight"):
        ExperimentConfig.model_validate(config)
    assert (
        ExperimentConfig.model_validate({"data": {"competition": "uwmgi"}}).train.class_loss_weight
        == 0.4
    )


# -- training --


@pytest.fixture(scope="module")
def head_run(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of a head model on the uwmgi phantom (64x64, resized), in float32:
    runs/head/fold_0."""
    from kaggle_seg.prepare import folds_for_table

    root = tmp_path_factory.mktemp("head_run")
    prepare_table("uwmgi", phantom_dir, root / "table.csv")
    folds_for_table("uwmgi", root / "table.csv", root / "folds.csv", 5, 0, force=False)
    config_path = root / "head.yaml"
    config_path.write_text(f"""
name: head
data: {{competition: uwmgi, table: {root / "table.csv"}, folds: {root / "folds.csv"}}}
augment: {{preset: light, height: 64, width: 64, resize_mode: resize}}
model: {json.dumps(HEAD_MODEL)}
train: {{epochs: 1, batch_size: 8, num_workers: 0, loss: [{{name: bce}}], class_loss_weight: 0.5,
        amp: "off"}}
""")  # float32: the prediction is compared with a hand computation
    train_fold(load_experiment(config_path), 0, run_root=root / "runs", device="cpu")
    return root / "runs" / "head" / "fold_0"


@pytest.mark.slow
def test_training_a_head_model_logs_its_loss_and_writes_class_oof(head_run: Path) -> None:
    history = pd.read_csv(head_run / "history.csv")
    assert {"train_class_bce", "valid_class_bce", "train_loss", "valid_loss"} <= set(history)
    assert np.isfinite(history[["train_class_bce", "valid_class_bce"]].to_numpy()).all()
    assert (head_run / "oof_classes.npz").is_file()
    masks = load_oof(head_run / "oof.npz")
    classes = load_class_oof(head_run / "oof_classes.npz")
    assert set(classes) == set(masks)
    for value in classes.values():
        assert value.shape == (3,) and value.dtype == np.float32
        assert ((value >= 0) & (value <= 1)).all()


def test_class_oof_round_trips(tmp_path: Path) -> None:
    values = {"a": np.array([0.1, 0.5, 0.9]), "b": np.array([0.0, 1.0, 0.25])}
    save_class_oof(values, tmp_path / "oof_classes.npz")
    loaded = load_class_oof(tmp_path / "oof_classes.npz")
    assert set(loaded) == {"a", "b"}
    np.testing.assert_array_equal(loaded["a"], values["a"].astype(np.float32))


# -- prediction --


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A uwmgi seed model without a head, same input pipeline as `head_run`."""
    path = tmp_path_factory.mktemp("seed_run") / "seed" / "fold_0" / "best.pt"
    return write_checkpoint(path, competition="uwmgi", classes=UWMGI_CLASSES, name="seed")


def _test_rows(phantom_dir: Path, n: int = 6) -> pd.DataFrame:
    table = get_competition("uwmgi").read_test_table(phantom_dir / "train")
    return table.head(n).reset_index(drop=True)


@pytest.mark.slow
def test_prediction_yields_class_probabilities_on_request(
    head_run: Path, seed_checkpoint: Path, phantom_dir: Path
) -> None:
    from kaggle_seg.tta import get_tta

    table = _test_rows(phantom_dir)
    competition = get_competition("uwmgi")
    members = load_ensemble([head_run])
    assert members[0].has_class_head
    plain = list(predict_probabilities(members, competition, table, tta="flip", num_workers=0))
    assert all(len(item) == 3 for item in plain)
    with_classes = list(
        predict_probabilities(
            members, competition, table, tta="flip", num_workers=0, with_class_probabilities=True
        )
    )
    one_by_one = list(
        predict_probabilities(members, competition, table, tta="flip", num_workers=0,
                              batched_tta=False, with_class_probabilities=True)
    )  # fmt: skip
    for (p, i, probs), (p2, i2, probs2, classes), (*_, classes3) in zip(
        plain, with_classes, one_by_one, strict=True
    ):
        assert (p, i) == (p2, i2)
        np.testing.assert_array_equal(probs, probs2)
        assert classes.shape == (3,) and classes.dtype == np.float32
        assert ((classes >= 0) & (classes <= 1)).all()
        np.testing.assert_allclose(classes, classes3, atol=1e-6)

    # By hand: the sigmoid of the head averaged over the TTA views of the model's input.
    dataset_input = _model_inputs(members[0], competition, table)
    model = members[0].model
    with torch.inference_mode():
        views = [
            torch.sigmoid(model(t.augment(dataset_input).contiguous())[1]) for t in get_tta("flip")
        ]
    expected = torch.stack(views).mean(0).numpy()
    got = np.stack([classes for *_, classes in with_classes])
    np.testing.assert_allclose(got, expected, atol=1e-5)

    # A member without a head adds nothing to the class probabilities; none with one: None.
    mixed = load_ensemble([head_run, seed_checkpoint], weights=[1.0, 3.0])
    mixed_items = list(
        predict_probabilities(
            mixed, competition, table, tta="flip", num_workers=0, with_class_probabilities=True
        )
    )
    np.testing.assert_allclose(np.stack([c for *_, c in mixed_items]), got, atol=1e-6)
    seed_only = load_ensemble([seed_checkpoint])
    for *_, classes in predict_probabilities(
        seed_only, competition, table, num_workers=0, with_class_probabilities=True
    ):
        assert classes is None


def _model_inputs(member, competition, table: pd.DataFrame) -> torch.Tensor:
    from kaggle_seg.predict import PredictionDataset

    dataset = PredictionDataset(competition, table, [member.spec])
    return torch.stack([dataset[i]["inputs"][0] for i in range(len(dataset))])


# -- submission --


def _settings(path: Path, gate: float | None) -> Path:
    # Threshold 0: every pixel is foreground, so only the gate can empty a mask.
    settings = PostprocessConfig(
        classes=list(UWMGI_CLASSES),
        thresholds=[0.0] * 3,
        min_area=[0] * 3,
        gate_pixels=[0] * 3,
        gate_probability=None if gate is None else [gate] * 3,
    )
    return save_postprocess(settings, path)


def test_submission_gates_on_the_head(
    head_run: Path, seed_checkpoint: Path, phantom_dir: Path, tmp_path: Path
) -> None:
    def submit(name: str, gate: float | None, checkpoint: Path = head_run) -> pd.DataFrame:
        settings = _settings(tmp_path / f"{name}.json", gate)
        out = tmp_path / f"{name}.csv"
        write_submission([checkpoint], phantom_dir, out, postprocess=settings, tta="flip",
                         num_workers=0, fallback_case_days=1)  # fmt: skip
        return pd.read_csv(out, dtype=str, keep_default_na=False)

    ungated = submit("none", None)
    assert (ungated["predicted"] != "").all()
    pd.testing.assert_frame_equal(submit("off", 0.0), ungated)
    everything = submit("all", 1.0)
    assert (everything["predicted"] == "").all()
    assert everything[["id", "class"]].equals(ungated[["id", "class"]])
    with pytest.raises(KsegError, match="no checkpoint has a classification head"):
        submit("seed", 0.5, seed_checkpoint)


# -- tuning --


@pytest.fixture(scope="module")
def gated_experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-fold uwmgi experiment whose masks have big spurious blobs (3600 pixels: beyond any
    area rule) wherever a class is absent, and whose head flags exactly those slices."""
    from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom

    root = tmp_path_factory.mktemp("gated")
    case_days = ("case1_day0", "case1_day1", "case2_day0")
    make_uwmgi_phantom(root / "data", case_days=case_days, n_slices=10, seed=1)
    prepare_table("uwmgi", root / "data", root / "table.csv")
    competition = get_competition("uwmgi")
    rng = np.random.default_rng(0)
    masks, heads = {}, {}
    for row in read_table(root / "table.csv").to_dict("records"):
        truth = np.moveaxis(competition.read_mask(row), -1, 0)
        probabilities = noisy(truth, rng, 0, 2.0)
        present = truth.reshape(len(truth), -1).any(1)
        for k in np.flatnonzero(~present):
            y = int(rng.integers(0, truth.shape[1] - 60))
            x = int(rng.integers(0, truth.shape[2] - 60))
            probabilities[k, y : y + 60, x : x + 60] = 0.95
        masks[row["id"]] = probabilities
        heads[row["id"]] = np.where(present, 0.9, 0.05).astype(np.float32)
    assert not all(h.min() > 0.5 for h in heads.values())  # some slice lacks some class
    config = ExperimentConfig(data=DataConfig(competition="uwmgi", table=root / "table.csv"))
    parts = [
        {k: v for k, v in masks.items() if k.startswith(prefix)} for prefix in ("case1_", "case2_")
    ]
    experiment = write_experiment(root, config, parts)
    for fold, prefix in enumerate(("case1_", "case2_")):
        part = {k: v for k, v in heads.items() if k.startswith(prefix)}
        save_class_oof(part, experiment / f"fold_{fold}" / "oof_classes.npz")
    return experiment


def test_tune_chooses_a_gate_that_removes_the_spurious_slices(gated_experiment: Path) -> None:
    result = tune_experiment(gated_experiment)
    gates = result.settings.gate_probability
    assert gates is not None
    assert any(0.05 < g <= 0.9 for g in gates)
    assert result.after["score"] > result.before["score"] + 0.05


def test_tune_without_class_oof_searches_no_gate(gated_experiment: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "runs" / "exp"
    shutil.copytree(gated_experiment, copy)
    (copy / "fold_1" / "oof_classes.npz").unlink()  # one fold without: no gate at all
    result = tune_experiment(copy, out=tmp_path / "pp.json")
    assert result.settings.gate_probability is None


def test_search_bookkeeping_matches_the_metric_with_a_gate(gated_experiment: Path) -> None:
    root = gated_experiment.parent.parent
    table = read_table(root / "table.csv")
    competition = get_competition("uwmgi")
    files, heads = {}, {}
    for fold in (0, 1):
        file = open_probabilities(gated_experiment / f"fold_{fold}" / "oof.npz")
        files.update(dict.fromkeys(file, file))
        heads.update(load_class_oof(gated_experiment / f"fold_{fold}" / "oof_classes.npz"))
    rng = np.random.default_rng(2)
    heads = {k: rng.uniform(0, 1, 3).astype(np.float32) for k in heads}  # gates that hurt too
    classes = list(UWMGI_CLASSES)
    table = table.sort_values(["case_day", "slice_index"], kind="stable")
    source, names = read_mask_source(competition, table, files, classes, "case_day", heads)
    search = FastMaskSearch(source, collect_mask_stats(source, volumetric=True), volumetric=True)
    for trial in range(4):
        settings = default_postprocess(classes).model_copy(
            update={
                "thresholds": rng.choice([0.3, 0.5, 0.6], 3).tolist(),
                "min_area": rng.choice([0, 40], 3).tolist(),
                "gate_probability": rng.choice([0.0, 0.3, 0.5, 0.8], 3).tolist(),
                "z_continuity": trial >= 2,
            }
        )
        fast = search.score_settings(settings)
        expected = score_uwmgi_settings(source, names, settings)["score"]
        assert fast == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow  # about a minute on two CPU cores
def test_ddp_and_ema_train_a_head_model(head_run: Path, tmp_path: Path) -> None:
    """Two gloo processes on CPU, with EMA: the tuple output goes through DDP and the class
    probabilities of every validation image are gathered into rank 0's oof_classes.npz."""
    import os
    import shutil
    import subprocess
    import sys

    from kaggle_seg.config import save_config

    config = load_experiment(head_run / "config.yaml")
    config.name = "head_ddp"
    config.train.ema_decay = 0.9
    save_config(config, tmp_path / "head_ddp.yaml")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "kaggle_seg", "train",
         "--config", str(tmp_path / "head_ddp.yaml"), "--fold", "0", "--device", "cpu",
         "--runs-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "head_ddp" / "fold_0"
    assert "valid_class_bce" in pd.read_csv(run / "history.csv")
    classes = load_class_oof(run / "oof_classes.npz")
    assert set(classes) == set(load_oof(head_run / "oof.npz"))
