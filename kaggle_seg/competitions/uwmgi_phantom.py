"""Phantom UW-Madison GI data in the exact Kaggle layout, for tests and the embedded example.

No real UW-Madison scans can be shipped, so this writes volumes of organ-like shapes: a stomach
(one ellipsoid high in the abdomen), a large bowel (ascending, transverse and descending tubes) and
small-bowel loops (a cluster of small ellipsoids), inside an elliptical body, as 16-bit PNGs named
`slice_SSSS_W_H_PW_PH.png`, with `train.csv` holding row-major RLEs. Scan sizes cycle through the
real ones, the non-square 360x310 included. As in the real scans (all 1.5 mm pixels), the body has
one size in pixels whatever the scan size: a larger scan shows more of the background around it,
not a larger body (so resizing scans to one size changes the anatomy's scale, and padding keeps it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_seg.competitions.uwmgi_files import CLASSES, RLE_ORDER, slice_id
from kaggle_seg.io import write_csv_atomic

# (width, height) as in the real file names; 360x310 is the non-square scan.
SCAN_SIZES = ((266, 266), (360, 310), (276, 276), (234, 234))
# The body's scale: coordinates run -1..1 across this many pixels (a 266 x 266 scan is filled
# exactly as before; a 360 x 310 one has a wider background margin, a 234 x 234 one a narrower).
BODY_SPAN_PIXELS = 266
# Organ brightness over the body, in 16-bit units.
_ORGAN_INTENSITY = {"large_bowel": 6000.0, "small_bowel": 9000.0, "stomach": 4000.0}


def _ellipsoid(grid: tuple[np.ndarray, ...], centre, radii) -> np.ndarray:
    z, y, x = grid
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (x - centre[2]) / radii[2]
    ) ** 2 <= 1.0


def phantom_volume(
    n_slices: int, height: int, width: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One case-day: uint16 image [D, H, W] and uint8 masks [D, H, W, 3] (CLASSES order), the body
    centred and BODY_SPAN_PIXELS across whatever height x width is."""
    half = (BODY_SPAN_PIXELS - 1) / 2.0
    z = np.linspace(0.0, 1.0, n_slices)[:, None, None]
    y = ((np.arange(height) - (height - 1) / 2.0) / half)[None, :, None]
    x = ((np.arange(width) - (width - 1) / 2.0) / half)[None, None, :]
    grid = (z, y, x)
    jitter = lambda scale: rng.uniform(-scale, scale)  # noqa: E731

    body = (y / 0.7) ** 2 + (x / 0.85) ** 2 <= 1.0
    stomach = _ellipsoid(
        grid,
        (0.22 + jitter(0.05), -0.25 + jitter(0.05), 0.35 + jitter(0.05)),
        (0.2, 0.22 + jitter(0.03), 0.25 + jitter(0.03)),
    )
    tube = 0.1 + jitter(0.02)
    ascending = _ellipsoid(grid, (0.68, 0.05, -0.5 + jitter(0.05)), (0.32, tube, tube))
    transverse = _ellipsoid(grid, (0.42 + jitter(0.03), -0.3, 0.0), (0.08, tube, 0.6))
    descending = _ellipsoid(grid, (0.68, 0.05, 0.55 + jitter(0.05)), (0.32, tube, tube))
    large_bowel = ascending | transverse | descending
    small_bowel = np.zeros_like(large_bowel)
    for _ in range(int(rng.integers(5, 9))):
        centre = (rng.uniform(0.5, 0.85), rng.uniform(-0.05, 0.35), rng.uniform(-0.3, 0.3))
        radii = (rng.uniform(0.05, 0.1), rng.uniform(0.06, 0.12), rng.uniform(0.06, 0.12))
        small_bowel |= _ellipsoid(grid, centre, radii)

    masks = np.stack([large_bowel, small_bowel, stomach], axis=-1) & body[..., None]
    image = np.where(body, 8000.0, 0.0) * np.ones_like(z)
    for k, name in enumerate(CLASSES):
        image += masks[..., k] * _ORGAN_INTENSITY[name]
    image += rng.normal(0.0, 600.0, image.shape) * body
    return np.clip(image, 0, 65535).astype(np.uint16), masks.astype(np.uint8)


def make_uwmgi_phantom(
    out_dir: str | Path,
    *,
    case_days: tuple[str, ...] = (
        "case7_day0",
        "case7_day13",
        "case12_day0",
        "case30_day2",
        "case30_day5",
        "case45_day0",
        "case88_day1",
    ),
    n_slices: int = 24,
    seed: int = 0,
) -> Path:
    """Write `train.csv` and `train/<case>/<case>_<day>/scans/*.png` under `out_dir`.

    Each case gets one scan size (cycling through SCAN_SIZES); case7_day0 is included on purpose,
    since the packaged uwmgi config excludes it as a known faulty case-day.
    """
    import cv2

    from kaggle_seg.data.rle import encode_rle

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    cases = list(dict.fromkeys(cd.split("_")[0] for cd in case_days))
    rows = []
    for case_day in case_days:
        case = case_day.split("_")[0]
        width, height = SCAN_SIZES[cases.index(case) % len(SCAN_SIZES)]
        image, masks = phantom_volume(n_slices, height, width, rng)
        scans = out_dir / "train" / case / case_day / "scans"
        scans.mkdir(parents=True, exist_ok=True)
        for s in range(n_slices):
            index = s + 1
            name = f"slice_{index:04d}_{width}_{height}_1.50_1.50.png"
            if not cv2.imwrite(str(scans / name), image[s]):
                raise OSError(f"{scans / name}: could not write")
            for k, organ in enumerate(CLASSES):
                rle = encode_rle(masks[s, :, :, k], RLE_ORDER)
                rows.append({"id": slice_id(case_day, index), "class": organ, "segmentation": rle})
    write_csv_atomic(pd.DataFrame(rows), out_dir / "train.csv")
    return out_dir
