"""train.time_budget_minutes: the epoch plan and the cosine schedule that follows it (a run cut
short by its budget: tests/test_train.py)."""

from __future__ import annotations

import io
import itertools
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


def _cosine_run(epochs: int, steps: int):
    config = ExperimentConfig.model_validate(
        {
            "data": {"competition": "dsb2018", "table": "t.csv", "folds": "f.csv"},
            "train": {
                "epochs": epochs,
                "scheduler": {"name": "cosine", "warmup_epochs": 1, "min_lr": 1e-5},
            },
        }
    )
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    scheduler, _ = build_scheduler(config, optimizer, steps)
    return optimizer, scheduler


def _step_epoch(optimizer, scheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_a_mid_run_replan_never_raises_the_lr_and_ends_at_the_floor():
    # A time budget's plan grows 25 -> 27 epochs at epoch 18, then shrinks to 26 at 22: the lr
    # goes on from where it was (no jump up or down) and reaches min_lr at the last step.
    steps = 10
    optimizer, scheduler = _cosine_run(25, steps)
    lrs = [lr for _ in range(18) for lr in _step_epoch(optimizer, scheduler, steps)]
    before = lrs[-1]
    assert set_schedule_epochs(scheduler, 27, steps, mid_run=True)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(before)  # nothing moves at once
    for _ in range(4):
        lrs += _step_epoch(optimizer, scheduler, steps)
    set_schedule_epochs(scheduler, 26, steps, mid_run=True)
    for _ in range(4):
        lrs += _step_epoch(optimizer, scheduler, steps)
    after_warmup = lrs[steps - 1 :]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(after_warmup))
    assert max(abs(b - a) for a, b in itertools.pairwise(lrs[170:])) < 5e-5
    assert lrs[26 * steps - 1] == pytest.approx(1e-5)


def test_an_anchored_cosine_resumes_where_it_was():
    steps = 10
    optimizer, scheduler = _cosine_run(25, steps)
    for _ in range(18):
        _step_epoch(optimizer, scheduler, steps)
    set_schedule_epochs(scheduler, 27, steps, mid_run=True)
    # Saved after the re-plan, then resumed in a fresh scheduler: the same lrs follow.
    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    expected = _step_epoch(optimizer, scheduler, steps)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh_optimizer, fresh = _cosine_run(25, steps)
    fresh_optimizer.load_state_dict(state["optimizer"])
    fresh.load_state_dict(state["scheduler"])
    assert _step_epoch(fresh_optimizer, fresh, steps) == pytest.approx(expected)
