"""`kseg demo`: the whole path on a small embedded example, in a few minutes on a laptop CPU.

prepare -> folds -> train a small model (fold 0) -> tune post-processing on its OOF -> predict
the held-out test images with flip TTA -> submit (validated CSV) -> score -> show.

The examples:
- dsb2018: 34 CC0 stage-1 training images shipped in the package (kaggle_seg/examples/dsb2018,
  written by scripts/make_dsb_example.py): 26 to train on, 8 as the test set with their solution.
- uwmgi: phantom scans in Kaggle's exact layout; two extra phantom cases form the hidden test,
  listed in sample_submission.csv as on Kaggle's private re-run.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from kaggle_seg.config import ExperimentConfig, save_config
from kaggle_seg.errors import KsegError
from kaggle_seg.io import write_csv_atomic

DEMO_COMPETITIONS = ("uwmgi", "dsb2018")
UWMGI_TEST_CASE_DAYS = ("case101_day0", "case101_day4", "case123_day20")


def _experiment(competition: str, out: Path, epochs: int) -> ExperimentConfig:
    """A small, quick recipe: a U-Net on an ImageNet EfficientNet-Lite0 (offline, from the
    efficientnet-lite0 wheel) with a light decoder, BCE + Dice, EMA. uwmgi: 2.5D stacks of 3
    slices resized to 160 x 160; dsb2018: nuclei + borders on native-scale 128 x 128 crops,
    whole images at validation and test, and the watershed split."""
    uwmgi = competition == "uwmgi"
    augment = (
        {"preset": "light", "height": 160, "width": 160, "resize_mode": "resize"}
        if uwmgi
        else {
            "preset": "nuclei",
            "height": 192,
            "width": 192,
            "resize_mode": "crop",
            "scale_jitter": 0.2,
        }
    )
    return ExperimentConfig.model_validate(
        {
            "name": f"demo_{competition}",
            "data": {
                "competition": competition,
                "table": str(out / "table.csv"),
                "folds": str(out / "folds.csv"),
                "n_folds": 4 if uwmgi else 5,
                "stack_depth": 3 if uwmgi else 1,
                "stack_stride": 2 if uwmgi else 1,
                "exclude_case_days": ["case7_day0"] if uwmgi else [],
                "targets": "mask" if uwmgi else "mask_border",
            },
            "augment": {**augment, "normalize": "imagenet"},
            "model": {
                "architecture": "Unet",
                "encoder": "tu-tf_efficientnet_lite0",
                "encoder_weights": "imagenet",
                "params": {"decoder_channels": [128, 64, 32, 32, 16]},
            },
            "train": {
                "epochs": epochs,
                "batch_size": 8,
                "num_workers": 0,
                "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4},
                "scheduler": {"name": "cosine", "warmup_epochs": 1},
                "loss": [{"name": "bce", "weight": 0.5}, {"name": "dice", "weight": 0.5}],
                "ema_decay": 0.99,
                "validate_every": max(1, epochs // 4),
                "oof_dtype": "uint8",
            },
        }
    )


def _uwmgi_example(root: Path) -> tuple[Path, Path, Path]:
    """(Kaggle root with train/ + test/ + sample_submission.csv, test truth CSV, test images)."""
    from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom

    make_uwmgi_phantom(root, seed=0)
    hidden = make_uwmgi_phantom(root.parent / "hidden", case_days=UWMGI_TEST_CASE_DAYS, seed=1)
    if (root / "test").exists():
        shutil.rmtree(root / "test")
    shutil.move(str(hidden / "train"), str(root / "test"))
    truth = pd.read_csv(hidden / "train.csv", dtype=str, keep_default_na=False)
    write_csv_atomic(truth[["id", "class"]].assign(predicted=""), root / "sample_submission.csv")
    truth_csv = root.parent / "test_truth.csv"
    shutil.move(str(hidden / "train.csv"), str(truth_csv))
    shutil.rmtree(hidden)
    return root, truth_csv, root / "test"


def _dsb_example(root: Path) -> tuple[Path, Path, Path]:
    """(Kaggle root with stage1_train/ + labels CSV + stage1_test/, solution CSV, test images)."""
    source = resources.files("kaggle_seg") / "examples" / "dsb2018"
    with resources.as_file(source) as folder:
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(folder, root)
    return root, root / "stage1_solution.csv", root / "stage1_test"


def run_demo(
    out: Path,
    competition: str = "uwmgi",
    *,
    epochs: int | None = None,
    device: str | None = "cpu",
) -> Iterator[str]:
    """Run the pipeline under `out`, yielding one progress line per step."""
    from kaggle_seg.prepare import folds_for_table, prepare_table
    from kaggle_seg.scoring import score_submission
    from kaggle_seg.show import show_experiment
    from kaggle_seg.submit import write_submission
    from kaggle_seg.train import train_fold
    from kaggle_seg.tune import tune_experiment

    if competition not in DEMO_COMPETITIONS:
        choices = ", ".join(DEMO_COMPETITIONS)
        raise KsegError(f"--competition {competition!r}: choose one of {choices}")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    uwmgi = competition == "uwmgi"
    epochs = epochs or (16 if uwmgi else 90)
    example = _uwmgi_example if uwmgi else _dsb_example
    root, truth_csv, test_images = example(out / "kaggle" / competition)
    yield f"example data in Kaggle's layout: {root}"

    config = _experiment(competition, out, epochs)
    summary = prepare_table(competition, root, out / "table.csv")
    yield (
        f"kseg prepare: {summary['images']} images in {summary['groups']} groups, "
        f"{summary['empty_fraction']:.1%} empty"
    )
    folds, _ = folds_for_table(
        competition, out / "table.csv", out / "folds.csv", config.data.n_folds, 42, force=True
    )
    yield f"kseg folds: sizes {folds.groupby('fold').size().tolist()}"

    save_config(config, out / f"{config.name}.yaml")
    runs = out / "runs"
    # A demo run again moves its previous run aside (fold_0.old-<time>) rather than refusing.
    result = train_fold(config, 0, run_root=runs, device=device, force=True)
    experiment = runs / config.name
    yield (
        f"kseg train --config {out / (config.name + '.yaml')} --fold 0: best score "
        f"{result.best_value:.4f} at epoch {result.best_epoch + 1} of {epochs} ({result.run_dir})"
    )

    tuned = tune_experiment(experiment)
    yield (
        f"kseg tune: CV (fold 0 OOF) {tuned.before['score']:.4f} with defaults -> "
        f"{tuned.after['score']:.4f} tuned ({tuned.path})"
    )

    csv = out / "submissions" / f"{competition}_{config.name}.csv"
    tta = "flip" if uwmgi else "d4"  # a slide has no up: all 8 orientations for nuclei
    submitted = write_submission([experiment], root, csv, tta=tta, device=device,
                                 num_workers=0)  # fmt: skip
    yield f"kseg submit ({tta} TTA): {submitted.rows} rows for {submitted.images} images -> {csv}"

    scored: dict[str, Any] = score_submission(
        competition, truth_csv, csv, test_images if uwmgi else None
    )
    if uwmgi:
        parts = f"0.4 x dice {scored['dice']:.4f} + 0.6 x (1 - hausdorff {scored['hausdorff']:.4f})"
    else:
        parts = f"mAP over {scored['n_images']} images"
    yield f"kseg score (held-out test): {scored['score']:.4f} = {parts}"

    pictures = out / "show"
    # Typical images next to the worst: what the model usually does, and where it fails.
    typical = show_experiment(experiment, pictures / "typical", typical=3)
    worst = show_experiment(experiment, pictures / "worst", worst=3)
    yield (
        f"kseg show: {len(typical)} PNGs of the 3 validation images scoring nearest the median "
        f"in {pictures / 'typical'}, {len(worst)} of the 3 worst in {pictures / 'worst'}"
    )
    from kaggle_seg.report import write_report

    yield f"kseg report: {write_report([experiment], out / 'report.html')}"
    yield (
        f"CV {tuned.after['score']:.4f}, test score {scored['score']:.4f}; "
        f"done in {(time.perf_counter() - started) / 60:.1f} min"
    )
