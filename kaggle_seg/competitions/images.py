"""Image file readers shared by competitions; every failure names the file."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kaggle_seg.errors import InputError, one_line


@dataclass(frozen=True)
class Skipped:
    """An image left out or predicted empty under `--on-error skip`, and why."""

    id: str
    path: str
    reason: str


def skip_or_raise(error: Exception, image_id: str, path: Any, skipped: list[Skipped] | None):
    """Record `error` in `skipped` (--on-error skip) or raise it (no list: fail)."""
    if skipped is None:
        raise InputError(f"{error} (pass --on-error skip to predict it as empty)") from error
    skipped.append(Skipped(str(image_id), str(path), str(error)))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def read_png(path: str | Path, *, unchanged: bool = True) -> np.ndarray:
    """A PNG/JPEG as stored (16-bit stays 16-bit): [H, W] or [H, W, C] in file channel order."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    flags = cv2.IMREAD_UNCHANGED if unchanged else cv2.IMREAD_COLOR
    image = cv2.imread(str(path), flags)
    if image is None:
        raise InputError(f"{path}: cannot decode image (corrupt or not an image)")
    if image.ndim == 3:
        # OpenCV gives BGR(A); the rest of the project speaks RGB(A).
        image = image[..., ::-1] if image.shape[2] == 3 else image[..., [2, 1, 0, 3]]
        image = np.ascontiguousarray(image)
    return image


@contextmanager
def _tifffile_warnings() -> Iterator[list[str]]:
    """tifffile's log warnings about this thread's file, collected instead of printed: left to
    logging they reach stderr as a line of their own beside kseg's error, and for a truncated
    file they are the only words for what is wrong (its exception then says 'index 0 out of
    range'). Other threads' reads (prepare checks files on several) collect their own."""
    messages: list[str] = []
    thread = threading.get_ident()

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == thread:
                # "<tifffile.TiffPages @202760> invalid offset..." -> "invalid offset..."
                messages.append(re.sub(r"^<[^>]*>\s*", "", one_line(record.getMessage())))

    handler = _Collect(logging.WARNING)
    log = logging.getLogger("tifffile")
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)


def _tiff_reason(warnings: list[str], exc: Exception | None = None) -> str:
    """tifffile's warnings and exception as one reason, nothing left out."""
    parts = [*dict.fromkeys(warnings)]
    if exc is not None:
        parts.append(f"{type(exc).__name__}: {one_line(exc)}")
    return "; ".join(parts)


def read_tiff(path: str | Path) -> np.ndarray:
    """A TIFF as stored: [H, W] or [H, W, C]."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    with _tifffile_warnings() as warnings:
        try:
            image = tifffile.imread(path)
        except Exception as exc:  # tifffile raises many types for a broken file
            raise InputError(f"{path}: cannot decode TIFF ({_tiff_reason(warnings, exc)})") from exc
    # A truncated file can decode to no pixels with only a warning; a decoded image's warnings
    # are tifffile's notes on a file it read, and are dropped.
    if image.size == 0:
        reason = _tiff_reason(warnings) or "no image data"
        raise InputError(f"{path}: cannot decode TIFF ({reason})")
    return image


def tiff_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of a TIFF's first page, from its header."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    with _tifffile_warnings() as warnings:
        try:
            with tifffile.TiffFile(path) as tiff:
                shape = tiff.pages[0].shape
        except Exception as exc:  # tifffile raises many types for a broken file
            reason = _tiff_reason(warnings, exc)
            raise InputError(f"{path}: cannot read TIFF header ({reason})") from exc
    if len(shape) < 2:
        raise InputError(f"{path}: not an image (TIFF page of shape {shape})")
    return int(shape[0]), int(shape[1])


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: cannot read image header (corrupt or not an image)") from exc
    except OSError as exc:
        reason = one_line(exc).replace(f" '{path}'", "").replace(str(path), "the file")
        raise InputError(f"{path}: cannot read image header ({reason})") from exc
    return height, width


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: object, mask_path: object):
    if image.shape[:2] != mask.shape[:2]:
        raise InputError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
            f"{image.shape[1]}x{image.shape[0]} (W x H)"
        )


def image_files(folder: Path) -> dict[str, Path]:
    """stem -> file; two files with one stem (img0.png + img0.jpg) are an error, not a choice."""
    files: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            raise InputError(
                f"{path}: same name as {files[path.stem].name}; keep one file per image"
            )
        files[path.stem] = path
    return files


def rgb_unit(image: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3] RGB in [0, 1] of an image as stored: alpha dropped, grey repeated,
    8- or 16-bit scaled by its type's range."""
    if image.ndim == 2:
        image = image[..., None]
    image = image[..., :3]
    if image.shape[-1] != 3:  # grey (+ alpha)
        image = np.repeat(image[..., :1], 3, axis=-1)
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    return image.astype(np.float32) / scale


def image_rows(
    paths: Mapping[str, Path],
    size_of: Callable[[Path], tuple[int, int]],
    skipped: list[Any] | None,
) -> pd.DataFrame:
    """A test table of `paths` (id -> image file), sorted by id: `id`, `group` (the id),
    `image_path`, `height`, `width`. An unreadable header raises InputError, or with a
    `skipped` list is recorded there and the image left out (`--on-error skip`)."""
    rows = []
    for image_id in sorted(paths):
        try:
            height, width = size_of(paths[image_id])
        except InputError as exc:
            skip_or_raise(exc, image_id, paths[image_id], skipped)
            continue
        path = str(Path(paths[image_id]).resolve())
        rows.append({"id": image_id, "group": image_id, "image_path": path,
                     "height": height, "width": width})  # fmt: skip
    return pd.DataFrame(rows, columns=["id", "group", "image_path", "height", "width"])


def check_file_headers(row: Any) -> None:
    """The image's header and every mask file's (mask_path, mask_dir/*.png) give the row's
    size; InputError naming the file otherwise."""
    size = (int(row["height"]), int(row["width"]))
    _same_size(image_size(row["image_path"]), size, row["image_path"], "image", row)
    if row.get("mask_path"):
        _same_size(image_size(row["mask_path"]), size, row["mask_path"], "mask", row)
    if row.get("mask_dir"):
        for path in sorted(Path(row["mask_dir"]).glob("*.png")):
            _same_size(image_size(path), size, path, "mask", row)


def _same_size(found: tuple[int, int], expected: tuple[int, int], path: Any, what: str, row):
    if found != expected:
        raise InputError(
            f"{path}: {what} is {found[1]}x{found[0]} but image {row['image_path']} is "
            f"{expected[1]}x{expected[0]} (W x H)"
        )
