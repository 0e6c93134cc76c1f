"""A fold's run folder is never replaced by accident, and a resume that cannot work says why.

`kseg train` on a folder that holds a run refuses unless `--resume` (continue it) or `--force`
(move it aside to `fold_<k>.old-<time>`, nothing deleted). A resume checks the checkpoint
against the config before anything is written, so a failed resume leaves the folder as it was.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kaggle_seg import paths
from kaggle_seg.errors import KsegError

# Files that make a folder hold a run: a bare config.yaml (a run stopped before its first
# epoch ended) holds nothing to lose.
RUN_FILES = (paths.LAST_CHECKPOINT, paths.BEST_CHECKPOINT, paths.HISTORY_FILE, paths.OOF_FILE)
# Config sections whose change makes the saved weights or optimizer state not fit.
_SHAPE_KEYS = (
    ("data", "competition"),
    ("data", "targets"),
    ("data", "stack_depth"),
    ("model", "architecture"),
    ("model", "encoder"),
    ("model", "params"),
    ("train", "optimizer", "name"),
    ("train", "scheduler", "name"),
)


def holds_run(run_dir: Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in RUN_FILES)


def claim_run_dir(run_dir: Path, *, resume: bool, force: bool, move: bool = True) -> Path | None:
    """Check `run_dir` may be trained into; returns where `force` moved an old run, if it did.

    `move` False (DDP ranks other than 0) checks without moving anything.
    """
    run_dir = Path(run_dir)
    if resume and force:
        raise KsegError("--resume continues the run and --force moves it aside: pass one")
    if resume:
        last = run_dir / paths.LAST_CHECKPOINT
        if not last.is_file():
            raise KsegError(
                f"--resume: no checkpoint at {last} (no epoch of this fold has finished); "
                "train without --resume"
            )
        return None
    if not holds_run(run_dir):
        return None
    if not force:
        raise KsegError(
            f"{run_dir} already holds a run: pass --resume to continue it, or --force to move "
            f"it aside (to {run_dir.name}.old-<time>) and start again"
        )
    if not move:
        return None
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    run_dir.rename(target)
    return target


def changed_keys(saved: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """The shape-giving config keys (model, targets, optimizer...) that differ, as
    `key (old -> new)`."""
    changes = []
    for keys in _SHAPE_KEYS:
        old, new = _get(saved, keys), _get(config, keys)
        if old != new:
            changes.append(f"{'.'.join(keys)} ({old!r} -> {new!r})")
    return changes


def resume_mismatch(path: Path, saved: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """One line for a checkpoint whose state does not fit the config it is resumed with."""
    changes = changed_keys(saved, config)
    what = "; ".join(changes) if changes else "the model or optimizer differs"
    return (
        f"--resume: {path} was trained with another model or optimizer than the config now "
        f"sets: {what}; restore the config, or start again with --force"
    )


def _get(tree: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    node: Any = tree
    for key in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node
