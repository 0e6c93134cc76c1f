"""Helpers shared by the kernel tests: run kseg as a user would, stand-in run folders, and
where credentials might hide. The fixtures built on them are in kernel_fixtures.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

USER = "kseg-tester"  # the fake Kaggle server's account
SENTINEL_KEY = "SENTINEL-kaggle-key-5f0c2d9e7a41"  # $KAGGLE_KEY while building
SENTINEL_JSON_KEY = "SENTINEL-json-key-93b1e0aa6c27"  # the key in ~/.kaggle/kaggle.json
ROOT = Path(__file__).resolve().parents[1]
IMAGE_FILE = ROOT / "kernels" / "kaggle_image.txt"


def kseg(*args: str, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "kaggle_seg", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment without Kaggle credentials or config, HOME moved to `home`; PYTHONPATH
    is kept (it may be how this checkout is imported) for kseg, not for the rehearsal's venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KAGGLE_") and k not in ("XDG_CONFIG_HOME",)
    }
    env["HOME"] = str(home)
    env.update(extra)
    return env


def fake_checkpoint(path: Path, experiment: str, competition: str = "uwmgi", **extra) -> Path:
    """A minimal kseg checkpoint (config, a one-tensor model, classes, channels): what build
    opens to check, without training anything."""
    import torch

    from kaggle_seg.checkpoints import save_checkpoint
    from kaggle_seg.competitions import get_competition
    from kaggle_seg.config import DataConfig, ExperimentConfig

    config = ExperimentConfig(name=experiment, data=DataConfig(competition=competition))
    state = {
        "config": config.model_dump(mode="json"),
        "model": {"w": torch.zeros(2)},
        "classes": list(get_competition(competition).classes),
        "in_channels": 3,
        **extra,
    }
    return save_checkpoint(state, path)


def fake_run(
    runs: Path, experiment: str, folds=(0, 1), postprocess: bool = True, competition: str = "uwmgi"
) -> Path:
    """runs/<exp>/fold_<k>/ with a minimal best.pt and stand-in files (build copies them)."""
    for k in folds:
        fold = runs / experiment / f"fold_{k}"
        fold.mkdir(parents=True)
        fake_checkpoint(fold / "best.pt", experiment, competition, fold=k)
        (fold / "last.pt").write_bytes(b"optimizer state")
        (fold / "config.yaml").write_text(f"name: {experiment}\n")
        (fold / "history.csv").write_text("epoch,score\n1,0.5\n")
    if postprocess:
        (runs / experiment / "postprocess.json").write_text('{"classes": {}}\n')
    return runs / experiment


def all_bytes(folder: Path) -> Iterator[tuple[str, bytes]]:
    """(place, bytes) of every file under `folder` and of every member of its zip files."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        yield str(path), path.read_bytes()
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    yield f"{path}!{name}", archive.read(name)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def user_home(root: Path) -> Path:
    """A HOME whose ~/.kaggle/kaggle.json names USER with the sentinel key."""
    home = root / "home"
    (home / ".kaggle").mkdir(parents=True, exist_ok=True)
    kaggle_json = home / ".kaggle" / "kaggle.json"
    kaggle_json.write_text(json.dumps({"username": USER, "key": SENTINEL_JSON_KEY}))
    kaggle_json.chmod(0o600)
    return home
