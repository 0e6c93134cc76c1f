"""`kseg weights import | fetch`: an encoder's weights written as a file of its own naming, with
a JSON sidecar (source, sha256, licence), for `model.encoder_weights` (e.g. a Kaggle dataset).
Builds models (factory.py) and loads weight files (weights.py), so it sits above both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kaggle_seg.config import ModelConfig
from kaggle_seg.models.factory import build_model
from kaggle_seg.models.freezing import encoder_of
from kaggle_seg.models.weights import (
    PACKAGED_LICENSE,
    load_encoder_weights,
    packaged_weights_file,
    sha256_of,
)


def build_encoder_model(encoder: str, in_channels: int = 3) -> nn.Module:
    """A small smp U-Net around `encoder` (random weights), whose `.encoder` is what
    `encoder_weights` files are loaded into and exported from."""

    return build_model(ModelConfig(architecture="Unet", encoder=encoder), in_channels, 1)


def write_encoder_weights(
    encoder: nn.Module, out: Path, *, source: str, encoder_name: str, license_text: str | None
) -> Path:
    """Save `encoder`'s state dict (safetensors when the suffix says so, else torch) and a
    sidecar `<out>.json`: source, sha256 of the file, licence, encoder, tensor count."""
    from kaggle_seg.io import atomic_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(out) as tmp:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)
    sidecar = {
        "encoder": encoder_name,
        "source": source,
        "sha256": sha256_of(out),
        "license": license_text or "unknown: check the source's terms before sharing",
        "tensors": len(state),
    }
    with atomic_path(out.with_name(out.name + ".json")) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
    return out


def import_encoder_weights(
    source: Path, encoder: str, out: Path, license_text: str | None = None
) -> dict[str, Any]:
    """`kseg weights import`: map a weights file of any supported naming onto `encoder` and
    write it in the encoder's own naming, with its sidecar."""

    model = build_encoder_model(encoder)
    ignored = load_encoder_weights(model, source)
    packaged = packaged_weights_file(encoder)
    if license_text is None and packaged is not None and packaged == Path(source).resolve():
        license_text = PACKAGED_LICENSE
    write_encoder_weights(
        encoder_of(model),
        out,
        source=f"{source} (sha256 {sha256_of(Path(source))})",
        encoder_name=encoder,
        license_text=license_text,
    )
    return {"out": str(out), "ignored": len(ignored)}


def fetch_encoder_weights(encoder: str, out: Path, weights: str = "imagenet") -> dict[str, Any]:
    """`kseg weights fetch`: on a connected machine, download `encoder`'s `weights` through
    smp / timm and save them as a file for `model.encoder_weights` (e.g. a Kaggle dataset)."""

    packaged = packaged_weights_file(encoder) if weights == "imagenet" else None
    if packaged is not None:
        return import_encoder_weights(packaged, encoder, out, PACKAGED_LICENSE)

    config = ModelConfig(architecture="Unet", encoder=encoder, encoder_weights=weights)
    model = build_model(config, 3, 1)
    write_encoder_weights(
        encoder_of(model),
        out,
        source=f"smp/timm '{weights}' weights of {encoder}",
        encoder_name=encoder,
        license_text=None,
    )
    return {"out": str(out), "ignored": 0}


# ---- weight files into models -------------------------------------------------------------
