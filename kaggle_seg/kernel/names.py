"""Names that end up in Kaggle URLs or in paths: titles and their slugs, the Kaggle user name,
and paths that must stay inside their root (experiment and folder names a build turns into
paths are checked by `safe_paths.check_name(..., portable=True)`)."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any

from kaggle_seg.errors import KsegError

# Titles are kept to characters whose Kaggle slug is unambiguous.
_TITLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _-]*$")


def slugify(title: str) -> str:
    """The slug Kaggle derives from a title: lower case, each run of other characters than a-z
    and 0-9 one hyphen (python-slugify's rule, which the kaggle client checks against)."""
    text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def check_title(title: str, *, what: str = "kernel", lengths: tuple[int, int] = (5, 50)) -> str:
    """`title` checked against Kaggle's rules; returns its slug."""
    low, high = lengths
    if not low <= len(title) <= high:
        raise KsegError(f"{what} title {title!r}: Kaggle needs {low} to {high} characters")
    if not _TITLE.match(title):
        raise KsegError(
            f"{what} title {title!r}: use letters, digits, spaces, '-' and '_' only, so the "
            "slug Kaggle derives from it is the one kseg writes"
        )
    slug = slugify(title)
    if len(slug) < low:
        raise KsegError(f"{what} title {title!r}: its slug {slug!r} is under {low} characters")
    return slug


def inside(root: Path, path: Path) -> Path:
    """`path`, after checking that it resolves inside `root` (links followed); KsegError else."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise KsegError(f"{path}: resolves to {resolved}, outside {base}; nothing was written")
    return path


def kaggle_config_dirs() -> list[Path]:
    """Where kaggle.json may be: the client's folder (kaggle_config_dir) and ~/.kaggle."""
    from kaggle_seg.kaggle_client import kaggle_config_dir

    return list(dict.fromkeys([kaggle_config_dir(), Path.home() / ".kaggle"]))


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when it is missing, unreadable or not an object."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def kaggle_username(explicit: str | None = None) -> str:
    """The Kaggle user that owns the kernel and datasets: `explicit`, else $KAGGLE_USERNAME,
    else the `username` of kaggle.json or credentials.json (no key is read here)."""
    name = explicit or os.environ.get("KAGGLE_USERNAME")
    candidates = [d / "kaggle.json" for d in kaggle_config_dirs()]
    candidates.append(Path.home() / ".kaggle" / "credentials.json")
    for path in candidates:
        if name:
            break
        name = str(read_json_object(path).get("username") or "")
    if not name:
        from kaggle_seg.kaggle_client import kaggle_config_dir

        raise KsegError(
            "no Kaggle user name: pass --username, set KAGGLE_USERNAME, or keep a kaggle.json "
            f"in {kaggle_config_dir()} (where the kaggle client will look for it too)"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise KsegError(f"Kaggle user name {name!r}: letters, digits, '-' and '_' only")
    return name.lower()
