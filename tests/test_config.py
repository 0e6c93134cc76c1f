"""Configs: strict validation, overrides, and the shipped experiment files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kaggle_seg.config import (
    ExperimentConfig,
    apply_overrides,
    build_data_config,
    load_experiment,
    save_config,
)
from kaggle_seg.errors import KsegError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_packaged_uwmgi_defaults_exclude_the_faulty_case_days():
    assert build_data_config("uwmgi").exclude_case_days == ["case7_day0", "case81_day30"]
    assert build_data_config("dsb2018").exclude_case_days == []


def test_overrides_set_nested_keys_with_yaml_values():
    raw = apply_overrides({"train": {"lr": 1}}, ["train.lr=3e-4", "data.n_folds=4", "a.b.c=[1]"])
    assert raw == {"train": {"lr": 3e-4}, "data": {"n_folds": 4}, "a": {"b": {"c": [1]}}}
    with pytest.raises(KsegError, match="expected key=value"):
        apply_overrides({}, ["train.lr"])


def test_amp_off_reads_as_off_in_yaml_and_in_overrides(tmp_path: Path):
    # PyYAML reads a bare `off` as false: kseg must still read it as the "off" setting.
    path = tmp_path / "amp.yaml"
    path.write_text("data: {competition: dsb2018}\ntrain: {amp: off}\n")
    assert load_experiment(path).train.amp == "off"
    assert load_experiment(path, ["train.amp=bf16"]).train.amp == "bf16"
    assert load_experiment(path, ["train.amp=off"]).train.amp == "off"
    with pytest.raises(KsegError, match=r"'train\.amp'"):
        load_experiment(path, ["train.amp=on"])


def test_an_unset_monitor_mode_follows_the_monitor(tmp_path: Path):
    """`--set train.monitor=valid_loss` alone must keep the lowest loss, not the highest."""
    path = tmp_path / "monitor.yaml"
    path.write_text("data: {competition: dsb2018}\n")
    modes = {
        monitor: load_experiment(path, [f"train.monitor={monitor}"]).train.monitor_mode
        for monitor in (
            "score",
            "dice",
            "valid_loss",
            "train_loss",
            "train_dice",
            "valid_class_bce",
        )
    }
    assert modes == {"score": "max", "dice": "max", "valid_loss": "min", "train_loss": "min",
                     "train_dice": "min", "valid_class_bce": "min"}  # fmt: skip
    explicit = ["train.monitor=valid_loss", "train.monitor_mode=max"]
    assert load_experiment(path, explicit).train.monitor_mode == "max"
    assert load_experiment(path).train.monitor_mode == "max"


def test_unknown_and_mistyped_keys_are_named(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {competition: lgg}\ntrain: {epochz: 3, batch_size: big}\n")
    with pytest.raises(KsegError) as error:
        load_experiment(path)
    assert "unknown key 'train.epochz'" in str(error.value)
    assert "'train.batch_size'" in str(error.value)
    path.write_text("train: {epochs: 3}\n")
    with pytest.raises(KsegError, match=r"'data\.competition' is required"):
        load_experiment(path)


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("train.epoch=1", "unknown key 'train.epoch' (did you mean train.epochs?)"),
        (
            "train.optimizer.lrr=1",
            "unknown key 'train.optimizer.lrr' (did you mean train.optimizer.lr?)",
        ),
        ("augment.heigth=64", "unknown key 'augment.heigth' (did you mean augment.height?)"),
        ("trian.epochs=1", "unknown key 'trian' (did you mean train?)"),
        (
            "train.loss=[{name: dice, wieght: 1}]",
            "'train.loss.0.wieght' (did you mean train.loss.0.weight?)",
        ),
        ("train.epochs=abc", "'train.epochs': Input should be a valid integer"),
    ],
)
def test_override_errors_name_the_set_option_and_the_close_key(
    tmp_path: Path, override: str, said: str
):
    path = tmp_path / "exp.yaml"
    path.write_text("data: {competition: dsb2018}\ntrain: {epochs: 2}\n")
    with pytest.raises(KsegError) as error:
        load_experiment(path, ["train.batch_size=2", override])
    assert str(error.value).startswith(f"--set {override}: invalid config: ")
    assert said in str(error.value) and str(path) not in str(error.value)


def test_data_override_errors_keep_the_section_and_blame_the_set_option():
    with pytest.raises(KsegError) as error:
        build_data_config("dsb2018", overrides=["data.fooo=1"])
    message = str(error.value)
    assert message.startswith("--set data.fooo=1: invalid config: unknown key 'data.fooo' (valid")
    assert "competition, data_dir," in message and "defaults" not in message
    with pytest.raises(
        KsegError, match=r"^--set data\.n_fold=3: .*\(did you mean data\.n_folds\?\)"
    ):
        build_data_config("dsb2018", overrides=["data.n_fold=3"])


def test_file_errors_name_the_file_beside_override_errors(tmp_path: Path):
    path = tmp_path / "typo.yaml"
    path.write_text("data: {competition: dsb2018, n_fold: 3}\naugment: {heigth: 64}\n")
    with pytest.raises(KsegError) as error:
        build_data_config("dsb2018", path)
    assert str(error.value) == (
        f"{path}: invalid config: unknown key 'data.n_fold' (did you mean data.n_folds?)"
    )
    with pytest.raises(KsegError) as error:
        load_experiment(path, ["train.epochs=abc"])
    message = str(error.value)
    assert message.startswith(f"{path}: invalid config: ") and "\n" not in message
    assert "unknown key 'augment.heigth' (did you mean augment.height?)" in message
    assert "unknown key 'data.n_fold' (did you mean data.n_folds?)" in message
    assert "; --set train.epochs=abc: 'train.epochs': Input should be a valid integer" in message


def test_freezing_a_random_encoder_is_refused_naming_the_option(tmp_path: Path):
    path = tmp_path / "frozen.yaml"
    path.write_text(
        "data: {competition: uwmgi}\n"
        "model: {architecture: Unet, encoder: resnet18}\n"
        "train: {freeze_encoder_epochs: 3}\n"
    )
    with pytest.raises(
        KsegError, match=r"train\.freeze_encoder_epochs .*model\.encoder_weights is null"
    ):
        load_experiment(path)
    with pytest.raises(KsegError, match=r"^\S+frozen\.yaml: invalid config: train\.unfreeze "):
        load_experiment(path, ["train.freeze_encoder_epochs=0", "train.unfreeze=last"])
    # Pretrained, the same freeze is a valid two-phase recipe.
    config = load_experiment(path, ["model.encoder_weights=imagenet"])
    assert config.train.freeze_encoder_epochs == 3


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_validates_and_round_trips(path: Path, tmp_path: Path):
    config = load_experiment(path)
    assert config.name == path.stem
    saved = save_config(config, tmp_path / "config.yaml")
    again = ExperimentConfig.model_validate(yaml.safe_load(saved.read_text()))
    assert again == config


def test_shipped_configs_cover_the_seed_systems():
    names = {p.stem for p in CONFIGS}
    assert {"dsb2018_resunet", "dsb2018_unet128", "uwmgi_unetpp_effb3", "uwmgi_scratch",
            "lgg_unet", "lgg_bunet", "lgg_unet_resnet50", "uwmgi_25d_effnet",
            "dsb2018_mask_border"} <= names  # fmt: skip


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_builds_its_model_and_loss_offline(path: Path):
    import torch

    from kaggle_seg.competitions import get_competition
    from kaggle_seg.losses import build_loss
    from kaggle_seg.models import build_model
    from kaggle_seg.models.weights import packaged_weights_file

    config = load_experiment(path)
    competition = get_competition(config.data.competition)
    classes = 2 if config.data.targets == "mask_border" else len(competition.classes)
    in_channels = competition.channels * config.data.stack_depth
    model_config = config.model
    if model_config.encoder_weights and packaged_weights_file(model_config.encoder) is None:
        # A download-only encoder (a GPU recipe): offline, build the same network untrained.
        model_config = model_config.model_copy(update={"encoder_weights": None})
    model = build_model(model_config, in_channels, classes).eval()
    with torch.inference_mode():
        logits = model(torch.zeros(1, in_channels, 64, 64))
    assert logits.shape == (1, classes, 64, 64)
    loss = build_loss(config.train.loss, "binary" if classes == 1 else "multilabel")
    assert torch.isfinite(loss(logits, torch.zeros_like(logits)))
