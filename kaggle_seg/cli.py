"""`kseg`: the command line. Wiring only: parse options, load config, call one function.

Heavy packages (torch, numba, sklearn, kaggle) are imported inside commands so `kseg --help`
starts instantly. Known errors print one line; `kseg --debug ...` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kaggle_seg import __version__
from kaggle_seg.cli_kernel import dataset_app, kernel_app
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

Competition = Annotated[
    str, typer.Option("--competition", "-c", help="uwmgi, dsb2018 or lgg.", show_default=False)
]
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
) -> None:
    """Read a competition's raw files into one table, one row per image, and summarise it."""
    from kaggle_seg.prepare import prepare_table

    summary = prepare_table(competition, data_dir, out, config, overrides or [])
    typer.echo(
        f"wrote {out}: {summary['images']} images in {summary['groups']} groups, "
        f"{summary['empty_fraction']:.1%} empty"
    )
    sizes = ", ".join(f"{size} x{n}" for size, n in summary["sizes"].items())
    typer.echo(f"sizes (W x H): {sizes}")
    if summary.get("excluded"):
        typer.echo(f"excluded by config: {', '.join(summary['excluded'])}")


@app.command()
def folds(
    competition: Competition,
    table: Annotated[Path, typer.Option(help="Table written by `kseg prepare`.")],
    out: Annotated[Path, typer.Option(help="Where to write folds.csv.")],
    n_folds: Annotated[int, typer.Option(help="Number of folds.")] = 5,
    seed: Annotated[int, typer.Option(help="Random seed of the split.")] = 42,
    force: Annotated[bool, typer.Option(help="Overwrite an existing folds file.")] = False,
) -> None:
    """Split the table into grouped, stratified folds (written once, then reused)."""
    from kaggle_seg.prepare import folds_for_table

    result, reused = folds_for_table(competition, table, out, n_folds, seed, force)
    verb = "reused" if reused else "wrote"
    counts = result.groupby("fold").size()
    typer.echo(f"{verb} {out}: " + ", ".join(f"fold {k}: {n}" for k, n in counts.items()))


@app.command()
def score(
    competition: Competition,
    truth: Annotated[Path, typer.Argument(help="Truth CSV (train.csv, stage1_solution.csv...).")],
    submission: Annotated[Path, typer.Argument(help="Submission CSV to score.")],
    images: Annotated[
        Path | None, typer.Option(help="Image folder, for sizes when the truth lacks them.")
    ] = None,
    merged_classes: Annotated[
        bool, typer.Option(help="uwmgi: score the union of the organs as one class.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Validate a submission and score it with the competition's own metric."""
    from kaggle_seg.scoring import score_submission

    result = score_submission(competition, truth, submission, images, merged_classes=merged_classes)
    # Per-image / per-slice tables stay out of the printed summary.
    printable = {k: v for k, v in result.items() if not hasattr(v, "to_csv")}
    if as_json:
        typer.echo(json.dumps(printable, default=float))
        return
    for line in _format_result(printable):
        typer.echo(line)


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", help="Experiment YAML (configs/...).")],
    fold: Annotated[int | None, typer.Option(help="The fold to train.")] = None,
    folds_list: Annotated[
        str | None, typer.Option("--folds", help="Several folds one after another: 0,1,2,3,4.")
    ] = None,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the fold's last.pt.")] = False,
    runs_dir: Annotated[Path, typer.Option(help="Root of the run folders.")] = Path("runs"),
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda (default: cuda when visible).")
    ] = None,
) -> None:
    """Train a fold (or several): runs/<experiment>/fold_<k>/ gets config, checkpoints, history
    and out-of-fold probabilities. Under `torchrun --nproc_per_node N -m kaggle_seg train ...`
    the processes share one fold with DDP."""
    from kaggle_seg.config import load_experiment
    from kaggle_seg.train import train_fold

    experiment = load_experiment(config, overrides or [])
    if (fold is None) == (folds_list is None):
        raise KsegError("pass exactly one of --fold K or --folds 0,1,2")
    try:
        to_train = [fold] if fold is not None else [int(k) for k in folds_list.split(",")]
    except ValueError:
        raise KsegError(f"--folds {folds_list!r}: expected integers like 0,1,2") from None
    for k in to_train:
        train_fold(experiment, k, run_root=runs_dir, resume=resume, device=device)


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A fold's run folder (runs/<exp>/fold_<k>).")],
    out: Annotated[Path | None, typer.Option(help="PNG path (default RUN_DIR/curves.png).")] = None,
) -> None:
    """Write the loss and metric curves of a run as PNG."""
    from kaggle_seg.plots import plot_history

    typer.echo(f"wrote {plot_history(run_dir, out)}")


def _format_result(result: dict, indent: str = "") -> list[str]:
    """Nested score dicts as indented `key: value` lines, floats to 6 places."""
    lines = []
    for key, value in result.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.extend(_format_result(value, indent + "  "))
        else:
            shown = f"{value:.6f}" if isinstance(value, float) else value
            lines.append(f"{indent}{key}: {shown}")
    return lines


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the example's files.")] = Path("runs/demo"),
    data_dir: Annotated[
        Path | None,
        typer.Option(help="A uwmgi folder (train.csv + train/); default: a generated phantom."),
    ] = None,
) -> None:
    """The main job on an example: prepare, folds, and score a stand-in prediction (uwmgi)."""
    from kaggle_seg.demo import run_demo

    for line in run_demo(out, data_dir):
        typer.echo(line)


def main() -> None:
    """Console entry point: one clear line per known error, the traceback with --debug."""
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except (KsegError, KeyError, FileNotFoundError, PermissionError) as exc:
        if debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        typer.echo(f"error: {message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        typer.echo(
            f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", err=True
        )
        sys.exit(1)
