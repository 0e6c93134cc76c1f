"""The README's N4 picture: an LGG FLAIR slice times a smooth synthetic bias field, before and
after `data.preprocess: [n4]`, with the intensity profile along one row.

    python scripts/n4_figure.py --out docs/images/n4.png   # reads $KSEG_SHARED_DATA/lgg
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SLICE = "TCGA_FG_5964_20010511/TCGA_FG_5964_20010511_20.tif"


def main() -> None:
    import tifffile
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from kaggle_seg.preprocess import foreground_mask, n4_correct

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "n4.png")
    args = parser.parse_args()
    data = Path(os.environ.get("KSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
    image = tifffile.imread(data / "lgg" / "kaggle_3m" / SLICE).astype(np.float32) / 255
    height, width = image.shape[:2]
    y, x = np.mgrid[0:height, 0:width] / np.float32(max(height, width))
    # The test's field (tests/test_preprocess.py), twice as strong so that it shows.
    bias = np.exp(1.2 * (x - 0.5) + 0.8 * (y - 0.5)).astype(np.float32)
    biased = image * bias[..., None]
    biased /= biased.max()
    corrected = n4_correct(biased)
    brain = foreground_mask(image.mean(axis=-1), "otsu")

    def variation(picture: np.ndarray) -> float:
        values = picture[..., 1][brain]
        return float(values.std() / values.mean())

    figure = Figure(figsize=(10, 3.3), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 4)
    pictures = [("original FLAIR", image), ("x smooth bias field", biased),
                ("after n4", corrected)]  # fmt: skip
    for ax, (title, picture) in zip(axes, pictures, strict=False):
        ax.imshow(picture[..., 1], cmap="gray", vmin=0, vmax=float(picture[..., 1].max()))
        ax.set_title(f"{title}\nCV in brain {variation(picture):.3f}", fontsize=9)
        ax.axhline(height // 2, color="yellow", lw=0.6)
        ax.set_axis_off()
    for title, picture in pictures:
        row = picture[height // 2, :, 1]
        axes[3].plot(row / row[brain[height // 2]].mean(), lw=1, label=title)
    axes[3].set_title("row profile / brain mean", fontsize=9)
    axes[3].legend(fontsize=7)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, format="png", dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
