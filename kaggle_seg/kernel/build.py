"""`kseg kernel build`: write kernels/<name>/ with the kernel script and metadata, a wheels
dataset, and the weights (a dataset, or a Kaggle Model instance pushed by `kseg model push`).

The folder is assembled beside its destination and renamed into place only when complete and
free of credentials, so a failed build leaves the previous one untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kaggle_seg import __version__
from kaggle_seg.ensemble_weights import check_weights, parse_weights
from kaggle_seg.errors import KsegError
from kaggle_seg.kernel.credentials import find_credentials
from kaggle_seg.kernel.metadata import (
    IMAGE_PINNING,
    SubmitOptions,
    check_kernel_metadata,
    dataset_metadata,
    kernel_metadata,
    render_script,
    source_slug,
    submit_arguments,
)
from kaggle_seg.kernel.names import (
    check_title,
    inside,
    kaggle_username,
    slugify,
)
from kaggle_seg.kernel.targets import (
    BUILD_RECORD,
    DATASET_METADATA,
    ENSEMBLE_POSTPROCESS,
    IMAGE_FILE,
    KERNEL_METADATA,
    MODEL_FRAMEWORK,
    WEIGHTS_DIR,
    WEIGHTS_MANIFEST,
    WHEELS_DIR,
    get_accelerator,
    get_target,
)
from kaggle_seg.kernel.weights import collect_weights, folder_bytes
from kaggle_seg.kernel.wheels import (
    FetchedWheel,
    build_project_wheel,
    collect_dependency_wheels,
    normalize_name,
    plan_dependency_wheels,
    read_kaggle_image,
    source_root,
    wheel_metadata,
)
from kaggle_seg.runs import experiment_folds
from kaggle_seg.safe_paths import check_name

WEIGHTS_AS = ("dataset", "model")


@dataclass
class KernelBuild:
    """What `build_kernel` wrote."""

    kernel_dir: Path
    kernel_id: str
    wheels_dataset: str
    weights_source: str  # user/slug of the weights dataset, or the model handle
    weights_as: str
    wheels: list[FetchedWheel]
    project_wheel: str
    wheels_bytes: int
    weights_bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


def model_handle(explicit: str | None, user: str, default_slug: str) -> str:
    """owner/model/framework/variation for the weights: `explicit` may give a model slug, an
    owner/model, or the whole handle; the rest defaults to <user>, pyTorch and `default`."""
    parts = (explicit or default_slug).split("/")
    if len(parts) == 1:
        parts = [user, *parts]
    if len(parts) == 2:
        parts += [MODEL_FRAMEWORK, "default"]
    if len(parts) != 4 or not all(parts):
        raise KsegError(
            f"--model {explicit!r}: expected model, owner/model or the whole handle "
            "owner/model/framework/variation"
        )
    owner, model, framework, variation = parts
    if slugify(model) != model or not 5 <= len(model) <= 50:
        raise KsegError(f"--model {explicit!r}: the model slug needs 5+ of a-z, 0-9 and '-'")
    check_name(variation, "--model variation", portable=True)
    return f"{owner.lower()}/{model}/{framework}/{variation}"


def preprocessing_needs(checkpoints: dict[str, list[Path]]) -> tuple[list[str], list[str]]:
    """(kaggle-seg extras, requirements) the shipped folds' `data.preprocess` steps need.
    Reads only that list: the rest of a fold's config is the checkpoint's business."""
    from kaggle_seg.preprocess import extra_requirements, extras_needed, resolve_steps
    from kaggle_seg.runs import CONFIG_FILE, read_run_value

    extras, requires = set(), set()
    for fold_dirs in checkpoints.values():
        for fold_dir in fold_dirs:
            steps = read_run_value(fold_dir, "data", "preprocess") or []
            try:
                resolved = resolve_steps(steps)
            except ValueError as exc:
                raise KsegError(f"{Path(fold_dir) / CONFIG_FILE}: {exc}") from None
            extras.update(extras_needed(resolved))
            requires.update(extra_requirements(resolved))
    return sorted(extras), sorted(requires)


def build_kernel(
    competition: str,
    experiments: Sequence[str],
    *,
    folds: Sequence[int] | None = None,
    submit: SubmitOptions = SubmitOptions(),
    runs_root: Path = Path("runs"),
    out_root: Path = Path("kernels"),
    name: str | None = None,
    title: str | None = None,
    username: str | None = None,
    wheels_dataset: str | None = None,
    weights_dataset: str | None = None,
    accelerator: str = "t4x2",
    weights_as: str = "dataset",
    model: str | None = None,
    docker_image: str | None = None,
    image_pinning: str | None = None,
    wheels_from: Path | None = None,
    repack: bool = False,
    force: bool = False,
    source: Path | None = None,
    postprocess: Path | None = None,
) -> KernelBuild:
    """Write `out_root/<name>/`: kernel script + metadata, the wheels dataset and the weights
    (a dataset, or the files of a Kaggle Model instance that `kseg model push` uploads).

    `postprocess`: settings for the whole ensemble (`kseg tune` with several --experiment),
    shipped at the weights folder's top and passed to `kseg submit --postprocess`; without it
    the kernel's submit takes the first experiment's postprocess.json."""
    start = time.perf_counter()
    target = get_target(competition)
    machine = get_accelerator(accelerator)
    if not experiments:
        raise KsegError("pass at least one --experiment")
    for experiment in experiments:
        check_name(experiment, "--experiment", portable=True)
    # The kernel's own `kseg submit --weights` would refuse these on Kaggle: refuse them here.
    check_weights(parse_weights(submit.ensemble_weights), len(experiments), "experiment")
    if weights_as not in WEIGHTS_AS:
        raise KsegError(f"--weights-as {weights_as!r}: choose one of {', '.join(WEIGHTS_AS)}")
    if model is not None and weights_as != "model":
        raise KsegError("--model names the Kaggle Model of --weights-as model; pass both")
    if image_pinning is not None and image_pinning not in IMAGE_PINNING:
        raise KsegError(f"--pin-image {image_pinning!r}: choose one of {', '.join(IMAGE_PINNING)}")
    root = Path(source) if source is not None else source_root()
    templates = root / "kernels" / "templates" / competition
    image = read_kaggle_image(root / "kernels" / IMAGE_FILE)
    user = kaggle_username(username)
    title = title or f"kseg {competition} {' '.join(experiments)}"[:50].rstrip(" _-")
    slug = check_title(title)
    name = name or slug
    if name == "templates":
        raise KsegError("--name templates: that folder holds kseg's kernel templates")
    check_name(name, "--name", portable=True)
    kernel_dir = inside(out_root, Path(out_root) / name)
    if kernel_dir.exists() and not force:
        raise KsegError(f"{kernel_dir} exists; pass --force to rebuild it")
    if len(set(experiments)) != len(experiments):
        twice = next(e for e in experiments if experiments.count(e) > 1)
        raise KsegError(f"--experiment {twice} given twice: the kernel would predict it twice")
    if submit.tta is not None and submit.tta not in TTA_NAMES:
        raise KsegError(f"--tta {submit.tta!r}: choose one of {', '.join(TTA_NAMES)}")
    checkpoints = experiment_folds(runs_root, experiments, folds)
    check_shipped_checkpoints(checkpoints, competition)
    wheels_slug = source_slug(wheels_dataset, slug, "wheels")
    weights_slug = source_slug(weights_dataset, slug, "weights")
    handle = model_handle(model, user, weights_slug) if weights_as == "model" else None
    warnings = [machine.note] if machine.note else []

    Path(out_root).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_root))
    try:
        wheels_dir = staging / WHEELS_DIR
        project_wheel = build_project_wheel(root, wheels_dir)
        project_name, project_version, requires = wheel_metadata(project_wheel)
        # Preprocessing steps that need more than kaggle-seg's own dependencies (n4: SimpleITK)
        # ship those wheels too, and the kernel installs kaggle-seg with that extra.
        extras, extra_requires = preprocessing_needs(checkpoints)
        needs = plan_dependency_wheels([*requires, *extra_requires], image)
        fetched = collect_dependency_wheels(
            needs, wheels_dir, wheels_from=wheels_from, repack=repack
        )
        warnings += [
            f"{w.file} is built for this Python and platform: Kaggle's must match"
            for w in fetched
            if not w.pure
        ]
        with_extras = f"[{','.join(extras)}]" if extras else ""
        requirement = f"{normalize_name(project_name)}{with_extras}=={project_version}"
        listing = "\n".join(f"- {w.file}: {w.reason}" for w in fetched) or "- (none)"
        write_json(
            wheels_dir / DATASET_METADATA,
            dataset_metadata(
                user,
                wheels_slug,
                wheels_slug.replace("-", " "),
                f"Offline install of {requirement} for the Kaggle kernel {user}/{slug}: "
                f"`pip install --no-index --find-links <this folder> {requirement}`. "
                f"Wheels the Kaggle image lacks:\n{listing}\n"
                "Each wheel keeps its own licence (see its METADATA).",
                "other",
            ),
        )
        weights_dir = staging / WEIGHTS_DIR
        manifest = collect_weights(checkpoints, weights_dir)
        if postprocess is not None:
            from kaggle_seg.postprocess import load_postprocess

            load_postprocess(postprocess)  # a file that does not parse is named here, not on Kaggle
            shutil.copy2(postprocess, weights_dir / ENSEMBLE_POSTPROCESS)
            manifest["postprocess"] = ENSEMBLE_POSTPROCESS
            submit = replace(submit, postprocess=ENSEMBLE_POSTPROCESS)
        elif len(experiments) == 1 and not manifest["experiments"][experiments[0]]["postprocess"]:
            warnings.append(
                f"{experiments[0]} has no postprocess.json: the kernel predicts with untuned "
                f"defaults (threshold 0.5); `kseg tune --experiment {runs_root}/{experiments[0]}` "
                "first"
            )
        elif len(experiments) > 1:
            warnings.append(
                "an ensemble without --postprocess: the kernel's kseg submit takes the first "
                "experiment's settings; `kseg tune` with every --experiment tunes the ensemble's"
            )
        write_json(weights_dir / WEIGHTS_MANIFEST, manifest)
        about = (
            f"kaggle_seg checkpoints (best.pt per fold, config inside) and tuned "
            f"post-processing of {', '.join(experiments)} for {target.source}."
        )
        if handle is None:
            write_json(
                weights_dir / DATASET_METADATA,
                dataset_metadata(
                    user, weights_slug, weights_slug.replace("-", " "), about, "CC0-1.0"
                ),
            )
        settings = {
            "competition": competition,
            "competition_source": target.source,
            "wheels_source": wheels_slug,
            "weights_source": weights_slug if handle is None else None,
            "weights_model": handle,
            "requirement": requirement,
            "submit_args": submit_arguments(experiments, submit),
        }
        code_file = f"{name}.py"
        # One script for every competition: what differs is in SETTINGS and the metadata.
        template = (templates.parent / "kernel.py").read_text()
        (staging / code_file).write_text(render_script(template, settings))
        datasets = [f"{user}/{wheels_slug}"]
        if handle is None:
            datasets.append(f"{user}/{weights_slug}")
        meta = kernel_metadata(
            json.loads((templates / KERNEL_METADATA).read_text()),
            kernel_id=f"{user}/{slug}",
            title=title,
            code_file=code_file,
            accelerator=machine,
            dataset_sources=datasets,
            code_competition=target.code_competition,
            docker_image=docker_image,
            image_pinning=image_pinning,
        )
        check_kernel_metadata(meta, competition)
        write_json(staging / KERNEL_METADATA, meta)
        weights_record: dict[str, Any] = {"dir": WEIGHTS_DIR, "as": weights_as}
        if handle is None:
            weights_record["dataset"] = f"{user}/{weights_slug}"
        else:
            weights_record.update(model=handle, version=None, about=about)
        record = {
            "kaggle_seg": __version__,
            "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "competition": competition,
            "kernel": f"{user}/{slug}",
            "code_file": code_file,
            "requirement": requirement,
            "project_wheel": project_wheel.name,
            "accelerator": machine.name,
            "wheels": {"dir": WHEELS_DIR, "dataset": f"{user}/{wheels_slug}"},
            "weights": weights_record,
            "experiments": list(experiments),
            "dependency_wheels": [asdict(w) for w in fetched],
            "image_packages": image,
        }
        if kernel_dir.exists():  # --force: what was pushed and submitted before stays on record
            record["earlier_builds"] = earlier_builds(kernel_dir)
        write_json(staging / BUILD_RECORD, record)

        problems = find_credentials(staging)
        if problems:
            raise KsegError(
                f"a Kaggle credential got into the build ({'; '.join(problems[:3])}); "
                "nothing was written"
            )
        if kernel_dir.exists():
            shutil.rmtree(kernel_dir)
        os.replace(staging, kernel_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return KernelBuild(
        kernel_dir=kernel_dir,
        kernel_id=f"{user}/{slug}",
        wheels_dataset=f"{user}/{wheels_slug}",
        weights_source=handle or f"{user}/{weights_slug}",
        weights_as=weights_as,
        wheels=fetched,
        project_wheel=project_wheel.name,
        wheels_bytes=folder_bytes(kernel_dir / WHEELS_DIR),
        weights_bytes=folder_bytes(kernel_dir / WEIGHTS_DIR),
        seconds=time.perf_counter() - start,
        warnings=warnings,
    )


# `kseg submit --tta` choices (kaggle_seg.tta.TTA_MODES; written out so a build imports no torch
# before it needs to; tests/test_kernel_build.py checks they agree).
TTA_NAMES = ("none", "hflip", "flip", "d4")


def check_shipped_checkpoints(checkpoints: dict[str, list[Path]], competition: str) -> None:
    """Each best.pt opens through kseg's safe loader and was trained for `competition`: what
    the kernel's `kseg submit` would refuse on Kaggle, refused here in one line."""
    from kaggle_seg.checkpoints import checkpoint_config, load_checkpoint
    from kaggle_seg.runs import BEST_CHECKPOINT

    for fold_dirs in checkpoints.values():
        for fold_dir in fold_dirs:
            path = fold_dir / BEST_CHECKPOINT
            trained_for = checkpoint_config(load_checkpoint(path, mmap=True), path).data.competition
            if trained_for != competition:
                raise KsegError(f"{path}: trained for {trained_for}, not -c {competition}")


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_build_record(kernel_dir: Path) -> dict[str, Any]:
    """kseg-kernel.json of a built kernel folder; KsegError when it is not one."""
    path = Path(kernel_dir) / BUILD_RECORD
    if not path.is_file():
        raise KsegError(
            f"{kernel_dir}: not a built kernel ({BUILD_RECORD} missing; kseg kernel build)"
        )
    return json.loads(path.read_text())


def earlier_builds(kernel_dir: Path) -> list[dict[str, Any]]:
    """The history a rebuild keeps from the build it replaces: each earlier build's date,
    experiments, pushed version and submissions (kseg kernel submit reads only the current
    build's `pushed`, so an old version is never submitted for a new build by mistake)."""
    path = Path(kernel_dir) / BUILD_RECORD
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # a damaged record is replaced, as the rest of the folder is
    keep = ("built", "kernel", "experiments", "pushed", "submissions")
    return [*old.get("earlier_builds", []), {k: old[k] for k in keep if k in old}]


def update_build_record(kernel_dir: Path, **changes: Any) -> dict[str, Any]:
    """Merge `changes` into kseg-kernel.json (what push and submit learn) and return it."""
    record = read_build_record(kernel_dir)
    record.update(changes)
    write_json(Path(kernel_dir) / BUILD_RECORD, record)
    return record
