"""`train_fold(config, fold)`: the training loop.

CPU, one GPU, or several through `torchrun` (DDP: sharded sampler, gathered metrics, rank 0
writes). AMP (bf16, or fp16 with a grad scaler, on GPU; bf16 on a CPU that has it) and
channels_last, gradient accumulation and clipping, timm's EMA, cosine-with-warm-up / plateau /
step schedules, two-phase encoder freezing, early stopping, exact resume, and out-of-fold
probabilities of the best checkpoint.

A run folder `runs/<experiment>/fold_<k>/` holds config.yaml, best.pt, last.pt (both carry the
resolved config), history.csv and oof.npz. A model with a classification head (smp
`aux_params`: it returns mask logits and class logits) also learns, with weight
`train.class_loss_weight`, the BCE of "mask channel k of this sample has foreground", logged as
`train_class_bce` / `valid_class_bce`, and its best checkpoint's class probabilities go to
oof_classes.npz.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from kaggle_seg import runs
from kaggle_seg.adapt_bn import adapt_batchnorm
from kaggle_seg.checkpoints import load_checkpoint
from kaggle_seg.competitions import competition_for
from kaggle_seg.config import ExperimentConfig, save_config
from kaggle_seg.errors import KsegError
from kaggle_seg.evaluation import FoldEvaluator
from kaggle_seg.malloc import keep_freed_memory
from kaggle_seg.optim import build_optimizer, build_scheduler

# The probability files live in their own torch-free module; loaders re-exported for callers.
from kaggle_seg.probabilities import load_class_oof, load_oof, save_class_oof, save_oof  # noqa: F401
from kaggle_seg.progress import epoch_progress
from kaggle_seg.runtime import Runtime, autocast_settings, gather, seed_everything, start_runtime
from kaggle_seg.spec import ModelSpec
from kaggle_seg.time_budget import EpochClock, forward_seconds
from kaggle_seg.train_data import fold_loaders, load_fold_tables
from kaggle_seg.train_state import TrainerState


class NonFiniteLoss(KsegError):
    """The loss became NaN or infinite; the message names the step and the batch ids."""


# ---- data ---------------------------------------------------------------------------------------


def check_full_run(config: ExperimentConfig) -> None:
    """`--full` trains on every row without validation: best.pt can only follow a training
    column (train_loss...), and early stopping has nothing to watch."""
    monitor = config.train.monitor
    if not monitor.startswith("train_"):
        raise KsegError(
            f"--full trains without a validation fold, so train.monitor {monitor!r} is never "
            "measured: pass --set train.monitor=train_loss --set train.monitor_mode=min "
            "(the last epochs are then kept), or train folds instead"
        )


# ---- the loop -----------------------------------------------------------------------------------


@dataclass
class FoldResult:
    run_dir: Path
    best_value: float
    best_epoch: int
    history: pd.DataFrame


class Trainer(TrainerState):
    """One fold's training state; `fit()` runs it. Kept as an object so resume is one load."""

    def __init__(
        self,
        config: ExperimentConfig,
        fold: int,
        run_root: Path,
        runtime: Runtime,
        *,
        full: bool = False,
    ):
        from kaggle_seg.models import build_model, has_class_head

        self.config, self.fold, self.runtime, self.full = config, fold, runtime, full
        self.class_head = has_class_head(config.model)
        if full:
            check_full_run(config)
            self.run_dir = runs.full_dir(config.name, run_root)
        else:
            self.run_dir = runs.fold_dir(config.name, fold, run_root)
        self.competition = competition_for(config.data)
        seed_everything(config.train.seed + runtime.rank)
        self.train_table, self.valid_table = load_fold_tables(config, fold, full=full)
        # The model's contract, fixed here once and saved in every checkpoint.
        self.spec = ModelSpec.for_training(config, self.competition)
        self.model = build_model(config.model, self.spec.in_channels, len(self.spec.outputs))
        self.model = self.model.to(runtime.device)
        self.channels_last = config.train.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp, self.amp_dtype = autocast_settings(config.train.amp, runtime.device)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp and self.amp_dtype == torch.float16
        )
        self.train_loader, self.valid_loader, self.valid_positions = fold_loaders(
            config,
            self.competition,
            self.spec,
            self.train_table,
            self.valid_table,
            runtime,
            self.run_dir.parent / "cache",
            fold,
        )
        self.steps_per_epoch = math.ceil(len(self.train_loader) / config.train.grad_accumulation)
        self.optimizer = build_optimizer(config, self.model)
        self.scheduler, self.scheduler_steps = build_scheduler(
            config, self.optimizer, self.steps_per_epoch
        )
        self.criterion = self._loss()
        self.ema = None
        if config.train.ema_decay:
            from kaggle_seg.ema import WarmupEma

            self.ema = WarmupEma(self.model, config.train.ema_decay, warmup=config.train.ema_warmup)
        self.epoch = 0
        # The epochs this run will do: train.epochs, or fewer when a time budget cuts it.
        self.planned_epochs = config.train.epochs
        self.logged_plan: int | None = None
        # (probabilities, class probabilities) by id of the last epoch's validation when that
        # epoch is the best: written as the OOF without a second pass.
        self.final_oof: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
        self.clock = EpochClock()
        self.pass_seconds = [0.0, 0.0, 0.0]  # this epoch's validation: forward, BN, a BN batch
        self.optimizer_steps = 0  # the EMA warm-up counts these
        self.bn_batches = 0  # training batches the last BN recalibration used
        self.best_step = 0  # optimizer steps at the best checkpoint
        self.best_value = -math.inf if config.train.monitor_mode == "max" else math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        self.truth_cache: dict = {}
        self.ddp_model: nn.Module = self.model
        self._writer = None  # TensorBoard, opened on first use

    # -- construction helpers --

    def _losses(
        self, outputs: Any, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(mask logits, loss, the head's BCE or None) of a model's output on a batch.

        A classification head learns whether each mask channel of each sample has any
        foreground after augmentation: target `[B, K]` from masks `[B, K, H, W]`.
        """
        from kaggle_seg.models import split_outputs

        logits, class_logits = split_outputs(outputs)
        loss = self.criterion(logits, masks)
        if class_logits is None:
            return logits, loss, None
        present = (masks.flatten(2) > 0.5).any(dim=2).to(torch.float32)
        class_bce = nn.functional.binary_cross_entropy_with_logits(class_logits.float(), present)
        return logits, loss + self.config.train.class_loss_weight * class_bce, class_bce

    def _loss(self) -> nn.Module:
        from kaggle_seg.losses import build_loss

        mode = "binary" if len(self.spec.outputs) == 1 else "multilabel"
        return build_loss(self.config.train.loss, mode)

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema else self.model

    def recalibrate_batchnorm(self) -> int:
        """Recompute the validated model's BN statistics from training batches (batchnorm.py):
        what the validation, best.pt and the OOF then use."""
        from kaggle_seg.batchnorm import mirrored_trainable_batchnorms, recalibrate_batchnorm

        model = self.eval_model()
        layers = mirrored_trainable_batchnorms(self.model, model)

        def to_input(batch: dict[str, Any]) -> torch.Tensor:
            images = batch["image"].to(self.runtime.device, non_blocking=True).float()
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            return images

        started = time.perf_counter()
        self.bn_batches = recalibrate_batchnorm(
            model,
            self.train_loader,
            to_input,
            self.config.train.bn_recalibration_batches,
            layers=layers,
            distributed=self.runtime.distributed,
            autocast=self._autocast,
        )
        seconds = time.perf_counter() - started  # for the time budget's OOF projection
        self.pass_seconds[1:] = [seconds, seconds / max(1, self.bn_batches)]
        return self.bn_batches

    # -- phases --

    def _apply_freezing(self) -> None:
        """Two-phase training: encoder frozen for the first epochs, then unfrozen."""
        from kaggle_seg.models.freezing import apply_freeze_phase

        cfg = self.config.train
        apply_freeze_phase(self.model, self.epoch, cfg.freeze_encoder_epochs, cfg.unfreeze)
        if self.runtime.distributed:
            # DDP fixes its gradient buckets at wrap time: re-wrap when the trainable set changes.
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.ddp_model = self.model

    def _autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=self.amp_dtype)

    def train_one_epoch(self) -> dict[str, float]:
        from kaggle_seg.runtime import merge_epoch_totals

        cfg, runtime = self.config.train, self.runtime
        self.ddp_model.train()
        # A frozen encoder's BatchNorm statistics stay frozen too.
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.eval()
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if cfg.num_workers == 0 and hasattr(self.train_loader.dataset.transform, "set_random_seed"):
            self.train_loader.dataset.transform.set_random_seed(
                int(torch.randint(0, 2**31 - 1, ()).item())
            )
        totals: dict[str, float] = {}
        n_images, start = 0, time.perf_counter()
        accumulation = cfg.grad_accumulation
        batches = epoch_progress(
            self.train_loader, f"epoch {self.epoch + 1}/{self.planned_epochs}", self.runtime.is_main
        )
        self.optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(batches):
            images = batch["image"].to(runtime.device, non_blocking=True).float()
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            masks = batch["mask"].to(runtime.device, non_blocking=True).float()
            last_micro = (step + 1) % accumulation == 0 or step + 1 == len(self.train_loader)
            sync = (
                nullcontext() if last_micro or not runtime.distributed else self.ddp_model.no_sync()
            )
            with sync:
                with self._autocast():
                    _, loss, class_bce = self._losses(self.ddp_model(images), masks)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"non-finite loss ({loss.item()}) at epoch {self.epoch + 1}, step {step}; "
                        f"batch ids: {', '.join(map(str, batch['id']))}"
                    )
                self.scaler.scale(loss / accumulation).backward()
            if last_micro:
                if cfg.clip_grad_norm:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.optimizer_steps += 1
                if self.ema:
                    # Parameters and BN running statistics are averaged with the same decay, so
                    # the EMA model's statistics belong to its averaged weights; counters copy.
                    self.ema.update(self.model, step=self.optimizer_steps)
                if self.scheduler_steps == "step":
                    self.scheduler.step()
            batch_size = images.shape[0]
            n_images += batch_size
            totals["train_loss"] = totals.get("train_loss", 0.0) + loss.item() * batch_size
            for name, value in getattr(self.criterion, "last_terms", {}).items():
                totals[f"train_{name}"] = totals.get(f"train_{name}", 0.0) + value * batch_size
            if class_bce is not None:
                totals["train_class_bce"] = (
                    totals.get("train_class_bce", 0.0) + class_bce.item() * batch_size
                )
            if hasattr(batches, "set_postfix"):
                batches.set_postfix(loss=f"{totals['train_loss'] / n_images:.4f}")
        seconds = time.perf_counter() - start
        totals, n_images, seconds = merge_epoch_totals(totals, n_images, seconds, runtime)
        result = {k: v / max(1, n_images) for k, v in totals.items()}
        result["train_seconds"] = seconds
        result["images_per_s"] = n_images / seconds
        return result

    @torch.inference_mode()
    def predict_valid(
        self, keep: bool = False, tta: str = "none"
    ) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Validation loss and fold metrics; with `keep`, this rank's probabilities by id
        ([K, H, W]) and, for a model with a classification head, its class probabilities by id
        ([K] float32; empty otherwise). `tta`: the views merged, as `kseg submit --tta`."""
        from kaggle_seg.evaluation import summarize_validation, validation_pass
        from kaggle_seg.tta import TTAModel

        model = self.eval_model()

        evaluator = FoldEvaluator(
            self.competition, self.valid_table, self.truth_cache, outputs=self.spec.outputs
        )
        part, kept, kept_classes = validation_pass(
            TTAModel(model, tta) if tta != "none" else model,
            self.valid_loader,
            evaluator,
            self.spec,
            self._losses,
            device=self.runtime.device,
            autocast=self._autocast,
            channels_last=self.channels_last,
            # "crop" validates whole images, tiled above tile_size (a head model sees them
            # whole: its class logits do not tile).
            tiled=not self.class_head,
            keep=keep,
        )
        return (
            summarize_validation(gather(part, self.runtime), self.competition),
            kept,
            kept_classes,
        )

    def _log(self, message: str) -> None:
        if self.runtime.is_main:
            print(message, flush=True)

    def fit(self, resume: bool = False) -> FoldResult:
        cfg = self.config.train
        self._check_monitor()
        if resume:  # before anything is written: a resume that fails leaves the folder as it was
            self.load(self.run_dir / runs.LAST_CHECKPOINT)
            if self._finished_with_oof():
                self._log(f"fold {self.fold}: finished, with its {runs.OOF_FILE}; nothing to do")
                return self._result()
            self._log(f"resumed {self.run_dir} {self._resumed_at()}")
        if self.runtime.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / runs.CONFIG_FILE)
        started = time.perf_counter() - self.clock.elapsed  # a resumed run keeps its minutes
        try:
            while self.epoch < self.planned_epochs:
                if self._should_stop_early():
                    self._log(
                        f"early stop: no {cfg.monitor} gain in {self.bad_epochs} validations "
                        f"({self.optimizer_steps - self.best_step} optimizer steps)"
                    )
                    break
                self._apply_freezing()
                epoch_start = time.perf_counter()
                train_metrics = self.train_one_epoch()
                trained = time.perf_counter()
                final = self.epoch + 1 == self.planned_epochs
                final = final or self._out_of_time(epoch_start, started)  # budget spent: validate
                validate = not self.full and ((self.epoch + 1) % cfg.validate_every == 0 or final)
                valid_metrics: dict[str, float] = {}
                if validate or self.full:
                    self.recalibrate_batchnorm()  # the weights best.pt may keep
                if validate:
                    # A TTA'd or BN-adapted OOF is predicted afresh from best.pt: nothing to keep.
                    fresh = cfg.oof_tta != "none" or cfg.adapt_bn_batches > 0
                    valid_metrics = self._validate(keep=final and not fresh)
                self._time_epoch(epoch_start, trained, validate, started)
                self._end_epoch({**train_metrics, **valid_metrics}, judged=validate or self.full)
                if self.best_epoch != self.epoch - 1 or self.epoch < self.planned_epochs:
                    # An earlier epoch is the best (best.pt gives the OOF), or the plan grew
                    # past this one: let the kept probabilities go now.
                    self.final_oof = None
        except KeyboardInterrupt:
            raise self._interruption(oof=False) from None
        if not self.full:
            try:
                self._write_oof()
            except KeyboardInterrupt:
                raise self._interruption(oof=True) from None
        minutes = (time.perf_counter() - started) / 60
        self._log(
            f"fold {self.fold}: best {cfg.monitor} {self.best_value:.4f} at epoch "
            f"{self.best_epoch + 1} in {minutes:.1f} min; {self.run_dir}"
        )
        return self._result()

    def _result(self) -> FoldResult:
        return FoldResult(
            self.run_dir, self.best_value, self.best_epoch, pd.DataFrame(self.history)
        )

    def _validate(self, keep: bool) -> dict[str, float]:
        """Validation metrics. The last epoch keeps its probabilities: when it is the best,
        they are the OOF, and the pass over best.pt after training is not needed."""
        with forward_seconds(self.eval_model()) as forward:
            metrics, kept, kept_classes = self.predict_valid(keep=keep)
        self.pass_seconds[0] = forward[0]
        self.final_oof = (kept, kept_classes) if keep else None
        return metrics

    def _time_epoch(self, epoch_start: float, trained: float, validated: bool, started: float):
        """Record this epoch's seconds (the slowest rank's, so every rank plans the same)."""
        now = time.perf_counter()
        times = [trained - epoch_start, now - trained, now - started, *self.pass_seconds]
        if self.runtime.distributed:
            times = [max(values) for values in zip(*gather(times, self.runtime), strict=True)]
        self.clock.record(times[0], times[1], validated, times[2], (times[3], times[4], times[5]))
        self._plan_epochs(self.epoch + 1, last_validated=validated or self.full, mid_run=True)

    def _write_oof(self) -> None:
        """Probabilities of the best checkpoint on the validation fold, compactly."""
        best = self.run_dir / runs.BEST_CHECKPOINT
        if self.runtime.distributed:
            dist.barrier()
        tta, adapt = self.config.train.oof_tta, self.config.train.adapt_bn_batches
        if self.final_oof is not None:  # the last validation is it (kept only when not `fresh`)
            kept, kept_classes = self.final_oof
        elif not best.is_file():
            return
        else:
            started = time.perf_counter()
            state = load_checkpoint(best, map_location=self.runtime.device)
            self.eval_model().load_state_dict(state["model"])
            # BN statistics of the fold, as `kseg submit` adapts to the test set (adapt_bn.py).
            adapted = adapt_batchnorm(self.eval_model(), self.spec, self.competition,
                                      self.valid_table, batches=adapt, tta=tta,
                                      batch_size=self.config.train.batch_size,
                                      autocast=self._autocast, seed=self.config.train.seed,
                                      channels_last=self.channels_last,
                                      weight=self.config.train.adapt_bn_weight)  # fmt: skip
            _, kept, kept_classes = self.predict_valid(keep=True, tta=tta)
            seconds = time.perf_counter() - started
            how = f"{tta} TTA" + (f", BN adapted on {adapted} batches" if adapted else "")
            self._log(f"OOF ({how}): {len(self.valid_table)} images in {seconds:.0f} s")
        self.final_oof = None
        parts = gather((kept, kept_classes), self.runtime)
        if not self.runtime.is_main:
            return
        merged = {k: v for part, _ in parts for k, v in part.items()}
        save_oof(merged, self.run_dir / runs.OOF_FILE, self.config.train.oof_dtype)
        if self.class_head:
            merged_classes = {k: v for _, part in parts for k, v in part.items()}
            save_class_oof(merged_classes, self.run_dir / runs.OOF_CLASSES_FILE)


def train_fold(
    config: ExperimentConfig,
    fold: int,
    *,
    run_root: Path = runs.RUNS_ROOT,
    resume: bool = False,
    force: bool = False,
    device: str | None = None,
    full: bool = False,
) -> FoldResult:
    """Train one fold; under torchrun every process calls this and rank 0 writes the files.
    `full`: train on every row of the table for train.epochs, without validation, into
    runs/<experiment>/full/ (a final-submission model; `fold` is ignored). A run folder that
    holds a run is continued (`resume`), moved aside (`force`), or refused."""
    runtime = start_runtime(device)
    if full:
        run_dir = runs.full_dir(config.name, Path(run_root))
    else:
        run_dir = runs.fold_dir(config.name, fold, Path(run_root))
    # Refused now, before the setup; an old run is moved aside only once the new one is built
    # (model, weights, loss, data, monitor), so a config error leaves it where it was.
    runs.claim_run_dir(run_dir, resume=resume, force=force, move=False)
    if runtime.device.type == "cpu":
        # Activation buffers are mmapped and faulted in afresh every step otherwise: on CPU
        # that was ~1/3 of the step (benchmarks/README.md, "Training-step overhead").
        keep_freed_memory(heap_only=True)
    trainer = Trainer(config, fold, Path(run_root), runtime, full=full)
    trainer._check_monitor()
    moved = runs.claim_run_dir(run_dir, resume=resume, force=force, move=runtime.is_main)
    if moved is not None:
        print(f"moved the previous run to {moved}", flush=True)
    return trainer.fit(resume=resume)
