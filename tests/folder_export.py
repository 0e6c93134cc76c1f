"""Real data exported to the folder competition's layout (images/ + masks/), as a user's own
dataset would be: what the folder tests train, tune, submit and show on."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from kaggle_seg.competitions import get_competition
from kaggle_seg.config import build_data_config


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = array[..., ::-1]  # RGB -> OpenCV's BGR
    assert cv2.imwrite(str(path), array)


def export(
    competition: str, source: Path, out: Path, *, n_test: int, limit: int | None = None
) -> tuple[Path, Path]:
    """(data folder with images/, masks/ and test/images/, truth folder of the test masks):
    the competition's training rows (the first `limit`), images as 8-bit PNG and masks 0 / 255,
    the last `n_test` rows as the test set."""
    plugin = get_competition(competition)
    table = plugin.read_table(source, build_data_config(competition))
    rows = table.head(limit).to_dict("records") if limit else table.to_dict("records")
    for k, row in enumerate(rows):
        image = np.round(plugin.read_image(row) * 255).astype(np.uint8)
        mask = (plugin.read_mask(row)[..., 0] * 255).astype(np.uint8)
        test = k >= len(rows) - n_test
        name = f"{row['id']}.png"
        _write_png(out / ("test/images" if test else "images") / name, image)
        _write_png((out.parent / f"{out.name}_truth" if test else out / "masks") / name, mask)
    return out, out.parent / f"{out.name}_truth"
