"""Shared fixtures: the real data beside the project, small DSB tables of it, and a small
phantom uwmgi folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path:
    """`../shared/data` beside the checkout, or $KSEG_SHARED_DATA."""
    override = os.environ.get("KSEG_SHARED_DATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set KSEG_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom uwmgi data in Kaggle layout: 7 case-days of 12 slices, 360x310 scans included."""
    from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom

    return make_uwmgi_phantom(tmp_path_factory.mktemp("uwmgi"), n_slices=12, seed=3)


@pytest.fixture(scope="session")
def write_dsb_subset(shared_data: Path):
    """write(root, n_images, n_fold0) -> root: table.csv of the first n_images 256x256 DSB
    training images and folds.csv with the first n_fold0 of them in fold 0, the rest in fold 1."""

    def write(root: Path, n_images: int, n_fold0: int) -> Path:
        import pandas as pd

        from kaggle_seg.competitions import get_competition
        from kaggle_seg.config import build_data_config

        table = get_competition("dsb2018").read_table(
            shared_data / "dsb2018", build_data_config("dsb2018")
        )
        table = table[(table["width"] == 256) & (table["height"] == 256)].head(n_images)
        table.to_csv(root / "table.csv", index=False)
        fold = [0] * n_fold0 + [1] * (len(table) - n_fold0)
        folds = pd.DataFrame({"id": table["id"], "fold": fold, "group": table["id"]})
        folds.to_csv(root / "folds.csv", index=False)
        return root

    return write


@pytest.fixture(scope="session")
def dsb_mixed(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 DSB images of three sizes (256x256, 696x520, 360x360), one of each in fold 0."""
    import pandas as pd

    from kaggle_seg.competitions import get_competition
    from kaggle_seg.config import build_data_config

    root = tmp_path_factory.mktemp("dsb_mixed")
    table = get_competition("dsb2018").read_table(
        shared_data / "dsb2018", build_data_config("dsb2018")
    )
    parts = [table[table["width"] == w].head(n) for w, n in ((256, 8), (696, 2), (360, 2))]
    table = pd.concat(parts, ignore_index=True)
    table.to_csv(root / "table.csv", index=False)
    fold = [0 if i in (0, 8, 10) else 1 for i in range(len(table))]
    folds = pd.DataFrame({"id": table["id"], "fold": fold, "group": table["id"]})
    folds.to_csv(root / "folds.csv", index=False)
    return root
