"""Names that become folder or file names, and writes that stay inside their root.

An experiment name comes from a YAML file, a `--set` override or a checkpoint someone else
wrote; it becomes `runs/<name>/` and `submissions/<competition>_<name>_<date>.csv`. So it must
be one plain path component: no `..`, no separator, not absolute.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kaggle_seg.errors import KsegError

_SEPARATORS = ("/", "\\", "\0")
# Names that travel (a kernel's folders, Kaggle dataset paths): nothing hidden, nothing that a
# shell, a URL or another file system would read differently.
_PORTABLE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")


def name_problem(name: str, *, portable: bool = False) -> str | None:
    """Why `name` cannot be one folder / file name component, or None when it can.

    `portable`: also letters, digits, '_', '-', '.', '+', '=' only, not hidden (the names a
    kernel build turns into paths of its datasets)."""
    if not name or not name.strip():
        return "is empty"
    if name in (".", ".."):
        return "is a relative folder reference"
    if any(sep in name for sep in _SEPARATORS) or os.path.isabs(name):
        return "holds a path separator"
    if any(ord(ch) < 32 for ch in name):
        return "holds a control character"
    if portable and (not _PORTABLE.fullmatch(name) or ".." in name):
        return "holds other characters than letters, digits, '_', '-', '.', '+', '='"
    return None


def check_name(name: str, what: str, *, portable: bool = False) -> str:
    """`name` unchanged when it is one plain path component (see `name_problem` for
    `portable`); else a KsegError naming `what`."""
    problem = name_problem(name, portable=portable)
    if problem:
        raise KsegError(
            f"{what} {name!r} {problem}: it must be a plain folder name (no '..', '/', '\\' "
            "or absolute path), as it names a folder or file"
        )
    return name


def path_inside(root: str | Path, *parts: str) -> Path:
    """`root / parts...`, refused unless it stays inside `root`.

    Checked on the normalised path, not the resolved one: a root (or an experiment folder)
    that is a symbolic link to a bigger disk is the user's choice and stays allowed.
    """
    root = Path(root)
    candidate = root.joinpath(*parts)
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.abspath(candidate))
    if os.path.commonpath([base, target]) != base or (target == base and parts):
        raise KsegError(f"{candidate}: resolves outside {root}; refusing to write there")
    return candidate
