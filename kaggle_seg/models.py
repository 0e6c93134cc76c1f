"""Segmentation models: any smp architecture + encoder, or one of the seed architectures.

Every model maps images `[B, in_channels, H, W]` to logits `[B, classes, H, W]` (no activation:
the loss and the prediction code apply sigmoid / softmax) and exposes its down path as
`model.encoder`, so two-phase training freezes smp and seed models the same way.

Weights come from local files only (Kaggle kernels run offline): smp is always asked for
`encoder_weights=None`, then `ModelConfig.encoder_weights_path` (an ImageNet checkpoint for the
encoder) and `ModelConfig.weights_path` (a whole trained model) are loaded here.

EfficientNet-B3: use `encoder: tu-efficientnet_b3` (or `tu-tf_efficientnet_b3`, the TF-ported
weights). It is plain timm, needs no extra package, and its features-only trunk has no unused
parameters. smp's own `efficientnet-b3` also builds offline (smp >= 0.5 vendors the
efficientnet-pytorch code) and takes lukemelas `efficientnet-b3-*.pth` checkpoints, but it keeps
the unused `_conv_head` / `_bn1` layers, which DDP reports as parameters without gradients;
`timm-efficientnet-b3` is deprecated by smp.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

from kaggle_seg.config import ModelConfig
from kaggle_seg.errors import KsegError

# --------------------------------------------------------------------------------------------
# Seed architectures
# --------------------------------------------------------------------------------------------


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1
) -> nn.Sequential:
    """Conv (same padding, no bias: BN follows), BN, ReLU."""
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Subsample(nn.Module):
    """Every `stride`-th pixel: `[B, C, H, W] -> [B, C, H / stride, W / stride]`."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride]


def _projection(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    """1x1 conv + BN shortcut where a residual branch changes width or resolution."""
    if in_channels == out_channels and stride == 1:
        return nn.Identity()
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if stride > 1:
        # Same as a strided 1x1 conv, whose CPU weight gradient crashes oneDNN (segfault) for
        # channels_last inputs with fewer than 16 channels (oneDNN issue #6035).
        layers.insert(0, Subsample(stride))
    return nn.Sequential(*layers)


class DoubleConv(nn.Sequential):
    """U-Net block: (3x3 conv, BN, ReLU) x 2. `[B, in, H, W] -> [B, out, H, W]`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            _conv_bn_relu(in_channels, out_channels), _conv_bn_relu(out_channels, out_channels)
        )


class ResidualBlock(nn.Module):
    """Pre-activation residual unit of ResUNet (Zhang et al. 2017).

    BN-ReLU-conv3x3(stride) -> BN-ReLU-conv3x3, plus a 1x1 conv shortcut where width or
    resolution change. `[B, in, H, W] -> [B, out, H / stride, W / stride]`.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=False),  # the input is also the shortcut's input
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        )
        self.shortcut = _projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ResidualStem(nn.Module):
    """ResUNet's first unit: conv-BN-ReLU-conv on the raw input, plus a 1x1 conv shortcut.

    The input is not pre-activated: BN-ReLU on raw intensities would discard half of them.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(in_channels, out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        )
        self.shortcut = _projection(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class RESBlock(nn.Module):
    """BU-Net's Residual Extended Skip block (Rehman et al. 2020).

    Three parallel paths with receptive fields 1, 3 and 5 (1x1 conv, 3x3 conv, two stacked 3x3
    convs), concatenated, fused by a 1x1 conv and added to a (projected) shortcut.
    `[B, in, H, W] -> [B, out, H, W]`.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.paths = nn.ModuleList(
            [
                _conv_bn_relu(in_channels, out_channels, kernel_size=1),
                _conv_bn_relu(in_channels, out_channels),
                nn.Sequential(
                    _conv_bn_relu(in_channels, out_channels),
                    _conv_bn_relu(out_channels, out_channels),
                ),
            ]
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(3 * out_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.shortcut = _projection(in_channels, out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = torch.cat([path(x) for path in self.paths], dim=1)
        return self.act(self.fuse(paths) + self.shortcut(x))


class WCBlock(nn.Module):
    """BU-Net's Wide Context block: parallel dilated 3x3 convs, 1x1 fusion, residual add.

    Dilation rates (1, 2, 4) widen the receptive field of the bottleneck without more
    downsampling. `[B, C, H, W] -> [B, C, H, W]`.
    """

    def __init__(self, channels: int, dilation_rates: Sequence[int] = (1, 2, 4)):
        super().__init__()
        self.paths = nn.ModuleList(
            [_conv_bn_relu(channels, channels, dilation=rate) for rate in dilation_rates]
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(len(dilation_rates) * channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = torch.cat([path(x) for path in self.paths], dim=1)
        return self.act(self.fuse(paths) + x)


class SeedEncoder(nn.Module):
    """The down path of a seed model: `stages[0]` at full resolution, `stages[i]` at 1 / 2**i.

    `forward` returns every stage's output, full resolution first:
    `[B, C, H, W] -> [[B, c0, H, W], [B, c1, H/2, W/2], ..., [B, c_depth, H/2**depth, ...]]`.
    """

    def __init__(self, stages: Sequence[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class UpBlock(nn.Module):
    """One decoder level: upsample the deeper map, concatenate the skip, run `body`.

    `[B, c_deep, h, w], [B, c_skip, 2h, 2w] -> [B, c_out, 2h, 2w]`.
    """

    def __init__(self, up: nn.Module, body: nn.Module):
        super().__init__()
        self.up = up
        self.body = body

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([self.up(x), skip], dim=1))


class SeedUNet(nn.Module):
    """Shared skeleton of the seed models: encoder, decoder levels, 1x1 head.

    `forward`: images `[B, in_channels, H, W]` -> logits `[B, classes, H, W]`, with H and W
    divisible by 2**depth.
    """

    def __init__(self, encoder: SeedEncoder, decoder: Sequence[UpBlock], head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = nn.ModuleList(decoder)
        self.head = head
        self.depth = len(decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2**self.depth
        height, width = x.shape[-2:]
        if height % multiple or width % multiple:
            raise KsegError(
                f"{type(self).__name__} with depth {self.depth} needs input height and width "
                f"divisible by {multiple}, got {height}x{width}"
            )
        features = self.encoder(x)
        y = features[-1]
        for block, skip in zip(self.decoder, reversed(features[:-1]), strict=True):
            y = block(y, skip)
        return self.head(y)


def _widths(base_channels: int, depth: int) -> list[int]:
    if base_channels < 1 or depth < 1:
        raise KsegError(f"base_channels and depth must be >= 1, got {base_channels}, {depth}")
    return [base_channels * 2**level for level in range(depth + 1)]


class UNet(SeedUNet):
    """Classic U-Net (Ronneberger et al. 2015) with BN: double-conv blocks, max-pool down,
    transposed-conv (or bilinear + 1x1 conv) up, concatenated skips.

    base_channels=64, depth=4 is the paper's 64..1024-channel network.
    """

    def __init__(
        self,
        in_channels: int,
        classes: int,
        base_channels: int = 64,
        depth: int = 4,
        bilinear: bool = False,
    ):
        widths = _widths(base_channels, depth)
        stages: list[nn.Module] = [DoubleConv(in_channels, widths[0])]
        stages += [
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i - 1], widths[i]))
            for i in range(1, depth + 1)
        ]
        decoder = []
        for i in range(depth, 0, -1):
            if bilinear:
                up: nn.Module = nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    nn.Conv2d(widths[i], widths[i - 1], 1),
                )
            else:
                up = nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2)
            decoder.append(UpBlock(up, DoubleConv(2 * widths[i - 1], widths[i - 1])))
        super().__init__(SeedEncoder(stages), decoder, nn.Conv2d(widths[0], classes, 1))


class ResUNet(SeedUNet):
    """Deep Residual U-Net (Zhang, Liu & Wang 2017, "Road Extraction by Deep Residual U-Net").

    Encoder: residual stem at full resolution, then pre-activation residual units whose first
    conv has stride 2 (no pooling); the deepest unit is the paper's bridge. Decoder: nearest
    upsampling, concatenation, residual unit. Head: 1x1 conv. The paper's network is
    base_channels=64, depth=3 (64, 128, 256, bridge 512; 7.8M parameters); depth=4 adds a level.
    """

    def __init__(self, in_channels: int, classes: int, base_channels: int = 64, depth: int = 4):
        widths = _widths(base_channels, depth)
        stages: list[nn.Module] = [ResidualStem(in_channels, widths[0])]
        stages += [ResidualBlock(widths[i - 1], widths[i], stride=2) for i in range(1, depth + 1)]
        decoder = [
            UpBlock(
                # nearest as in the paper (Keras UpSampling2D); also deterministic on CUDA
                nn.Upsample(scale_factor=2, mode="nearest"),
                ResidualBlock(widths[i] + widths[i - 1], widths[i - 1]),
            )
            for i in range(depth, 0, -1)
        ]
        head = nn.Sequential(
            # the last residual unit ends on a bare conv (pre-activation), so activate first
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(widths[0], classes, 1),
        )
        super().__init__(SeedEncoder(stages), decoder, head)


class BUNet(SeedUNet):
    """BU-Net (Rehman et al. 2020, "BU-Net: Brain Tumor Segmentation Using Modified U-Net
    Architecture"), compact version.

    A U-Net whose encoder and decoder blocks are Residual Extended Skip blocks (`RESBlock`:
    1x1 / 3x3 / 5x5-receptive-field paths + residual), with a Wide Context block (`WCBlock`:
    dilated 3x3 convs at rates 1, 2, 4 + residual) after the bottleneck RES block, i.e. between
    encoder and decoder. Max-pool down, transposed-conv up. The paper's custom loss is a config
    matter (weighted BCE + Dice in `kaggle_seg.losses`), not part of the model.
    """

    def __init__(
        self,
        in_channels: int,
        classes: int,
        base_channels: int = 32,
        depth: int = 4,
        dilation_rates: Sequence[int] = (1, 2, 4),
    ):
        widths = _widths(base_channels, depth)
        stages: list[nn.Module] = [RESBlock(in_channels, widths[0])]
        stages += [
            nn.Sequential(nn.MaxPool2d(2), RESBlock(widths[i - 1], widths[i]))
            for i in range(1, depth)
        ]
        stages.append(
            nn.Sequential(
                nn.MaxPool2d(2),
                RESBlock(widths[depth - 1], widths[depth]),
                WCBlock(widths[depth], tuple(dilation_rates)),
            )
        )
        decoder = [
            UpBlock(
                nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2),
                RESBlock(2 * widths[i - 1], widths[i - 1]),
            )
            for i in range(depth, 0, -1)
        ]
        super().__init__(SeedEncoder(stages), decoder, nn.Conv2d(widths[0], classes, 1))


SEED_MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "resunet": ResUNet, "bunet": BUNet}


def smp_architectures() -> list[str]:
    """smp's architecture names as smp spells them (its classes: Unet, UnetPlusPlus, FPN, ...)."""
    return [cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()]


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_model(config: ModelConfig, in_channels: int, classes: int) -> nn.Module:
    """The model `config` names, with its local weights loaded.

    `config.architecture`: a seed name (`SEED_MODELS`, any case) or an smp architecture
    (`Unet`, `UnetPlusPlus`, `FPN`, ..., any case) with `config.encoder` (an smp encoder name or
    `tu-<timm model>`); `config.params` go to the constructor. "unet" names both: smp's exact
    spelling `Unet` (the config default) builds smp's U-Net, any other (`unet`, `UNet`) the
    seed U-Net. Returns a module mapping `[B, in_channels, H, W]` to logits
    `[B, classes, H, W]`; with `params.aux_params` (smp only: a classification head, e.g.
    `{dropout: 0.2}`; its `classes` defaults to, and must equal, `classes`) it returns a tuple
    (mask logits `[B, classes, H, W]`, class logits `[B, classes]`).

    Raises KeyError for an unknown architecture or encoder (listing the valid names) and
    KsegError for bad params or weight files that are missing or do not fit.
    """
    from kaggle_seg.pretrained import (
        download_failed,
        hub_offline_when_unreachable,
        is_weights_file,
        packaged_weights_file,
    )

    arch = config.architecture.lower()
    params = dict(config.params)
    # A file to load after building, or a weight name smp / timm download while building.
    weights: Any = config.encoder_weights or config.encoder_weights_path
    download: str | None = None
    if weights is not None and not is_weights_file(weights):
        packaged = packaged_weights_file(config.encoder) if weights == "imagenet" else None
        weights, download = (packaged, None) if packaged else (None, str(weights))
    # "Unet" (smp's spelling, the config default) is smp's U-Net; "unet" / "UNet" the seed.
    smp_spelling = config.architecture in smp_architectures()
    if arch in SEED_MODELS and not smp_spelling:
        if "aux_params" in params:
            raise KsegError(
                f"model '{config.architecture}': the seed models have no classification head; "
                "model.params.aux_params needs an smp architecture (e.g. Unet, FPN)"
            )
        model_class = SEED_MODELS[arch]
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
            f"unknown model architecture '{config.architecture}'; valid: seed models "
            + ", ".join(SEED_MODELS)
            + "; smp: "
            + ", ".join(smp_architectures())
            + " (any case; exactly 'Unet' is smp's, other spellings of unet the seed U-Net)"
        )
    if weights is not None:
        load_encoder_weights(model, weights)
    if config.weights_path is not None:
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
                f"unknown timm encoder '{encoder}': '{encoder[3:]}' is not a timm model "
                "(see timm.list_models(); e.g. tu-resnet50, tu-efficientnet_b3, tu-convnext_tiny)"
            )
        return
    names = smp.encoders.get_encoder_names()
    if encoder not in names:
        raise KeyError(
            f"unknown encoder '{encoder}'; use 'tu-<timm model>' or one of smp's: "
            + ", ".join(sorted(names))
        )


# --------------------------------------------------------------------------------------------
# Weights from local files
# --------------------------------------------------------------------------------------------

# Wrappers that prefix every key: DDP, torch.compile, smp's timm encoder, a whole smp model.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_ENCODER_PREFIXES = (*_WRAPPER_PREFIXES, "encoder.", "model.")
_LISTED_KEYS = 5


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a raw state dict, or a checkpoint holding one under
    "state_dict" or "model" (kseg checkpoints); `.safetensors` files too. DDP's `module.` and
    torch.compile's `_orig_mod.` prefixes are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise KsegError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                # kseg checkpoints embed their config and history; the user named this file
                state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise KsegError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not state:
        raise KsegError(f"{path}: not a state dict (expected a mapping of parameter tensors)")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise KsegError(
            f"{path}: not a state dict: {_summary(not_tensors)} are not tensors "
            "(a checkpoint should keep its weights under 'model' or 'state_dict')"
        )
    return {_strip_prefixes(str(k), _WRAPPER_PREFIXES): v for k, v in state.items()}


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load a whole-model state dict (e.g. a kseg checkpoint's "model") into `model`, strictly."""
    state = read_state_dict(path)
    _load_checked(model, state, path, "model", strict=True)


def load_encoder_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> list[str]:
    """Load a local encoder checkpoint (e.g. ImageNet weights) into `encoder_of(model)`.

    Keys are matched after removing wrapper prefixes (`module.`, `_orig_mod.`, `encoder.`,
    `model.`) and treating `.` and `_` alike, so a timm / torchvision checkpoint fits smp's
    `tu-` and native encoders, and a whole smp model's state dict gives its encoder part.
    Checkpoint keys of modules the encoder does not have at all (classifier heads: `fc.`,
    `classifier.`, `head.`, `conv_head.`, ...) are ignored and returned. A first conv trained on
    3 channels is adapted to the model's input channels as timm does (summed for 1 channel,
    repeated and scaled by 3 / C otherwise). Missing encoder keys are an error when `strict`;
    unexpected keys of modules the encoder has, and shape mismatches, always are.
    """
    encoder = encoder_of(model)
    target = encoder.state_dict()
    source = read_state_dict(path)

    exact = {_strip_prefixes(k, _ENCODER_PREFIXES): k for k in target}
    loose: dict[str, str | None] = {}
    for short, key in exact.items():
        canon = short.replace(".", "_")
        loose[canon] = None if canon in loose else key  # None: ambiguous, exact names only
    canonical_targets = set(loose)

    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    ignored: list[str] = []
    for key, tensor in source.items():
        short = _strip_prefixes(key, _ENCODER_PREFIXES)
        name = exact.get(short) or loose.get(short.replace(".", "_"))
        if name is not None:
            mapped[name] = tensor
            continue
        module = short.split(".", 1)[0] + "_"
        if any(t.startswith(module) for t in canonical_targets):
            unexpected.append(key)
        else:
            ignored.append(key)

    problems = _misfits(
        target, mapped, "encoder", strict=strict, unexpected=unexpected, adaptable=True
    )
    if not mapped or problems:
        # Names disagree (e.g. efficientnet-pytorch's `_blocks.N` against timm's `blocks.N.M`):
        # the same network's tensors still come in the same order with the same shapes.
        from kaggle_seg.pretrained import map_by_order, order_report

        by_order = map_by_order(source, target)
        if by_order is None:
            by_name = (
                "; ".join(problems)
                if mapped
                else f"no key fits the encoder ({type(encoder).__name__}); file keys: "
                f"{_summary(list(source))}; encoder keys: {_summary(list(target))}"
            )
            raise KsegError(
                f"{path}: weights do not fit the encoder: by name, {by_name}; "
                f"{order_report(source, target)}"
            )
        mapped, ignored, unexpected = by_order[0], by_order[1], []
    for name, tensor in list(mapped.items()):
        wanted = target[name]
        rgb_conv = tensor.ndim == 4 and tensor.shape[1] == 3
        other_inputs = wanted.ndim == 4 and wanted.shape[1] != 3
        if (
            rgb_conv
            and other_inputs
            and tensor.shape[:1] + tensor.shape[2:] == wanted.shape[:1] + wanted.shape[2:]
        ):
            mapped[name] = timm.models.adapt_input_conv(wanted.shape[1], tensor)

    _load_checked(encoder, mapped, path, "encoder", strict=strict, unexpected=unexpected)
    return ignored


def _misfits(
    target: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    what: str,
    *,
    strict: bool,
    unexpected: Sequence[str] = (),
    adaptable: bool = False,
) -> list[str]:
    """What keeps `state` from loading into a module with state dict `target`, as report parts
    (missing keys when `strict`, unexpected keys, shape mismatches); empty when it fits. With
    `adaptable`, a 3-channel conv fits a conv of other input channels (it will be adapted)."""
    # BN step counters: absent from timm and old torchvision files, and unused by BN in train
    # mode with a momentum; load_state_dict fills them in.
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [*unexpected, *(k for k in state if k not in target)]

    def fits(have: torch.Tensor, want: torch.Tensor) -> bool:
        if have.shape == want.shape:
            return True
        rgb_conv = adaptable and have.ndim == 4 and want.ndim == 4 and have.shape[1] == 3
        return rgb_conv and have.shape[:1] + have.shape[2:] == want.shape[:1] + want.shape[2:]

    mismatched = [
        f"{k}: file {list(v.shape)} vs {what} {list(target[k].shape)}"
        for k, v in state.items()
        if k in target and not fits(v, target[k])
    ]
    problems = []
    if missing and strict:
        problems.append(f"{len(missing)} missing keys ({_summary(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_summary(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_summary(mismatched)})")
    return problems


def _load_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    what: str,
    *,
    strict: bool,
    unexpected: Sequence[str] = (),
) -> None:
    """`module.load_state_dict(state)` with one KsegError naming the file and every misfit."""
    problems = _misfits(module.state_dict(), state, what, strict=strict, unexpected=unexpected)
    if problems:
        raise KsegError(f"{path}: weights do not fit the {what}: " + "; ".join(problems))
    module.load_state_dict(dict(state), strict=strict)


def _strip_prefixes(key: str, prefixes: Sequence[str]) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _summary(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LISTED_KEYS])
    return shown + (f", ... {len(items) - _LISTED_KEYS} more" if len(items) > _LISTED_KEYS else "")


# --------------------------------------------------------------------------------------------
# Encoder freezing, optimizer groups
# --------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def encoder_of(model: nn.Module) -> nn.Module:
    """The down path of an smp or seed model (`model.encoder`), through DDP / compile wrappers."""
    encoder = getattr(_unwrap(model), "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise KsegError(f"{type(_unwrap(model)).__name__} has no `encoder` module to freeze")
    return encoder


def last_encoder_stage(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the encoder's deepest stage, the one "unfreeze: last" trains.

    - seed models: `encoder.stages[-1]` (the bottleneck);
    - smp `tu-` (timm) encoders: everything after the second-deepest feature module up to the
      deepest one (timm `feature_info`): ResNet `layer4`, EfficientNet block groups 5-6,
      ConvNeXt `stages.3`;
    - smp native encoders: the modules `get_stages()` lists for the deepest stride in use
      (ResNet `layer4`, EfficientNet the stride-32 block groups);
    - otherwise the encoder's last child module that has parameters.
    """
    encoder = encoder_of(model)
    stages = getattr(encoder, "stages", None)
    if isinstance(stages, nn.ModuleList) and len(stages) > 0:
        return list(stages[-1].parameters())
    timm_model = getattr(encoder, "model", None)
    feature_info = getattr(timm_model, "feature_info", None)
    if isinstance(timm_model, nn.Module) and feature_info is not None:
        found = _last_timm_stage(timm_model, feature_info.module_name())
        if found:
            return found
    get_stages = getattr(encoder, "get_stages", None)
    if callable(get_stages):
        try:
            by_stride = get_stages()
        except NotImplementedError:
            by_stride = {}
        in_use = [s for s in by_stride if s <= 2 ** getattr(encoder, "_depth", 5)]
        if in_use:
            found = [p for m in by_stride[max(in_use)] for p in m.parameters()]
            if found:
                return found
    for child in reversed(list(encoder.children())):
        found = list(child.parameters())
        if found:
            return found
    return list(encoder.parameters())


def _last_timm_stage(timm_model: nn.Module, module_names: Sequence[str]) -> list[nn.Parameter]:
    # Registration order follows the forward pass in timm trunks, so a stage is a slice.
    # features_only wrappers may flatten "blocks.6" to "blocks_6": compare with "_" for ".".
    named = [(name.replace(".", "_"), p) for name, p in timm_model.named_parameters()]

    def last_index(module_name: str) -> int:
        prefix = module_name.replace(".", "_") + "_"
        hits = [i for i, (name, _) in enumerate(named) if name.startswith(prefix)]
        return hits[-1] if hits else -1

    if not module_names:
        return []
    end = last_index(module_names[-1])
    start = last_index(module_names[-2]) if len(module_names) > 1 else -1
    return [p for _, p in named[start + 1 : end + 1]] if end > start else []


def set_encoder_trainable(model: nn.Module, trainable: bool, *, last_only: bool = False) -> None:
    """Freeze or unfreeze the encoder (`requires_grad`); decoder and head stay trainable.

    `trainable=True, last_only=True` trains only `last_encoder_stage(model)` and freezes the
    rest of the encoder. BatchNorm running statistics still update in train mode; call
    `.eval()` on frozen BN layers where that matters.
    """
    encoder = encoder_of(model)
    for p in encoder.parameters():
        p.requires_grad_(trainable and not last_only)
    if trainable and last_only:
        for p in last_encoder_stage(model):
            p.requires_grad_(True)


def parameter_groups(model: nn.Module, lr: float, encoder_lr: float | None) -> list[dict]:
    """Optimizer param groups: encoder at `encoder_lr` (or `lr`), decoder + head at `lr`.

    Every parameter is included, frozen or not, so unfreezing later needs no new optimizer
    (frozen parameters get no gradient, so the optimizer skips them).
    """
    encoder_ids = {id(p) for p in encoder_of(model).parameters()}
    encoder_params, other_params = [], []
    for p in _unwrap(model).parameters():
        (encoder_params if id(p) in encoder_ids else other_params).append(p)
    groups = [
        {
            "name": "encoder",
            "params": encoder_params,
            "lr": lr if encoder_lr is None else encoder_lr,
        },
        {"name": "decoder", "params": other_params, "lr": lr},
    ]
    return [g for g in groups if g["params"]]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (only those with `requires_grad` if `trainable_only`)."""
    params = _unwrap(model).parameters()
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)
