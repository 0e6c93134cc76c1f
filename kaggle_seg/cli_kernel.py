"""`kseg kernel ...` and `kseg dataset ...`: Kaggle kernels and datasets (sub-apps of cli.py).

Wiring only, like cli.py: heavy modules and the `kaggle` client are imported inside commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kaggle_seg.errors import KsegError

kernel_app = typer.Typer(help="Build, rehearse and push Kaggle kernels.", no_args_is_help=True)
dataset_app = typer.Typer(help="Create or version Kaggle datasets.", no_args_is_help=True)


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


@kernel_app.command("build")
def kernel_build(
    competition: Annotated[
        str, typer.Option("--competition", "-c", help="uwmgi or dsb2018.", show_default=False)
    ],
    experiments: Annotated[
        list[str],
        typer.Option(
            "--experiment", "-e", help="runs/<EXP>/ to ship (repeat to ensemble experiments)."
        ),
    ],
    folds: Annotated[
        str | None, typer.Option(help="Folds to ship, e.g. 0,1,2 (default: every trained fold).")
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="Ensemble weights per experiment, e.g. 1,0.5.")
    ] = None,
    runs_dir: Annotated[Path, typer.Option(help="Root of the run folders.")] = Path("runs"),
    out_dir: Annotated[Path, typer.Option(help="Where kernel folders go.")] = Path("kernels"),
    name: Annotated[
        str | None, typer.Option(help="Kernel folder name (default: the slug of the title).")
    ] = None,
    title: Annotated[
        str | None,
        typer.Option(help="Kernel title, 5-50 characters; Kaggle makes the slug from it."),
    ] = None,
    username: Annotated[
        str | None,
        typer.Option(help="Kaggle user (default: $KAGGLE_USERNAME or kaggle.json's username)."),
    ] = None,
    wheels_dataset: Annotated[
        str | None, typer.Option(help="Slug of the wheels dataset (default: <slug>-wheels).")
    ] = None,
    weights_dataset: Annotated[
        str | None, typer.Option(help="Slug of the weights dataset (default: <slug>-weights).")
    ] = None,
    gpu: Annotated[bool, typer.Option("--gpu/--no-gpu", help="Run on a Kaggle GPU.")] = True,
    tta: Annotated[
        str | None, typer.Option(help="Passed to kseg submit --tta (e.g. flip).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Passed to kseg submit --batch-size.")
    ] = None,
    wheels_from: Annotated[
        Path | None,
        typer.Option(help="Take dependency wheels from this folder only (offline)."),
    ] = None,
    repack_installed: Annotated[
        bool,
        typer.Option(help="Build dependency wheels from this environment instead (offline)."),
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing kernel folder.")] = False,
) -> None:
    """Write kernels/<name>/: the kernel script and metadata, a wheels dataset (kaggle_seg and
    what the Kaggle image lacks) and a weights dataset (best.pt per fold, postprocess.json)."""
    from kaggle_seg.kernel import build_kernel, parse_folds

    submit_options: list[str] = []
    if tta:
        submit_options += ["--tta", tta]
    if batch_size:
        submit_options += ["--batch-size", str(batch_size)]
    build = build_kernel(
        competition,
        experiments,
        folds=parse_folds(folds),
        ensemble_weights=weights,
        runs_root=runs_dir,
        out_root=out_dir,
        name=name,
        title=title,
        username=username,
        wheels_dataset=wheels_dataset,
        weights_dataset=weights_dataset,
        enable_gpu=gpu,
        submit_options=submit_options,
        wheels_from=wheels_from,
        repack=repack_installed,
        force=force,
    )
    typer.echo(f"wrote {build.kernel_dir} ({build.kernel_id}) in {build.seconds:.1f} s")
    shipped = ", ".join(f"{w.file} ({w.source})" for w in build.wheels) or "none"
    typer.echo(
        f"  wheels  {build.wheels_dataset}: {_megabytes(build.wheels_bytes)}; "
        f"{build.project_wheel} + {shipped}"
    )
    typer.echo(f"  weights {build.weights_dataset}: {_megabytes(build.weights_bytes)}")
    for warning in build.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"next: kseg kernel rehearse {build.kernel_dir}")


@kernel_app.command("rehearse")
def kernel_rehearse(
    kernel_dir: Annotated[Path, typer.Argument(help="A folder written by kseg kernel build.")],
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Competition folder to stage from (uwmgi default: a phantom)."),
    ] = None,
    holdout: Annotated[
        int | None,
        typer.Option(help="Train cases (uwmgi, default 2) / images (dsb2018, 8) held back."),
    ] = None,
    isolation: Annotated[
        str, typer.Option(help="auto, unshare (network namespace) or guard (socket guard).")
    ] = "auto",
    timeout: Annotated[float, typer.Option(help="Seconds allowed per run.")] = 3600.0,
    keep: Annotated[bool, typer.Option(help="Keep the temporary Kaggle-like root.")] = False,
    work_dir: Annotated[
        Path | None,
        typer.Option(help="Where the temporary root goes (best on the data's file system)."),
    ] = None,
) -> None:
    """Run the kernel as Kaggle would (offline, read-only inputs, only the image's packages plus
    the wheels dataset), with an empty and a held-back test; check submission.csv; time it."""
    from kaggle_seg.kernel import rehearse_kernel, summarize_rehearsal

    rehearsal = rehearse_kernel(
        kernel_dir,
        data_dir=data_dir,
        holdout=holdout,
        isolation=isolation,
        timeout_s=timeout,
        keep=keep,
        work_root=work_dir,
    )
    for line in summarize_rehearsal(rehearsal):
        typer.echo(line)
    if not rehearsal.ok:
        failed = next(r for r in rehearsal.runs if not r.ok)
        raise KsegError(f"rehearsal failed: {failed.label}: {failed.problem}")


@kernel_app.command("push")
def kernel_push(
    kernel_dir: Annotated[Path, typer.Argument(help="A folder written by kseg kernel build.")],
) -> None:
    """Push the kernel (push its wheels and weights datasets first: kseg dataset push)."""
    import json

    from kaggle_seg.kaggle_api import push_kernel
    from kaggle_seg.kernel import (
        KERNEL_METADATA,
        check_kernel_metadata,
        check_no_credentials,
        read_build_record,
    )

    record = read_build_record(kernel_dir)
    meta = json.loads((Path(kernel_dir) / KERNEL_METADATA).read_text())
    check_kernel_metadata(meta, record["competition"])
    check_no_credentials(Path(kernel_dir))
    typer.echo(push_kernel(Path(kernel_dir)))


@dataset_app.command("push")
def dataset_push(
    folder: Annotated[Path, typer.Argument(help="A folder with dataset-metadata.json.")],
    message: Annotated[str, typer.Option(help="Version notes.")] = "kseg",
    public: Annotated[bool, typer.Option(help="Make a new dataset public.")] = False,
) -> None:
    """Create the dataset, or push a new version of it."""
    from kaggle_seg.kaggle_api import push_dataset
    from kaggle_seg.kernel import DATASET_METADATA, check_no_credentials

    if not (Path(folder) / DATASET_METADATA).is_file():
        raise KsegError(f"{folder}: no {DATASET_METADATA} (kseg kernel build writes one)")
    check_no_credentials(Path(folder))
    typer.echo(push_dataset(Path(folder), message, public=public))
