"""`kseg tune`: the command line of `kaggle_seg.tune`, for one experiment or the blended OOF of
several (`kaggle_seg.blend`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def tune(
    experiment: Annotated[
        list[Path],
        typer.Option(
            help="Experiment folder runs/<experiment>; repeat to tune the ensemble of several "
            "(their OOF blended, as kseg submit merges them)."
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write the settings (default EXP/postprocess.json)."),
    ] = None,
    max_images: Annotated[
        int | None, typer.Option(help="Tune on a sample of this many images (whole groups).")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="With several --experiment: one weight each, e.g. 1,0.5."),
    ] = None,
    blend_dir: Annotated[
        Path | None,
        typer.Option(help="With several --experiment: the blend's folder (runs/blend_<a>_<b>)."),
    ] = None,
) -> None:
    """Search thresholds, minimum areas and the empty-slice gate on the out-of-fold predictions,
    scored with the competition metric; write them for `kseg submit`."""
    from kaggle_seg.ensemble_weights import parse_weights
    from kaggle_seg.tune import tune_experiment

    target = experiment[0]
    if len(experiment) > 1 or weights is not None or blend_dir is not None:
        from kaggle_seg.blend import blend_for_tuning

        target = blend_for_tuning(experiment, parse_weights(weights), blend_dir)
    result = tune_experiment(target, out=out, max_images=max_images)
    typer.echo(
        f"OOF of folds {','.join(map(str, result.folds))} ({result.n_images} images): "
        f"CV {result.before['score']:.4f} with defaults -> {result.after['score']:.4f} tuned"
    )
    if result.empty_prediction_score:  # 0 (every group has truth) says nothing
        typer.echo(
            f"predicting nothing would score {result.empty_prediction_score:.4f} (empty truth "
            "counts 1): the floor this CV must clear"
        )
    typer.echo(f"wrote {result.path}: {result.settings.model_dump_json()}")
    if len(experiment) > 1:
        members = " ".join(f"--checkpoints {e}" for e in experiment)
        # The blend tuned is the weighted one: the submission must weigh its members the same.
        shares = f" --weights {weights}" if weights is not None else ""
        typer.echo(f"submit it with: kseg submit {members}{shares} --postprocess {result.path}")
