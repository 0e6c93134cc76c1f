"""`kseg demo`: the whole path on a small embedded example, in a few minutes on a laptop CPU.

prepare -> folds -> train a small model (fold 0) -> tune post-processing on its OOF -> predict
the held-out test images with flip TTA -> submit (validated CSV) -> score -> show.

The examples:
- dsb2018: 50 CC0 stage-1 training images shipped in the package (kaggle_seg/examples/dsb2018,
  written by scripts/make_dsb_example.py): 26 to train on, 24 as the test set with their
  solution.
- uwmgi: phantom scans in Kaggle's exact layout; two extra phantom cases form the hidden test,
  listed in sample_submission.csv as on Kaggle's private re-run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kaggle_seg.competitions.base import DemoRecipe
from kaggle_seg.config import ExperimentConfig, save_config
from kaggle_seg.errors import KsegError

# `kseg demo` promises about 3 minutes on 2 CPU cores: training gets 2.25 of them (the rest,
# prepare to report, takes 20-40 s). The recipe's epochs take 1.7-2.0 min on a 2-vCPU Xeon and
# about 2.1 min on a float32-only AVX2 EPYC (benchmarks/README.md), so the budget only binds on a
# slower machine, which then trains fewer epochs, not for longer.
DEMO_TRAIN_MINUTES = 2.25


def demo_competitions() -> list[str]:
    """The competitions whose plug-in has a demo recipe (`Competition.demo`)."""
    from kaggle_seg.competitions import COMPETITIONS

    return [name for name, competition in COMPETITIONS.items() if competition.demo is not None]


def demo_experiment(
    competition: str,
    recipe: DemoRecipe,
    out: Path,
    epochs: int,
    minutes: float | None,
    seed: int = 42,
) -> ExperimentConfig:
    """A small, quick recipe: a U-Net on an ImageNet EfficientNet-Lite0 (offline, from the
    efficientnet-lite0 wheel) with a light decoder, BCE + Dice, EMA; the competition's recipe
    gives the input (uwmgi: 2.5D stacks of 3 slices on native-scale 160 x 160 crops; dsb2018:
    nuclei + borders on native-scale 192 x 192 crops and the watershed split; both validate and
    predict whole images)."""
    return ExperimentConfig.model_validate(
        {
            "name": f"demo_{competition}",
            "data": {
                "competition": competition,
                "table": str(out / "table.csv"),
                "folds": str(out / "folds.csv"),
                **recipe.data,
            },
            "augment": {**recipe.augment, "normalize": "imagenet"},
            "model": {
                "architecture": "Unet",
                "encoder": "tu-tf_efficientnet_lite0",
                "encoder_weights": "imagenet",
                "params": {"decoder_channels": list(recipe.decoder_channels)},
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
                "time_budget_minutes": minutes,
                "oof_dtype": "uint8",
                # Tuned on OOF predicted as the test is: the submission's TTA.
                "oof_tta": recipe.tta,
                "seed": seed,
            },
        }
    )


def run_demo(
    out: Path,
    competition: str = "uwmgi",
    *,
    epochs: int | None = None,
    device: str | None = "cpu",
    seed: int = 42,
) -> Iterator[str]:
    """Run the pipeline under `out`, yielding one progress line per step. `seed` is the
    training seed (the folds keep theirs): on 26 images it moves the scores by a few
    hundredths, so one run's figure is one draw (benchmarks/bench_demo.py measures the spread)."""
    from kaggle_seg.competitions import COMPETITIONS
    from kaggle_seg.prepare import folds_for_table, prepare_table
    from kaggle_seg.scoring import score_submission
    from kaggle_seg.show import show_experiment
    from kaggle_seg.submit import write_submission
    from kaggle_seg.train import train_fold
    from kaggle_seg.tune import tune_experiment

    recipe = COMPETITIONS[competition].demo if competition in COMPETITIONS else None
    if recipe is None:
        choices = ", ".join(demo_competitions())
        raise KsegError(f"--competition {competition!r}: choose one of {choices}")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Epochs asked for are trained in full; the recipe's own are fitted to the demo's minutes.
    minutes = None if epochs else DEMO_TRAIN_MINUTES
    epochs = epochs or recipe.epochs
    example = recipe.write_example(out / "kaggle" / competition)
    root = example.root
    yield f"example data in Kaggle's layout: {root}"

    config = demo_experiment(competition, recipe, out, epochs, minutes, seed)
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
        f"{result.best_value:.4f} at epoch {result.best_epoch + 1} of {len(result.history)} "
        f"({result.run_dir})"
    )

    tuned = tune_experiment(experiment)
    yield (
        f"kseg tune: CV (fold 0 OOF) {tuned.before['score']:.4f} with defaults -> "
        f"{tuned.after['score']:.4f} tuned ({tuned.path})"
    )

    csv = out / "submissions" / f"{competition}_{config.name}.csv"
    tta = recipe.tta
    submitted = write_submission([experiment], root, csv, tta=tta, device=device,
                                 num_workers=0)  # fmt: skip
    yield f"kseg submit ({tta} TTA): {submitted.rows} rows for {submitted.images} images -> {csv}"

    scored: dict[str, Any] = score_submission(
        competition, example.truth_csv, csv, example.score_images
    )
    parts = recipe.describe_score(scored)
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
    if COMPETITIONS[competition].kernel is not None:  # a Kaggle kernel is one command away
        yield (
            f"next: kseg kernel build -c {competition} -e {experiment.name} --runs-dir "
            f"{experiment.parent}, then kseg kernel rehearse <kernel> --data-dir {root}"
        )
