"""Probability files: id -> [K, H, W] probabilities in one .npz, float16 or uint8 (value / 255).

One format for out-of-fold predictions (`oof.npz`), `kseg predict --save` and what `kseg tune`
and `kseg show` read back. numpy only, so readers do not pull in torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from kaggle_seg.errors import KsegError
from kaggle_seg.io import atomic_path

ProbabilityDtype = Literal["float16", "uint8"]


def encode_probabilities(probabilities: np.ndarray, dtype: str) -> np.ndarray:
    """float [..] in [0, 1] -> the stored array: float16, or uint8 = round(value * 255)."""
    if dtype == "uint8":
        return np.round(probabilities * 255).astype(np.uint8)
    if dtype == "float16":
        return probabilities.astype(np.float16)
    raise KsegError(f"unknown probability dtype {dtype!r}; choose float16 or uint8")


def decode_probabilities(array: np.ndarray) -> np.ndarray:
    """A stored array back as float32 probabilities."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    return array.astype(np.float32)


def save_oof(probabilities: dict[str, np.ndarray], path: Path, dtype: str) -> None:
    """id -> [K, H, W] probabilities as float16, or uint8 (value / 255), in one npz."""
    arrays = {k: encode_probabilities(v, dtype) for k, v in probabilities.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def load_oof(path: Path) -> dict[str, np.ndarray]:
    """oof.npz back as id -> float32 [K, H, W] probabilities."""
    with np.load(path) as data:
        return {k: decode_probabilities(data[k]) for k in data.files}


def save_class_oof(class_probabilities: dict[str, np.ndarray], path: Path) -> None:
    """id -> [K] classification-head probabilities as float32, in one npz."""
    arrays = {
        k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in class_probabilities.items()
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def load_class_oof(path: Path) -> dict[str, np.ndarray]:
    """oof_classes.npz back as id -> float32 [K] class probabilities."""
    with np.load(path) as data:
        return {k: data[k].astype(np.float32) for k in data.files}


class ProbabilityWriter:
    """Streams id -> [K, H, W] probabilities into one .npz in the format above, one array at a
    time (the test set is never held in memory). Written to a temporary file and renamed on
    success, so an interrupted run leaves no partial file."""

    def __init__(self, path: str | Path, dtype: ProbabilityDtype = "float16"):
        import zipfile

        encode_probabilities(np.zeros(0, np.float32), dtype)  # refuse a bad dtype up front
        self.path = Path(path)
        self.dtype = dtype
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_DEFLATED)

    def add(self, image_id: str, probabilities: np.ndarray) -> None:
        array = encode_probabilities(probabilities, self.dtype)
        with self._zip.open(f"{image_id}.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array(handle, array, allow_pickle=False)

    def __enter__(self) -> ProbabilityWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._zip.close()
        if exc_type is None:
            self._tmp.replace(self.path)
        else:
            self._tmp.unlink(missing_ok=True)
