"""Checkpoints that load without running code.

A kseg checkpoint holds tensors and plain data only (dict, list, tuple, str, int, float, bool,
None): the resolved config as a dict, the RNG states as lists and tensors, optimizer, scheduler,
grad-scaler and EMA states as PyTorch writes them. So it loads with
`torch.load(weights_only=True)`, whose unpickler refuses every other global, and nothing needs
torch.serialization's allow-list. Nothing ever falls back to the full unpickler: a file the safe
loader refuses is refused, with one line naming it (Kaggle users load checkpoints from other
people's datasets, and a pickle can run any code).

Writes go through a temporary file; a full disk or any other write failure names the file.
"""

from __future__ import annotations

import io
import pickle
import random
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kaggle_seg.errors import KsegError
from kaggle_seg.io import atomic_path


def _cut_short(path: Path) -> bool:
    """A zip archive (torch.save's format) whose end is missing: a copy or download cut short."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            return False
    return not zipfile.is_zipfile(path)


class UnsafeCheckpoint(KsegError):
    """A file the safe loader refuses: loading it would import or call something."""


class UnreadableCheckpoint(KsegError):
    """A truncated or foreign file; `reason` says why without the path."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: not a readable checkpoint ({reason})")
        self.reason = reason


_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")
# What checkpoints of kseg <= 0.x held besides plain data: numpy's RNG state array.
_NUMPY_GLOBALS = ("numpy.", "numpy._core.", "numpy.core.")


def plain_data(value: Any, where: str = "checkpoint") -> Any:
    """`value` with numpy scalars / arrays and paths turned into what the safe loader accepts.

    Raises TypeError naming the key for anything else that is not tensors or plain data, so a
    checkpoint that would not load is never written.
    """
    if isinstance(value, torch.Tensor | str | bool | int | float | None | torch.Size):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        items = ((k, plain_data(v, f"{where}.{k}")) for k, v in value.items())
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    if isinstance(value, list | tuple):
        converted = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return converted if isinstance(value, list) else tuple(converted)
    raise TypeError(f"{where}: {type(value).__name__} is not tensors or plain data")


# ---- RNG states as plain data -------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, as lists, ints and tensors."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {
        "key": numpy_state["state"]["key"].tolist(),
        "pos": int(numpy_state["state"]["pos"]),
    }
    state = {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {
        "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
        "pos": int(numpy_state["state"]["pos"]),
    }
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- saving -------------------------------------------------------------------------------------


class _RecordingWriter(io.RawIOBase):
    """A file that keeps what stopped a write: torch.save reports any exception from it only
    as `RuntimeError: [enforce fail at inline_container.cc]`, without the cause or the path.
    That hides an OSError's reason, and turns a Ctrl-C or SIGTERM arriving mid-save (the
    handler runs inside write) into a write error instead of an interruption."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except BaseException as exc:  # OSError, KeyboardInterrupt
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.handle.flush()
        except BaseException as exc:
            self.error = exc
            raise


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """torch.save `state` (made plain data) through a temporary file: a failure never leaves a
    truncated checkpoint, and names `path` with its cause (e.g. no space left on device)."""
    path = Path(path)
    state = plain_data(dict(state))
    writer = None
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            writer = _RecordingWriter(handle)
            torch.save(state, writer)
    except (OSError, RuntimeError) as exc:
        cause = writer.error if writer is not None and writer.error is not None else exc
        if isinstance(cause, KeyboardInterrupt):  # interrupted, not broken: unwind as such
            raise KeyboardInterrupt from None
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else cause
        raise KsegError(f"{path}: cannot write the checkpoint ({_first_line(reason)})") from exc
    return path


# ---- loading ------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """A checkpoint's contents through the safe loader (tensors and plain data only).

    `mmap`: tensors are mapped, not read (for the plain data alone: the spec, the config).
    A file that would need any other global (code could run) raises UnsafeCheckpoint; a
    truncated or foreign file raises KsegError; both name the file in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise KsegError(f"{path}: checkpoint not found")
    if _cut_short(path):
        raise UnreadableCheckpoint(
            path,
            f"truncated or damaged: {path.stat().st_size:,} bytes and the zip archive torch.save "
            "writes has no end; copy or download it again",
        )
    try:
        with warnings.catch_warnings():  # torch's note on a plain pickle's protocol: noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused is None:
            raise UnreadableCheckpoint(path, "not a torch.save file") from None
        raise UnsafeCheckpoint(_refusal(path, refused.group(1))) from None
    except Exception as exc:  # a truncated or foreign file: torch raises many types
        raise UnreadableCheckpoint(path, f"{type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(state, dict):
        raise KsegError(f"{path}: not a kseg checkpoint (holds a {type(state).__name__})")
    return state


def _refusal(path: Path, name: str) -> str:
    if name.startswith(_NUMPY_GLOBALS):
        return (
            f"{path}: written by an older kseg (numpy state inside), which the safe loader "
            "refuses; its best.pt still predicts; to train on, start the fold again with "
            "`kseg train --force`"
        )
    return (
        f"{path}: refused: loading it would call {name}, and kseg loads checkpoints only as "
        "tensors and plain data (unpickling can run code); use a checkpoint written by kseg"
    )


def checkpoint_config(state: Mapping[str, Any], path: str | Path) -> Any:
    """The ExperimentConfig embedded in a loaded kseg checkpoint; errors name `path`."""
    from pydantic import ValidationError

    from kaggle_seg.config import ExperimentConfig, format_validation_error

    missing = [key for key in ("config", "model", "classes", "in_channels") if key not in state]
    if missing:
        raise KsegError(f"{path}: not a kseg checkpoint (no {', '.join(missing)} inside)")
    weights = state["model"]
    if not isinstance(state["config"], Mapping) or not isinstance(weights, Mapping):
        raise KsegError(f"{path}: not a kseg checkpoint (config or model is not a mapping)")
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise KsegError(f"{path}: not a kseg checkpoint (its model holds more than tensors)")
    if not isinstance(state["classes"], list | tuple) or not isinstance(state["in_channels"], int):
        raise KsegError(f"{path}: not a kseg checkpoint (classes or in_channels malformed)")
    try:
        return ExperimentConfig.model_validate(state["config"])
    except ValidationError as exc:
        raise KsegError(format_validation_error(f"{path} (embedded config)", exc)) from None


def _first_line(value: object) -> str:
    lines = str(value).strip().splitlines()
    return lines[0] if lines else type(value).__name__
