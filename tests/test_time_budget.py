"""train.time_budget_minutes: the epoch plan and the cosine schedule that follows it (a run cut
short by its budget: tests/test_train.py)."""

from __future__ import annotations

import io

import pytest
import torch

from kaggle_seg.config import ExperimentConfig
from kaggle_seg.optim import build_scheduler, set_schedule_epochs
from kaggle_seg.time_budget import (
    EpochClock,
    epochs_within_budget,
    oof_pass_validations,
    validations_between,
)
from kaggle_seg.tta import TTA_MODES


def test_validations_between_counts_every_nth_and_the_last():
    assert validations_between(0, 8, 4) == 2  # epochs 4 and 8
    assert validations_between(0, 10, 4) == 3  # 4, 8 and the last, 10
    assert validations_between(4, 5, 4) == 1  # the last
    assert validations_between(5, 5, 4) == 0


def test_plan_fits_epochs_validations_and_the_oof_pass():
    # 10 s elapsed, an epoch 10 s (the slow first one left out), a validation 20 s.
    clock = EpochClock(train=[30.0, 10.0, 10.0], validation=[20.0], elapsed=50.0)
    assert clock.epoch_seconds() == 10.0
    plan = dict(validate_every=4, validates=True, last_validated=False, validation_guess_s=0.0)
    # N epochs from done=3: 50 + 10 (N - 3) + 20 (validations in 4..N + the OOF pass).
    # N = 4: 50 + 10 + 20 * 2 = 100; N = 5: 50 + 20 + 20 * 3 = 130.
    assert epochs_within_budget(100.0, clock, 3, 64, **plan) == 4
    assert epochs_within_budget(129.0, clock, 3, 64, **plan) == 4
    assert epochs_within_budget(130.0, clock, 3, 64, **plan) == 5
    assert epochs_within_budget(1e9, clock, 3, 64, **plan) == 64  # never past train.epochs
    # Out of time: an unvalidated last epoch still gets one more, validated, epoch ...
    assert epochs_within_budget(1.0, clock, 3, 64, **plan) == 4
    # ... a validated one stops where it is.
    assert epochs_within_budget(1.0, clock, 3, 64, **{**plan, "last_validated": True}) == 3
    # --full: no validations, no OOF pass.
    full = {**plan, "validates": False, "last_validated": True}
    assert epochs_within_budget(100.0, clock, 3, 64, **full) == 8


def test_a_tta_oof_pass_is_reserved_as_more_validations():
    clock = EpochClock(train=[30.0, 10.0, 10.0], validation=[20.0], elapsed=50.0)
    plan = dict(validate_every=4, validates=True, last_validated=False, validation_guess_s=0.0)
    assert oof_pass_validations(1) == 1.0
    assert oof_pass_validations(8) == pytest.approx(1.875)  # d4
    assert oof_pass_validations(8, 64) == pytest.approx(2.125)  # d4, BN adapted on 64 batches
    # N = 5 from done = 3: 50 + 20 + 20 * (2 validations + the OOF pass); a d4 OOF pass costs
    # 20 * 0.875 more, so the same budget fits one epoch less.
    assert epochs_within_budget(130.0, clock, 3, 64, **plan) == 5
    d4 = oof_pass_validations(len(TTA_MODES["d4"]))
    assert epochs_within_budget(130.0, clock, 3, 64, **plan, oof_validations=d4) == 4
    assert epochs_within_budget(147.5, clock, 3, 64, **plan, oof_validations=d4) == 5


def test_cosine_follows_a_new_plan_and_resumes_it():
    config = ExperimentConfig.model_validate(
        {
            "data": {"competition": "dsb2018", "table": "t.csv", "folds": "f.csv"},
            "train": {"epochs": 10, "scheduler": {"name": "cosine", "min_lr": 0.0001}},
        }
    )
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.optimizer.lr)
    scheduler, when = build_scheduler(config, optimizer, 5)
    assert when == "step" and set_schedule_epochs(scheduler, 4, 5)
    for _ in range(4 * 5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0001)  # annealed at epoch 4
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    fresh_optimizer = torch.optim.Adam(model.parameters(), lr=config.train.optimizer.lr)
    fresh, _ = build_scheduler(config, fresh_optimizer, 5)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.lr_lambdas[0].total == 20  # the plan, not 10 epochs x 5 steps
