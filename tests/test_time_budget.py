"""train.time_budget_minutes: the epoch plan and the cosine schedule that follows it (a run cut
short by its budget: tests/test_train.py)."""

from __future__ import annotations

import io
import time

import pytest
import torch

from kaggle_seg.config import ExperimentConfig
from kaggle_seg.optim import build_scheduler, set_schedule_epochs
from kaggle_seg.time_budget import (
    EpochClock,
    epochs_within_budget,
    forward_seconds,
    oof_pass_seconds,
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
    d4 = len(TTA_MODES["d4"])
    assert epochs_within_budget(130.0, clock, 3, 64, **plan, oof_views=d4) == 4
    assert epochs_within_budget(147.5, clock, 3, 64, **plan, oof_views=d4) == 5


def test_a_measured_forward_pass_projects_the_oof_pass():
    # The last validation took 20 s: 12 s of forward passes, 4 s of BN recalibration over 8
    # batches (0.5 s each), the rest scoring. A d4 OOF pass with 64 adaptation batches: its 8
    # views stacked cost 1.25 passes each, an adaptation batch two recalibration batches:
    # 20 - 4 + (8 * 1.25 - 1) * 12 + 64 * 2 * 0.5 = 188 s (the ratio alone: 20 * 2.125 = 42.5).
    clock = EpochClock(train=[30.0, 10.0, 10.0], validation=[20.0], elapsed=50.0)
    assert oof_pass_seconds(clock, 20.0, 8, 64) == pytest.approx(42.5)
    clock.record(10.0, 20.0, True, 80.0, (12.0, 4.0, 0.5))
    assert (clock.forward, clock.recalibration, clock.bn_batch) == (12.0, 4.0, 0.5)
    assert oof_pass_seconds(clock, 20.0, 8, 64) == pytest.approx(188.0)
    assert oof_pass_seconds(clock, 20.0, 1, 0) == pytest.approx(16.0)  # no TTA, nothing adapted
    # From done = 4 at 80 s: N = 5 costs 80 + 10 + 20 (its validation) + 188 = 298 s.
    plan = dict(validate_every=4, validates=True, last_validated=True, validation_guess_s=0.0)
    assert epochs_within_budget(298.0, clock, 4, 64, **plan, oof_views=8, oof_adapt_batches=64) == 5
    assert epochs_within_budget(297.0, clock, 4, 64, **plan, oof_views=8, oof_adapt_batches=64) == 4
    # An unvalidated epoch keeps the parts; a resumed run gets them back.
    clock.record(10.0, 0.0, False, 90.0)
    restored = EpochClock()
    restored.load_state_dict(clock.state_dict())
    assert restored == clock and restored.forward == 12.0


def test_forward_seconds_times_the_model_calls_inside_the_block():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3))
    with forward_seconds(model) as spent:
        started = time.perf_counter()
        for _ in range(3):
            model(torch.zeros(1, 1, 64, 64))
        time.sleep(0.05)  # outside the model: not counted
        total = time.perf_counter() - started
    assert 0 < spent[0] < total - 0.04
    before = spent[0]
    model(torch.zeros(1, 1, 8, 8))  # after the block: the hooks are gone
    assert spent[0] == before and not model._forward_hooks and not model._forward_pre_hooks


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
