"""`kseg`: the command line. Wiring only: parse options, load config, call one function.

Heavy packages (torch, numba, sklearn, kaggle) are imported inside commands so `kseg --help`
starts instantly. Known errors print one line; `kseg --debug ...` shows the traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from kaggle_seg import __version__
from kaggle_seg.cli_errors import run_reporting_errors
from kaggle_seg.cli_insight import explain, report
from kaggle_seg.cli_kernel import dataset_app, kernel_app, model_app
from kaggle_seg.cli_options import (
    COMPETITION_NAMES,  # noqa: F401  (tests check it names every competition)
    Checkpoints,
    Competition,
    PredictionOptions,
    check_choice,
    prediction_options,
)
from kaggle_seg.cli_pseudo import pseudo_label
from kaggle_seg.cli_score import score
from kaggle_seg.cli_tune import tune
from kaggle_seg.cli_weights import weights_app
from kaggle_seg.errors import KsegError

app = typer.Typer(
    name="kseg",
    help="Kaggle medical-image segmentation: raw competition files to a scored submission.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(kernel_app, name="kernel")
app.add_typer(dataset_app, name="dataset")
app.add_typer(model_app, name="model")
app.add_typer(weights_app, name="weights")
app.command()(explain)
app.command()(report)

ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="YAML config whose `data` section applies.")
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set data.exclude_case_days=[]."),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kseg {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """Kaggle medical-image segmentation: raw competition files to a scored submission."""


@app.command()
def prepare(
    competition: Competition,
    data_dir: Annotated[Path, typer.Option(help="The competition folder as Kaggle ships it.")],
    out: Annotated[Path, typer.Option(help="Where to write the table (CSV).")],
    config: ConfigFile = None,
    overrides: Overrides = None,
    check: Annotated[
        str | None,
        typer.Option(
            help="What to check before writing: full (decode every image and mask; the "
            "default), headers (file sizes and label RLEs) or none.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Read a competition's raw files into one table, one row per image, and summarise it."""
    from kaggle_seg.prepare import prepare_table

    summary = prepare_table(competition, data_dir, out, config, overrides or [], check=check)
    typer.echo(
        f"wrote {out}: {summary['images']} images in {summary['groups']} groups, "
        f"{summary['empty_fraction']:.1%} empty"
    )
    sizes = ", ".join(f"{size} x{n}" for size, n in summary["sizes"].items())
    typer.echo(f"sizes (W x H): {sizes}")
    if summary.get("excluded"):
        typer.echo(f"excluded by config: {', '.join(summary['excluded'])}")
    for note in summary.get("notes", []):
        typer.echo(f"note: {note}")


@app.command()
def folds(
    competition: Competition,
    table: Annotated[
        Path, typer.Option(help="Table written by `kseg prepare` for this competition.")
    ],
    out: Annotated[Path, typer.Option(help="Where to write folds.csv.")],
    n_folds: Annotated[int, typer.Option(help="Number of folds.")] = 5,
    seed: Annotated[int, typer.Option(help="Random seed of the split.")] = 42,
    force: Annotated[
        bool, typer.Option(help="Rewrite an existing folds file (another seed or fold count).")
    ] = False,
    group_by: Annotated[
        str | None,
        typer.Option(
            help="Table column(s) whose values stay in one fold, e.g. height,width (DSB image "
            "kinds); default: the table's group (case, patient, image)."
        ),
    ] = None,
) -> None:
    """Split the table into grouped, stratified folds (written once, then reused; another
    --seed or --n-folds than the file's is refused without --force)."""
    from kaggle_seg.prepare import folds_for_table

    result, reused = folds_for_table(competition, table, out, n_folds, seed, force, group_by)
    verb = "reused" if reused else "wrote"
    counts = result.groupby("fold").size()
    groups = result.groupby("fold")["group"].nunique() if "group" in result else None
    typer.echo(
        f"{verb} {out}: "
        + ", ".join(
            ("pseudo-labelled, trained in every fold" if k < 0 else f"fold {k}")
            + f": {n}"
            + ("" if groups is None or k < 0 else f" ({groups[k]} groups)")
            for k, n in counts.items()
        )
    )


app.command()(score)  # after folds, as in the workflow
app.command("pseudo-label")(pseudo_label)


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", help="Experiment YAML (configs/...).")],
    fold: Annotated[int | None, typer.Option(help="The fold to train.")] = None,
    folds_list: Annotated[
        str | None, typer.Option("--folds", help="Several folds one after another: 0,1,2,3,4.")
    ] = None,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the fold's last.pt.")] = False,
    force: Annotated[
        bool, typer.Option(help="Move a fold's previous run aside (fold_<k>.old-<time>).")
    ] = False,
    runs_dir: Annotated[Path, typer.Option(help="Root of the run folders.")] = Path("runs"),
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda (default: cuda when visible).")
    ] = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Train on every row for train.epochs, no validation, into runs/<exp>/full/ "
            "(final submissions; needs train.monitor=train_loss).",
        ),
    ] = False,
) -> None:
    """Train a fold (or several): runs/<experiment>/fold_<k>/ gets config, checkpoints, history
    and out-of-fold probabilities. Under `torchrun --nproc_per_node N -m kaggle_seg train ...`
    the processes share one fold with DDP."""
    from kaggle_seg.config import load_experiment
    from kaggle_seg.train import train_fold

    experiment = load_experiment(config, overrides or [])
    if full:
        if fold is not None or folds_list is not None:
            raise KsegError("--full trains on every row: leave out --fold / --folds")
        train_fold(
            experiment, 0, run_root=runs_dir, resume=resume, force=force, device=device, full=True
        )
        return
    if (fold is None) == (folds_list is None):
        raise KsegError("pass exactly one of --fold K or --folds 0,1,2 (or --full)")
    from kaggle_seg import runs

    if fold is not None:
        runs.parse_folds(str(fold), "--fold")  # -1 holds pseudo-labelled rows, not a fold
    to_train = [fold] if fold is not None else runs.parse_folds(folds_list) or []
    for k in to_train:
        # Rerunning an interrupted `--folds ... --resume` job: a fold it never reached has
        # nothing to resume, and starts (a lone --fold K --resume still says so and stops).
        starts = (
            resume
            and len(to_train) > 1
            and not runs.holds_run(runs.fold_dir(experiment.name, k, runs_dir))
        )
        if starts and os.environ.get("RANK", "0") == "0":
            typer.echo(f"fold {k}: no run to resume yet, training it from the start")
        train_fold(
            experiment, k, run_root=runs_dir, resume=resume and not starts, force=force,
            device=device,
        )  # fmt: skip


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A fold's run folder (runs/<exp>/fold_<k>).")],
    out: Annotated[Path | None, typer.Option(help="PNG path (default RUN_DIR/curves.png).")] = None,
) -> None:
    """Write the loss and metric curves of a run as PNG."""
    from kaggle_seg.plots import plot_history

    typer.echo(f"wrote {plot_history(run_dir, out)}")


@app.command()
@prediction_options
def predict(
    checkpoints: Checkpoints,
    test_dir: Annotated[
        Path | None, typer.Option(help="Folder of test images (Kaggle layout).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Or the competition folder: its usual test images, as kseg submit."),
    ] = None,
    save: Annotated[
        Path | None, typer.Option(help="Write probabilities here (.npz, one array per image).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="Saved probabilities: float16 or uint8.")] = "float16",
    options: PredictionOptions | None = None,
) -> None:
    """Ensemble probabilities for a folder of test images, with TTA, streamed image by image."""
    from kaggle_seg.predict_folder import predict_folder

    check_choice("--dtype", dtype, ("float16", "uint8"))
    assert options is not None  # given by prediction_options
    result = predict_folder(
        checkpoints, test_dir, save, data_dir=data_dir, dtype=dtype, **options.as_kwargs()
    )  # type: ignore[arg-type]
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports the joined file
        return
    for note in result["notes"]:
        typer.echo(f"note: {note}")
    typer.echo(
        f"predicted {result['images']} images with {result['models']} model(s), "
        f"{result['tta']} TTA, in {result['seconds']:.1f} s ({result['images_per_s']:.1f} "
        "images/s)" + (f"; wrote {result['saved']}" if result["saved"] else "")
    )
    _echo_skipped(result["skipped"])


def _echo_skipped(skipped: list) -> None:
    """`--on-error skip`: every skipped file and why, after the summary."""
    if skipped:
        typer.echo(f"skipped {len(skipped)} unreadable image(s), predicted empty:")
        for item in skipped:  # most reasons already begin with the file
            named = item.reason.startswith(f"{item.path}: ")
            typer.echo(f"  {item.reason}" if named else f"  {item.path}: {item.reason}")


app.command()(tune)


@app.command()
@prediction_options
def submit(
    checkpoints: Checkpoints = None,  # type: ignore[assignment]  # needed unless --kernel
    data_dir: Annotated[
        Path | None,
        typer.Option(help="The competition folder as Kaggle mounts it (test/ or stage1_test/)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="CSV path (default submissions/<competition>_<experiment>_<date>.csv)."),
    ] = None,
    test_dir: Annotated[
        Path | None, typer.Option(help="The test images folder, when not the usual one.")
    ] = None,
    postprocess: Annotated[
        Path | None,
        typer.Option(help="Settings JSON (default: postprocess.json beside the checkpoints)."),
    ] = None,
    upload: Annotated[
        bool, typer.Option(help="Submit the CSV to the competition through the Kaggle API.")
    ] = False,
    message: Annotated[str, typer.Option(help="Submission message for --upload.")] = "kseg",
    kernel: Annotated[
        str | None,
        typer.Option(
            help="Code competitions: submit this pushed kernel (a kseg kernel folder or "
            "owner/slug) instead of predicting here."
        ),
    ] = None,
    version: Annotated[
        int | None,
        typer.Option(help="With --kernel: its version (default: the one kseg kernel push made)."),
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="With --kernel: wait for the version to finish and the score.")
    ] = False,
    submission_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="folder: rle (an id,class,rle CSV) or png (a mask PNG per image); default: "
            "the checkpoints' data.options.submission.",
        ),
    ] = None,
    options: PredictionOptions | None = None,
) -> None:
    """Predict the test set and write a validated submission CSV in the competition's format;
    with --kernel, submit a finished version of a pushed kernel instead."""
    from kaggle_seg.submit import write_submission

    if kernel is not None:
        from kaggle_seg.submit import submit_pushed_kernel

        typer.echo(submit_pushed_kernel(kernel, version, message, wait=wait, say=typer.echo))
        return
    if not checkpoints or data_dir is None:
        raise KsegError("kseg submit needs --checkpoints and --data-dir (or --kernel)")
    assert options is not None  # given by prediction_options
    result = write_submission(
        checkpoints,
        data_dir,
        out,
        test_dir=test_dir,
        postprocess=postprocess,
        submission_format=submission_format,
        **options.as_kwargs(),
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 reports the joined file
        return
    for note in result.notes:
        typer.echo(note)
    typer.echo(
        f"wrote {result.path}: {result.rows} rows for {result.images} images in "
        f"{result.seconds:.1f} s ({result.tta} TTA; validated)"
    )
    _echo_skipped(result.skipped)
    if upload:
        from kaggle_seg.submit import upload_submission

        typer.echo(upload_submission(result.path, result.competition, message))


@app.command()
def show(
    experiment: Annotated[
        Path | None, typer.Option(help="Experiment folder: its out-of-fold predictions.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")] = Path("runs/show"),
    ids: Annotated[str | None, typer.Option(help="Comma-separated image ids.")] = None,
    random: Annotated[int | None, typer.Option(help="This many random images.")] = None,
    worst: Annotated[int | None, typer.Option(help="The N worst-scoring images.")] = None,
    typical: Annotated[
        int | None, typer.Option(help="The N images scoring nearest the median.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of --random.")] = 0,
    predictions: Annotated[
        Path | None, typer.Option(help="A probabilities .npz from `kseg predict --save`.")
    ] = None,
    table: Annotated[
        Path | None, typer.Option(help="The table those predictions' images are in.")
    ] = None,
    competition: Annotated[
        str | None,
        typer.Option("--competition", "-c", help="With --predictions and no --experiment."),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Probability threshold of the masks (default: the experiment's tuned "
            "postprocess.json, else 0.5)."
        ),
    ] = None,
) -> None:
    """Write image | truth | prediction panels and overlays as PNG (no display needed)."""
    from kaggle_seg.show import describe_masking, show_experiment, show_masking
    from kaggle_seg.show_scores import parse_ids

    if experiment is None and predictions is None:
        raise KsegError("pass --experiment runs/<experiment>, or --predictions with --table")
    masking = show_masking(experiment, threshold)  # read once: drawn with, and said
    written = show_experiment(
        experiment,
        out,
        ids=parse_ids(ids),
        random=random,
        worst=worst,
        typical=typical,
        seed=seed,
        predictions=predictions,
        table=table,
        competition=competition,
        masking=masking,
    )
    typer.echo(f"wrote {len(written)} PNG(s) to {out} (masks by {describe_masking(masking)})")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the example's files.")] = Path("runs/demo"),
    competition: Annotated[
        str, typer.Option("--competition", "-c", help="uwmgi (phantom scans) or dsb2018.")
    ] = "uwmgi",
    epochs: Annotated[
        int | None,
        typer.Option(
            help=(
                "Training epochs, all trained (default: the recipe's 16 for uwmgi, 90 for "
                "dsb2018, fitted to 2.25 minutes of training)."
            )
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(help="cpu, or cuda for a GPU (the demo's timings are for 2 CPU cores).")
    ] = "cpu",
    seed: Annotated[
        int, typer.Option(help="Training seed: another one shows how much the scores vary.")
    ] = 42,
) -> None:
    """The whole path on a small embedded example: prepare, folds, train, tune, predict with
    TTA, submit, score and show."""
    from kaggle_seg.demo import run_demo

    for line in run_demo(out, competition, epochs=epochs, device=device, seed=seed):
        typer.echo(line)


def main() -> None:
    """Console entry point: one clear line per known error, the traceback with --debug."""
    run_reporting_errors(app)
