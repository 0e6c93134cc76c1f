"""Decoded images held once: a PNG / TIFF is decoded a single time per run (or once for many runs).

An `ImageStore` keeps every image of a table in one flat array (sizes differ, e.g. in DSB) with
per-image offsets and shapes, compactly: images as uint16, value = round(65535 x pixel) (they
arrive float32 in [0, 1]; an absolute error below 7.7e-6, so 8-bit images and UW-Madison's 16-bit
slices divided by their maximum come back exactly up to float32 rounding), masks as uint8. uint16
rather than float16 (the same 2 bytes): the geometric augmentations run on it about twice as fast
as on float32, see `transforms.accepts_uint16` and `ImageStore.view`. It is filled once, with
a thread pool (cv2 and tifffile release the GIL while decoding), before the DataLoader forks its
workers, which then read it without copying:

- "memory": an anonymous array, shared copy-on-write with the forked workers (only read, so never
  copied);
- "memmap": a file under `folder` (e.g. the run's `cache/`), shared through the OS page cache and
  reused by later runs while a small JSON index (ids, shapes and a fingerprint of each item's
  source files: paths, sizes, mtimes) still matches; rebuilt otherwise;
- "none": no store, `get` decodes every time (the usual notebook behaviour).

The memmap data file has a fresh name per build and the index, written last and atomically,
names it: an interrupted fill leaves at most an orphan temporary file, never an index that points
at a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kaggle_seg.errors import InputError, KsegError

StoreMode = Literal["none", "memory", "memmap"]
StoreKind = Literal["image", "mask"]

STORE_MODES: tuple[str, ...] = ("none", "memory", "memmap")
# (stored dtype, dtype `get` returns) per kind.
STORE_DTYPES: dict[str, tuple[np.dtype, np.dtype]] = {
    "image": (np.dtype(np.uint16), np.dtype(np.float32)),
    "mask": (np.dtype(np.uint8), np.dtype(np.uint8)),
}
# Bump when the layout of the data file or the index changes.
INDEX_FORMAT = 2
# Stored image value of the pixel value 1.0 (uint16: value = round(UINT16_SCALE * pixel)).
UINT16_SCALE = 65535.0
# Decoded image values further outside [0, 1] than this are an InputError (rounding is clipped).
_RANGE_SLACK = 1e-3
# A temporary data file untouched this long belongs to a fill that died.
_STALE_TMP_SECONDS = 3600.0
# What follows the store's name in its data files' names.
_DATA_FILE = re.compile(r"\.[0-9a-f]{12}\.bin")
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def fingerprint(paths: Iterable[str | Path], *, extra: str = "") -> str:
    """A short digest of files' paths, sizes and mtimes (a folder: of every file in it) + `extra`.

    It changes when a source file is replaced, edited, added to or removed from a folder, which
    is what invalidates a memmap cache; `extra` carries inline sources such as RLE strings.
    """
    digest = hashlib.sha1(extra.encode())
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                stat = file.stat()
                digest.update(f"\0{file}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
            except FileNotFoundError:
                digest.update(f"\0{file}\0missing".encode())
    return digest.hexdigest()[:16]


def to_uint16(image: np.ndarray, *, what: str = "image") -> np.ndarray:
    """uint16 round(65535 x image) of a float image in [0, 1] (the store's image format).

    Values within 1e-3 outside [0, 1] are clipped; further out is an InputError.
    """
    image = np.asarray(image)
    if image.size:
        low, high = float(image.min()), float(image.max())
        if low < -_RANGE_SLACK or high > 1.0 + _RANGE_SLACK or not np.isfinite(low + high):
            raise InputError(
                f"{what}: image values span [{low:g}, {high:g}]; images must be in [0, 1]"
            )
    scaled = np.multiply(image, np.float32(UINT16_SCALE), dtype=np.float32)
    np.add(scaled, np.float32(0.5), out=scaled)
    np.clip(scaled, 0.0, UINT16_SCALE, out=scaled)
    return scaled.astype(np.uint16)


def from_uint16(image: np.ndarray) -> np.ndarray:
    """float32 image / 65535 of a uint16 store image: back in [0, 1]."""
    return np.multiply(image, np.float32(1.0 / UINT16_SCALE), dtype=np.float32)


def _as_hwc(array: np.ndarray) -> np.ndarray:
    return array[..., None] if array.ndim == 2 else array


class ImageStore:
    """Arrays of one kind ("image": float32 [H, W, C] in [0, 1]; "mask": uint8 [H, W, K]),
    decoded once and held in memory or in a memmap file; see the module docstring.

    `folder` (memmap only) holds `<name>.json` and the data file it names, `<name>.<token>.bin`.
    Pickled (DataLoader workers started with "spawn" rather than Linux's "fork"), a memmap store
    sends only its file name, a memory store its whole array.
    """

    def __init__(
        self,
        mode: StoreMode,
        kind: StoreKind,
        *,
        folder: str | Path | None = None,
        name: str | None = None,
    ):
        if mode not in STORE_MODES:
            raise KsegError(f"unknown cache mode {mode!r}; choose one of {', '.join(STORE_MODES)}")
        if kind not in STORE_DTYPES:
            raise KsegError(f"unknown store kind {kind!r}; choose one of {', '.join(STORE_DTYPES)}")
        if name is not None and not _NAME.fullmatch(name):
            raise KsegError(f"store name {name!r}: use letters, digits, '_' and '-' only")
        if mode == "memmap" and folder is None:
            raise KsegError("cache mode 'memmap' needs a folder for its files")
        self.mode = mode
        self.kind = kind
        self.folder = Path(folder) if folder is not None else None
        self.name = name or f"{kind}s"
        self.stored_dtype, self.dtype = STORE_DTYPES[kind]
        self.filled = False
        # True when a memmap fill found a matching index and decoded nothing.
        self.reused = False
        self.fill_seconds = 0.0
        self.ids: list[str] = []
        self._id_to_slot: dict[str, int] = {}
        self._read_fn: Callable[[int], np.ndarray] | None = None
        self._shapes = np.zeros((0, 3), dtype=np.int64)
        self._offsets = np.zeros(1, dtype=np.int64)
        self._data: np.ndarray | None = None
        self._data_path: Path | None = None

    # --- filling -------------------------------------------------------------------------------

    def fill(
        self,
        read_fn: Callable[[int], np.ndarray],
        n: int,
        *,
        sizes: Sequence[tuple[int, int]] | None = None,
        ids: Sequence[str] | None = None,
        sources: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> ImageStore:
        """Decode items 0..n-1 with `read_fn(i)` ([H, W] or [H, W, C]) into the store; returns self.

        sizes: the expected (height, width) of each item (e.g. the table's columns). With them
        the store is allocated up front and filled in place (peak memory = the store), and a
        decoded item of another size is an InputError; all items must then share one channel
        count. Without them items are decoded first and packed after (peak = twice the store).
        ids: one name per item, used by `positions` and in errors (default "0".."n-1").
        sources: one `fingerprint` per item; a memmap is reused only when ids, sizes and sources
        all match its index (without sources it is always rebuilt).
        threads: decoding threads (default min(8, CPU count)).
        """
        started = time.perf_counter()
        self.ids = [str(i) for i in (ids if ids is not None else range(n))]
        if len(self.ids) != n or (sizes is not None and len(sizes) != n):
            raise KsegError(f"store {self.name}: {n} items but ids / sizes of another length")
        if sources is not None and len(sources) != n:
            raise KsegError(f"store {self.name}: {n} items but {len(sources)} sources")
        self._id_to_slot = {key: slot for slot, key in enumerate(self.ids)}
        if len(self._id_to_slot) != n:
            raise KsegError(f"store {self.name}: ids are not unique")
        self._read_fn = read_fn
        threads = threads or min(8, os.cpu_count() or 1)
        if self.mode == "memmap":
            self._fill_memmap(read_fn, n, sizes, sources, threads)
        elif self.mode == "memory":
            self._data = self._decode_all(
                read_fn, n, sizes, threads, lambda total: np.empty(total, dtype=self.stored_dtype)
            )
        if self.mode != "none":
            self._read_fn = None  # not needed any more, and a lambda would not pickle
        self.filled = True
        self.fill_seconds = time.perf_counter() - started
        return self

    def _decode_all(
        self,
        read_fn: Callable[[int], np.ndarray],
        n: int,
        sizes: Sequence[tuple[int, int]] | None,
        threads: int,
        allocate: Callable[[int], np.ndarray],
    ) -> np.ndarray:
        """Decode every item into the flat array `allocate(total)` returns; sets shapes/offsets."""
        if n == 0:
            self._set_shapes(np.zeros((0, 3), dtype=np.int64))
            return allocate(0)
        if sizes is None:
            with ThreadPoolExecutor(threads) as pool:
                items = [self._convert(_as_hwc(a)) for a in pool.map(read_fn, range(n))]
            self._set_shapes(np.array([a.shape for a in items], dtype=np.int64))
            flat = allocate(int(self._offsets[-1]))
            for i in range(n):
                self._slot(flat, i)[...] = items[i]
                items[i] = None  # type: ignore[call-overload]  # free as we pack
            return flat
        first = _as_hwc(read_fn(0))
        channels = first.shape[-1]
        shapes = np.array([(int(h), int(w), channels) for h, w in sizes], dtype=np.int64)
        self._set_shapes(shapes)
        flat = allocate(int(self._offsets[-1]))

        def put(i: int, array: np.ndarray) -> None:
            array = _as_hwc(array)
            if array.shape != tuple(shapes[i]):
                raise InputError(
                    f"{self.ids[i]}: decoded {self.kind} is {array.shape} (H, W, C) but "
                    f"{tuple(int(s) for s in shapes[i])} was expected (table size, channels of "
                    f"{self.ids[0]})"
                )
            self._slot(flat, i)[...] = self._convert(array)

        put(0, first)
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(lambda i: put(i, read_fn(i)), range(1, n)):
                pass
        return flat

    def _convert(self, array: np.ndarray) -> np.ndarray:
        if self.kind == "mask":
            return array.astype(np.uint8, copy=False)
        return to_uint16(array, what=f"store {self.name}")

    def _set_shapes(self, shapes: np.ndarray) -> None:
        self._shapes = shapes.reshape(-1, 3)
        self._offsets = np.r_[0, np.cumsum(self._shapes.prod(axis=1))].astype(np.int64)

    def _slot(self, flat: np.ndarray, i: int) -> np.ndarray:
        return flat[self._offsets[i] : self._offsets[i + 1]].reshape(self._shapes[i])

    # --- memmap --------------------------------------------------------------------------------

    @property
    def index_path(self) -> Path:
        if self.folder is None:
            raise KsegError(f"store {self.name} has no folder")
        return self.folder / f"{self.name}.json"

    def _expected_index(self, sources: Sequence[str] | None) -> dict[str, Any]:
        from kaggle_seg import __version__

        return {
            "format": INDEX_FORMAT,
            # The readers' behaviour (scaling, channel order) can change between versions.
            "kaggle_seg": __version__,
            "kind": self.kind,
            "dtype": self.stored_dtype.name,
            "ids": self.ids,
            "sources": list(sources) if sources is not None else None,
        }

    def _load_matching_index(
        self, sizes: Sequence[tuple[int, int]] | None, sources: Sequence[str] | None
    ) -> dict[str, Any] | None:
        if sources is None or not self.index_path.is_file():
            return None
        try:
            index = json.loads(self.index_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        expected = self._expected_index(sources)
        if any(index.get(key) != value for key, value in expected.items()):
            return None
        shapes = np.asarray(index.get("shapes", []), dtype=np.int64).reshape(-1, 3)
        if len(shapes) != len(self.ids):
            return None
        if sizes is not None and not np.array_equal(
            shapes[:, :2], np.asarray(sizes).reshape(-1, 2)
        ):
            return None
        data_path = self.folder / str(index.get("data_file", ""))  # type: ignore[operator]
        total = int(shapes.prod(axis=1).sum())
        if (
            not data_path.is_file()
            or data_path.stat().st_size != total * self.stored_dtype.itemsize
        ):
            return None
        index["shapes"] = shapes
        return index

    def _fill_memmap(
        self,
        read_fn: Callable[[int], np.ndarray],
        n: int,
        sizes: Sequence[tuple[int, int]] | None,
        sources: Sequence[str] | None,
        threads: int,
    ) -> None:
        from kaggle_seg.io import atomic_path

        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        index = self._load_matching_index(sizes, sources)
        if index is not None:
            self._set_shapes(index["shapes"])
            self._data_path = self.folder / index["data_file"]
            self._data = self._open(self._data_path)
            self.reused = True
            return
        self.reused = False
        self._remove_stale_temporaries()
        data_file = f"{self.name}.{uuid.uuid4().hex[:12]}.bin"
        tmp = self.folder / f".{data_file}.tmp"
        holder: dict[str, np.memmap] = {}

        def allocate(total: int) -> np.ndarray:
            # np.memmap cannot map an empty file; a 0-item store keeps an empty file anyway.
            if total == 0:
                tmp.write_bytes(b"")
                return np.empty(0, dtype=self.stored_dtype)
            holder["map"] = np.memmap(tmp, dtype=self.stored_dtype, mode="w+", shape=(total,))
            return holder["map"]

        try:
            self._decode_all(read_fn, n, sizes, threads, allocate)
            if "map" in holder:
                holder["map"].flush()
                del holder["map"]
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            # Mapped before the rename: a concurrent fill that removes this file as stale
            # cannot take the pages from under us.
            data = self._open(tmp)
            os.replace(tmp, self.folder / data_file)
        finally:
            holder.clear()
            if tmp.exists():
                tmp.unlink()
        record = {
            **self._expected_index(sources),
            "data_file": data_file,
            "shapes": self._shapes.tolist(),
        }
        with atomic_path(self.index_path) as index_tmp:
            index_tmp.write_text(json.dumps(record))
        self._data_path = self.folder / data_file
        self._data = data
        for old in self.folder.glob(f"{self.name}.*.bin"):
            if old.name != data_file and _DATA_FILE.fullmatch(old.name[len(self.name) :]):
                old.unlink(missing_ok=True)

    def _remove_stale_temporaries(self) -> None:
        assert self.folder is not None
        now = time.time()
        for tmp in self.folder.glob(f".{self.name}.*.bin.tmp"):
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                    tmp.unlink()
            except FileNotFoundError:
                pass

    def _open(self, path: Path) -> np.ndarray:
        total = int(self._offsets[-1])
        if total == 0:
            return np.empty(0, dtype=self.stored_dtype)
        return np.memmap(path, dtype=self.stored_dtype, mode="r", shape=(total,))

    # --- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Bytes held (0 for mode "none")."""
        return 0 if self._data is None else int(self._data.nbytes)

    def shape(self, i: int) -> tuple[int, int, int]:
        """(H, W, C) of item i (only once filled, and not for mode "none")."""
        return tuple(int(s) for s in self._shapes[i])  # type: ignore[return-value]

    def positions(self, ids: Iterable[str]) -> np.ndarray:
        """Slots of `ids` in this store: int64 [N]; a KsegError names the first unknown id."""
        self._require_filled()
        slots = []
        for key in ids:
            slot = self._id_to_slot.get(str(key))
            if slot is None:
                raise KsegError(f"store {self.name}: no item {key!r} (filled from another table?)")
            slots.append(slot)
        return np.asarray(slots, dtype=np.int64)

    def get(self, i: int) -> np.ndarray:
        """Item i as a new array: float32 [H, W, C] in [0, 1] (images) or uint8 [H, W, K] (masks).

        Always a copy, so transforms may write into it without touching the shared store.
        """
        self._require_filled()
        if self._data is None:
            assert self._read_fn is not None
            return _as_hwc(self._read_fn(i)).astype(self.dtype)
        view = self.view(i)
        if view.dtype == self.dtype:
            return np.array(view)
        return from_uint16(view)

    def view(self, i: int) -> np.ndarray:
        """Item i as stored, without a copy where possible: uint16 [H, W, C] images (value =
        round(65535 x pixel), see `from_uint16`), uint8 [H, W, K] masks.

        A read-only view of the shared store (copy it before writing); mode "none" decodes and
        converts a new array.
        """
        self._require_filled()
        if self._data is None:
            assert self._read_fn is not None
            return self._convert(_as_hwc(self._read_fn(i)))
        return self._data[self._offsets[i] : self._offsets[i + 1]].reshape(self._shapes[i])

    def _require_filled(self) -> None:
        if not self.filled:
            raise KsegError(f"store {self.name} is empty: call fill() before reading from it")

    # --- pickling (DataLoader workers started with "spawn") --------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if isinstance(self._data, np.memmap):
            state["_data"] = None  # reopened from the file, not shipped through the pipe
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.mode == "memmap" and self._data is None and self._data_path is not None:
            self._data = self._open(self._data_path)
