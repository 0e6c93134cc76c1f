"""Two-phase training: freezing the encoder (all of it, or all but its last stage), and the
optimizer's parameter groups (encoder at its own learning rate)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from kaggle_seg.errors import KsegError


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


def apply_freeze_phase(model: nn.Module, epoch: int, frozen_epochs: int, unfreeze: str) -> None:
    """Two-phase training: the encoder frozen for the first `frozen_epochs` epochs, then
    trained whole (`unfreeze: all`) or only its last stage (`unfreeze: last`)."""
    if frozen_epochs == 0:
        trainable, last_only = True, False
    elif epoch < frozen_epochs:
        trainable, last_only = False, False
    else:
        trainable, last_only = True, unfreeze == "last"
    if not trainable or last_only:
        set_encoder_trainable(model, False)
    if trainable:
        set_encoder_trainable(model, True, last_only=last_only)


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
