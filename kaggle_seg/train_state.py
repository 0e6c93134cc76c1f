"""What training records, as a part of `train.Trainer`: the checkpointed state (last.pt, best.pt
with the `ModelSpec` and config), the resume that restores it, and the end of each epoch
(history.csv, the best checkpoint, early stopping, TensorBoard)."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from kaggle_seg import runs
from kaggle_seg.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kaggle_seg.errors import KsegError
from kaggle_seg.io import write_csv_atomic
from kaggle_seg.optim import set_schedule_epochs
from kaggle_seg.time_budget import EpochClock, epochs_within_budget
from kaggle_seg.tta import get_tta

# What a last.pt holds beyond best.pt's weights and config: without them there is nothing to
# continue from (a best.pt, or another tool's checkpoint).
_TRAINING_KEYS = ("train_model", "optimizer", "scaler", "epoch", "best_value", "best_epoch")


def check_training_state(state: dict[str, Any], path: Path) -> None:
    """Refuse, in one line naming `path`, a checkpoint that is not a kseg last.pt: compared as
    one, every config key would read as changed, or a missing key as another optimizer."""
    if not isinstance(state.get("config"), dict):
        raise KsegError(
            f"--resume: {path} is not a kseg checkpoint (no config inside): --resume continues "
            "the last.pt that kseg train wrote in this fold; to start again, pass --force"
        )
    missing = [key for key in _TRAINING_KEYS if key not in state]
    if missing:
        raise KsegError(
            f"--resume: {path} holds weights but no training state (no {', '.join(missing)}; a "
            "best.pt is like that): resume from the fold's last.pt, or start again with --force "
            "(model.weights_path can start from these weights)"
        )


class TrainerState:
    """The record-keeping half of `Trainer` (a mixin: it reads the trainer's model, optimizer,
    scheduler, EMA, spec, config and counters)."""

    # Set by Trainer.__init__.
    config: Any
    history: list[dict[str, Any]]
    eval_model: Any  # Trainer.eval_model: the EMA model when there is one, else the model
    logged_plan: int | None  # the epoch plan the log last announced

    def state(self) -> dict[str, Any]:
        return {
            "model": self.eval_model().state_dict(),
            "train_model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "epoch": self.epoch,
            "planned_epochs": self.planned_epochs,
            "clock": self.clock.state_dict(),
            "optimizer_steps": self.optimizer_steps,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "valid_ids_sha256": self._valid_ids_digest(),
            "rng": rng_state(),
            **self.metadata(),
        }

    def metadata(self) -> dict[str, Any]:
        """What prediction needs without the training command line."""
        from kaggle_seg import __version__

        return {
            "config": self.config.model_dump(mode="json"),
            "fold": self.fold,
            "competition": self.competition.name,
            "classes": list(self.spec.outputs),
            "in_channels": self.spec.in_channels,
            "spec": self.spec.as_dict(),
            "kseg_version": __version__,
        }

    def load(self, path: Path) -> None:
        """Restore everything from a last.pt so training continues exactly."""
        if not path.is_file():
            raise KsegError(f"--resume: no checkpoint at {path}")
        state = load_checkpoint(path, map_location=self.runtime.device)
        check_training_state(state, path)
        saved, config = state["config"], self.config.model_dump(mode="json")
        if runs.changed_keys(saved, config):
            raise KsegError(runs.resume_mismatch(path, saved, config))
        try:
            self.model.load_state_dict(state["train_model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler and state["scheduler"]:
                self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema and state["ema"]:
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise KsegError(runs.resume_mismatch(path, saved, config)) from exc
        # A last.pt of an older kseg has no digest: its fold cannot be checked.
        saved_ids = state.get("valid_ids_sha256")
        if saved_ids is not None and saved_ids != self._valid_ids_digest():
            raise KsegError(
                f"--resume: {path} was validated on other images than fold {self.fold} of "
                f"data.folds ({self.config.data.folds}) and data.table now give (a changed "
                "split would validate on images it trained on, and compare its scores with "
                "another fold's); restore those files, or start again with --force"
            )
        self.epoch = state["epoch"]
        self.planned_epochs = state.get("planned_epochs", self.config.train.epochs)
        self.clock.load_state_dict(state.get("clock", {}))
        self.optimizer_steps = state.get("optimizer_steps", 0)
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.bad_epochs, self.history = state["bad_epochs"], state["history"]
        self.best_step = state.get("best_step", 0)
        set_rng_state(state["rng"])
        self._plan_epochs(self.epoch, last_validated=self.best_epoch >= 0)

    def _valid_ids_digest(self) -> str:
        ids = sorted(map(str, self.valid_table["id"]))
        return hashlib.sha256("\n".join(ids).encode()).hexdigest()

    def _finished_with_oof(self) -> bool:
        """No epoch left and oof.npz written from the current best.pt: a resume (a rerun
        `--folds ... --resume` job) has nothing to do, not even the OOF pass."""
        if self.full or (self.epoch < self.planned_epochs and not self._should_stop_early()):
            return False
        oof, best = self.run_dir / runs.OOF_FILE, self.run_dir / runs.BEST_CHECKPOINT
        return oof.is_file() and best.is_file() and oof.stat().st_mtime >= best.stat().st_mtime

    def _resumed_at(self) -> str:
        if self.epoch < self.planned_epochs and not self._should_stop_early():
            return f"at epoch {self.epoch + 1}"
        return f"after its last epoch ({self.epoch}): no epoch left, only the OOF pass"

    def _interruption(self, oof: bool) -> KsegError:
        """The one line for a Ctrl-C / SIGTERM: what is kept and how to go on. `oof`: it came
        in the pass that writes oof.npz, after the last epoch (training is done)."""
        last = self.run_dir / runs.LAST_CHECKPOINT
        if oof:
            return KsegError(
                f"interrupted while writing the OOF, after the last epoch: training is done "
                f"({last}); --resume writes {runs.OOF_FILE} without training again"
            )
        if not last.is_file():
            return KsegError(
                f"interrupted in epoch {self.epoch + 1}, before any epoch finished: nothing "
                "to resume; run the same command again"
            )
        # last.pt stays the end of the last finished epoch: resuming repeats the interrupted
        # epoch from there, so the run does exactly the configured epochs.
        return KsegError(
            f"interrupted in epoch {self.epoch + 1}: {last} holds the end of the last "
            "finished epoch; continue with --resume (the interrupted epoch runs again)"
        )

    def _validated_weights(self) -> dict[str, Any]:
        """history.csv columns saying which weights this epoch's validation (and best.pt) used:
        `weights` "ema" or "raw", and the EMA's decay at the last step (0 for raw)."""
        weights = {"weights": "raw", "ema_decay": 0.0, "bn_batches": self.bn_batches}
        if self.ema:
            weights.update(weights="ema", ema_decay=float(self.ema.get_decay(self.optimizer_steps)))
        return weights

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.config.train.monitor_mode == "max":
            return value > self.best_value
        return value < self.best_value

    def _check_monitor(self) -> None:
        """A train.monitor that no epoch will measure is an error now, not after an epoch."""
        from kaggle_seg.evaluation import fold_metric_names

        measured = {"train_loss", "train_seconds", "images_per_s", "valid_loss", "lr"}
        measured |= {f"train_{label}" for label in getattr(self.criterion, "labels", [])}
        measured |= set(fold_metric_names(self.competition))
        if self.class_head:
            measured |= {"train_class_bce", "valid_class_bce"}
        if self.config.train.monitor not in measured:
            raise KsegError(
                f"train.monitor: {self.config.train.monitor!r} is not measured; choose one of "
                f"{', '.join(sorted(measured))}"
            )

    def _should_stop_early(self) -> bool:
        cfg = self.config.train
        return bool(
            cfg.early_stopping_patience
            and self.bad_epochs >= cfg.early_stopping_patience
            and self.optimizer_steps - self.best_step >= cfg.early_stopping_min_steps
        )

    def _end_epoch(self, metrics: dict[str, float], judged: bool = True) -> None:
        """Record the epoch; `judged` (it was validated, or a --full run) lets it become the
        best checkpoint and count for early stopping."""
        cfg = self.config.train
        if judged and cfg.monitor not in metrics:
            raise KsegError(
                f"train.monitor: {cfg.monitor!r} is not measured; choose one of "
                f"{', '.join(sorted(metrics))}"
            )
        value = metrics.get(cfg.monitor, math.nan)
        lr = self.optimizer.param_groups[-1]["lr"]
        # An epoch without a validation validated no weights: its columns stay empty.
        validated = self._validated_weights() if judged else {}
        row = {"epoch": self.epoch + 1, **metrics, "lr": lr, **validated}
        self.history.append(row)
        if self.scheduler_steps == "epoch":
            self.scheduler.step()
        elif self.scheduler_steps == "metric" and judged:
            self.scheduler.step(value)
        improved = judged and self._improved(value)
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, self.epoch, 0
            self.best_step = self.optimizer_steps
        elif judged:
            self.bad_epochs += 1
        self.epoch += 1
        if self.runtime.is_main:
            if improved:
                save_checkpoint(
                    {
                        "model": self.eval_model().state_dict(),
                        "epoch": self.epoch,
                        cfg.monitor: value,
                        **self.metadata(),
                    },
                    self.run_dir / runs.BEST_CHECKPOINT,
                )
            save_checkpoint(self.state(), self.run_dir / runs.LAST_CHECKPOINT)
            write_csv_atomic(pd.DataFrame(self.history), self.run_dir / runs.HISTORY_FILE)
            self._log_tensorboard(row)
            shown = ", ".join(
                f"{k} {v:.4g}"
                for k, v in row.items()
                if k in ("train_loss", "valid_loss", "score", "dice", "lr", "images_per_s")
            )
            self._log(
                f"epoch {self.epoch}/{self.planned_epochs}: {shown}" + (" *" if improved else "")
            )

    def _log_tensorboard(self, row: dict[str, float]) -> None:
        if not self.config.train.tensorboard:
            return
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise KsegError(
                    "train.tensorboard is true but tensorboard is not installed: "
                    "pip install 'kaggle-seg[tensorboard]'"
                ) from None
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                self._writer.add_scalar(key, value, global_step=int(row["epoch"]))
        self._writer.flush()

    def _budget_plan(self, clock: EpochClock, done: int, last_validated: bool) -> int:
        """The most epochs that fit train.time_budget_minutes, by `clock`'s measured times."""
        cfg = self.config.train
        return epochs_within_budget(
            cfg.time_budget_minutes * 60,
            clock,
            done,
            cfg.epochs,
            validate_every=cfg.validate_every,
            validates=not self.full,
            last_validated=last_validated,
            oof_views=len(get_tta(cfg.oof_tta)),
            oof_adapt_batches=cfg.adapt_bn_batches,
            # Before the first validation: whole-image forward passes over the validation
            # rows, guessed at a training epoch's cost per row.
            validation_guess_s=clock.epoch_seconds()
            * len(self.valid_table)
            / max(1, len(self.train_table)),
        )

    def _out_of_time(self, epoch_start: float, started: float) -> bool:
        """Under a time budget, whether the epoch just trained (since `epoch_start`, the run
        since `started`: perf_counter values) must be the last, validated now, as another
        epoch and its validation would not fit. Without this, an unvalidated epoch that used
        up the budget (a slow or loaded machine) forced one more past it, only to validate."""
        cfg = self.config.train
        if cfg.time_budget_minutes is None or self.full:
            return False
        now = time.perf_counter()
        times = [now - epoch_start, now - started]
        if self.runtime.distributed:  # every rank decides alike: the slowest rank's times
            from kaggle_seg.runtime import gather

            times = [max(values) for values in zip(*gather(times, self.runtime), strict=True)]
        clock = replace(self.clock, train=[*self.clock.train, times[0]], elapsed=times[1])
        done = self.epoch + 1
        return self._budget_plan(clock, done, last_validated=True) <= done

    def _plan_epochs(self, done: int, last_validated: bool, mid_run: bool = False) -> None:
        """The epochs this run does: train.epochs, or under train.time_budget_minutes those that
        fit what is left. Also on --resume, so a run resumed with more epochs or minutes does them
        and its cosine schedule ends with the new plan (mid_run: a re-plan between epochs, where
        the lr goes on from its current value)."""
        cfg = self.config.train
        planned = cfg.epochs
        if cfg.time_budget_minutes is not None and self.clock.train:
            planned = self._budget_plan(self.clock, done, last_validated)
        if planned != self.planned_epochs:
            # The plan wobbles by an epoch or two as times are measured: say so when it first
            # departs from train.epochs, then only when it moves by a tenth of them.
            logged = self.logged_plan
            if cfg.time_budget_minutes is not None and (
                logged is None or abs(planned - logged) >= max(1, cfg.epochs // 10)
            ):
                self.logged_plan = planned
                self._log(
                    f"time budget {cfg.time_budget_minutes:g} min: {planned} of {cfg.epochs} "
                    f"epochs (an epoch {self.clock.epoch_seconds() / 60:.2f} min, "
                    f"{self.clock.elapsed / 60:.1f} min so far)"
                )
            self.planned_epochs = planned
            set_schedule_epochs(self.scheduler, planned, self.steps_per_epoch, mid_run)
