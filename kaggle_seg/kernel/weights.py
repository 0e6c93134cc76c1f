"""The weights a kernel ships: each fold's best.pt and config.yaml, the experiment's tuned
postprocess.json, and a manifest of checksums; never last.pt (optimizer state)."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kaggle_seg import __version__
from kaggle_seg.errors import KsegError
from kaggle_seg.kernel.names import check_path_name, inside
from kaggle_seg.paths import BEST_CHECKPOINT, CONFIG_FILE, POSTPROCESS_FILE


def parse_folds(text: str | None) -> list[int] | None:
    """`0,1,2` -> [0, 1, 2]; None or empty -> None (every trained fold)."""
    if not text:
        return None
    try:
        folds = [int(k) for k in text.split(",")]
    except ValueError:
        raise KsegError(f"--folds {text!r}: expected integers like 0,1,2") from None
    if any(k < 0 for k in folds):
        raise KsegError(f"--folds {text!r}: fold numbers start at 0")
    return folds


def _fold_number(path: Path) -> int:
    match = re.fullmatch(r"fold_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_checkpoints(
    runs_root: Path, experiments: Sequence[str], folds: Sequence[int] | None
) -> dict[str, list[Path]]:
    """experiment -> its fold folders holding best.pt (`folds`, or every trained fold).
    Experiment names are plain folder names: they become paths in the weights dataset."""
    found = {}
    for experiment in experiments:
        check_path_name(experiment, "--experiment")
        run_dir = Path(runs_root) / experiment
        if not run_dir.is_dir():
            raise KsegError(f"{run_dir}: experiment folder not found (train it with kseg train)")
        if folds is None:
            fold_dirs = sorted(
                (d for d in run_dir.glob("fold_*") if (d / BEST_CHECKPOINT).is_file()),
                key=_fold_number,
            )
            if not fold_dirs:
                raise KsegError(f"{run_dir}: no fold_<k>/{BEST_CHECKPOINT} checkpoints")
        else:
            fold_dirs = [run_dir / f"fold_{k}" for k in folds]
        for fold_dir in fold_dirs:
            if not (fold_dir / BEST_CHECKPOINT).is_file():
                raise KsegError(f"{fold_dir / BEST_CHECKPOINT}: checkpoint not found")
        found[experiment] = fold_dirs
    return found


def collect_weights(checkpoints: dict[str, list[Path]], out_dir: Path) -> dict[str, Any]:
    """Copy each fold's best.pt (weights with the config inside) and config.yaml, and the
    experiment's tuned postprocess.json, to `out_dir/<exp>/`; last.pt (optimizer state) stays
    out. Returns the manifest (kseg-weights.json)."""
    manifest: dict[str, Any] = {"kaggle_seg": __version__, "experiments": {}}
    for experiment, fold_dirs in checkpoints.items():
        entry: dict[str, Any] = {"folds": {}, "postprocess": None}
        for fold_dir in fold_dirs:
            best = fold_dir / BEST_CHECKPOINT
            target = inside(out_dir, Path(out_dir) / experiment / fold_dir.name)
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(best, target / BEST_CHECKPOINT)
            if (fold_dir / CONFIG_FILE).is_file():
                shutil.copy2(fold_dir / CONFIG_FILE, target / CONFIG_FILE)
            entry["folds"][fold_dir.name] = {"sha256": _sha256(best), "bytes": best.stat().st_size}
        postprocess = fold_dirs[0].parent / POSTPROCESS_FILE
        if postprocess.is_file():
            shutil.copy2(postprocess, Path(out_dir) / experiment / POSTPROCESS_FILE)
            entry["postprocess"] = POSTPROCESS_FILE
        manifest["experiments"][experiment] = entry
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
