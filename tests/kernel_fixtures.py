"""Fixtures of the kernel tests (a pytest plugin: `pytest_plugins = ["kernel_fixtures"]`): a
built kernel and a kernel trained on the phantom, each made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from kernel_helpers import SENTINEL_KEY, clean_env, fake_run, kseg, user_home


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kseg kernel build` as a user runs it: the username from ~/.kaggle/kaggle.json, a
    sentinel $KAGGLE_KEY, dependency wheels rebuilt from this environment (offline)."""
    root = tmp_path_factory.mktemp("kernel_build")
    fake_run(root / "runs", "tiny_unet")
    env = clean_env(user_home(root), KAGGLE_KEY=SENTINEL_KEY)
    result = kseg(
        "kernel", "build", "--competition", "uwmgi", "--experiment", "tiny_unet",
        "--runs-dir", str(root / "runs"), "--out-dir", str(root / "kernels"),
        "--repack-installed", "--tta", "flip", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wheels" in result.stdout and "MB" in result.stdout
    (kernel_dir,) = (root / "kernels").iterdir()
    return kernel_dir


@pytest.fixture(scope="session")
def trained(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch seed U-Net (4 channels, depth 2, 64x64) on the phantom: runs/<exp>/fold_0."""
    from kaggle_seg.config import load_experiment
    from kaggle_seg.prepare import folds_for_table, prepare_table
    from kaggle_seg.train import train_fold

    root = tmp_path_factory.mktemp("trained")
    prepare_table("uwmgi", phantom_dir, root / "table.csv")
    folds_for_table("uwmgi", root / "table.csv", root / "folds.csv", 2, 0, force=False)
    config = root / "tiny.yaml"
    config.write_text(f"""
name: tiny
data: {{competition: uwmgi, table: {root / "table.csv"}, folds: {root / "folds.csv"}}}
augment: {{preset: none, height: 64, width: 64}}
model: {{architecture: seed_unet, params: {{base_channels: 4, depth: 2}}}}
train: {{epochs: 1, batch_size: 16, num_workers: 0, cache: none}}
""")
    train_fold(load_experiment(config), 0, run_root=root / "runs", device="cpu")
    return root / "runs"
