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


class CosineFactor:
    """LR factor per optimizer step: linear warm-up over `warmup` steps, then a cosine down to
    `floor` at `total`. An object, not a closure, so that LambdaLR's state_dict saves `total`,
    which a time budget (kaggle_seg/time_budget.py) may change mid-run, and resume restores.

    A mid-run change (`replan`) anchors the cosine at the step it happens: from there the factor
    falls from where it was to `floor` at the new total. Moving `total` alone would shift the
    whole curve, so a plan that grew by two epochs raised the lr again late in the run (25 -> 27
    epochs at epoch 18: 0.00092 -> 0.00100) and one that shrank dropped it in one step."""

    # Class defaults, so a state_dict saved before anchors existed loads unanchored.
    anchor_step: int | None = None
    anchor_factor: float = 1.0

    def __init__(self, total: int, warmup: int, floor: float):
        self.total, self.warmup, self.floor = total, warmup, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        start, top = self.warmup, 1.0
        if self.anchor_step is not None and step >= self.anchor_step:
            start, top = self.anchor_step, self.anchor_factor
        progress = min(1.0, (step - start) / max(1, self.total - start))
        return self.floor + (top - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def replan(self, total: int, step: int | None) -> None:
        """End the cosine at `total`. From optimizer step `step` on, continuing from the factor
        the schedule has there (in warm-up: only the end moves); step None: the whole cosine
        laid over the new length."""
        if step is None:
            self.anchor_step = None
        elif step > self.warmup:
            self.anchor_factor = self(step)
            self.anchor_step = step
        self.total = total


def _cosine(config: ExperimentConfig, optimizer: torch.optim.Optimizer, steps: int):
    """Linear warm-up over warmup_epochs, then a cosine down to min_lr, per optimizer step."""
    sched = config.train.scheduler
    factor = CosineFactor(
        total=max(1, config.train.epochs * steps),
        warmup=int(sched.warmup_epochs * steps),
        floor=sched.min_lr / config.train.optimizer.lr,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "step"


def set_schedule_epochs(
    scheduler: Any, epochs: int, steps_per_epoch: int, mid_run: bool = False
) -> bool:
    """Make a cosine schedule end after `epochs`; True if it did. mid_run (a time budget's
    re-plan between epochs): the lr continues from its current value, never rising again;
    otherwise (a resume with a new plan) the whole cosine is laid over the new length. Step
    and plateau schedules do not depend on the run's length."""
    factors = getattr(scheduler, "lr_lambdas", [])
    changed = False
    for factor in factors:
        if isinstance(factor, CosineFactor):
            total = max(1, epochs * steps_per_epoch)
            factor.replan(total, scheduler.last_epoch if mid_run else None)
            changed = True
    return changed


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
