"""The weights a kernel ships: each fold's best.pt and config.yaml, the experiment's tuned
postprocess.json, and a manifest of checksums; never last.pt (optimizer state)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from kaggle_seg import __version__
from kaggle_seg.kernel.names import inside
from kaggle_seg.runs import BEST_CHECKPOINT, CONFIG_FILE, POSTPROCESS_FILE


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
