"""Models: shapes for every architecture and input depth, local weights, freezing, groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from kaggle_seg.config import ModelConfig
from kaggle_seg.errors import KsegError
from kaggle_seg.models import (
    MODELS,
    build_model,
    count_parameters,
    encoder_of,
    last_encoder_stage,
    load_encoder_weights,
    parameter_groups,
    set_encoder_trainable,
)
from kaggle_seg.models.seed import BUNet, ResUNet, UNet

CLASSES = 3

# Seed models at a small width: the same code as the defaults, a fraction of the time.
SEED_CONFIGS = [ModelConfig(architecture=name, params={"base_channels": 8}) for name in MODELS]
SMP_CONFIGS = [
    ModelConfig(architecture="Unet", encoder="resnet34"),
    ModelConfig(architecture="Unet", encoder="resnet50"),
    ModelConfig(architecture="UnetPlusPlus", encoder="tu-efficientnet_b3"),
    ModelConfig(architecture="Unet", encoder="tu-resnet18"),
]


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _config_id(config: ModelConfig) -> str:
    if config.architecture in MODELS:
        return config.architecture
    return f"{config.architecture}-{config.encoder}"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("config", SEED_CONFIGS + SMP_CONFIGS, ids=_config_id)
@pytest.mark.parametrize("in_channels", [1, 3, 5])
def test_forward_shape_channels_last_and_backward(config: ModelConfig, in_channels: int) -> None:
    model = build_model(config, in_channels, CLASSES).to(memory_format=torch.channels_last)
    images = torch.randn(2, in_channels, 64, 64).to(memory_format=torch.channels_last)

    logits = model(images)

    assert logits.shape == (2, CLASSES, 64, 64)
    logits.float().square().mean().backward()
    first = _first_conv(model)
    assert first.in_channels == in_channels
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("config", SEED_CONFIGS, ids=_config_id)
def test_seed_models_same_output_in_both_memory_formats(config: ModelConfig) -> None:
    model = build_model(config, 3, CLASSES).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        actual = model(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_seed_models_expose_encoder_stages() -> None:
    for model_class in MODELS.values():
        model = model_class(in_channels=3, classes=1, base_channels=8, depth=3)
        stages = encoder_of(model).stages
        assert isinstance(stages, nn.ModuleList) and len(stages) == 4
        features = encoder_of(model)(torch.randn(1, 3, 32, 32))
        assert [f.shape[-1] for f in features] == [32, 16, 8, 4]


def test_seed_default_sizes() -> None:
    # The classic U-Net (64..1024 channels, BN) has 31,037,633 parameters for 3 -> 1 channels.
    assert count_parameters(UNet(3, 1)) == 31_037_633
    # Zhang et al.'s network (depth 3) is ~7.8M parameters; ours adds BN to the shortcuts.
    assert 7_500_000 < count_parameters(ResUNet(3, 1, depth=3)) < 8_500_000
    assert count_parameters(ResUNet(3, 1)) == 33_133_633
    assert count_parameters(BUNet(3, 1)) == 20_782_721


def test_seed_model_rejects_indivisible_input() -> None:
    model = build_model(ModelConfig(architecture="seed_unet", params={"base_channels": 4}), 1, 1)
    with pytest.raises(KsegError, match="divisible by 16"):
        model(torch.randn(1, 1, 40, 40))


def test_seed_models_have_their_own_names_and_smp_any_case() -> None:
    assert type(build_model(ModelConfig(architecture="Unet"), 3, 1)).__name__ == "Unet"
    assert type(build_model(ModelConfig(architecture="unetplusplus"), 3, 1)).__name__ == (
        "UnetPlusPlus"
    )
    assert isinstance(build_model(ModelConfig(architecture="seed_unet"), 3, 1), UNet)
    assert isinstance(build_model(ModelConfig(architecture="Seed_BUNet"), 3, 1), BUNet)
    fpn = build_model(ModelConfig(architecture="fpn", encoder="resnet18"), 3, 1)
    assert type(fpn).__name__ == "FPN"


def test_old_seed_names_still_build_with_a_deprecation_note() -> None:
    for old, model_class in (("UNet", UNet), ("unet", UNet), ("resunet", ResUNet)):
        with pytest.warns(FutureWarning, match=f"'{old}' is the old name of the seed model"):
            assert isinstance(build_model(ModelConfig(architecture=old), 3, 1), model_class)


@pytest.mark.parametrize(
    ("config", "names"),
    [
        (ModelConfig(architecture="SegNet"), ["'SegNet'", "resunet", "bunet", "UnetPlusPlus"]),
        (ModelConfig(encoder="resnet35"), ["'resnet35'", "resnet34", "efficientnet-b3"]),
        (ModelConfig(encoder="tu-resnet35"), ["'tu-resnet35'", "timm"]),
    ],
)
def test_unknown_names_raise_key_error_listing_valid_ones(
    config: ModelConfig, names: list[str]
) -> None:
    with pytest.raises(KeyError) as info:
        build_model(config, 3, 1)
    for name in names:
        assert name in str(info.value)


def test_bad_params_name_the_model() -> None:
    with pytest.raises(KsegError, match=r"resunet.*widht"):
        build_model(ModelConfig(architecture="seed_resunet", params={"widht": 3}), 3, 1)
    with pytest.raises(KsegError, match=r"set model\.encoder_weights instead"):
        build_model(ModelConfig(params={"encoder_weights": "imagenet"}), 3, 1)


# -- local weights ---------------------------------------------------------------------------


def _randomized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


def _assert_state_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=key)


def test_encoder_weights_load_and_classifier_head_is_ignored(tmp_path: Path) -> None:
    reference = build_model(ModelConfig(encoder="resnet18"), 3, 1)
    saved = _randomized(reference.encoder.state_dict())
    path = tmp_path / "resnet18.pth"
    torch.save({**saved, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)}, path)

    model = build_model(ModelConfig(encoder="resnet18", encoder_weights_path=path), 3, 1)

    _assert_state_equal(model.encoder.state_dict(), saved)
    assert load_encoder_weights(model, path) == ["fc.weight", "fc.bias"]


def test_encoder_weights_without_batchnorm_counters(tmp_path: Path) -> None:
    # timm and old torchvision ImageNet files have no `num_batches_tracked` entries
    model = build_model(ModelConfig(encoder="resnet18"), 3, 1)
    saved = _randomized(model.encoder.state_dict())
    path = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}, path)

    load_encoder_weights(model, path)

    torch.testing.assert_close(model.encoder.bn1.running_var, saved["bn1.running_var"])


def test_encoder_weights_with_ddp_prefixes_in_a_checkpoint_dict(tmp_path: Path) -> None:
    model = build_model(ModelConfig(encoder="resnet18"), 3, 1)
    saved = _randomized(model.encoder.state_dict())
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved.items()}, "epoch": 3}, path)

    load_encoder_weights(model, path)

    _assert_state_equal(model.encoder.state_dict(), saved)


def test_timm_checkpoint_fits_tu_encoder(tmp_path: Path) -> None:
    # A full timm classifier (what timm / HF ImageNet files hold) into smp's features-only trunk.
    timm_model = timm.create_model("resnet18", pretrained=False)
    saved = _randomized(timm_model.state_dict())
    path = tmp_path / "model.safetensors"  # how the Hugging Face hub ships timm weights
    save_file(saved, str(path))

    model = build_model(ModelConfig(encoder="tu-resnet18", encoder_weights_path=path), 3, 1)

    loaded = model.encoder.model.state_dict()
    assert loaded.keys() == saved.keys() - {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved[key], msg=key)


def test_three_channel_checkpoint_adapted_to_five_and_one_channels(tmp_path: Path) -> None:
    saved = _randomized(build_model(ModelConfig(encoder="resnet18"), 3, 1).encoder.state_dict())
    path = tmp_path / "rgb.pth"
    torch.save(saved, path)
    rgb = saved["conv1.weight"]

    five = build_model(ModelConfig(encoder="resnet18", encoder_weights_path=path), 5, 1)
    one = build_model(ModelConfig(encoder="resnet18", encoder_weights_path=path), 1, 1)

    expected_five = torch.cat([rgb, rgb[:, :2]], dim=1) * (3 / 5)
    torch.testing.assert_close(five.encoder.conv1.weight, expected_five)
    torch.testing.assert_close(one.encoder.conv1.weight, rgb.sum(dim=1, keepdim=True))
    torch.testing.assert_close(five.encoder.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])


def test_encoder_weights_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(KsegError, match=r"nowhere.pth: weights file not found"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights_path=missing), 3, 1)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(KsegError, match=r"garbage.pth: cannot read weights"):
        build_model(ModelConfig(encoder="resnet18", encoder_weights_path=garbage), 3, 1)

    other = tmp_path / "resnet34.pth"
    torch.save(build_model(ModelConfig(encoder="resnet34"), 3, 1).encoder.state_dict(), other)
    with pytest.raises(KsegError, match=r"resnet34.pth: weights do not fit the encoder") as info:
        build_model(ModelConfig(encoder="resnet18", encoder_weights_path=other), 3, 1)
    assert "unexpected keys (layer1.2." in str(info.value)

    foreign = tmp_path / "vit.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}, foreign)
    with pytest.raises(
        KsegError, match=r"vit.pth: weights do not fit the encoder: by name, no key fits"
    ):
        load_encoder_weights(
            build_model(ModelConfig(encoder="resnet18"), 3, 1), foreign, strict=False
        )


def test_missing_encoder_keys_strict_and_not(tmp_path: Path) -> None:
    model = build_model(ModelConfig(encoder="resnet18"), 3, 1)
    saved = _randomized(model.encoder.state_dict())
    del saved["layer4.1.conv2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(saved, path)

    with pytest.raises(KsegError, match=r"1 missing keys \(layer4.1.conv2.weight\)"):
        load_encoder_weights(model, path)
    load_encoder_weights(model, path, strict=False)
    torch.testing.assert_close(model.encoder.conv1.weight, saved["conv1.weight"])


def test_whole_model_weights_round_trip_and_mismatch(tmp_path: Path) -> None:
    config = ModelConfig(architecture="seed_bunet", params={"base_channels": 4, "depth": 2})
    trained = build_model(config, 3, 2)
    path = tmp_path / "best.pt"
    torch.save({"model": trained.state_dict(), "epoch": 7, "config": {"name": "x"}}, path)

    restored = build_model(config.model_copy(update={"weights_path": path}), 3, 2)
    _assert_state_equal(restored.state_dict(), trained.state_dict())

    with pytest.raises(KsegError, match=r"best.pt: weights do not fit the model: 2 shape mis"):
        build_model(config.model_copy(update={"weights_path": path}), 3, 1)
    with pytest.raises(KsegError, match=r"best.pt: weights do not fit the model: .*missing keys"):
        build_model(ModelConfig(architecture="seed_unet", weights_path=path), 3, 2)


# -- freezing and optimizer groups -----------------------------------------------------------


def _trainable_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("config", "last", "not_last"),
    [
        (ModelConfig(encoder="resnet34"), "layer4.", "layer3."),
        (ModelConfig(architecture="Unet", encoder="tu-efficientnet_b3"), "blocks.5.", "blocks.4."),
        (ModelConfig(architecture="Unet", encoder="efficientnet-b3"), "_blocks.25.", "_blocks.17."),
        (
            ModelConfig(architecture="seed_resunet", params={"base_channels": 4}),
            "stages.4.",
            "stages.3.",
        ),
    ],
    ids=["resnet34", "tu-efficientnet_b3", "efficientnet-b3", "resunet"],
)
def test_freeze_and_unfreeze_last_stage(config: ModelConfig, last: str, not_last: str) -> None:
    model = build_model(config, 3, 1)
    encoder = encoder_of(model)
    decoder_names = {n for n, _ in model.named_parameters() if not n.startswith("encoder.")}

    set_encoder_trainable(model, False)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert _trainable_names(model) == decoder_names

    set_encoder_trainable(model, True, last_only=True)
    trainable = {n.removeprefix("model.") for n in _trainable_names(encoder)}
    assert any(n.startswith(last) for n in trainable)
    assert not any(n.startswith(not_last) for n in trainable)
    assert {id(p) for p in last_encoder_stage(model)} == {
        id(p) for p in encoder.parameters() if p.requires_grad
    }
    assert _trainable_names(model) >= decoder_names

    set_encoder_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("epoch", "unfreeze", "encoder_trainable"),
    [
        (0, "all", "none"),
        (1, "all", "none"),
        (2, "all", "all"),
        (2, "last", "last"),
        (5, "last", "last"),
    ],
)
def test_freeze_phase_follows_the_epoch(epoch: int, unfreeze: str, encoder_trainable: str) -> None:
    from kaggle_seg.models.freezing import apply_freeze_phase

    model = build_model(ModelConfig(encoder="resnet18"), 3, 1)
    apply_freeze_phase(model, epoch, frozen_epochs=2, unfreeze=unfreeze)

    trainable = {id(p) for p in encoder_of(model).parameters() if p.requires_grad}
    expected = {
        "none": set(),
        "last": {id(p) for p in last_encoder_stage(model)},
        "all": {id(p) for p in encoder_of(model).parameters()},
    }[encoder_trainable]
    assert trainable == expected
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("encoder."))


def test_no_freeze_phase_leaves_the_encoder_trainable() -> None:
    from kaggle_seg.models.freezing import apply_freeze_phase

    model = build_model(ModelConfig(encoder="resnet18"), 3, 1)
    set_encoder_trainable(model, False)
    apply_freeze_phase(model, 0, frozen_epochs=0, unfreeze="last")
    assert all(p.requires_grad for p in model.parameters())


def test_parameter_groups_cover_every_parameter_once() -> None:
    model = build_model(ModelConfig(encoder="resnet18"), 3, 1)
    set_encoder_trainable(model, False)

    groups = parameter_groups(model, lr=1e-3, encoder_lr=1e-4)

    assert [(g["name"], g["lr"]) for g in groups] == [("encoder", 1e-4), ("decoder", 1e-3)]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.encoder.parameters()}
    assert [g["lr"] for g in parameter_groups(model, 1e-3, None)] == [1e-3, 1e-3]
    torch.optim.AdamW(groups, lr=1e-3)


def test_count_parameters_and_wrappers() -> None:
    model = build_model(ModelConfig(architecture="seed_unet", params={"base_channels": 4}), 3, 1)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total

    set_encoder_trainable(model, False)
    encoder_total = sum(p.numel() for p in model.encoder.parameters())
    assert count_parameters(model, trainable_only=True) == total - encoder_total

    wrapper = nn.Module()
    wrapper.module = model  # what DDP looks like from outside
    assert encoder_of(wrapper) is model.encoder
    with pytest.raises(KsegError, match="no `encoder`"):
        encoder_of(nn.Conv2d(1, 1, 1))


def test_the_ema_twin_recalibrates_only_the_batchnorms_trainable_in_the_model() -> None:
    import copy

    from kaggle_seg.batchnorm import mirrored_trainable_batchnorms

    model = build_model(ModelConfig(encoder="resnet18"), 3, 1)
    twin = copy.deepcopy(model)
    set_encoder_trainable(model, False)

    layers = mirrored_trainable_batchnorms(model, twin)

    twin_encoder = {id(m) for m in encoder_of(twin).modules()}
    twin_decoder_bns = [
        m
        for n, m in twin.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not n.startswith("encoder.")
    ]
    assert layers and all(id(m) not in twin_encoder for m in layers)
    assert {id(m) for m in layers} == {id(m) for m in twin_decoder_bns}
