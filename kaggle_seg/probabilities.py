"""Probability files: id -> [K, H, W] probabilities in one .npz, float16 or uint8 (value / 255).

One format for out-of-fold predictions (`oof.npz`), `kseg predict --save` and what `kseg tune`
and `kseg show` read back. numpy only, so readers do not pull in torch.

`oof.npz` is written uncompressed, each array's data 64-byte aligned in the file, so that
`open_probabilities` maps it: `kseg tune` reads a whole competition's OOF (16 GB of float16 for
uwmgi) through the page cache instead of copying it into memory. Any npz `np.load` reads (the
compressed ones of earlier versions, `kseg predict --save`) opens too, one array decompressed
per lookup.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import struct
import sys
import threading
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kaggle_seg.errors import KsegError
from kaggle_seg.io import atomic_path, refuse_folder

ProbabilityDtype = Literal["float16", "uint8"]
# One npy header parsed at a time (see ProbabilityFile._read_header).
HEADER_LOCK = threading.Lock()


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


# Array data starts at a multiple of this in a mapped npz (np.lib.format pads its own header
# to 64 bytes, so aligning the member's start aligns the data).
ALIGNMENT = 64
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # a zip local file header, 30 bytes
_PADDING_FIELD = 0xCAFE  # a zip extra-field id no tool gives a meaning to


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_mappable_npz(
    arrays: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], path: Path
) -> None:
    """An npz (`np.load` reads it) whose arrays are stored uncompressed with their data
    ALIGNMENT-aligned in the file, so `open_probabilities` can map them. `arrays`: a mapping,
    or (name, array) pairs made as they are written (one array in memory at a time); written
    atomically."""
    pairs = arrays.items() if isinstance(arrays, Mapping) else arrays
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, array in pairs:
            data = _npy_bytes(array)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            # Pad the local header's extra field so the member's data starts aligned.
            header_end = archive.start_dir + _LOCAL_HEADER.size + len(info.filename.encode())
            padding = -(header_end + 4) % ALIGNMENT
            info.extra = struct.pack("<HH", _PADDING_FIELD, padding) + bytes(padding)
            archive.writestr(info, data)


def save_oof(probabilities: dict[str, np.ndarray], path: Path, dtype: str) -> None:
    """id -> [K, H, W] probabilities as float16, or uint8 (value / 255), in one mappable npz
    (see `write_mappable_npz`)."""
    arrays = {k: encode_probabilities(v, dtype) for k, v in probabilities.items()}
    write_mappable_npz(arrays, path)


def load_oof(path: Path) -> dict[str, np.ndarray]:
    """oof.npz back as id -> float32 [K, H, W] probabilities."""
    with np.load(path) as data:
        return {k: decode_probabilities(data[k]) for k in data.files}


class ProbabilityFile(Mapping[str, np.ndarray]):
    """A probabilities npz opened for reading: id -> the stored [K, H, W] array (float16,
    float32 or uint8 = value * 255, as saved; see `decode_probabilities`), read-only.

    Arrays stored uncompressed are views of one read-only memory map of the file: nothing is
    copied, and the OS pages them in and out as they are used. Compressed ones are
    decompressed one per lookup.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._archive = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise _unreadable(self.path, exc) from exc
        self._members = {
            info.filename[: -len(".npy")]: info
            for info in self._archive.infolist()
            if info.filename.endswith(".npy")
        }
        self._map: mmap.mmap | None = None
        self._offsets: dict[str, int | None] = {}
        if any(info.compress_type == zipfile.ZIP_STORED for info in self._members.values()):
            with open(self.path, "rb") as handle:
                if self.path.stat().st_size:
                    self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._members

    def is_mapped(self, image_id: str) -> bool:
        """Whether this array is a view of the file (stored uncompressed)."""
        return self._members[image_id].compress_type == zipfile.ZIP_STORED

    def __getitem__(self, image_id: str) -> np.ndarray:
        info = self._members[image_id]
        if info.compress_type != zipfile.ZIP_STORED or self._map is None:
            with self._archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
        return self._mapped_array(info)

    @property
    def buffer(self) -> np.ndarray | None:
        """The whole file as a read-only uint8 array over its memory map (None: nothing is
        stored uncompressed)."""
        return None if self._map is None else np.frombuffer(self._map, dtype=np.uint8)

    def data_offset(self, image_id: str) -> int | None:
        """Byte offset of the array's data in `buffer` (C order), or None when the array is
        compressed or not C-ordered."""
        if image_id not in self._offsets:
            offset = None
            if self.is_mapped(image_id) and self._map is not None:
                array = self[image_id]
                if array.flags.c_contiguous:
                    offset = array.ctypes.data - self.buffer.ctypes.data
            self._offsets[image_id] = offset
        return self._offsets[image_id]

    def header(self, image_id: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of the stored array, from its npy header only (nothing else is read
        or decompressed)."""
        info = self._members[image_id]
        if info.compress_type == zipfile.ZIP_STORED and self._map is not None:
            shape, _, dtype, _ = self._mapped_header(info)
            return shape, dtype
        with self._archive.open(info) as member:
            shape, _, dtype = self._read_header(member, info)
        return shape, dtype

    def _read_header(self, member: Any, info: zipfile.ZipInfo) -> tuple:
        # numpy parses the header with ast.literal_eval, which CPython 3.11 (before 3.11.8)
        # may fail with "SystemError: AST constructor recursion depth mismatch" when threads
        # parse at once (cpython gh-106905): seen in kseg tune's thread pool, in CI.
        with HEADER_LOCK:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        if dtype.hasobject:
            raise KsegError(f"{self.path}: {info.filename} holds Python objects, not numbers")
        return shape, fortran, dtype

    def _mapped_header(self, info: zipfile.ZipInfo) -> tuple:
        """(shape, fortran order, dtype, data offset in the file) of a stored member."""
        local = self._map[info.header_offset : info.header_offset + _LOCAL_HEADER.size]
        fields = _LOCAL_HEADER.unpack(local)
        if fields[0] != b"PK\x03\x04":
            raise KsegError(f"{self.path}: {info.filename} has no local zip header")
        start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        member = io.BytesIO(self._map[start : start + min(info.file_size, 65536)])
        shape, fortran, dtype = self._read_header(member, info)
        return shape, fortran, dtype, start + member.tell()

    def _mapped_array(self, info: zipfile.ZipInfo) -> np.ndarray:
        shape, fortran, dtype, offset = self._mapped_header(info)
        count = int(np.prod(shape))
        array = np.frombuffer(self._map, dtype=dtype, count=count, offset=offset)
        return array.reshape(shape, order="F" if fortran else "C")


def open_probabilities(path: str | Path) -> ProbabilityFile:
    """`ProbabilityFile` of an npz written by `save_oof` (mapped) or any other npz of arrays."""
    return ProbabilityFile(path)


def save_class_oof(class_probabilities: dict[str, np.ndarray], path: Path) -> None:
    """id -> [K] classification-head probabilities as float32, in one npz."""
    arrays = {
        k: np.asarray(v, dtype=np.float32).reshape(-1) for k, v in class_probabilities.items()
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def _unreadable(path: Path, exc: BaseException) -> KsegError:
    """One line naming an npz that does not load, in kseg's words where it is no zip at all
    (numpy would say it holds pickled data)."""
    why = str(exc) if zipfile.is_zipfile(path) else "no zip archive: truncated, or another format"
    return KsegError(f"{path}: not a readable npz ({why})")


def load_class_oof(path: Path) -> dict[str, np.ndarray]:
    """oof_classes.npz back as id -> float32 [K] class probabilities."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k].astype(np.float32) for k in data.files}
    except (OSError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        raise _unreadable(Path(path), exc) from exc


def load_class_oofs(paths: Sequence[Path]) -> dict[str, np.ndarray] | None:
    """The oof_classes.npz of several folds as one id -> [K] mapping (files that do not exist
    skipped: folds of a model without a classification head); None when there is none."""
    found = [Path(p) for p in paths if Path(p).is_file()]
    if not found:
        return None
    merged: dict[str, np.ndarray] = {}
    for path in found:
        merged.update(load_class_oof(path))
    return merged


class ProbabilityWriter:
    """Streams id -> [K, H, W] probabilities into one .npz in the format above, one array at a
    time (the test set is never held in memory). Written to a temporary file and renamed on
    success, so an interrupted run leaves no partial file."""

    def __init__(self, path: str | Path, dtype: ProbabilityDtype = "float16"):
        import zipfile

        encode_probabilities(np.zeros(0, np.float32), dtype)  # refuse a bad dtype up front
        self.path = Path(path)
        refuse_folder(self.path)  # before predicting, not at the rename after it
        self.dtype = dtype
        # A unique temporary name (atomic_path), so two writers of one path never share a file,
        # and a full disk is one line naming the path.
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_DEFLATED)
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise

    def add(self, image_id: str, probabilities: np.ndarray) -> None:
        array = encode_probabilities(probabilities, self.dtype)
        with self._zip.open(f"{image_id}.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array(handle, array, allow_pickle=False)

    def __enter__(self) -> ProbabilityWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        try:
            self._zip.close()
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        self._atomic.__exit__(exc_type, exc, traceback)


def join_probability_files(parts: Sequence[Path], out: Path, order: Sequence[str]) -> int:
    """Several ProbabilityWriter files (the shares of `kseg predict` under torchrun) as one npz
    at `out`: the arrays copied as stored, ids in `order` first (the order one process writes),
    any others after. Returns the array count; the parts are removed."""
    import shutil

    with contextlib.ExitStack() as stack:
        where: dict[str, zipfile.ZipFile] = {}
        for path in parts:
            archive = stack.enter_context(zipfile.ZipFile(path))
            for name in archive.namelist():
                where.setdefault(name, archive)
        rank = {f"{image_id}.npy": i for i, image_id in reversed(list(enumerate(order)))}
        names = sorted(where, key=lambda name: rank.get(name, len(rank)))
        with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as joined:
            for name in names:
                with (
                    where[name].open(name) as source,
                    joined.open(name, "w", force_zip64=True) as target,
                ):
                    shutil.copyfileobj(source, target, 1 << 20)
    for path in parts:
        path.unlink(missing_ok=True)
    return len(names)


class NpzProbabilities(Mapping[str, np.ndarray]):
    """id -> float32 [K, H, W] probabilities over one or more npz files (oof.npz or
    `kseg predict --save`), decoded one array per lookup: uint8 means value / 255, as `load_oof`.
    Use as a context manager (the files stay open). An id in several files: the first file wins.
    """

    def __init__(self, files: Sequence[Path]):
        self._stack = contextlib.ExitStack()
        self._where: dict[str, Any] = {}
        try:
            for path in files:
                if not Path(path).is_file():
                    raise KsegError(f"{path}: predictions file not found")
                try:
                    npz = np.load(path, allow_pickle=False)
                except (OSError, ValueError, zipfile.BadZipFile) as exc:
                    raise _unreadable(Path(path), exc) from exc
                if not hasattr(npz, "files"):
                    raise KsegError(f"{path}: a single array, expected an npz of id -> [K, H, W]")
                self._stack.enter_context(npz)
                for image_id in npz.files:
                    self._where.setdefault(image_id, npz)
        except BaseException:
            self._stack.close()
            raise

    def __getitem__(self, image_id: str) -> np.ndarray:
        return decode_probabilities(self._where[image_id][image_id])

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> NpzProbabilities:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
