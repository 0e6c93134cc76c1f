"""The only module that knows the run folder: `runs/<experiment>/fold_<k>/` (and
`runs/<experiment>/full/` for `kseg train --full`), what it holds, and how it is found, read and
protected.

A fold folder holds config.yaml (the resolved config), best.pt and last.pt (both carry it),
history.csv, oof.npz (and oof_classes.npz for a model with a classification head); `kseg tune`
writes postprocess.json beside the fold folders. Only `fold_<k>` folders are folds: a run moved
aside by `--force` (`fold_<k>.old-<time>`) is not.

`kseg train` on a folder that holds a run refuses unless `--resume` (continue it) or `--force`
(move it aside, nothing deleted). A resume checks the checkpoint against the config before
anything is written, so a failed resume leaves the folder as it was.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kaggle_seg.errors import KsegError

RUNS_ROOT = Path("runs")
FULL_RUN = "full"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
HISTORY_FILE = "history.csv"
CONFIG_FILE = "config.yaml"
OOF_FILE = "oof.npz"
POSTPROCESS_FILE = "postprocess.json"  # written by kseg tune beside the fold folders
OOF_CLASSES_FILE = "oof_classes.npz"  # classification-head models: id -> [K] probabilities
_FOLD_DIR = re.compile(r"^fold_(\d+)$")
_MOVED_ASIDE = re.compile(r"^fold_(\d+)\.old-")  # kseg train --force: fold_<k>.old-<time>


# ---- names ------------------------------------------------------------------------------------


def fold_dir(experiment: str, fold: int, root: Path = RUNS_ROOT) -> Path:
    """runs/<experiment>/fold_<k>/: resolved config, checkpoints, history, OOF probabilities.

    Refused (one line) unless it stays inside `root`: the name comes from a config or a
    checkpoint, not necessarily the user's own.
    """
    from kaggle_seg.safe_paths import check_name, path_inside

    if int(fold) < 0:
        raise KsegError(f"fold {fold}: folds are numbered from 0")
    return path_inside(root, check_name(experiment, "experiment name"), f"fold_{int(fold)}")


def full_dir(experiment: str, root: Path = RUNS_ROOT) -> Path:
    """runs/<experiment>/full/: a `kseg train --full` run on every row, without validation;
    refused unless it stays inside `root`, as `fold_dir`."""
    from kaggle_seg.safe_paths import check_name, path_inside

    return path_inside(root, check_name(experiment, "experiment name"), FULL_RUN)


def fold_number(path: Path) -> int | None:
    """k of a `fold_<k>` folder; None for anything else (`fold_0.old-<time>` included)."""
    match = _FOLD_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_fold_dir(path: Path) -> bool:
    """`fold_<k>` exactly: a run moved aside by `kseg train --force` (fold_0.old-<time>) is not."""
    return fold_number(path) is not None


def parse_folds(text: str | None, option: str = "--folds") -> list[int] | None:
    """`0,1,2` -> [0, 1, 2]; None or empty -> None (every trained fold)."""
    if not text:
        return None
    try:
        folds = [int(k) for k in text.split(",")]
    except ValueError:
        raise KsegError(f"{option} {text!r}: expected integers like 0,1,2") from None
    if any(k < 0 for k in folds):
        raise KsegError(f"{option} {text!r}: fold numbers start at 0")
    return folds


# ---- finding runs -----------------------------------------------------------------------------


def list_folds(experiment_dir: Path, holding: str | None = None) -> list[tuple[int, Path]]:
    """(k, folder) of every `fold_<k>/` of an experiment, by k; with `holding`, only folds
    that hold that file (best.pt, oof.npz, config.yaml...). A fold folder itself gives itself,
    and so does a run moved aside (`fold_<k>.old-<time>`) when it is the folder named: only
    an experiment's listing leaves those out."""
    experiment_dir = Path(experiment_dir)
    moved = _MOVED_ASIDE.match(experiment_dir.name)
    own = fold_number(experiment_dir) if moved is None else int(moved.group(1))
    if own is not None:
        candidates = [(own, experiment_dir)]
    else:
        candidates = [(fold_number(f), f) for f in _children(experiment_dir)]
    found = []
    for k, folder in candidates:
        if k is not None and folder.is_dir() and (holding is None or (folder / holding).is_file()):
            found.append((k, folder))
    return sorted(found)


def _children(folder: Path) -> list[Path]:
    return list(folder.iterdir()) if folder.is_dir() else []


def find_checkpoints(source: str | Path) -> list[Path]:
    """Checkpoints under `source`: an experiment folder (every `fold_<k>/best.pt`), a fold
    folder (its best.pt) or a .pt file."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise KsegError(f"{source}: no such checkpoint, fold folder or experiment folder")
    if (source / BEST_CHECKPOINT).is_file():
        return [source / BEST_CHECKPOINT]
    found = [folder / BEST_CHECKPOINT for _, folder in list_folds(source, BEST_CHECKPOINT)]
    if not found:
        raise KsegError(
            f"{source}: no checkpoints (expected fold_<k>/{BEST_CHECKPOINT}); "
            "train with `kseg train` first"
        )
    return found


def experiment_folds(
    runs_root: Path, experiments: Sequence[str], folds: Sequence[int] | None
) -> dict[str, list[Path]]:
    """experiment -> its fold folders holding best.pt (`folds`, or every trained fold).
    Experiment names are plain, portable folder names: they become paths in a kernel's
    weights dataset."""
    from kaggle_seg.safe_paths import check_name

    found = {}
    for experiment in experiments:
        check_name(experiment, "--experiment", portable=True)
        run_dir = Path(runs_root) / experiment
        if not run_dir.is_dir():
            raise KsegError(
                f"{run_dir}: experiment folder not found (train it with kseg train; --runs-dir "
                "names the folder that holds it)"
            )
        trained = [folder for _, folder in list_folds(run_dir, BEST_CHECKPOINT)]
        if folds is None:
            fold_dirs = trained
            if not fold_dirs:
                started = [folder.name for _, folder in list_folds(run_dir)]
                hint = (
                    f"{', '.join(started)} not finished: a best.pt is written at its first "
                    "validation; `kseg train --resume` continues"
                    if started
                    else "train it with kseg train"
                )
                raise KsegError(f"{run_dir}: no fold_<k>/{BEST_CHECKPOINT} checkpoints ({hint})")
        else:
            fold_dirs = [run_dir / f"fold_{k}" for k in folds]
        for folder in fold_dirs:
            if not (folder / BEST_CHECKPOINT).is_file():
                listed = ", ".join(f.name for f in trained) or "none"
                raise KsegError(
                    f"{folder / BEST_CHECKPOINT}: checkpoint not found (trained folds: {listed})"
                )
        found[experiment] = fold_dirs
    return found


def read_run_config(run_dir: Path) -> Any:
    """The resolved ExperimentConfig a fold was trained with (`fold_<k>/config.yaml`)."""
    import yaml
    from pydantic import ValidationError

    from kaggle_seg.config import ExperimentConfig

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise KsegError(f"{path}: resolved config not found (not a run folder of `kseg train`?)")
    try:
        return ExperimentConfig.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise KsegError(f"{path}: not a valid experiment config ({first})") from exc


def read_run_value(run_dir: Path, *keys: str) -> Any:
    """One value of a fold's config.yaml (e.g. `"data", "preprocess"`), the rest left unchecked:
    what a reader that needs one key should not fail on (a stand-in config, an older kseg's).
    None when the file or the key is missing."""
    from kaggle_seg.config import load_yaml

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    value: Any = load_yaml(path)
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def validated_twice(path: Path, image_id: str, other: Path) -> KsegError:
    """The error for an image in two folds' oof.npz (`kseg tune` and `kseg report` refuse it)."""
    return KsegError(
        f"{path}: {image_id} is also in {other}: the folds of one experiment validate distinct "
        "images (a fold trained on another folds.csv? retrain it, or move it aside)"
    )


def read_history(run_dir: Path) -> Any:
    """A fold's history.csv as a DataFrame, None when it has none; a file that does not parse
    (emptied, cut short, edited by hand) is a KsegError naming it."""
    import pandas as pd

    from kaggle_seg.errors import one_line

    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise KsegError(f"{path}: not a readable CSV ({one_line(exc)})") from exc


def run_file(path: str | Path, run_dir: Path) -> Path:
    """A path a run's config names (data.table, data.folds): as given when it exists, else
    relative to a folder above the run (the root `kseg train` ran in)."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    for parent in Path(run_dir).resolve().parents:
        if (parent / path).is_file():
            return parent / path
    return path


def read_run_spec(run_dir: Path, config: Any = None) -> Any:
    """The ModelSpec of a fold: the one its best.pt stores (read without loading the weights),
    else built from its config (a run of an older kseg, or one before its first best.pt)."""
    from kaggle_seg.spec import ModelSpec

    config = config if config is not None else read_run_config(run_dir)
    best = Path(run_dir) / BEST_CHECKPOINT
    if best.is_file():
        from kaggle_seg.checkpoints import load_checkpoint

        return ModelSpec.from_checkpoint(load_checkpoint(best, mmap=True), config)
    from kaggle_seg.competitions import competition_for

    return ModelSpec.for_training(config, competition_for(config.data))


# ---- protecting runs --------------------------------------------------------------------------


# Files that make a folder hold a run: a bare config.yaml (a run stopped before its first
# epoch ended) holds nothing to lose.
RUN_FILES = (LAST_CHECKPOINT, BEST_CHECKPOINT, HISTORY_FILE, OOF_FILE)
# Config sections whose change makes the saved weights or optimizer state not fit.
_SHAPE_KEYS = (
    ("data", "competition"),
    ("data", "options"),
    ("data", "targets"),
    ("data", "stack_depth"),
    # The input the weights learnt on: another normalisation or preprocessing starts over.
    ("data", "preprocess"),
    ("augment", "normalize"),
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
        last = run_dir / LAST_CHECKPOINT
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
    from kaggle_seg.config import canonical_architecture

    changes = []
    for keys in _SHAPE_KEYS:
        old, new = _get(saved, keys), _get(config, keys)
        if keys == ("model", "architecture") and isinstance(old, str) and isinstance(new, str):
            old, new = canonical_architecture(old), canonical_architecture(new)
        # A key that a run of an older kseg did not write (data.options) is its empty default.
        if old != new and not (old in (None, {}, []) and new in (None, {}, [])):
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
