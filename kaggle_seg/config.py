"""Validated configuration: pydantic models that refuse unknown keys, YAML loading, overrides.

A config file names the competition and its data options; `--set section.key=value` overrides
any field. Unknown keys and wrong types are errors naming the key.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kaggle_seg.errors import KsegError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class ExperimentConfig(StrictModel):
    """One experiment. Later sections (model, train, predict, kernel) plug in here."""

    name: str = "default"
    data: DataConfig


def _format_validation_error(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            parts.append(f"'{key}': {err['msg']}")
    return f"{source}: invalid config: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`data.n_folds=4` -> (["data", "n_folds"], 4); the value is parsed as YAML."""
    if "=" not in text:
        raise KsegError(f"--set {text!r}: expected key=value, e.g. data.n_folds=4")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


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
        raise KsegError(f"{path}: not valid YAML ({exc})") from exc
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
        raise KsegError(_format_validation_error(source, exc)) from exc
