"""`train.time_budget_minutes`: fit a run's epochs to the minutes the user has.

A recipe's `epochs` is tuned on one machine; the same 2-core recipe took 30 min on one CPU
and would take 60 on another (benchmarks/README.md). With a budget, `epochs` is the most the
run may do: after every epoch the run measures what an epoch and a validation cost and plans
the most epochs whose projected time (the validations they bring, the last epoch's, and the
out-of-fold pass) fits. The cosine schedule follows the plan, so a cut run still anneals.
An epoch that leaves no time for another (and its validation) validates at once and ends the
run (`TrainerState._out_of_time`), so a slow or loaded machine does not train past the budget
only to reach a validation epoch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EpochClock:
    """Seconds measured so far in one run: each epoch's training, each validation (with its
    BatchNorm recalibration), and everything since the run started (`elapsed`). Of the last
    validation also: its model forward passes (`forward`), its BN recalibration
    (`recalibration`) and one recalibration batch (`bn_batch`), from which the OOF pass is
    projected (`oof_pass_seconds`); 0 until measured."""

    train: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    forward: float = 0.0
    recalibration: float = 0.0
    bn_batch: float = 0.0

    def epoch_seconds(self) -> float:
        """A steady epoch: the first one also pays for warm-up (kernel choice, page cache), so
        it is left out once there are others; the median of the last three resists a pause."""
        steady = self.train[1:] if len(self.train) > 1 else self.train
        return statistics.median(steady[-3:]) if steady else 0.0

    def record(
        self,
        train_s: float,
        valid_s: float,
        validated: bool,
        elapsed: float,
        parts: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ) -> None:
        """One finished epoch. Unvalidated, its BatchNorm recalibration (--full) is part of
        the epoch's cost. `parts`: a validation's (forward, recalibration, bn_batch) seconds."""
        if validated:
            self.train.append(train_s)
            self.validation.append(valid_s)
            if parts[0] > 0:
                self.forward, self.recalibration, self.bn_batch = parts
        else:
            self.train.append(train_s + valid_s)
        self.elapsed = elapsed

    def validation_seconds(self, guess: float) -> float:
        return self.validation[-1] if self.validation else guess

    def state_dict(self) -> dict[str, object]:
        return {
            "train": self.train,
            "validation": self.validation,
            "elapsed": self.elapsed,
            "parts": [self.forward, self.recalibration, self.bn_batch],
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.train = list(state.get("train", []))  # type: ignore[arg-type]
        self.validation = list(state.get("validation", []))  # type: ignore[arg-type]
        self.elapsed = float(state.get("elapsed", 0.0))  # type: ignore[arg-type]
        parts = [float(v) for v in state.get("parts", [0.0, 0.0, 0.0])]  # type: ignore[attr-defined]
        self.forward, self.recalibration, self.bn_batch = parts


def validations_between(done: int, planned: int, validate_every: int) -> int:
    """Validations epochs done+1 .. planned run: every validate_every-th, and the last."""
    if planned <= done:
        return 0
    count = planned // validate_every - done // validate_every
    return count + (planned % validate_every != 0)


def epochs_within_budget(
    budget_s: float,
    clock: EpochClock,
    done: int,
    max_epochs: int,
    *,
    validate_every: int,
    validates: bool,
    last_validated: bool,
    validation_guess_s: float,
    oof_views: int = 1,
    oof_adapt_batches: int = 0,
) -> int:
    """The most epochs (done .. max_epochs) whose projected run time fits `budget_s`.

    `validates`: the run validates (not --full), so its validations and the final
    out-of-fold pass (`oof_validations` validations' time: more with TTA) count. A run whose
    last finished epoch was not validated (or judged, for --full) plans at least one more
    epoch, which will be: a best checkpoint always exists (the trainer validates an epoch
    that leaves no time for another before planning, so this floor rarely adds one)."""
    floor = done if last_validated else done + 1
    epoch_s = clock.epoch_seconds()
    valid_s = clock.validation_seconds(validation_guess_s) if validates else 0.0
    oof_s = oof_pass_seconds(clock, valid_s, oof_views, oof_adapt_batches) if validates else 0.0
    best = min(floor, max_epochs)
    for planned in range(best + 1, max_epochs + 1):
        projected = clock.elapsed + (planned - done) * epoch_s
        if validates:
            validations = validations_between(done, planned, validate_every)
            projected += validations * valid_s + oof_s
        if projected > budget_s:
            break
        best = planned
    return best


def oof_pass_validations(views: int, adapt_bn_batches: int = 0) -> float:
    """The OOF pass's time in validations, with `views` TTA views and `adapt_bn_batches` batches
    of BN adaptation (adapt_bn.py). A validation's time is mostly not the forward pass
    (BatchNorm recalibration, scoring, loading): on the DSB CPU recipe (115 whole images, 2
    cores) a plain validation took about 1 min and the d4 (8-view) forward passes 0.9 min, so
    each extra view is counted as an eighth of a validation; 64 adaptation batches took 15 s
    (the OOF pass 81 s against 66), so each counts as 1/256 of one."""
    return 1.0 + (views - 1) / 8 + adapt_bn_batches / 256


# Measured on the DSB CPU recipe's best.pt (2-vCPU AVX2 CPU, float32, 115 whole images):
# - the 8 views of a d4 pass run stacked as one batch per image, 169 s of forward passes
#   against 8 x 16.9 s for one view: a view costs 1.25 plain passes;
# - an adaptation batch (crops read and transformed in the process) 0.92 s against a
#   recalibration batch's 0.45 (a loader worker reads ahead): twice as much.
STACKED_VIEW_COST = 1.25
ADAPT_BATCH_COST = 2.0


def oof_pass_seconds(clock: EpochClock, valid_s: float, views: int, adapt_bn_batches: int) -> float:
    """The OOF pass's projected seconds: a validation with `views` forward passes where it had
    one, and `adapt_bn_batches` BN adaptation batches instead of its recalibration. From the
    last validation's measured parts; before those, `oof_pass_validations` validations. (A
    ratio alone misjudged a float32 CPU, where the forward passes are most of the work: 4 min
    of d4 OOF pass against 1.2 reserved, and a 40-minute budget ran 42.4.)"""
    if clock.forward <= 0:
        return valid_s * oof_pass_validations(views, adapt_bn_batches)
    forward = (views * STACKED_VIEW_COST - 1) * clock.forward if views > 1 else 0.0
    adapt = adapt_bn_batches * ADAPT_BATCH_COST * clock.bn_batch
    return valid_s - clock.recalibration + forward + adapt


@contextmanager
def forward_seconds(model: Any) -> Iterator[list[float]]:
    """[seconds] spent in `model`'s forward calls inside the block, by forward hooks (removed
    after). A CUDA output is waited for, so the time is the device's, not the launch's."""
    total, started = [0.0], [0.0]

    def before(*_: Any) -> None:
        started[0] = time.perf_counter()

    def after(_module: Any, _inputs: Any, output: Any) -> None:
        first = output[0] if isinstance(output, tuple | list) else output
        if getattr(first, "is_cuda", False):
            import torch

            torch.cuda.synchronize(first.device)
        total[0] += time.perf_counter() - started[0]

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()
