"""Optimizers and learning-rate schedules by name: one literal dict each (`OPTIMIZERS`,
`SCHEDULERS`) and a `build_*` function, as the config names them (train.optimizer.name,
train.scheduler.name)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kaggle_seg.config import ExperimentConfig
from kaggle_seg.errors import KsegError

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
}


def build_optimizer(config: ExperimentConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer train.optimizer names over the model's groups (encoder at encoder_lr)."""
    from kaggle_seg.models import parameter_groups

    opt = config.train.optimizer
    groups = parameter_groups(model, opt.lr, config.train.encoder_lr)
    try:
        optimizer = OPTIMIZERS[opt.name]
    except KeyError:
        raise KeyError(
            f"unknown optimizer {opt.name!r}; choose one of {', '.join(OPTIMIZERS)}"
        ) from None
    try:
        return optimizer(groups, lr=opt.lr, weight_decay=opt.weight_decay, **opt.params)
    except TypeError as exc:
        raise KsegError(f"train.optimizer.params: {exc}") from exc


# A schedule: (config, optimizer, optimizer steps per epoch) -> (scheduler or None, when it
# steps: "step", "epoch", "metric" or "never").
Schedule = Callable[[ExperimentConfig, torch.optim.Optimizer, int], tuple[Any, str]]


def _no_schedule(config: ExperimentConfig, optimizer: torch.optim.Optimizer, steps: int):
    return None, "never"


def _plateau(config: ExperimentConfig, optimizer: torch.optim.Optimizer, steps: int):
    sched = config.train.scheduler
    params = {"factor": 0.5, "patience": 2, **sched.params}
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=config.train.monitor_mode, min_lr=sched.min_lr, **params
    )
    return scheduler, "metric"


def _step(config: ExperimentConfig, optimizer: torch.optim.Optimizer, steps: int):
    params = {"step_size": 10, "gamma": 0.1, **config.train.scheduler.params}
    return torch.optim.lr_scheduler.StepLR(optimizer, **params), "epoch"


def _cosine(config: ExperimentConfig, optimizer: torch.optim.Optimizer, steps: int):
    """Linear warm-up over warmup_epochs, then a cosine down to min_lr, per optimizer step."""
    sched = config.train.scheduler
    total = max(1, config.train.epochs * steps)
    warmup = int(sched.warmup_epochs * steps)
    floor = sched.min_lr / config.train.optimizer.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "step"


SCHEDULERS: dict[str, Schedule] = {
    "none": _no_schedule,
    "cosine": _cosine,
    "plateau": _plateau,
    "step": _step,
}


def build_scheduler(
    config: ExperimentConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> tuple[Any, str]:
    """(scheduler, when it steps: "step", "epoch", "metric" or "never")."""
    name = config.train.scheduler.name
    try:
        schedule = SCHEDULERS[name]
    except KeyError:
        raise KeyError(
            f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}"
        ) from None
    return schedule(config, optimizer, steps_per_epoch)
