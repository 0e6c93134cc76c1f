"""Publishing a built kernel in the order Kaggle needs, waiting for each step:

1. the wheels and weights datasets (or the weights Model instance) are pushed, and Kaggle has
   processed them ("ready");
2. the kernel is pushed on its accelerator; Kaggle runs the new version;
3. the version has finished ("complete"; on an error its log's last lines are shown);
4. that version is submitted to the code competition, and the score awaited.

Every wait has a timeout and prints a progress line when the status changes; every failure
is one line naming what is wrong. The build record (kseg-kernel.json) keeps what was pushed and
submitted, so later commands can name the kernel folder instead of owner/slug and a version.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kaggle_seg.errors import KsegError
from kaggle_seg.kernel.build import read_build_record, update_build_record, write_json
from kaggle_seg.kernel.credentials import check_no_credentials
from kaggle_seg.kernel.metadata import check_kernel_metadata
from kaggle_seg.kernel.targets import (
    KERNEL_METADATA,
    REHEARSAL_DIR,
    WEIGHTS_MANIFEST,
    get_target,
)
from kaggle_seg.kernel.weights import collect_weights
from kaggle_seg.runs import experiment_folds

Say = Callable[[str], None]
DONE, FAILED = "complete", ("error", "cancel_requested", "cancel_acknowledged")
LOG_TAIL = 30  # lines of a failed version's log shown
SUBMISSION_LOG = Path("submissions") / "kernel_submissions.jsonl"


def wait_for(
    check: Callable[[], str],
    what: str,
    *,
    done: Sequence[str],
    timeout_s: float,
    poll_s: float,
    say: Say,
    fail: Sequence[str] = (),
) -> str:
    """Poll `check` until its status is in `done` or `fail` (returned), saying each new status
    with the time waited; KsegError after `timeout_s`."""
    start, last = time.monotonic(), None
    while True:
        status = check()
        waited = time.monotonic() - start
        if status != last:
            say(f"{what}: {status} ({waited:.0f} s)")
            last = status
        if status in done or status in fail:
            return status
        if waited + poll_s > timeout_s:
            raise KsegError(
                f"{what}: still {status} after {waited:.0f} s (timeout {timeout_s:.0f} s); "
                "run the command again to keep waiting"
            )
        time.sleep(poll_s)


def wait_for_datasets(refs: Sequence[str], *, timeout_s: float, poll_s: float, say: Say) -> None:
    """Each dataset in `refs` exists and Kaggle has processed it."""
    from kaggle_seg.kaggle_api import dataset_status

    for ref in refs:
        status = wait_for(
            lambda ref=ref: dataset_status(ref),
            f"dataset {ref}",
            done=("ready",),
            fail=("missing", "failed", "deleted"),
            timeout_s=timeout_s,
            poll_s=poll_s,
            say=say,
        )
        if status == "missing":
            raise KsegError(
                f"dataset {ref} is not on Kaggle: push it first (kseg dataset push, or kseg "
                "kernel push --with-datasets)"
            )
        if status != "ready":
            raise KsegError(f"Kaggle could not process dataset {ref} ({status}): push it again")


def check_models(sources: Sequence[str]) -> None:
    """Each model source owner/model/framework/variation/version exists on Kaggle."""
    from kaggle_seg.kaggle_api import model_version

    for source in sources:
        handle, _, version = source.rpartition("/")
        latest = model_version(handle)
        if latest is None or latest < int(version):
            raise KsegError(
                f"model {source} is not on Kaggle (latest version: {latest}): push it first "
                "(kseg model push)"
            )


def push_model(kernel_dir: Path, notes: str = "kseg", license_name: str = "Apache 2.0") -> str:
    """Upload the kernel's weights folder as a new version of its Model instance, and point
    kernel-metadata.json's model_sources at that version. Returns owner/model/fw/variation/N."""
    from kaggle_seg.kaggle_api import upload_model

    kernel_dir = Path(kernel_dir)
    record = read_build_record(kernel_dir)
    weights = record["weights"]
    if "model" not in weights:
        raise KsegError(
            f"{kernel_dir}: its weights are a dataset (kseg dataset push); build with "
            "--weights-as model to push them as a Kaggle Model"
        )
    folder = kernel_dir / weights["dir"]
    check_no_credentials(folder)
    version = upload_model(weights["model"], folder, license_name, notes)
    source = f"{weights['model']}/{version}"
    meta_file = kernel_dir / KERNEL_METADATA
    meta = json.loads(meta_file.read_text())
    meta["model_sources"] = [source]
    write_json(meta_file, meta)
    update_build_record(kernel_dir, weights={**weights, "version": version})
    return source


def push_experiment_model(
    run_dir: Path,
    handle: str,
    *,
    folds: Sequence[int] | None = None,
    notes: str = "kseg",
    license_name: str = "Apache 2.0",
) -> str:
    """Upload an experiment's best.pt and config.yaml per fold and its postprocess.json (the
    weights a kernel ships) as a new version of Model instance `handle`."""
    from kaggle_seg.kaggle_api import upload_model

    run_dir = Path(run_dir)
    checkpoints = experiment_folds(run_dir.parent, [run_dir.name], folds)
    with tempfile.TemporaryDirectory(prefix="kseg-model-") as tmp:
        write_json(Path(tmp) / WEIGHTS_MANIFEST, collect_weights(checkpoints, Path(tmp)))
        check_no_credentials(Path(tmp))
        version = upload_model(handle, Path(tmp), license_name, notes)
    return f"{handle}/{version}"


@dataclass(frozen=True)
class Pushed:
    """A pushed kernel version."""

    kernel: str
    version: int | None
    url: str


def push_kernel_folder(
    kernel_dir: Path,
    *,
    with_datasets: bool = False,
    message: str = "kseg",
    timeout_s: float = 1800.0,
    poll_s: float = 15.0,
    say: Say = print,
) -> Pushed:
    """Push the kernel once its datasets (and model) are on Kaggle and ready; with
    `with_datasets`, push them first. Records the new version in kseg-kernel.json."""
    from kaggle_seg.kaggle_api import push_dataset, push_kernel

    kernel_dir = Path(kernel_dir)
    record = read_build_record(kernel_dir)
    meta = json.loads((kernel_dir / KERNEL_METADATA).read_text())
    check_kernel_metadata(meta, record["competition"])
    check_no_credentials(kernel_dir, skip=REHEARSAL_DIR)
    if with_datasets:
        for part in ("wheels", "weights"):
            if "dataset" in record[part]:
                say(push_dataset(kernel_dir / record[part]["dir"], message))
        if "model" in record["weights"]:
            say(f"model {push_model(kernel_dir, message)}")
            meta = json.loads((kernel_dir / KERNEL_METADATA).read_text())
    if "model" in record["weights"] and not meta.get("model_sources"):
        raise KsegError(
            f"{kernel_dir}: the weights Model is not pushed yet: kseg model push {kernel_dir} "
            "(or kseg kernel push --with-datasets)"
        )
    wait_for_datasets(meta.get("dataset_sources", []), timeout_s=timeout_s, poll_s=poll_s, say=say)
    check_models(meta.get("model_sources", []))
    pushed = push_kernel(kernel_dir)
    kernel = str(meta["id"])
    update_build_record(
        kernel_dir,
        pushed={"version": pushed.version, "url": pushed.url, "time": _now()},
    )
    return Pushed(kernel, pushed.version, pushed.url)


@dataclass(frozen=True)
class KernelRef:
    """A kernel named on the command line: owner/slug, a version, its competition's slug, and
    its built folder when it was named by one."""

    kernel: str
    version: int | None
    competition: str | None
    folder: Path | None


def resolve_kernel(name: str, version: int | None = None) -> KernelRef:
    """`name` as a built kernel folder (its id, its pushed version, its competition) or as
    owner/slug[/version]."""
    folder = Path(name)
    if folder.is_dir():
        record = read_build_record(folder)
        meta = json.loads((folder / KERNEL_METADATA).read_text())
        pushed = (record.get("pushed") or {}).get("version")
        competition = get_target(record["competition"]).source
        return KernelRef(str(meta["id"]), version or pushed, competition, folder)
    match = re.fullmatch(r"([A-Za-z0-9_-]+/[A-Za-z0-9_-]+)(?:/(\d+))?", name)
    if match is None:
        raise KsegError(f"kernel {name!r}: expected a built kernel folder or owner/kernel-slug")
    if match.group(2) and version and int(match.group(2)) != version:
        raise KsegError(f"kernel {name!r} names version {match.group(2)}, --version {version}")
    return KernelRef(match.group(1), version or _int(match.group(2)), None, None)


def _int(text: str | None) -> int | None:
    return int(text) if text else None


def wait_for_kernel(
    ref: KernelRef, *, timeout_s: float, poll_s: float, say: Say, tail: int = LOG_TAIL
) -> str:
    """Wait until the kernel version has finished; on a failure show its log's last `tail`
    lines and raise one line naming the version and the cause."""
    from kaggle_seg.kaggle_api import kernel_status

    described = _described(ref)
    last: dict[str, Any] = {}

    def check() -> str:
        status = kernel_status(ref.kernel, ref.version)
        if not status.version_asked and not last:
            say("note: this kaggle client cannot name a version: the status is the latest one's")
        last["status"] = status
        return status.status

    status = wait_for(
        check, described, done=(DONE,), fail=FAILED, timeout_s=timeout_s, poll_s=poll_s, say=say
    )
    if status != DONE:
        fail_with_log(ref, status, last["status"].failure, say, tail)
    return status


def report_kernel(ref: KernelRef, say: Say, tail: int = LOG_TAIL) -> str:
    """Say the version's status once; a failed version shows its log's tail and raises."""
    from kaggle_seg.kaggle_api import kernel_status

    status = kernel_status(ref.kernel, ref.version)
    note = "" if status.version_asked else " (the latest version's: this client names none)"
    say(f"{_described(ref)}: {status.status}{note}")
    if status.status in FAILED:
        fail_with_log(ref, status.status, status.failure, say, tail)
    return status.status


def fail_with_log(ref: KernelRef, status: str, failure: str | None, say: Say, tail: int) -> None:
    """Show the last `tail` lines of a failed version's log, then raise one line: the version,
    its status, and Kaggle's failure message or the cause read from the log."""
    from kaggle_seg.kaggle_api import kernel_log
    from kaggle_seg.kernel.rehearse import diagnose

    described = _described(ref)
    log = kernel_log(ref.kernel, ref.version)
    lines = [line for line in log.splitlines() if line.strip()]
    if lines:
        say(f"last {min(tail, len(lines))} lines of the log of {described}:")
        for line in lines[-tail:]:
            say(f"  | {line}")
    cause = failure or (diagnose(log) if lines else "Kaggle gave no log")
    raise KsegError(f"{described} ended with {status}: {cause}")


def _described(ref: KernelRef) -> str:
    return f"kernel {ref.kernel}" + (f" version {ref.version}" if ref.version else "")


def submit_kernel_version(
    ref: KernelRef,
    *,
    message: str,
    wait: bool,
    timeout_s: float,
    poll_s: float,
    say: Say,
) -> str:
    """Submit a finished version of a code-competition kernel (waiting for it to finish with
    `wait`, else refusing one that has not), record it, and with `wait` await the score."""
    from kaggle_seg.kaggle_api import kernel_competitions, kernel_status, submit_kernel

    competition = ref.competition or _code_competition(kernel_competitions(ref.kernel), ref)
    described = _described(ref)
    if wait:
        wait_for_kernel(ref, timeout_s=timeout_s, poll_s=poll_s, say=say)
    else:
        status = kernel_status(ref.kernel, ref.version).status
        if status != DONE:
            raise KsegError(
                f"{described} is {status}, not complete: Kaggle scores a finished version; "
                "pass --wait, or run kseg kernel wait first"
            )
    submitted = submit_kernel(competition, ref.kernel, message, version=ref.version)
    entry = {
        "time": _now(),
        "competition": competition,
        "kernel": ref.kernel,
        "version": ref.version,
        "submission": submitted.ref,
        "message": message,
    }
    SUBMISSION_LOG.parent.mkdir(parents=True, exist_ok=True)
    with SUBMISSION_LOG.open("a") as log:
        log.write(json.dumps(entry) + "\n")
    if ref.folder is not None:
        record = read_build_record(ref.folder)
        update_build_record(ref.folder, submissions=[*record.get("submissions", []), entry])
    say(f"{submitted.message} ({described}, submission {submitted.ref}; see {SUBMISSION_LOG})")
    if wait and submitted.ref:
        return _wait_for_score(competition, submitted.ref, timeout_s, poll_s, say)
    return submitted.message


def _code_competition(sources: Sequence[str], ref: KernelRef) -> str:
    from kaggle_seg.competitions import COMPETITIONS

    if not sources:
        raise KsegError(f"{_described(ref)} has no competition source on Kaggle")
    for competition in COMPETITIONS.values():
        if competition.kaggle_slug in sources and not competition.code_competition:
            raise KsegError(
                f"{competition.kaggle_slug} is a file competition: submit the CSV "
                "(kseg submit ... --upload), not a kernel"
            )
    return sources[0]


def _wait_for_score(competition: str, ref: int, timeout_s: float, poll_s: float, say: Say) -> str:
    from kaggle_seg.kaggle_api import submission_status

    found: dict[str, Any] = {}

    def check() -> str:
        status = submission_status(competition, ref)
        found["status"] = status
        return status.status if status else "not listed yet"

    final = wait_for(
        check,
        f"submission {ref} to {competition}",
        done=("complete",),
        fail=("error",),
        timeout_s=timeout_s,
        poll_s=poll_s,
        say=say,
    )
    status = found["status"]
    if final != "complete":
        raise KsegError(f"submission {ref} to {competition} failed: {status.error or final}")
    return f"submission {ref} to {competition} scored {status.public_score} (public)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
