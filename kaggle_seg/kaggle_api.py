"""Publishing through the official `kaggle` client (and kagglehub for Kaggle Models): datasets,
kernels, their status and logs, submissions, Model instances. Each call is one request or one
client method, under `kaggle_errors` (see kaggle_client.py); the waiting and the order of
things are in kernel/publish.py.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kaggle_seg.errors import KsegError
from kaggle_seg.kaggle_client import (
    KAGGLE_WEB,
    check_credentials,
    client_has,
    kaggle_api,
    kaggle_errors,
    one_line,
    read_json,
    require_client,
)

if TYPE_CHECKING:
    from kaggle.api.kaggle_api_extended import KaggleApi

DATASET_METADATA = "dataset-metadata.json"
KERNEL_METADATA = "kernel-metadata.json"

# ---- datasets ----


def push_dataset(folder: Path, message: str = "kseg", *, public: bool = False) -> str:
    """Create the dataset that `folder/dataset-metadata.json` names, or a new version of it.

    Every file in `folder` is uploaded and every sub-folder as `<name>.zip` (Kaggle unpacks it);
    the client would otherwise skip sub-folders without a word. A file whose upload fails stops
    the push before anything is published (kaggle>=2.2.5 raises; older clients would publish
    without it, so they are refused). `message` is the version note; `public` applies when the
    dataset is created (a new version keeps its visibility). Returns the dataset's URL.
    """
    folder = Path(folder)
    ref = _read_dataset_metadata(folder)["id"]
    require_client("dataset push", f"pushing dataset {ref}")
    api = kaggle_api()
    with kaggle_errors(f"pushing dataset {ref}"):
        if dataset_status(ref, api) != "missing":
            response = api.dataset_create_version(str(folder), message, quiet=False, dir_mode="zip")
        else:
            response = api.dataset_create_new(
                str(folder), public=public, quiet=False, dir_mode="zip"
            )
    if response.error or (response.status or "ok").lower() != "ok":
        raise KsegError(
            one_line(f"Kaggle refused dataset {ref}: {response.error or response.status}")
        )
    return response.url or f"{KAGGLE_WEB}/datasets/{ref}"


def dataset_status(ref: str, api: KaggleApi | None = None) -> str:
    """Kaggle's status of dataset `ref` in lower case ("ready", "failed", a processing step), or
    "missing" when there is no such dataset."""
    from requests import HTTPError

    api = api or kaggle_api()
    with kaggle_errors(f"asking for the status of dataset {ref}"):
        try:
            return str(api.dataset_status(ref)).lower()
        except HTTPError as error:
            if error.response is not None and error.response.status_code == 404:
                return "missing"
            raise


# ---- kernels ----


@dataclass(frozen=True)
class KernelPush:
    """What Kaggle answered to a kernel push: the kernel's page and the new version's number."""

    url: str
    version: int | None


def push_kernel(folder: Path) -> KernelPush:
    """Push the kernel in `folder` (kernel-metadata.json and its code_file) as a new version,
    on the accelerator its machine_shape names.

    Raises KsegError when Kaggle did not attach a dataset, competition, kernel or model source:
    the version would run without its inputs.
    """
    folder = Path(folder)
    metadata_file = folder / KERNEL_METADATA
    if not metadata_file.is_file():
        raise KsegError(f"{metadata_file} not found: a kernel folder needs {KERNEL_METADATA}")
    meta = read_json(metadata_file)
    ref = meta.get("id") or meta.get("id_no")
    if not ref:
        raise KsegError(f"{metadata_file} has no id: set it to 'user/kernel-slug'")
    shape = meta.get("machine_shape")
    if shape:
        require_client("accelerator", f"pushing kernel {ref} on {shape}")
    api = kaggle_api()
    with kaggle_errors(f"pushing kernel {ref}"):
        response = (
            api.kernels_push(str(folder), acc=shape) if shape else api.kernels_push(str(folder))
        )
    if response.error:
        raise KsegError(one_line(f"Kaggle refused kernel {ref}: {response.error}"))
    url = response.url or (f"{KAGGLE_WEB}{response.ref}" if response.ref else str(ref))
    rejected = {
        "dataset_sources": response.invalid_dataset_sources,
        "competition_sources": response.invalid_competition_sources,
        "kernel_sources": response.invalid_kernel_sources,
        "model_sources": response.invalid_model_sources,
    }
    rejected = {name: sources for name, sources in rejected.items() if sources}
    if rejected:
        listed = "; ".join(f"{name} {', '.join(sources)}" for name, sources in rejected.items())
        raise KsegError(
            one_line(
                f"kernel pushed to {url}, but Kaggle could not attach {listed}: "
                f"fix {KERNEL_METADATA} and push again"
            )
        )
    return KernelPush(url, response.version_number or None)


@dataclass(frozen=True)
class KernelStatus:
    """A kernel version's run: "queued", "running", "complete", "error", "cancel_*"."""

    status: str
    failure: str | None
    version_asked: bool  # False: the client could only ask about the latest version


def kernel_ref(kernel: str, version: int | None) -> tuple[str, bool]:
    """The client's name of `kernel` (owner/slug) at `version`, and whether the version is in
    it (clients before 2.2.5 cannot name one)."""
    owner, _, slug = kernel.partition("/")
    if not owner or not slug or "/" in slug:
        raise KsegError(f"kernel must be 'owner/kernel-slug', got {kernel!r}")
    if version is not None and version < 1:
        raise KsegError(f"kernel version must be 1 or more, got {version}")
    if version is not None and client_has("kernel version"):
        return f"{kernel}/{version}", True
    return kernel, version is None


def kernel_status(kernel: str, version: int | None = None) -> KernelStatus:
    """The status of `kernel`'s version `version` (else the latest)."""
    ref, asked = kernel_ref(kernel, version)
    api = kaggle_api()
    with kaggle_errors(f"asking for the status of kernel {ref}"):
        response = api.kernels_status(ref)
    status = getattr(response.status, "name", response.status)
    return KernelStatus(str(status).lower(), response.failure_message or None, asked)


def kernel_log(kernel: str, version: int | None = None) -> str:
    """The text `kernel`'s version printed (Kaggle keeps it as JSON lines of stream chunks)."""
    ref, _ = kernel_ref(kernel, version)
    api = kaggle_api()
    with kaggle_errors(f"fetching the log of kernel {ref}"):
        if hasattr(api, "kernels_logs"):
            raw = api.kernels_logs(ref)
        else:  # clients before 2.1 write the log beside the kernel's output files
            with tempfile.TemporaryDirectory(prefix="kseg-log-") as tmp:
                files, _ = api.kernels_output(ref, tmp)
                logs = [Path(f) for f in files if str(f).endswith(".log")]
                raw = logs[0].read_text(errors="replace") if logs else ""
    return log_text(raw)


def log_text(raw: str) -> str:
    """Kaggle's kernel log as plain text: the `data` of each JSON entry, or `raw` itself."""
    try:
        entries = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(entries, list):
        return raw
    return "".join(str(e.get("data", "")) for e in entries if isinstance(e, dict))


def kernel_competitions(kernel: str) -> list[str]:
    """The competition sources of `kernel` as Kaggle has them (its metadata, pulled)."""
    ref, _ = kernel_ref(kernel, None)
    api = kaggle_api()
    with (
        kaggle_errors(f"reading the metadata of kernel {ref}"),
        tempfile.TemporaryDirectory(prefix="kseg-pull-") as tmp,
    ):
        api.kernels_pull(ref, tmp, metadata=True, quiet=True)
        meta = read_json(Path(tmp) / KERNEL_METADATA)
    return [str(source) for source in meta.get("competition_sources") or []]


# ---- submissions ----


def submit_file(competition: str, csv: Path, message: str) -> str:
    """Upload `csv` to a file competition and submit it. Returns the server's message."""
    csv = Path(csv)
    if not csv.is_file():
        raise KsegError(f"submission file {csv} not found")
    api = kaggle_api()
    with kaggle_errors(f"submitting {csv.name} to {competition}"):
        response = api.competition_submit(str(csv), message, competition, quiet=False)
    if response.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        raise KsegError(f"upload of {csv} to {competition} failed: nothing was submitted")
    return response.message or f"submitted {csv.name} to {competition}"


@dataclass(frozen=True)
class CodeSubmission:
    """A code-competition submission: the server's message and the submission's number."""

    message: str
    ref: int | None


def submit_kernel(
    competition: str,
    kernel: str,
    message: str,
    *,
    version: int | None = None,
    file_name: str = "submission.csv",
) -> CodeSubmission:
    """Submit `file_name` written by kernel `owner/slug` (version `version`, else the latest) to a
    code competition, where Kaggle reruns the kernel on the hidden test set."""
    kernel_ref(kernel, version)
    api = kaggle_api()
    described = f"{kernel} version {version}" if version else kernel
    with kaggle_errors(f"submitting {described} to {competition}"):
        response = api.competition_submit_code(
            file_name, message, competition, kernel, version, quiet=True
        )
    text = response.message or f"submitted {described} to {competition}"
    return CodeSubmission(text, getattr(response, "ref", None) or None)


@dataclass(frozen=True)
class SubmissionStatus:
    """A submission as Kaggle lists it: "pending", "complete" or "error", and its scores."""

    status: str
    public_score: str | None
    error: str | None


def submission_status(competition: str, ref: int) -> SubmissionStatus | None:
    """Submission `ref` among the competition's recent submissions (None if not listed)."""
    api = kaggle_api()
    with kaggle_errors(f"listing the submissions to {competition}"):
        submissions = api.competition_submissions(competition)
    for submission in submissions or []:
        if getattr(submission, "ref", None) == ref:
            status = getattr(submission.status, "name", submission.status)
            return SubmissionStatus(
                str(status).lower(),
                submission.public_score or None,
                submission.error_description or None,
            )
    return None


# ---- Kaggle Models ----


def upload_model(handle: str, folder: Path, license_name: str, notes: str) -> int:
    """Upload `folder` as a new version of Model instance `handle` (owner/model/framework/
    variation), creating the model and the instance when needed, folders kept; returns the
    version number Kaggle gave it. Through kagglehub, which raises on a failed file upload
    before anything is created."""
    try:
        import kagglehub
        from kagglehub.exceptions import BackendError
    except ImportError:
        raise KsegError(
            "kseg model push needs kagglehub: pip install 'kaggle-seg[models]'"
        ) from None
    check_credentials()
    with kaggle_errors(f"uploading model {handle}"):
        try:
            kagglehub.model_upload(
                handle,
                str(folder),
                license_name=license_name,
                version_notes=notes,
                ignore_patterns=[DATASET_METADATA],
            )
        except BackendError as error:
            raise KsegError(one_line(f"Kaggle refused model {handle}: {error}")) from error
    version = model_version(handle)
    if version is None:
        raise KsegError(f"model {handle} was uploaded, but Kaggle lists no version of it")
    return version


def model_version(handle: str) -> int | None:
    """The latest version number of Model instance `handle`, or None when it does not exist."""
    from requests import HTTPError

    api = kaggle_api()
    with kaggle_errors(f"reading model {handle}"):
        try:
            instance = api.model_instance_get(handle)
        except HTTPError as error:
            if error.response is not None and error.response.status_code == 404:
                return None
            raise
    return int(instance.version_number) or None


# ---- metadata ----


def _read_dataset_metadata(folder: Path) -> dict[str, Any]:
    """dataset-metadata.json, checked for what creating a dataset needs: id 'user/slug', a title
    and one license; KsegError naming the first problem."""
    if not folder.is_dir():
        raise KsegError(f"dataset folder {folder} not found")
    path = folder / DATASET_METADATA
    if not path.is_file():
        raise KsegError(
            f"{path} not found: write one with id 'user/slug', title and licenses "
            f'(e.g. [{{"name": "CC0-1.0"}}]), or run kaggle datasets init -p {folder}'
        )
    metadata = read_json(path)
    ref = metadata.get("id")
    if not isinstance(ref, str) or not re.fullmatch(r"[^/\s]+/[^/\s]+", ref):
        raise KsegError(f"{path}: id must be 'user/slug', got {ref!r}")
    title = metadata.get("title")
    if not isinstance(title, str) or not title.strip():
        raise KsegError(f"{path}: title is missing")
    if "INSERT_" in ref or "INSERT_" in title:
        raise KsegError(f"{path}: replace the INSERT_... placeholders in id and title")
    licenses = metadata.get("licenses")
    if (
        not isinstance(licenses, list)
        or len(licenses) != 1
        or not isinstance(licenses[0], dict)
        or not licenses[0].get("name")
    ):
        raise KsegError(f'{path}: licenses must name exactly one, e.g. [{{"name": "CC0-1.0"}}]')
    data = [entry for entry in folder.iterdir() if entry.name != DATASET_METADATA]
    if not data:
        raise KsegError(f"{folder} has nothing to upload besides {DATASET_METADATA}")
    return metadata
