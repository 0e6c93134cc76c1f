"""Write the embedded DSB 2018 example that `kseg demo --competition dsb2018` runs on.

A reproducible sample of the CC0 stage-1 training images (BBBC038) from ../shared/data/dsb2018,
in Kaggle's layout, spread over the imaging types (fluorescence, histology, brightfield) and kept
small (under 3 MB): images are re-saved losslessly (the constant alpha dropped, grayscale as one
channel), nuclei as column-major RLE rows instead of one PNG each. 26 images are for training;
24 others form a "test" folder with a `stage1_solution.csv`, so the demo can score its
submission.

    python scripts/make_dsb_example.py [--source ../shared/data/dsb2018]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from kaggle_seg.data.rle import encode_rle

OUT = Path(__file__).resolve().parents[1] / "kaggle_seg" / "examples" / "dsb2018"
# (width, height, grayscale) -> (images drawn with SEED, the first of them taken as test images,
# test images drawn later with EXTRA_SEED from the kind's remaining images). The later draw has
# its own seed so the 26 training images and the first 8 test images stay as they were: a mAP
# over 8 images swings by about 0.05 with which 8 they are; over 24, by about half that.
KINDS = {
    (256, 256, True): (18, 4, 8),
    (320, 256, False): (7, 2, 4),
    (360, 360, True): (6, 1, 3),
    (347, 260, True): (3, 1, 1),
}
SEED = 2018
EXTRA_SEED = 2019


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=Path("../shared/data/dsb2018"))
    args = parser.parse_args()
    train_dir = args.source / "stage1_train"
    rng = np.random.default_rng(SEED)
    by_kind: dict[tuple[int, int, bool], list[str]] = {kind: [] for kind in KINDS}
    for folder in sorted(train_dir.iterdir()):
        image = cv2.imread(str(folder / "images" / f"{folder.name}.png"), cv2.IMREAD_UNCHANGED)
        rgb = image[..., :3]
        gray = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
        kind = (image.shape[1], image.shape[0], gray)
        if kind in by_kind:
            by_kind[kind].append(folder.name)
    train_rows, test_rows = [], []
    chosen_by_kind = {
        kind: sorted(rng.choice(by_kind[kind], size=n, replace=False))
        for kind, (n, _, _) in KINDS.items()
    }
    extra_rng = np.random.default_rng(EXTRA_SEED)
    splits = []
    for kind, chosen in chosen_by_kind.items():
        _, n_test, n_extra_test = KINDS[kind]
        splits += [
            (image_id, "stage1_test" if k < n_test else "stage1_train", kind)
            for k, image_id in enumerate(chosen)
        ]
        left = sorted(set(by_kind[kind]) - set(chosen))
        extra = extra_rng.choice(left, size=n_extra_test, replace=False)
        splits += [(image_id, "stage1_test", kind) for image_id in sorted(extra)]
    for image_id, split, kind in splits:
        rows = test_rows if split == "stage1_test" else train_rows
        source = train_dir / image_id
        image = cv2.imread(str(source / "images" / f"{image_id}.png"), cv2.IMREAD_UNCHANGED)
        image = image[..., 0] if kind[2] else image[..., :3]
        target = OUT / split / image_id / "images" / f"{image_id}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        height, width = image.shape[:2]
        for mask_path in sorted((source / "masks").glob("*.png")):
            nucleus = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 127
            rows.append(
                {
                    "ImageId": image_id,
                    "EncodedPixels": encode_rle(nucleus, "F"),
                    "Height": height,
                    "Width": width,
                }
            )
    train = pd.DataFrame(train_rows)
    train[["ImageId", "EncodedPixels"]].to_csv(OUT / "stage1_train_labels.csv", index=False)
    test = pd.DataFrame(test_rows).assign(Usage="Public")
    test.to_csv(OUT / "stage1_solution.csv", index=False)
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(
        f"wrote {OUT}: {train['ImageId'].nunique()} train + {test['ImageId'].nunique()} test "
        f"images, {len(train) + len(test)} nuclei, {size / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
