"""Recipe benchmark: train each strong recipe within its stated budget on real data, and score it.

Run by hand (hours of CPU), not in CI:

    python benchmarks/bench_recipes.py --recipes dsb2018_cpu,baseline,lgg_cpu,uwmgi_phantom \
        --data ../shared/data --out runs/bench_recipes

Per recipe (fold 0, as `kseg train --fold 0` / `kseg tune` / `kseg submit` / `kseg score` do):
- dsb2018_cpu (configs/dsb2018_cpu.yaml): minutes of training; fold-0 OOF mAP with default
  and tuned post-processing; `kseg score` of the submission on DSB stage1_test (65 images,
  stage1_solution.csv): mAP and the pixel Dice of the nuclei unions; and both scored with the
  nuclei grown by 1 and 2 px (benchmarks/dsb_outline_width.py: how wide each set's truth
  outlines are drawn).
- baseline: the plain hand-written smp loop the recipe must beat, given the same minutes of
  training as dsb2018_cpu took (run it after dsb2018_cpu, in the same invocation): smp
  Unet-ResNet18 (random init: no ImageNet weights offline), images resized to 128 x 128, BCE +
  Dice, flips, at least 20 epochs, a 0.5 threshold and connected components for the nuclei.
  Scored on the same fold-0 validation images and on stage1_test.
- lgg_cpu (configs/lgg_cpu.yaml): LGG fold 0, mean per-patient volume Dice (Buda et al.), with
  default and tuned post-processing, and the per-image mean Dice beside it.
- uwmgi_phantom (configs/uwmgi_cpu.yaml): the phantom UW-Madison data (no real uwmgi data is
  available): trained on phantom cases, submitted on two held-out phantom case-days, scored with
  the competition metric.

Each result is printed as a JSON line and collected in OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kaggle_seg.config import load_experiment, save_config  # noqa: E402

BASELINE_SIZE = 128
BASELINE_MIN_EPOCHS = 20


def prepared(competition: str, data_dir: Path, out: Path) -> tuple[Path, Path]:
    """(table.csv, folds.csv) of `kseg prepare` + `kseg folds` (5 folds, seed 42) under out."""
    from kaggle_seg.prepare import folds_for_table, prepare_table

    out.mkdir(parents=True, exist_ok=True)
    table, folds = out / "table.csv", out / "folds.csv"
    if not table.is_file():
        prepare_table(competition, data_dir, table)
    if not folds.is_file():
        folds_for_table(competition, table, folds, 5, 42, force=False)
    return table, folds


def train_recipe(config_file: Path, table: Path, folds: Path, runs: Path, extra: list[str]):
    """Train fold 0 of a recipe; (experiment folder, training minutes, history).

    `kseg train` runs in its own process, as a user runs it: the trainer's image cache and
    state go with it, so the submission that follows does not share a process holding 16 GB
    (session 19's run was OOM-killed there).
    """
    overrides = [f"data.table={table}", f"data.folds={folds}", *extra]
    config = load_experiment(config_file, overrides)
    experiment = runs / config.name
    if experiment.exists():
        shutil.rmtree(experiment)
    command = [sys.executable, "-m", "kaggle_seg", "train", "--config", str(config_file)]
    command += ["--fold", "0", "--runs-dir", str(runs), "--device", "cpu"]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    minutes = (time.perf_counter() - started) / 60
    save_config(config, runs / f"{config.name}.yaml")
    return experiment, minutes, pd.read_csv(experiment / "fold_0" / "history.csv")


def tuned(experiment: Path) -> dict[str, Any]:
    from kaggle_seg.tune import tune_experiment

    started = time.perf_counter()
    result = tune_experiment(experiment)
    return {
        "oof_default": result.before,
        "oof_tuned": result.after,
        "tune_minutes": (time.perf_counter() - started) / 60,
    }


def dsb_stage1_score(experiments: list[Path], data: Path, out: Path, tta: str) -> dict[str, Any]:
    """kseg submit on stage1_test, then kseg score against stage1_solution.csv."""
    from kaggle_seg.scoring import score_submission
    from kaggle_seg.submit import write_submission

    started = time.perf_counter()
    csv = out / "stage1_submission.csv"
    write_submission(experiments, data / "dsb2018", csv, tta=tta, device="cpu", num_workers=1)
    scored = score_submission("dsb2018", data / "dsb2018" / "stage1_solution.csv", csv, None)
    return {
        "stage1_map": scored["score"],
        "stage1_dice": scored["pixel_dice"],
        "predict_minutes": (time.perf_counter() - started) / 60,
    }


def run_dsb(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    out = args.out / "dsb2018"
    table, folds = prepared("dsb2018", args.data / "dsb2018", out)
    experiment, minutes, history = train_recipe(
        ROOT / "configs" / "dsb2018_cpu.yaml", table, folds, out / "runs", args.set
    )
    result = {"recipe": "dsb2018_cpu", "train_minutes": minutes, "epochs": len(history)}
    result["best_valid_map"] = float(history["score"].max())
    result.update(tuned(experiment))
    result.update(dsb_stage1_score([experiment], args.data, out, args.tta))
    result["outline_width"] = outline_width(experiment, out / "stage1_submission.csv", args.data)
    return result


def outline_width(experiment: Path, submission: Path, data: Path) -> list[dict[str, Any]]:
    """benchmarks/dsb_outline_width.py's table: OOF and stage 1 with the nuclei grown 0-2 px."""
    from dsb_outline_width import outline_table  # this script's folder is on sys.path

    return outline_table(experiment, submission, data)


# ----------------------------------------------------------------------------- the baseline


def run_baseline(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """A plain smp loop: what a competitor writes in a notebook in ten minutes."""
    import cv2
    import segmentation_models_pytorch as smp
    import torch
    from scipy import ndimage

    from kaggle_seg.competitions import get_competition
    from kaggle_seg.metrics import dsb_image_score, pixel_metrics

    budget = results.get("dsb2018_cpu", {}).get("train_minutes", args.baseline_minutes)
    torch.manual_seed(0)
    competition = get_competition("dsb2018")
    out = args.out / "dsb2018"
    table_path, folds_path = prepared("dsb2018", args.data / "dsb2018", out)
    table = pd.read_csv(table_path).merge(pd.read_csv(folds_path)[["id", "fold"]], on="id")
    train_rows = table[table["fold"] != 0].to_dict("records")
    valid_rows = table[table["fold"] == 0].to_dict("records")

    def load(row: dict) -> tuple[np.ndarray, np.ndarray]:
        image = competition.read_image(row)
        mask = competition.read_mask(row)[..., 0]
        size = (BASELINE_SIZE, BASELINE_SIZE)
        return (cv2.resize(image, size, interpolation=cv2.INTER_AREA),
                cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST))  # fmt: skip

    images, masks = zip(*(load(r) for r in train_rows), strict=True)
    x_all = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    y_all = torch.from_numpy(np.stack(masks)).float()[:, None]
    model = smp.Unet("resnet18", encoder_weights=None, classes=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dice_loss = smp.losses.DiceLoss("binary")
    bce = torch.nn.BCEWithLogitsLoss()
    started, epochs = time.perf_counter(), 0
    while epochs < BASELINE_MIN_EPOCHS or (time.perf_counter() - started) / 60 < budget:
        model.train()
        order = torch.randperm(len(x_all))
        for k in range(0, len(order) - 15, 16):
            batch = order[k : k + 16]
            x, y = x_all[batch], y_all[batch]
            if torch.rand(()) < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            if torch.rand(()) < 0.5:
                x, y = x.flip(-2), y.flip(-2)
            logits = model(x)
            loss = bce(logits, y) + dice_loss(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epochs += 1
    minutes = (time.perf_counter() - started) / 60

    def predict_labels(image: np.ndarray) -> np.ndarray:
        small = cv2.resize(image, (BASELINE_SIZE, BASELINE_SIZE), interpolation=cv2.INTER_AREA)
        with torch.inference_mode():
            logits = model.eval()(torch.from_numpy(small).permute(2, 0, 1)[None].float())
        probability = torch.sigmoid(logits)[0, 0].numpy()
        full = cv2.resize(probability, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
        return ndimage.label(full > 0.5)[0]

    scores, dices = [], []
    for row in valid_rows:
        labels = predict_labels(competition.read_image(row))
        truth = competition.read_instances(row)
        scores.append(dsb_image_score(truth, labels))
        dices.append(pixel_metrics(truth > 0, labels > 0)["dice"])
    test_scores, test_dices = [], []
    solution = pd.read_csv(args.data / "dsb2018" / "stage1_solution.csv")
    test_table = competition.read_test_table(args.data / "dsb2018" / "stage1_test")
    from kaggle_seg.data.rle import decode_rles_to_labels

    for row in test_table.to_dict("records"):
        labels = predict_labels(competition.read_image(row))
        rles = solution.loc[solution["ImageId"] == row["id"], "EncodedPixels"].tolist()
        shape = (int(row["height"]), int(row["width"]))
        truth = decode_rles_to_labels(rles, shape, order="F")
        test_scores.append(dsb_image_score(truth, labels))
        test_dices.append(pixel_metrics(truth > 0, labels > 0)["dice"])
    return {
        "recipe": "baseline (smp Unet-ResNet18 @128, plain loop)",
        "train_minutes": minutes,
        "epochs": epochs,
        "oof_map": float(np.mean(scores)),
        "oof_dice": float(np.mean(dices)),
        "stage1_map": float(np.mean(test_scores)),
        "stage1_dice": float(np.mean(test_dices)),
    }


# ----------------------------------------------------------------------------- LGG, uwmgi


def run_lgg(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    out = args.out / "lgg"
    table, folds = prepared("lgg", args.data / "lgg", out)
    experiment, minutes, history = train_recipe(
        ROOT / "configs" / "lgg_cpu.yaml", table, folds, out / "runs", args.set
    )
    result = {"recipe": "lgg_cpu", "train_minutes": minutes, "epochs": len(history)}
    result["best_valid_patient_dice"] = float(history["score"].max())
    result.update(tuned(experiment))
    return result


def run_uwmgi_phantom(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom
    from kaggle_seg.scoring import score_submission
    from kaggle_seg.submit import write_submission

    out = args.out / "uwmgi_phantom"
    if out.exists():
        shutil.rmtree(out)
    root = make_uwmgi_phantom(out / "kaggle", seed=0)
    hidden = make_uwmgi_phantom(out / "hidden", case_days=("case101_day0", "case123_day20"),
                                seed=1)  # fmt: skip
    shutil.move(str(hidden / "train"), str(root / "test"))
    truth = pd.read_csv(hidden / "train.csv", dtype=str, keep_default_na=False)
    truth[["id", "class"]].assign(predicted="").to_csv(root / "sample_submission.csv", index=False)
    table, folds = prepared("uwmgi", root, out)
    experiment, minutes, history = train_recipe(
        ROOT / "configs" / "uwmgi_cpu.yaml", table, folds, out / "runs", args.set
    )
    result = {
        "recipe": "uwmgi_cpu on the phantom",
        "train_minutes": minutes,
        "epochs": len(history),
    }
    result.update(tuned(experiment))
    csv = out / "submission.csv"
    write_submission([experiment], root, csv, tta="flip", device="cpu", num_workers=1)
    scored = score_submission("uwmgi", hidden / "train.csv", csv, root / "test")
    result.update(test_score=scored["score"], test_dice=scored["dice"],
                  test_hausdorff=scored["hausdorff"])  # fmt: skip
    return result


RECIPES = {
    "dsb2018_cpu": run_dsb,
    "baseline": run_baseline,
    "lgg_cpu": run_lgg,
    "uwmgi_phantom": run_uwmgi_phantom,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_recipes")
    parser.add_argument("--tta", default="d4", help="TTA of the DSB submission")
    parser.add_argument("--baseline-minutes", type=float, default=45.0,
                        help="the baseline's budget when dsb2018_cpu is not run first")  # fmt: skip
    parser.add_argument("--set", action="append", default=[],
                        help="a config override for every recipe, e.g. train.epochs=2")  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name in args.recipes.split(","):
        if name not in RECIPES:
            raise SystemExit(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
        results[name] = RECIPES[name](args, results)
        print(json.dumps(results[name], default=float), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
