"""Shared fixtures: the real data beside the project, and a small phantom uwmgi folder."""

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
