"""The seed architectures the project grew from: a U-Net, a ResUNet and a BU-Net (U-Net with
RES and WC blocks), written out in torch; no published weights.

Every model maps images `[B, in_channels, H, W]` to logits `[B, classes, H, W]` and exposes its
down path as `model.encoder` (a `SeedEncoder`), so two-phase training freezes seed and smp models
the same way. Built by name through `models.factory.MODELS` (`seed_unet`, `seed_resunet`,
`seed_bunet`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kaggle_seg.errors import KsegError


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
