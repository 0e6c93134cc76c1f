"""`kseg kernel rehearse`: run a built kernel locally the way Kaggle runs it, and check what it
writes.

A temporary root holds input/<competition>, input/<wheels>, input/<weights> (read-only) and
working/; the kernel runs with no network in a fresh virtualenv that sees only the Kaggle
image's packages (at Kaggle's versions, see image.py) plus what it installs from the wheels
dataset. Code competitions run twice: with an empty test folder (the public re-run) and with
held-back train cases as the test; others once, with the held-back test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kaggle_seg.competitions.base import StagedTest
from kaggle_seg.errors import KsegError
from kaggle_seg.io import link_tree
from kaggle_seg.kernel.build import read_build_record, write_json
from kaggle_seg.kernel.credentials import check_no_credentials
from kaggle_seg.kernel.image import ImageEnv, prepare_image_env, version_table
from kaggle_seg.kernel.metadata import check_kernel_metadata
from kaggle_seg.kernel.sandbox import (
    READ_ONLY_SH,
    make_kaggle_venv,
    resolve_isolation,
    set_writable,
    snapshot,
)
from kaggle_seg.kernel.targets import (
    DATASET_METADATA,
    KERNEL_METADATA,
    REHEARSAL_DIR,
    ROOT_ENV,
    get_target,
)

TIMING = re.compile(r"^KSEG_TIMING (\w+) ([\d.]+)$", re.MULTILINE)


def diagnose(log: str) -> str:
    """The cause of a failed kernel run, in one line, from its output."""
    checks = [
        (
            r"No matching distribution found for ([^\s;]+)",
            "pip found no {0} in the wheels dataset, and the Kaggle image (kaggle_image.txt) does "
            "not provide it: add its wheel (kseg kernel build packs what kaggle_seg requires)",
        ),
        (
            r"ModuleNotFoundError: No module named '([^']+)'",
            "module {0} is in neither the Kaggle image (kaggle_image.txt) nor the wheels dataset",
        ),
        (r"No such command '([^']+)'", "this kaggle_seg has no `kseg {0}` command"),
        (
            r"Read-only file system: '([^']+)'",
            "the kernel wrote under /kaggle/input ({0}), which Kaggle mounts read-only",
        ),
    ]
    for pattern, message in checks:
        match = re.search(pattern, log)
        if match:
            return message.format(*match.groups())
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    # kseg's own one-line error says more than the kernel's "... exited with N" after it.
    errors = [
        line
        for line in lines
        if re.match(r"(error:|\w+Error\b)", line) and not re.search(r"exited with \d+$", line)
    ]
    if errors:
        return errors[-1]
    network = re.search(r"(Network is unreachable|Temporary failure in name resolution)", log)
    if network:
        return f"the kernel tried to reach the network ({network.group(1)}); Kaggle runs offline"
    return (lines or ["no output"])[-1]


@dataclass
class RehearsalRun:
    """One run of the kernel: its test, whether it passed, its timings and the cause if not."""

    label: str
    test_items: int
    ok: bool
    seconds: float
    install_seconds: float | None
    predict_seconds: float | None
    rows: int | None
    predicted_items: int | None  # slices / images in submission.csv
    score: float | None
    log: str
    problem: str | None = None


@dataclass
class Rehearsal:
    """A rehearsal: its runs, the estimate for the hidden test, and the packages it used."""

    kernel_dir: Path
    competition: str
    isolation: str
    runs: list[RehearsalRun]
    unit: str
    hidden_test_items: int
    hidden_test_note: str
    estimate_seconds: float | None
    estimate_basis: str | None
    limit_seconds: float | None
    device: str
    image_versions: str = "kaggle"
    image_rows: list[dict[str, Any]] = field(default_factory=list)  # image.PinRow as dicts
    image_notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.runs)


def _device() -> str:
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[0].split(" (UUID")[0]
    return f"CPU only, {os.cpu_count()} cores"


def _check_submission(
    competition: str, submission: Path, staged: StagedTest
) -> tuple[int, int, float | None]:
    """(rows, slices or images, score) of a kernel's submission.csv; raises naming what is
    wrong with it."""
    import pandas as pd

    from kaggle_seg.competitions import get_competition

    plugin = get_competition(competition)
    if not submission.is_file():
        raise KsegError("the kernel wrote no /kaggle/working/submission.csv")
    if staged.truth_csv is not None:
        result = plugin.score_submission(staged.truth_csv, submission, staged.test_images)
        frame = pd.read_csv(submission, dtype=str)
        return len(frame), frame.iloc[:, 0].nunique(), float(result["score"])
    # Public re-run (empty test): whatever rows there are must be valid train predictions.
    rows, items = plugin.check_rerun_submission(submission, staged)
    return rows, items, None


def rehearse_kernel(
    kernel_dir: Path,
    *,
    data_dir: Path | None = None,
    holdout: int | None = None,
    isolation: str = "auto",
    timeout_s: float = 3600.0,
    keep: bool = False,
    work_root: Path | None = None,
    image_versions: str = "kaggle",
    image_cache: Path | None = None,
    pip_args: Sequence[str] = (),
    say: Callable[[str], None] = print,
) -> Rehearsal:
    """Run the built kernel locally the way Kaggle would, and check what it writes.

    The packages come from `prepare_image_env` (`image_versions` kaggle or local); the version
    table goes to `say` before anything runs. Logs, submissions and report.json go to
    `kernel_dir/rehearsal/`. The temporary root goes under `work_root` (the system's temp
    folder by default); put it on the data's file system so inputs are hard links.
    """
    kernel_dir = Path(kernel_dir)
    record = read_build_record(kernel_dir)
    competition = record["competition"]
    target = get_target(competition)
    metadata = json.loads((kernel_dir / KERNEL_METADATA).read_text())
    check_kernel_metadata(metadata, competition)
    code_file = metadata.get("code_file") or record["code_file"]
    if not (kernel_dir / code_file).is_file():  # renamed by hand: Kaggle would find no script
        raise KsegError(
            f"{kernel_dir / KERNEL_METADATA}: code_file {code_file} is not in {kernel_dir}"
        )
    record = {**record, "code_file": code_file}  # the script Kaggle runs is the metadata's
    check_no_credentials(kernel_dir, skip=REHEARSAL_DIR)
    mode = resolve_isolation(isolation)
    holdout = target.default_holdout if holdout is None else holdout
    if holdout < 1:
        raise KsegError("--holdout must be at least 1")
    out_dir = kernel_dir / REHEARSAL_DIR
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    work = Path(tempfile.mkdtemp(prefix="kseg-rehearse-", dir=work_root))
    try:
        from kaggle_seg.competitions import get_competition

        if data_dir is None:
            data_dir = get_competition(competition).rehearsal_data(work / "phantom")
            if data_dir is None:
                raise KsegError(f"{competition}: pass --data-dir (the competition folder)")
        elif not Path(data_dir).is_dir():
            raise KsegError(f"--data-dir {data_dir}: folder not found")
        plans = [("empty test (public re-run)", 0)] if target.code_competition else []
        # The held-back cases come from train/, which the shipped folds trained on: its score
        # checks the kernel end to end, it is no validation score.
        seen = f"{holdout} train {target.holdout_unit}, seen in training"
        plans.append((f"held-back test ({seen})", holdout))
        # Staged before anything runs, so a --holdout too large fails now, not after a run.
        stage = get_competition(competition).stage_test
        staged = [
            stage(Path(data_dir), work / f"run{n}/input" / target.source, held, work / f"run{n}")
            for n, (_, held) in enumerate(plans, 1)
        ]
        image = prepare_image_env(
            record["image_packages"],
            work,
            mode=image_versions,
            cache_dir=image_cache,
            pip_args=pip_args,
            say=say,
        )
        for line in version_table(image):
            say(line)
        for note in image.notes:  # dependencies the pins leave unmet, as pip check sees them
            say(f"note: {note}")
        if image.mode == "local":
            say(
                "warning: --image-versions local: the kernel runs against this machine's "
                "versions, not Kaggle's; a pass here does not show it runs on Kaggle"
            )
        runs = []
        for number, (label, _) in enumerate(plans, 1):
            runs.append(
                _rehearse_once(
                    kernel_dir,
                    record,
                    staged[number - 1],
                    work / f"run{number}",
                    label,
                    mode,
                    image,
                    timeout_s,
                    out_dir / f"run{number}",
                )
            )
            if not runs[-1].ok:
                break  # the next run would fail the same way
    finally:
        if not keep:
            for folder in work.glob("run*/input"):
                with contextlib.suppress(OSError):
                    set_writable(folder, True)
            shutil.rmtree(work, ignore_errors=True)
    estimate, basis = estimate_run_time(runs, target.hidden_test_items, target.unit)
    rehearsal = Rehearsal(
        kernel_dir=kernel_dir,
        competition=competition,
        isolation=mode,
        runs=runs,
        unit=target.unit,
        hidden_test_items=target.hidden_test_items,
        hidden_test_note=target.hidden_test_note,
        estimate_seconds=estimate,
        estimate_basis=basis,
        limit_seconds=target.time_limit_hours * 3600 if target.time_limit_hours else None,
        device=_device(),
        image_versions=image.mode,
        image_rows=[asdict(row) for row in image.rows],
        image_notes=image.notes,
    )
    report = asdict(rehearsal)
    report["kernel_dir"] = str(kernel_dir)
    report["work_dir"] = str(work) if keep else None
    write_json(out_dir / "report.json", report)
    return rehearsal


def input_path(source: dict[str, Any]) -> str:
    """Where Kaggle mounts a kernel source under /kaggle/input: a dataset at <slug>, a Model
    instance at <model>/<framework, lower case>/<variation>/<version>."""
    if "model" in source:
        _, model, framework, variation = source["model"].split("/")
        return f"{model}/{framework.lower()}/{variation}/{source.get('version') or 1}"
    return str(source["dataset"]).split("/", 1)[1]


def _run_logged(
    command: list[str], cwd: Path, env: dict[str, str], log_path: Path, timeout_s: float,
    label: str,
) -> int | None:  # fmt: skip
    """Run the kernel with its output in `log_path`; its progress lines (`kseg submit`'s plain
    "N/M images, x images/s, ETA" lines) are echoed to stderr as they come, so a long
    rehearsal shows where it is. None when it ran past `timeout_s`."""
    import threading

    from kaggle_seg.progress import PLAIN_LINE

    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace",
        )  # fmt: skip

        def copy() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                if PLAIN_LINE.match(line.strip()):
                    print(f"  {label}: {line.strip()}", file=sys.stderr, flush=True)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            returncode: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            returncode = None
        reader.join(timeout=10)
    return returncode


def _rehearse_once(
    kernel_dir: Path,
    record: dict[str, Any],
    staged: StagedTest,
    root: Path,
    label: str,
    mode: str,
    image: ImageEnv,
    timeout_s: float,
    out_prefix: Path,
) -> RehearsalRun:
    inputs, working = root / "input", root / "working"
    for folder in (working, root / "tmp", root / "home"):
        folder.mkdir(parents=True)
    for part in ("wheels", "weights"):
        mount = inputs / input_path(record[part])
        link_tree(kernel_dir / record[part]["dir"], mount, skip=(DATASET_METADATA,))
    script = root / record["code_file"]
    shutil.copy2(kernel_dir / record["code_file"], script)
    python = make_kaggle_venv(root / "venv", image.sites, guard=mode == "guard")

    env = {
        "PATH": f"{python.parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "LANG": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",
        ROOT_ENV: str(root),
    }
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
                 "KSEG_PROCESSES"):  # fmt: skip
        if name in os.environ:
            env[name] = os.environ[name]
    command = [str(python), str(script)]
    if mode == "unshare":
        command = ["unshare", "-rnm", "sh", "-c", READ_ONLY_SH, "sh", str(inputs), *command]
    else:
        set_writable(inputs, False)
    before = snapshot(inputs)
    log_path = out_prefix.with_suffix(".log")
    start = time.perf_counter()
    returncode = _run_logged(command, working, env, log_path, timeout_s, label)
    seconds = time.perf_counter() - start
    if mode != "unshare":
        set_writable(inputs, True)
    text = log_path.read_text(errors="replace")
    timings = {key: float(value) for key, value in TIMING.findall(text)}
    run = RehearsalRun(
        label,
        staged.items,
        False,
        seconds,
        timings.get("install"),
        timings.get("predict"),
        None,
        None,
        None,
        str(log_path),
    )
    if returncode is None:
        run.problem = f"timed out after {timeout_s:.0f} s"
        return run
    if returncode != 0:
        run.problem = diagnose(text)
        return run
    if "KSEG_WARNING pip could not resolve" in text:
        # On Kaggle that fallback is for conflicts inside the image; here it hides a gap.
        run.problem = (
            f"pip had to install with --no-deps: {diagnose(text.split('KSEG_WARNING')[0])}"
        )
        return run
    changed = sorted(set(before.items()) ^ set(snapshot(inputs).items()))
    if changed:
        run.problem = f"the kernel changed /kaggle/input/{changed[0][0]}, which is read-only"
        return run
    submission = working / "submission.csv"
    try:
        run.rows, run.predicted_items, run.score = _check_submission(
            record["competition"], submission, staged
        )
    except (KsegError, ValueError) as exc:
        run.problem = f"submission.csv: {exc}"
        return run
    finally:
        if submission.is_file():
            shutil.copy2(submission, out_prefix.with_name(out_prefix.name + "_submission.csv"))
    run.ok = True
    return run


def estimate_run_time(
    runs: Sequence[RehearsalRun], hidden_items: int, unit: str
) -> tuple[float | None, str | None]:
    """Seconds the kernel would take on the hidden test here, and how that was reckoned.

    The figure charges each run's start-up to its items (an upper bound: on the hidden test
    the start-up is shared by many more). With two passing runs of different sizes, a line
    through (items, predict seconds) splits start-up from the time per item and is reported
    beside it; it is not the figure, since two small, noisy runs can make its slope ten times
    too low on a busy machine, and a kernel past the limit scores nothing.
    """
    timed = sorted(
        (r.predicted_items, r.predict_seconds or r.seconds)
        for r in runs
        if r.ok and r.predicted_items
    )
    if not timed:
        return None, None
    install = max(r.install_seconds or 0.0 for r in runs if r.ok)
    item = unit.rstrip("s")
    (n_small, t_small), (n_large, t_large) = timed[0], timed[-1]
    per_item = t_large / n_large
    bound = install + per_item * hidden_items
    basis = (
        f"install {install:.0f} s + {per_item * 1000:.0f} ms per {item} with start-up included: "
        "an upper bound"
    )
    if n_large > n_small:
        slope = (t_large - t_small) / (n_large - n_small)
        start_up = t_small - slope * n_small
        if slope > 0 and start_up >= 0:
            fitted = install + start_up + slope * hidden_items
            return bound, (
                f"{basis}; a line fitted to both runs says {fitted / 3600:.2f} h (start-up "
                f"{start_up:.0f} s + {slope * 1000:.0f} ms per {item})"
            )
    return bound, f"{basis} (hold back more cases for a closer one)"


def summarize_rehearsal(rehearsal: Rehearsal) -> Iterator[str]:
    """Printable lines: each run, then the estimate for the hidden test against the limit."""
    yield f"isolation: {rehearsal.isolation}; device: {rehearsal.device}"
    for run in rehearsal.runs:
        timing = f"{run.seconds:.1f} s"
        if run.install_seconds is not None:
            timing += f" (install {run.install_seconds:.1f} s"
            if run.predict_seconds is not None:
                timing += f", predict {run.predict_seconds:.1f} s"
            timing += ")"
        if run.ok:
            score = "" if run.score is None else f", score {run.score:.4f}"
            predicted = (
                f" ({run.predicted_items} predicted)"
                if run.predicted_items != run.test_items
                else ""
            )
            yield (
                f"ok    {run.label}: {run.test_items} test {rehearsal.unit}{predicted}, "
                f"{timing}, {run.rows} rows{score}"
            )
        else:
            yield f"FAIL  {run.label}: {run.problem} ({timing}; log {run.log})"
    if rehearsal.estimate_seconds is not None:
        limit = rehearsal.limit_seconds
        share = (
            f" = {rehearsal.estimate_seconds / limit:.0%} of the {limit / 3600:.0f} h limit"
            if limit
            else ""
        )
        yield (
            f"estimate for the hidden test ({rehearsal.hidden_test_items} {rehearsal.unit}, "
            f"{rehearsal.hidden_test_note}): {rehearsal.estimate_seconds / 3600:.2f} h{share} "
            f"at this machine's speed ({rehearsal.estimate_basis})"
        )
