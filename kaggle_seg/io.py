"""File edges: CSV reading with errors that name the file and column, and atomic writes."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from kaggle_seg.errors import InputError, KsegError, one_line

# Write failures that are about the disk, not the data: reported naming the file being written.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def read_csv_checked(
    path: str | Path, required_columns: Sequence[str], *, keep_empty_strings: bool = True
) -> pd.DataFrame:
    """Read a CSV and check its columns; every failure names the file (and the column).

    RLE columns stay strings: empty cells become "" rather than NaN when `keep_empty_strings`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=not keep_empty_strings)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV ({one_line(exc)})") from exc
    missing = [c for c in required_columns if c not in frame.columns]
    if missing:
        found = ", ".join(one_line(repr(c)) for c in frame.columns) or "none"
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; found {found}")
    if keep_empty_strings:
        frame = frame.fillna("")
    return frame


def refuse_folder(path: Path) -> None:
    """An output file named as an existing folder (`--out runs`): one line, not the OS error
    of the rename at the end."""
    if Path(path).is_dir():
        raise KsegError(f"{path}: is a folder; name the file to write")


def _output_mode(path: Path) -> int:
    """The permission bits for `path`: those of the file it replaces, else 0o666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)  # read it: there is no other portable way
        os.umask(mask)
        return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    So an interrupted or failed command never leaves a partial output file behind. A full disk
    (or quota, read-only file system, I/O error) is a KsegError naming `path`.
    """
    path = Path(path)
    refuse_folder(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise KsegError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    try:
        # mkstemp's file is private (0o600); the output gets the mode a plain open() would give
        # it, or keeps the one of the file it replaces.
        os.fchmod(fd, _output_mode(path))
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in _DISK_ERRORS:
            raise
        raise KsegError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def write_csv_atomic(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write `frame` without its index to `path`, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def link_file(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (a copy across file systems)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def link_tree(source: Path, target: Path, skip: Sequence[str] = ()) -> None:
    """Every file under `source` linked at the same place under `target` (names `skip` left
    out); `target` exists afterwards even when `source` is empty."""
    for path in Path(source).rglob("*"):
        if path.is_file() and path.name not in skip:
            link_file(path, target / path.relative_to(source))
    target.mkdir(parents=True, exist_ok=True)
