"""How good is `kseg demo -c dsb2018`'s model, beyond its one figure? Run by hand, not in CI.

    python benchmarks/bench_demo.py --seeds 42,1,7 --data ../shared/data --out runs/bench_demo

For each training seed, the demo as users run it (26 embedded images, its minutes, tune on the
fold-0 OOF, d4 TTA): its CV, its test mAP on the package's 24 test images, and the mAP of the
same model on a larger held-out set: stage-1 training images of `../shared` of the example's
kinds (size and grey / colour), none of them in the example, up to --per-kind of each. The
spread over seeds and the larger set say how much one demo figure means.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

Kind = tuple[int, int, bool]  # width, height, grey


def image_kind(path: Path) -> Kind:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SystemExit(f"{path}: not a readable image")
    if image.ndim == 2:
        return image.shape[1], image.shape[0], True
    rgb = image[..., :3]
    grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return image.shape[1], image.shape[0], grey


def example_images(example: Path) -> dict[str, Kind]:
    """ImageId -> kind of every image the package's example ships (train and test)."""
    return {
        png.stem: image_kind(png)
        for split in ("stage1_train", "stage1_test")
        for png in sorted((example / split).glob("*/images/*.png"))
    }


def write_heldout_set(source: Path, dest: Path, example: Path, per_kind: int, seed: int) -> int:
    """Kaggle's layout under dest (stage1_test/ + stage1_solution.csv): up to `per_kind` stage-1
    training images of each of the example's kinds, none of them in the example."""
    shipped = example_images(example)
    kinds = set(shipped.values())
    by_kind: dict[Kind, list[str]] = {kind: [] for kind in kinds}
    for folder in sorted((source / "stage1_train").iterdir()):
        if folder.name in shipped:
            continue
        kind = image_kind(folder / "images" / f"{folder.name}.png")
        if kind in by_kind:
            by_kind[kind].append(folder.name)
    rng = np.random.default_rng(seed)
    chosen = []
    for kind in sorted(by_kind):
        ids = by_kind[kind]
        chosen += sorted(rng.choice(ids, size=min(per_kind, len(ids)), replace=False))
    if dest.exists():
        shutil.rmtree(dest)
    for image_id in chosen:
        target = dest / "stage1_test" / image_id / "images"
        target.mkdir(parents=True)
        shutil.copy2(source / "stage1_train" / image_id / "images" / f"{image_id}.png", target)
    labels = pd.read_csv(source / "stage1_train_labels.csv")
    labels[labels["ImageId"].isin(set(chosen))].to_csv(dest / "stage1_solution.csv", index=False)
    return len(chosen)


def run_seed(out: Path, seed: int, heldout: Path) -> dict:
    from kaggle_seg.demo import run_demo
    from kaggle_seg.scoring import score_submission
    from kaggle_seg.submit import write_submission

    started = time.perf_counter()
    lines = list(run_demo(out, "dsb2018", seed=seed))
    minutes = (time.perf_counter() - started) / 60
    cv, test = map(float, re.search(r"CV (\d\.\d+), test score (\d\.\d+)", lines[-1]).groups())
    n_test = int(re.search(r"mAP over (\d+) images", "\n".join(lines)).group(1))
    experiment = out / "runs" / "demo_dsb2018"
    csv = out / "heldout_submission.csv"
    write_submission([experiment], heldout, csv, tta="d4", num_workers=0)
    scored = score_submission(
        "dsb2018", heldout / "stage1_solution.csv", csv, heldout / "stage1_test"
    )
    return {
        "seed": seed,
        "demo_minutes": round(minutes, 2),
        "cv_tuned": round(cv, 4),
        "test_map": round(test, 4),
        "test_images": n_test,
        "heldout_map": round(scored["score"], 4),
        "heldout_dice": round(scored["pixel_dice"], 4),
        "heldout_images": scored["n_images"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="42,1", help="training seeds, comma-separated")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_demo"))
    parser.add_argument("--per-kind", type=int, default=30, help="held-out images per kind")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with resources.as_file(resources.files("kaggle_seg") / "examples" / "dsb2018") as example:
        heldout = args.out / "heldout"
        n = write_heldout_set(args.data / "dsb2018", heldout, example, args.per_kind, seed=0)
    print(f"held-out set: {n} stage-1 training images of the example's kinds", flush=True)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        result = run_seed(args.out / f"seed_{seed}", seed, heldout)
        print(json.dumps(result), flush=True)
        results.append(result)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(pd.DataFrame(results).to_string(index=False))


if __name__ == "__main__":
    main()
