"""Where things live: run folders, checkpoints, records."""

from __future__ import annotations

from pathlib import Path

RUNS_ROOT = Path("runs")


def fold_dir(experiment: str, fold: int, root: Path = RUNS_ROOT) -> Path:
    """runs/<experiment>/fold_<k>/: resolved config, checkpoints, history, OOF probabilities."""
    return Path(root) / experiment / f"fold_{fold}"


def full_dir(experiment: str, root: Path = RUNS_ROOT) -> Path:
    """runs/<experiment>/full/: a `kseg train --full` run on every row, without validation."""
    return Path(root) / experiment / FULL_RUN


FULL_RUN = "full"
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
HISTORY_FILE = "history.csv"
CONFIG_FILE = "config.yaml"
OOF_FILE = "oof.npz"
POSTPROCESS_FILE = "postprocess.json"  # written by kseg tune beside the fold folders
OOF_CLASSES_FILE = "oof_classes.npz"  # classification-head models: id -> [K] probabilities
