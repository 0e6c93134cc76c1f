"""Which competition a folder's layout belongs to, so a checkpoint used on another
competition's data is told so, rather than that some folder of its own layout is missing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

from kaggle_seg.errors import KsegError

_PEEK = 50  # entries looked at per folder: enough to recognise a layout, cheap on big folders


def _entries(folder: Path) -> list[Path]:
    try:
        return list(islice(folder.iterdir(), _PEEK))
    except OSError:
        return []


def _looks_uwmgi(folder: Path) -> bool:
    """train.csv + train/, or a folder of case folders: <case>/<case>_<day>/scans/."""
    if (folder / "train.csv").is_file() and (folder / "train").is_dir():
        return True
    cases = [p for p in _entries(folder) if p.is_dir() and p.name.startswith("case")]
    return any(next(case.glob("*/scans"), None) is not None for case in cases[:3])


def _looks_dsb2018(folder: Path) -> bool:
    if any((folder / name).exists() for name in ("stage1_train", "stage1_test", "stage1_test.zip")):
        return True
    return any(
        p.is_dir() and (p / "images" / f"{p.name}.png").is_file() for p in _entries(folder)[:10]
    )


def _looks_lgg(folder: Path) -> bool:
    if (folder / "kaggle_3m").is_dir():
        return True
    entries = _entries(folder)
    return any(p.is_dir() and p.name.startswith("TCGA_") for p in entries) or any(
        p.suffix == ".tif" for p in entries
    )


_LAYOUTS = {"uwmgi": _looks_uwmgi, "dsb2018": _looks_dsb2018, "lgg": _looks_lgg}


def guess_competition(folder: Path) -> str | None:
    """The one competition whose layout `folder` has, or None (none or several match)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    matches = [name for name, looks in _LAYOUTS.items() if looks(folder)]
    return matches[0] if len(matches) == 1 else None


def other_competition_message(expected: str, folder: Path) -> str | None:
    """One line when `folder` holds another competition's data than `expected`'s, else None."""
    found = guess_competition(folder)
    if found is None or found == expected:
        return None
    return (
        f"{folder} holds {found} data, but the checkpoints are for {expected}: the "
        "competitions differ (use checkpoints trained on this competition)"
    )


@contextmanager
def explain_other_competition(expected: str, *folders: Path) -> Iterator[None]:
    """Turn a failure to read `folders` as `expected`'s layout into "the competitions differ"
    when one of them holds another competition's data."""
    try:
        yield
    except KsegError as exc:
        for folder in folders:
            message = other_competition_message(expected, folder)
            if message:
                raise KsegError(message) from exc
        raise
