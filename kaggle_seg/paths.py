"""Where things live: run folders, checkpoints, records."""

from __future__ import annotations

from pathlib import Path

RUNS_ROOT = Path("runs")


def fold_dir(experiment: str, fold: int, root: Path = RUNS_ROOT) -> Path:
    """runs/<experiment>/fold_<k>/: resolved config, checkpoints, history, OOF probabilities.

    Refused (one line) unless it stays inside `root`: the name comes from a config or a
    checkpoint, not necessarily the user's own.
    """
    from kaggle_seg.errors import KsegError
    from kaggle_seg.safe_paths import check_name, path_inside

    if int(fold) < 0:
        raise KsegError(f"fold {fold}: folds are numbered from 0")
    return path_inside(root, check_name(experiment, "experiment name"), f"fold_{int(fold)}")


def is_fold_dir(path: Path) -> bool:
    """`fold_<k>` exactly: a run moved aside by `kseg train --force` (fold_0.old-<time>) is not."""
    suffix = Path(path).name.removeprefix("fold_")
    return Path(path).name.startswith("fold_") and suffix.isdigit()


def full_dir(experiment: str, root: Path = RUNS_ROOT) -> Path:
    """runs/<experiment>/full/: a `kseg train --full` run on every row, without validation;
    refused unless it stays inside `root`, as `fold_dir`."""
    from kaggle_seg.safe_paths import check_name, path_inside

    return path_inside(root, check_name(experiment, "experiment name"), FULL_RUN)


FULL_RUN = "full"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
HISTORY_FILE = "history.csv"
CONFIG_FILE = "config.yaml"
OOF_FILE = "oof.npz"
POSTPROCESS_FILE = "postprocess.json"  # written by kseg tune beside the fold folders
OOF_CLASSES_FILE = "oof_classes.npz"  # classification-head models: id -> [K] probabilities
