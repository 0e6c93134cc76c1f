"""The files Kaggle reads: dataset-metadata.json, kernel-metadata.json (with the accelerator,
the sources and the optional docker image pin) and the kernel script's SETTINGS, including the
`kseg submit` arguments the kernel runs with."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kaggle_seg.errors import KsegError
from kaggle_seg.kernel.names import check_title, slugify
from kaggle_seg.kernel.targets import ACCELERATORS, KERNEL_METADATA, Accelerator, get_target

SETTINGS_LINE = "SETTINGS: dict = {}  # written by `kseg kernel build`"
IMAGE_PINNING = ("original", "latest")  # docker_image_pinning_type, as the client accepts it
_MODEL_SOURCE = re.compile(r"[A-Za-z0-9_-]+/[a-z0-9-]+/[A-Za-z0-9]+/[a-z0-9_-]+/\d+")


def dataset_metadata(
    username: str, slug: str, title: str, description: str, license_name: str
) -> dict[str, Any]:
    """dataset-metadata.json as `kaggle datasets create` reads it (one licence, 6-50 chars)."""
    if not 6 <= len(slug) <= 50:
        raise KsegError(f"dataset slug {slug!r}: Kaggle needs 6 to 50 characters")
    check_title(title, what="dataset", lengths=(6, 50))
    return {
        "title": title,
        "id": f"{username}/{slug}",
        "licenses": [{"name": license_name}],
        "description": description,
    }


def source_slug(explicit: str | None, base: str, suffix: str, what: str = "dataset") -> str:
    """`explicit`, checked to be a slug already, else `<base>-<suffix>` cut to 50 characters."""
    if explicit:
        slug = slugify(explicit)
        if slug != explicit:
            raise KsegError(f"{what} slug {explicit!r}: use lower-case letters, digits and '-'")
        return slug
    return f"{base[: 50 - len(suffix) - 1].rstrip('-')}-{suffix}"


def kernel_metadata(
    template: dict[str, Any],
    *,
    kernel_id: str,
    title: str,
    code_file: str,
    accelerator: Accelerator,
    dataset_sources: Sequence[str],
    model_sources: Sequence[str] = (),
    code_competition: bool,
    docker_image: str | None = None,
    image_pinning: str | None = None,
) -> dict[str, Any]:
    """kernel-metadata.json: the competition's template with the id, title, code file, sources
    and accelerator filled in. Booleans are the strings "true" / "false"; enable_internet is
    always written, because the client turns the internet on when it is absent."""
    meta = dict(template)
    meta.update(
        id=kernel_id,
        title=title,
        code_file=code_file,
        enable_gpu="true" if accelerator.enable_gpu else "false",
        enable_tpu="true" if accelerator.enable_tpu else "false",
        dataset_sources=list(dataset_sources),
        model_sources=list(model_sources),
    )
    meta.pop("machine_shape", None)
    if accelerator.machine_shape:
        meta["machine_shape"] = accelerator.machine_shape
    if code_competition:
        meta["enable_internet"] = "false"
    if docker_image:
        meta["docker_image"] = docker_image
    if image_pinning:
        meta["docker_image_pinning_type"] = image_pinning
    return meta


def check_kernel_metadata(meta: dict[str, Any], competition: str | None = None) -> None:
    """kernel-metadata.json as Kaggle needs it; raises KsegError naming the field at fault."""
    where = KERNEL_METADATA
    kernel_id = str(meta.get("id", ""))
    match = re.fullmatch(r"([A-Za-z0-9_-]+)/([a-z0-9-]+)", kernel_id)
    if match is None:
        raise KsegError(f"{where}: id {kernel_id!r} is not user/slug")
    title = str(meta.get("title", ""))
    if len(title) < 5:
        raise KsegError(f"{where}: title {title!r} is shorter than 5 characters")
    if slugify(title) != match.group(2):
        raise KsegError(
            f"{where}: title {title!r} makes the slug {slugify(title)!r}, not the id's "
            f"{match.group(2)!r} (Kaggle derives the slug from the title)"
        )
    if len(match.group(2)) < 5:
        raise KsegError(f"{where}: slug {match.group(2)!r} is shorter than 5 characters")
    if meta.get("language") != "python":
        raise KsegError(f"{where}: language must be python")
    if meta.get("kernel_type") not in ("script", "notebook"):
        raise KsegError(f"{where}: kernel_type must be script or notebook")
    if not meta.get("code_file"):
        raise KsegError(f"{where}: code_file is missing")
    for key in ("is_private", "enable_gpu", "enable_tpu", "enable_internet"):
        if key in meta and meta[key] not in ("true", "false"):
            raise KsegError(f'{where}: {key} must be the string "true" or "false"')
    for source in meta.get("dataset_sources", []):
        if not re.fullmatch(r"[A-Za-z0-9_-]+/[a-z0-9-]{6,50}", str(source)):
            raise KsegError(f"{where}: dataset source {source!r} is not user/slug")
    for source in meta.get("model_sources", []):
        if not _MODEL_SOURCE.fullmatch(str(source)):
            raise KsegError(
                f"{where}: model source {source!r} is not owner/model/framework/variation/version"
            )
    _check_accelerator(meta)
    pinning = meta.get("docker_image_pinning_type")
    if pinning is not None and pinning not in IMAGE_PINNING:
        raise KsegError(f"{where}: docker_image_pinning_type must be one of {IMAGE_PINNING}")
    if competition is not None:
        target = get_target(competition)
        if target.code_competition and meta.get("enable_internet") != "false":
            # Absent, the client turns the internet on, and a code competition refuses that.
            raise KsegError(f'{where}: enable_internet must be "false" for {competition}')
        if target.source not in meta.get("competition_sources", []):
            raise KsegError(f"{where}: competition_sources must name {target.source}")


def _check_accelerator(meta: dict[str, Any]) -> None:
    """A GPU session names its machine: with enable_gpu alone, Kaggle has handed out P100s."""
    where = KERNEL_METADATA
    shape = meta.get("machine_shape")
    by_shape = {a.machine_shape.lower(): a for a in ACCELERATORS.values() if a.machine_shape}
    accelerator = by_shape.get(str(shape).lower()) if shape else None
    if accelerator is not None and accelerator.refused:
        raise KsegError(f"{where}: machine_shape {shape}: {accelerator.refused}")
    if meta.get("enable_gpu") == "true" and not shape:
        raise KsegError(
            f'{where}: enable_gpu is "true" without machine_shape, so Kaggle may hand out a P100 '
            "that Kaggle's torch cannot use; rebuild with --accelerator t4x2 (or l4)"
        )


def render_script(template: str, settings: dict[str, Any]) -> str:
    """The kernel template with its SETTINGS line replaced by `settings` as a Python literal."""
    if template.count(SETTINGS_LINE) != 1:
        raise KsegError(f"kernel template: expected one line `{SETTINGS_LINE}`")
    lines = [f"    {json.dumps(key)}: {_literal(value)}," for key, value in settings.items()]
    literal = "{\n" + "\n".join(lines) + "\n}"
    return template.replace(SETTINGS_LINE, f"SETTINGS: dict = {literal}")


def _literal(value: Any) -> str:
    """A Python literal of a JSON-like value (JSON spells None and booleans differently)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    return json.dumps(value)


@dataclass(frozen=True)
class SubmitOptions:
    """What the kernel passes to `kseg submit` besides its folders and checkpoints: the same
    options `kseg submit` takes, declared here so building a kernel needs nothing of the CLI."""

    tta: str | None = None
    batch_size: int | None = None
    ensemble_weights: str | None = None  # per experiment, e.g. "1,0.5"
    postprocess: str | None = None  # settings file in the weights folder (an ensemble's)

    def arguments(self) -> list[str]:
        arguments = []
        if self.postprocess:
            arguments += ["--postprocess", f"{{weights}}/{self.postprocess}"]
        if self.ensemble_weights:
            arguments += ["--weights", self.ensemble_weights]
        if self.tta:
            arguments += ["--tta", self.tta]
        if self.batch_size:
            arguments += ["--batch-size", str(self.batch_size)]
        return arguments


def submit_arguments(experiments: Sequence[str], options: SubmitOptions) -> list[str]:
    """The kernel's `kseg submit` arguments; {data}, {weights} and {working} are filled in by
    the kernel with the folders Kaggle mounted."""
    arguments = ["--data-dir", "{data}", "--out", "{working}/submission.csv"]
    for experiment in experiments:
        arguments += ["--checkpoints", f"{{weights}}/{experiment}"]
    return arguments + options.arguments()
