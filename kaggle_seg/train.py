"""`train_fold(config, fold)`: the training loop.

CPU, one GPU, or several through `torchrun` (DDP: sharded sampler, gathered metrics, rank 0
writes). AMP (bf16, or fp16 with a grad scaler) and channels_last on GPU, gradient accumulation
and clipping, timm's EMA, cosine-with-warm-up / plateau / step schedules, two-phase encoder
freezing, early stopping, exact resume, and out-of-fold probabilities of the best checkpoint.

A run folder `runs/<experiment>/fold_<k>/` holds config.yaml, best.pt, last.pt (both carry the
resolved config), history.csv and oof.npz. A model with a classification head (smp
`aux_params`: it returns mask logits and class logits) also learns, with weight
`train.class_loss_weight`, the BCE of "mask channel k of this sample has foreground", logged as
`train_class_bce` / `valid_class_bce`, and its best checkpoint's class probabilities go to
oof_classes.npz.
"""

from __future__ import annotations

import math
import os
import random
import sys
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

from kaggle_seg import paths
from kaggle_seg.checkpoints import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kaggle_seg.competitions import get_competition
from kaggle_seg.config import ExperimentConfig, save_config
from kaggle_seg.errors import KsegError
from kaggle_seg.evaluation import FoldEvaluator, summarize_fold
from kaggle_seg.io import write_csv_atomic
from kaggle_seg.malloc import keep_freed_memory

# The probability files live in their own torch-free module; loaders re-exported for callers.
from kaggle_seg.probabilities import load_class_oof, load_oof, save_class_oof, save_oof  # noqa: F401


class NonFiniteLoss(KsegError):
    """The loss became NaN or infinite; the message names the step and the batch ids."""


# ---- distributed set-up -------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where this process runs: rank and world size (1 without torchrun) and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start_runtime(device: str | None = None) -> Runtime:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KsegError("--device cuda: no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        resolved = torch.device("cuda", local_rank)
    else:
        resolved = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return Runtime(rank=rank, world_size=world_size, device=resolved)


def gather(obj: Any, runtime: Runtime) -> list[Any]:
    """Every rank's `obj`, on every rank (a one-item list without DDP)."""
    if not runtime.distributed:
        return [obj]
    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def load_fold_tables(
    config: ExperimentConfig, fold: int, *, full: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, validation rows) of the table for `fold`, in table order; with `full`,
    every row trains and none validates."""
    from kaggle_seg.data.folds import read_folds
    from kaggle_seg.prepare import read_table

    if config.data.table is None or config.data.folds is None:
        raise KsegError(
            "config: data.table and data.folds must name the files of "
            "`kseg prepare` and `kseg folds` (or pass --set data.table=...)"
        )
    table = read_table(config.data.table)
    folds = read_folds(config.data.folds)
    table = table.merge(folds[["id", "fold"]], on="id", how="left")
    if table["fold"].isna().any():
        missing = table.loc[table["fold"].isna(), "id"].iloc[0]
        raise KsegError(f"{config.data.folds}: no fold for id {missing} of {config.data.table}")
    if full:
        return table.reset_index(drop=True), table.iloc[:0].reset_index(drop=True)
    if fold not in set(table["fold"]):
        raise KsegError(
            f"--fold {fold}: {config.data.folds} has folds {sorted(set(table['fold']))}"
        )
    train = table[table["fold"] != fold].reset_index(drop=True)
    valid = table[table["fold"] == fold].reset_index(drop=True)
    return train, valid


def shard_positions(valid: pd.DataFrame, runtime: Runtime) -> np.ndarray:
    """This rank's validation rows; uwmgi case-days stay whole so volumes can be scored."""
    if not runtime.distributed:
        return np.arange(len(valid))
    keys = valid["case_day"] if "case_day" in valid.columns else valid["id"]
    owners = pd.factorize(keys)[0] % runtime.world_size
    return np.flatnonzero(owners == runtime.rank)


def _seed_worker(worker_id: int) -> None:
    # albumentations 2 draws from its own generators: seed them from torch's per-worker seed so
    # a run (and its resume) augments the same way.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


# ---- model pieces -------------------------------------------------------------------------------


def autocast_settings(config: ExperimentConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    """(enabled, dtype): AMP on CUDA only; "auto" picks bf16 where the GPU has it."""
    amp = config.train.amp
    if device.type != "cuda" or amp == "off":
        return False, torch.float32
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return True, torch.bfloat16
    return True, torch.float16


def build_optimizer(config: ExperimentConfig, model: nn.Module) -> torch.optim.Optimizer:
    from kaggle_seg.models import parameter_groups

    opt = config.train.optimizer
    groups = parameter_groups(model, opt.lr, config.train.encoder_lr)
    optimizers = {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "rmsprop": torch.optim.RMSprop,
        "sgd": torch.optim.SGD,
    }
    try:
        return optimizers[opt.name](groups, lr=opt.lr, weight_decay=opt.weight_decay, **opt.params)
    except TypeError as exc:
        raise KsegError(f"train.optimizer.params: {exc}") from exc


def build_scheduler(
    config: ExperimentConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> tuple[Any, str]:
    """(scheduler, when it steps: "step", "epoch", "metric" or "never")."""
    sched = config.train.scheduler
    if sched.name == "none":
        return None, "never"
    if sched.name == "plateau":
        params = {"factor": 0.5, "patience": 2, **sched.params}
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=config.train.monitor_mode, min_lr=sched.min_lr, **params
        )
        return scheduler, "metric"
    if sched.name == "step":
        params = {"step_size": 10, "gamma": 0.1, **sched.params}
        return torch.optim.lr_scheduler.StepLR(optimizer, **params), "epoch"
    total = max(1, config.train.epochs * steps_per_epoch)
    warmup = int(sched.warmup_epochs * steps_per_epoch)
    floor = sched.min_lr / config.train.optimizer.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "step"


# ---- the loop -----------------------------------------------------------------------------------


@dataclass
class FoldResult:
    run_dir: Path
    best_value: float
    best_epoch: int
    history: pd.DataFrame


class Trainer:
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
            self.run_dir = paths.full_dir(config.name, run_root)
        else:
            self.run_dir = paths.fold_dir(config.name, fold, run_root)
        self.competition = get_competition(config.data.competition)
        seed_everything(config.train.seed + runtime.rank)
        self.train_table, self.valid_table = load_fold_tables(config, fold, full=full)
        self.classes = self._n_outputs()
        self.in_channels = self.competition.channels * config.data.stack_depth
        self.model = build_model(config.model, self.in_channels, self.classes).to(runtime.device)
        self.channels_last = config.train.channels_last and runtime.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp, self.amp_dtype = autocast_settings(config, runtime.device)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp and self.amp_dtype == torch.float16
        )
        self.train_loader, self.valid_loader, self.valid_positions = self._loaders()
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

    def _n_outputs(self) -> int:
        return 2 if self.config.data.targets == "mask_border" else len(self.competition.classes)

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

        mode = "binary" if self.classes == 1 else "multilabel"
        return build_loss(self.config.train.loss, mode)

    def _datasets(self):
        """(train, validation) datasets sharing one decoded-image store over the fold's table."""
        from kaggle_seg.data.dataset import SegmentationDataset, build_stores
        from kaggle_seg.data.input_steps import with_input_steps
        from kaggle_seg.data.transforms import build_transforms

        data = self.config.data
        table = pd.concat([self.train_table, self.valid_table], ignore_index=True)
        image_store, mask_store = build_stores(
            self.competition,
            table,
            self.config.train.cache,
            folder=self.run_dir.parent / "cache",
            targets=data.targets,
            preprocess=data.preprocess,
        )
        return tuple(
            SegmentationDataset(
                self.competition,
                part,
                with_input_steps(build_transforms(self.config.augment, train), data.preprocess),
                stack_depth=data.stack_depth,
                stack_stride=data.stack_stride,
                targets=data.targets,
                image_store=image_store,
                mask_store=mask_store,
                compact=True,
            )
            for part, train in ((self.train_table, True), (self.valid_table, False))
        )

    def _loaders(self):
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        from kaggle_seg.data.loader import WorkerInit, make_train_loader
        from kaggle_seg.spec import InputSpec, shape_batches

        train_cfg, runtime = self.config.train, self.runtime
        train_set, valid_set = self._datasets()
        if train_cfg.sampler_weight_column:
            from kaggle_seg.data.dataset import weighted_sampler

            sampler = weighted_sampler(
                self.train_table,
                train_cfg.sampler_weight_column,
                num_samples=len(self.train_table) // runtime.world_size,
                seed=train_cfg.seed + runtime.rank,
            )
        elif runtime.distributed:
            sampler = DistributedSampler(train_set, seed=train_cfg.seed, drop_last=True)
        else:
            sampler = None
        loader_args = {
            "batch_size": train_cfg.batch_size,
            "num_workers": train_cfg.num_workers,
            "pin_memory": runtime.device.type == "cuda",
        }
        train_loader = make_train_loader(
            train_set,
            sampler=sampler,
            pooled=train_cfg.pooled_loader,
            worker_init_fn=_seed_worker,
            **loader_args,
        )
        if len(train_loader) == 0:
            raise KsegError(
                f"fold {self.fold}: {len(train_set)} training images are fewer than "
                f"one batch of {train_cfg.batch_size}"
            )
        positions = shard_positions(self.valid_table, runtime)
        valid_subset = Subset(valid_set, positions.tolist())
        # Batches of one input shape ("crop" validates whole images of many sizes); uwmgi
        # volumes are scored slice by slice in table order, so their rows stay in order.
        batches = shape_batches(
            self.valid_table.iloc[positions],
            [InputSpec.from_config(self.config)],
            train_cfg.batch_size,
            keep_order="case_day" in self.valid_table.columns,
        )
        valid_loader = DataLoader(
            valid_subset,
            batch_sampler=batches,
            persistent_workers=train_cfg.num_workers > 0,
            worker_init_fn=WorkerInit(_seed_worker),
            num_workers=train_cfg.num_workers,
            pin_memory=runtime.device.type == "cuda",
        )
        return train_loader, valid_loader, positions

    # -- state --

    def state(self) -> dict[str, Any]:
        return {
            "model": self.eval_model().state_dict(),
            "train_model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "epoch": self.epoch,
            "optimizer_steps": self.optimizer_steps,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
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
            "classes": self._class_names(),
            "in_channels": self.in_channels,
            "kseg_version": __version__,
        }

    def _class_names(self) -> list[str]:
        if self.config.data.targets == "mask_border":
            return [*self.competition.classes, "border"]
        return list(self.competition.classes)

    def load(self, path: Path) -> None:
        """Restore everything from a last.pt so training continues exactly."""
        from kaggle_seg.runs import changed_keys, resume_mismatch

        if not path.is_file():
            raise KsegError(f"--resume: no checkpoint at {path}")
        state = load_checkpoint(path, map_location=self.runtime.device)
        saved, config = state.get("config") or {}, self.config.model_dump(mode="json")
        if changed_keys(saved, config):
            raise KsegError(resume_mismatch(path, saved, config))
        try:
            self.model.load_state_dict(state["train_model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler and state["scheduler"]:
                self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema and state["ema"]:
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise KsegError(resume_mismatch(path, saved, config)) from exc
        self.epoch = state["epoch"]
        self.optimizer_steps = state.get("optimizer_steps", 0)
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.bad_epochs, self.history = state["bad_epochs"], state["history"]
        self.best_step = state.get("best_step", 0)
        set_rng_state(state["rng"])

    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema else self.model

    def recalibrate_batchnorm(self) -> int:
        """Recompute the validated model's BN statistics from training batches (batchnorm.py):
        what the validation, best.pt and the OOF then use."""
        from kaggle_seg.batchnorm import recalibrate_batchnorm, trainable_batchnorms

        model = self.eval_model()
        # The EMA copy's layers mirror the raw model's: frozen there, frozen here.
        trainable = {id(m) for m in trainable_batchnorms(self.model)}
        layers = [
            ema_layer
            for raw_layer, ema_layer in zip(self.model.modules(), model.modules(), strict=True)
            if id(raw_layer) in trainable
        ]

        def to_input(batch: dict[str, Any]) -> torch.Tensor:
            images = batch["image"].to(self.runtime.device, non_blocking=True).float()
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            return images

        with self._autocast():
            self.bn_batches = recalibrate_batchnorm(
                model,
                self.train_loader,
                to_input,
                self.config.train.bn_recalibration_batches,
                layers=layers,
                distributed=self.runtime.distributed,
            )
        return self.bn_batches

    def _validated_weights(self) -> dict[str, Any]:
        """history.csv columns saying which weights this epoch's validation (and best.pt) used:
        `weights` "ema" or "raw", and the EMA's decay at the last step (0 for raw)."""
        weights = {"weights": "raw", "ema_decay": 0.0, "bn_batches": self.bn_batches}
        if self.ema:
            weights.update(weights="ema", ema_decay=float(self.ema.get_decay(self.optimizer_steps)))
        return weights

    # -- phases --

    def _apply_freezing(self) -> None:
        """Two-phase training: encoder frozen for the first epochs, then unfrozen."""
        from kaggle_seg.models import set_encoder_trainable

        frozen_epochs = self.config.train.freeze_encoder_epochs
        if frozen_epochs == 0:
            trainable, last_only = True, False
        elif self.epoch < frozen_epochs:
            trainable, last_only = False, False
        else:
            trainable, last_only = True, self.config.train.unfreeze == "last"
        if not trainable or last_only:
            set_encoder_trainable(self.model, False)
        if trainable:
            set_encoder_trainable(self.model, True, last_only=last_only)
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
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def train_one_epoch(self) -> dict[str, float]:
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
        batches = self._progress(self.train_loader, f"epoch {self.epoch + 1}/{cfg.epochs}")
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
        result = {k: v / max(1, n_images) for k, v in totals.items()}
        result["train_seconds"] = seconds
        result["images_per_s"] = n_images * runtime.world_size / seconds
        return result

    @torch.inference_mode()
    def predict_valid(
        self, keep: bool = False
    ) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Validation loss and fold metrics; with `keep`, this rank's probabilities by id
        ([K, H, W]) and, for a model with a classification head, its class probabilities by id
        ([K] float32; empty otherwise)."""
        from kaggle_seg.spec import forward_tiled, pad_to_divisor, restore_size

        model = self.eval_model()
        augment = self.config.augment
        # "crop" validates whole images, tiled above tile_size (a head model sees them whole:
        # its class logits do not tile).
        tile = augment.tile_size if augment.resize_mode == "crop" and not self.class_head else None
        model.eval()
        evaluator = FoldEvaluator(self.competition, self.valid_table, self.truth_cache)
        kept: dict[str, np.ndarray] = {}
        kept_classes: dict[str, np.ndarray] = {}
        loss_sum, n_images = 0.0, 0
        class_bce_sum = 0.0
        for batch in self.valid_loader:
            images = batch["image"].to(self.runtime.device, non_blocking=True).float()
            images, height, width = pad_to_divisor(images)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            masks = batch["mask"].to(self.runtime.device, non_blocking=True).float()
            with self._autocast():
                outputs = forward_tiled(model, images, tile, augment.tile_overlap)
                if isinstance(outputs, tuple | list):
                    outputs = (outputs[0][..., :height, :width], outputs[1])
                else:
                    outputs = outputs[..., :height, :width]
                logits, loss, class_bce = self._losses(outputs, masks)
            loss_sum += loss.item() * images.shape[0]
            n_images += images.shape[0]
            probabilities = torch.sigmoid(logits.float()).cpu().numpy()
            if class_bce is not None:
                class_bce_sum += class_bce.item() * images.shape[0]
                class_probabilities = torch.sigmoid(outputs[1].float()).cpu().numpy()
                for position, class_probs in zip(
                    batch["index"].tolist(), class_probabilities, strict=True
                ):
                    if keep:
                        kept_classes[self.valid_table.iloc[position]["id"]] = class_probs
            for position, probs in zip(batch["index"].tolist(), probabilities, strict=True):
                row = self.valid_table.iloc[position]
                probs = restore_size(
                    probs, int(row["height"]), int(row["width"]), augment.resize_mode
                )
                evaluator.add(position, probs)
                if keep:
                    kept[row["id"]] = probs
        losses = {"loss": (loss_sum, n_images)}
        if self.class_head:
            losses["class_bce"] = (class_bce_sum, n_images)
        parts = gather({**evaluator.finish(), **losses}, self.runtime)
        summary = summarize_fold(parts, self.competition.name)
        for name, column in (("loss", "valid_loss"), ("class_bce", "valid_class_bce")):
            if name in losses:
                total = sum(p[name][0] for p in parts)
                summary[column] = total / max(1, sum(p[name][1] for p in parts))
        return summary, kept, kept_classes

    def _progress(self, iterable, description: str):
        if not self.runtime.is_main or not sys.stderr.isatty():
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True)

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.config.train.monitor_mode == "max":
            return value > self.best_value
        return value < self.best_value

    def _log(self, message: str) -> None:
        if self.runtime.is_main:
            print(message, flush=True)

    def fit(self, resume: bool = False) -> FoldResult:
        cfg = self.config.train
        self._check_monitor()
        if resume:  # before anything is written: a resume that fails leaves the folder as it was
            self.load(self.run_dir / paths.LAST_CHECKPOINT)
            self._log(f"resumed {self.run_dir} at epoch {self.epoch + 1}")
        if self.runtime.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / paths.CONFIG_FILE)
        started = time.perf_counter()
        try:
            while self.epoch < cfg.epochs:
                if self._should_stop_early():
                    self._log(
                        f"early stop: no {cfg.monitor} gain in {self.bad_epochs} validations "
                        f"({self.optimizer_steps - self.best_step} optimizer steps)"
                    )
                    break
                self._apply_freezing()
                train_metrics = self.train_one_epoch()
                validate = not self.full and (
                    (self.epoch + 1) % cfg.validate_every == 0 or self.epoch + 1 == cfg.epochs
                )
                valid_metrics: dict[str, float] = {}
                if validate or self.full:
                    self.recalibrate_batchnorm()  # the weights best.pt may keep
                if validate:
                    valid_metrics, _, _ = self.predict_valid()
                self._end_epoch({**train_metrics, **valid_metrics}, judged=validate or self.full)
        except KeyboardInterrupt:
            # last.pt stays the end of the last finished epoch: resuming repeats the interrupted
            # epoch from there, so the run does exactly the configured epochs.
            last = self.run_dir / paths.LAST_CHECKPOINT
            if not last.is_file():
                raise KsegError(
                    f"interrupted in epoch {self.epoch + 1}, before any epoch finished: nothing "
                    "to resume; run the same command again"
                ) from None
            raise KsegError(
                f"interrupted in epoch {self.epoch + 1}: {last} holds the end of the last "
                "finished epoch; continue with --resume (the interrupted epoch runs again)"
            ) from None
        if not self.full:
            self._write_oof()
        minutes = (time.perf_counter() - started) / 60
        self._log(
            f"fold {self.fold}: best {cfg.monitor} {self.best_value:.4f} at epoch "
            f"{self.best_epoch + 1} in {minutes:.1f} min; {self.run_dir}"
        )
        return FoldResult(
            self.run_dir, self.best_value, self.best_epoch, pd.DataFrame(self.history)
        )

    def _check_monitor(self) -> None:
        """A train.monitor that no epoch will measure is an error now, not after an epoch."""
        from kaggle_seg.evaluation import fold_metric_names

        measured = {"train_loss", "train_seconds", "images_per_s", "valid_loss", "lr"}
        measured |= {f"train_{label}" for label in getattr(self.criterion, "labels", [])}
        measured |= set(fold_metric_names(self.competition.name))
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
        row = {"epoch": self.epoch + 1, **metrics, "lr": lr, **self._validated_weights()}
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
                    self.run_dir / paths.BEST_CHECKPOINT,
                )
            save_checkpoint(self.state(), self.run_dir / paths.LAST_CHECKPOINT)
            write_csv_atomic(pd.DataFrame(self.history), self.run_dir / paths.HISTORY_FILE)
            self._log_tensorboard(row)
            shown = ", ".join(
                f"{k} {v:.4g}"
                for k, v in row.items()
                if k in ("train_loss", "valid_loss", "score", "dice", "lr", "images_per_s")
            )
            self._log(f"epoch {self.epoch}/{cfg.epochs}: {shown}" + (" *" if improved else ""))

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

    def _write_oof(self) -> None:
        """Probabilities of the best checkpoint on the validation fold, compactly."""
        best = self.run_dir / paths.BEST_CHECKPOINT
        if self.runtime.distributed:
            dist.barrier()
        if not best.is_file():
            return
        state = load_checkpoint(best, map_location=self.runtime.device)
        self.eval_model().load_state_dict(state["model"])
        _, kept, kept_classes = self.predict_valid(keep=True)
        parts = gather((kept, kept_classes), self.runtime)
        if not self.runtime.is_main:
            return
        merged = {k: v for part, _ in parts for k, v in part.items()}
        save_oof(merged, self.run_dir / paths.OOF_FILE, self.config.train.oof_dtype)
        if self.class_head:
            merged_classes = {k: v for _, part in parts for k, v in part.items()}
            save_class_oof(merged_classes, self.run_dir / paths.OOF_CLASSES_FILE)


def train_fold(
    config: ExperimentConfig,
    fold: int,
    *,
    run_root: Path = paths.RUNS_ROOT,
    resume: bool = False,
    force: bool = False,
    device: str | None = None,
    full: bool = False,
) -> FoldResult:
    """Train one fold; under torchrun every process calls this and rank 0 writes the files.
    `full`: train on every row of the table for train.epochs, without validation, into
    runs/<experiment>/full/ (a final-submission model; `fold` is ignored). A run folder that
    holds a run is continued (`resume`), moved aside (`force`), or refused."""
    from kaggle_seg.runs import claim_run_dir

    runtime = start_runtime(device)
    if full:
        run_dir = paths.full_dir(config.name, Path(run_root))
    else:
        run_dir = paths.fold_dir(config.name, fold, Path(run_root))
    moved = claim_run_dir(run_dir, resume=resume, force=force, move=runtime.is_main)
    if moved is not None:
        print(f"moved the previous run to {moved}", flush=True)
    if runtime.device.type == "cpu":
        # Activation buffers are mmapped and faulted in afresh every step otherwise: on CPU
        # that was ~1/3 of the step (benchmarks/README.md, "Training-step overhead").
        keep_freed_memory(heap_only=True)
    trainer = Trainer(config, fold, Path(run_root), runtime, full=full)
    return trainer.fit(resume=resume)
