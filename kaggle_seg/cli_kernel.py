"""`kseg kernel ...`, `kseg dataset ...` and `kseg model ...`: Kaggle kernels, datasets and
Models (sub-apps of cli.py).

Wiring only, like cli.py: heavy modules and the `kaggle` client are imported inside commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kaggle_seg.errors import KsegError

kernel_app = typer.Typer(
    help="Build, rehearse, push and follow Kaggle kernels.", no_args_is_help=True
)
dataset_app = typer.Typer(help="Create or version Kaggle datasets.", no_args_is_help=True)
model_app = typer.Typer(help="Upload weights as Kaggle Model instances.", no_args_is_help=True)

KernelName = Annotated[
    str,
    typer.Argument(help="A folder written by kseg kernel build, or owner/kernel-slug."),
]
Version = Annotated[
    int | None,
    typer.Option(help="Kernel version (default: the one kseg kernel push made, else the latest)."),
]
Timeout = Annotated[float, typer.Option(help="Seconds to wait before giving up.")]
Poll = Annotated[float, typer.Option(help="Seconds between two questions to Kaggle.")]
Message = Annotated[str, typer.Option(help="Version notes.")]


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
    accelerator: Annotated[
        str,
        typer.Option(help="t4x2, l4, cpu or tpu (p100 is refused: Kaggle's torch cannot use it)."),
    ] = "t4x2",
    weights_as: Annotated[
        str,
        typer.Option(help="Ship the weights as a dataset or as a Kaggle Model instance (model)."),
    ] = "dataset",
    model: Annotated[
        str | None,
        typer.Option(
            help="With --weights-as model: model slug, owner/model or owner/model/framework/"
            "variation (default: <user>/<slug>-weights/pyTorch/default)."
        ),
    ] = None,
    docker_image: Annotated[
        str | None,
        typer.Option(help="Run on this Kaggle image (gcr.io/kaggle-images/python@sha256:...)."),
    ] = None,
    pin_image: Annotated[
        str | None,
        typer.Option(help="docker_image_pinning_type: original (the first run's image) or latest."),
    ] = None,
    tta: Annotated[
        str | None, typer.Option(help="Passed to kseg submit --tta (default: its own).")
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
    postprocess: Annotated[
        Path | None,
        typer.Option(help="An ensemble's settings (kseg tune with several --experiment)."),
    ] = None,
) -> None:
    """Write kernels/<name>/: the kernel script and metadata, a wheels dataset (kaggle_seg and
    what the Kaggle image lacks) and the weights (best.pt per fold, postprocess.json)."""
    from kaggle_seg.kernel import SubmitOptions, build_kernel, parse_folds

    build = build_kernel(
        competition,
        experiments,
        folds=parse_folds(folds),
        submit=SubmitOptions(tta=tta, batch_size=batch_size, ensemble_weights=weights),
        runs_root=runs_dir,
        out_root=out_dir,
        name=name,
        title=title,
        username=username,
        wheels_dataset=wheels_dataset,
        weights_dataset=weights_dataset,
        accelerator=accelerator,
        weights_as=weights_as,
        model=model,
        docker_image=docker_image,
        image_pinning=pin_image,
        wheels_from=wheels_from,
        repack=repack_installed,
        force=force,
        postprocess=postprocess,
    )
    typer.echo(f"wrote {build.kernel_dir} ({build.kernel_id}) in {build.seconds:.1f} s")
    shipped = ", ".join(f"{w.file} ({w.source})" for w in build.wheels) or "none"
    typer.echo(
        f"  wheels  {build.wheels_dataset}: {_megabytes(build.wheels_bytes)}; "
        f"{build.project_wheel} + {shipped}"
    )
    kind = "model  " if build.weights_as == "model" else "weights"
    typer.echo(f"  {kind} {build.weights_source}: {_megabytes(build.weights_bytes)}")
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
    image_versions: Annotated[
        str,
        typer.Option(
            help="kaggle: Kaggle's pinned versions from the registry (cached); local: this "
            "machine's (weaker)."
        ),
    ] = "kaggle",
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
        image_versions=image_versions,
        say=typer.echo,
    )
    for line in summarize_rehearsal(rehearsal):
        typer.echo(line)
    if not rehearsal.ok:
        failed = next(r for r in rehearsal.runs if not r.ok)
        raise KsegError(f"rehearsal failed: {failed.label}: {failed.problem}")


@kernel_app.command("push")
def kernel_push(
    kernel_dir: Annotated[Path, typer.Argument(help="A folder written by kseg kernel build.")],
    with_datasets: Annotated[
        bool, typer.Option(help="Push the wheels and weights datasets (or Model) first.")
    ] = False,
    wait: Annotated[bool, typer.Option(help="Wait until the new version has run.")] = False,
    message: Message = "kseg",
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the datasets to be ready.")
    ] = 1800.0,
    run_timeout: Annotated[
        float, typer.Option(help="With --wait: seconds to wait for the version's run.")
    ] = 12 * 3600.0,
    poll: Poll = 15.0,
) -> None:
    """Push the kernel once Kaggle has its datasets ready (with --with-datasets, push them
    first); with --wait, follow the new version until it has run."""
    from kaggle_seg.kernel.publish import KernelRef, push_kernel_folder, wait_for_kernel

    pushed = push_kernel_folder(
        kernel_dir,
        with_datasets=with_datasets,
        message=message,
        timeout_s=timeout,
        poll_s=poll,
        say=typer.echo,
    )
    typer.echo(f"pushed {pushed.kernel} version {pushed.version}: {pushed.url}")
    if wait:
        ref = KernelRef(pushed.kernel, pushed.version, None, Path(kernel_dir))
        wait_for_kernel(ref, timeout_s=run_timeout, poll_s=poll, say=typer.echo)
    else:
        typer.echo(f"next: kseg kernel wait {kernel_dir}")


@kernel_app.command("status")
def kernel_status(kernel: KernelName, version: Version = None) -> None:
    """Say whether the kernel version is queued, running, complete or failed (with its log's
    last lines)."""
    from kaggle_seg.kernel.publish import report_kernel, resolve_kernel

    report_kernel(resolve_kernel(kernel, version), typer.echo)


@kernel_app.command("wait")
def kernel_wait(
    kernel: KernelName,
    version: Version = None,
    timeout: Timeout = 12 * 3600.0,
    poll: Poll = 30.0,
) -> None:
    """Wait until the kernel version has run; a failed one shows its log's last lines."""
    from kaggle_seg.kernel.publish import resolve_kernel, wait_for_kernel

    wait_for_kernel(resolve_kernel(kernel, version), timeout_s=timeout, poll_s=poll, say=typer.echo)


@dataset_app.command("push")
def dataset_push(
    folder: Annotated[Path, typer.Argument(help="A folder with dataset-metadata.json.")],
    message: Message = "kseg",
    public: Annotated[bool, typer.Option(help="Make a new dataset public.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait until Kaggle has processed it.")] = False,
    timeout: Timeout = 1800.0,
    poll: Poll = 15.0,
) -> None:
    """Create the dataset, or push a new version of it."""
    from kaggle_seg.kaggle_api import push_dataset
    from kaggle_seg.kernel import DATASET_METADATA, check_no_credentials
    from kaggle_seg.kernel.publish import wait_for_datasets

    if not (Path(folder) / DATASET_METADATA).is_file():
        raise KsegError(f"{folder}: no {DATASET_METADATA} (kseg kernel build writes one)")
    check_no_credentials(Path(folder))
    typer.echo(push_dataset(Path(folder), message, public=public))
    if wait:
        import json

        ref = json.loads((Path(folder) / DATASET_METADATA).read_text())["id"]
        wait_for_datasets([ref], timeout_s=timeout, poll_s=poll, say=typer.echo)


@model_app.command("push")
def model_push(
    source: Annotated[
        Path,
        typer.Argument(help="A kernel folder built with --weights-as model, or runs/<EXP>."),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            help="For runs/<EXP>: model slug, owner/model or owner/model/framework/variation."
        ),
    ] = None,
    folds: Annotated[str | None, typer.Option(help="For runs/<EXP>: folds to upload.")] = None,
    username: Annotated[str | None, typer.Option(help="Kaggle user owning the model.")] = None,
    license_name: Annotated[str, typer.Option("--license", help="The model's licence.")] = (
        "Apache 2.0"
    ),
    message: Message = "kseg",
) -> None:
    """Upload best.pt and config.yaml per fold and postprocess.json as a new version of a Kaggle
    Model instance (owner/model/framework/variation); a kernel folder's metadata then names it."""
    from kaggle_seg.kernel import kaggle_username, parse_folds, slugify
    from kaggle_seg.kernel.build import model_handle
    from kaggle_seg.kernel.publish import push_experiment_model, push_model
    from kaggle_seg.kernel.targets import BUILD_RECORD

    if (source / BUILD_RECORD).is_file():
        if model is not None:
            raise KsegError("--model: a kernel folder's model was set by kseg kernel build")
        typer.echo(f"pushed model {push_model(source, message, license_name)}")
        return
    handle = model_handle(model, kaggle_username(username), slugify(f"kseg {source.name}"))
    pushed = push_experiment_model(
        source, handle, folds=parse_folds(folds), notes=message, license_name=license_name
    )
    typer.echo(f"pushed model {pushed}")
