"""`kseg submit`: test images -> ensembled probabilities -> post-processing -> RLE -> a validated
CSV in the competition's exact format.

The competition plug-in says what the test set is and writes its format (competitions/base.py:
`test_set`, `write_submission`). Predictions stream through one image at a time (one volume for
competitions scored by volume, for the z-continuity rule), so memory stays flat however large
the test set. The CSV is checked with the same validator `kseg score` uses before it is
written, atomically.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaggle_seg.competitions.base import Skipped, TestSet
from kaggle_seg.competitions.detect import explain_other_competition
from kaggle_seg.errors import KsegError
from kaggle_seg.runs import POSTPROCESS_FILE
from kaggle_seg.submission import NO_HEAD

SUBMISSIONS_ROOT = Path("submissions")

log = logging.getLogger(__name__)


def oof_tta_mismatch(members: Sequence[Any], tta: str) -> str | None:
    """A one-line warning when members' OOF was predicted with a TTA (`train.oof_tta`) other
    than the submission's: `kseg tune` chose its thresholds on those probabilities."""
    tuned_with = sorted({m.config.train.oof_tta for m in members} - {"none"})
    if not tuned_with or tuned_with == [tta]:
        return None
    return (
        f"--tta {tta}: the post-processing was tuned on OOF predicted with "
        f"{' / '.join(tuned_with)} TTA (train.oof_tta); predict the same way (--tta "
        f"{tuned_with[0]}) for thresholds that transfer"
    )


def single_member_settings(members: Sequence[Any]) -> str | None:
    """A one-line warning when an ensemble of several experiments would take one member's
    postprocess.json: tuned on that member's OOF alone, not on the ensemble's."""
    experiments = list(dict.fromkeys(m.source.parent.parent for m in members))
    if len(experiments) < 2:
        return None
    flags = " ".join(f"--experiment {e}" for e in experiments)
    return (
        f"an ensemble of {len(experiments)} experiments without --postprocess: the settings "
        f"beside {experiments[0]} were tuned on its OOF alone; `kseg tune {flags}` tunes them "
        "on the ensemble's"
    )


def blend_mismatch(members: Sequence[Any], postprocess: Path) -> str | None:
    """A one-line warning when `--postprocess` is a blend's (blend.json beside it, from `kseg
    tune -e A -e B`) and the checkpoints are not that blend's experiments and weights: its
    thresholds were tuned on the blend's OOF."""
    from kaggle_seg.blend import BLEND_FILE, read_blend_members

    try:
        pairs = read_blend_members(Path(postprocess).parent)
    except KsegError:
        record = Path(postprocess).parent / BLEND_FILE
        return f"{record}: unreadable, so these checkpoints are not checked against the blend"
    if pairs is None:
        return None
    tuned = {str(Path(e).resolve()): w for e, w in pairs}
    given: dict[str, float] = {}
    for member in members:
        experiment = str(member.source.parent.parent.resolve())
        given[experiment] = given.get(experiment, 0.0) + float(member.weight)
    total = sum(given.values()) or 1.0
    given = {e: w / total for e, w in given.items()}
    if given.keys() == tuned.keys() and all(abs(given[e] - tuned[e]) < 1e-6 for e in tuned):
        return None

    def shown(weights: dict[str, float]) -> str:
        return ", ".join(f"{Path(e).name} {w:.3g}" for e, w in weights.items())

    return (
        f"{postprocess} was tuned on the blend {shown(tuned)}; these checkpoints are "
        f"{shown(given)}: pass the blend's experiments and --weights for thresholds that transfer"
    )


def default_submission_path(
    competition: str, experiment: str, day: dt.date | None = None, suffix: str = ".csv"
) -> Path:
    """submissions/<competition>_<experiment>_<YYYY-MM-DD>.csv (`suffix`: the competition's
    `submission_suffix`)"""
    from kaggle_seg.safe_paths import check_name, path_inside

    day = day or dt.date.today()
    name = check_name(f"{competition}_{experiment}_{day.isoformat()}{suffix}", "submission file")
    return path_inside(SUBMISSIONS_ROOT, name)


def load_settings(members: Sequence[Any], postprocess: Path | None) -> tuple[Any, str]:
    """The post-processing to apply and where it came from: `--postprocess`, else the
    postprocess.json `kseg tune` wrote beside the first checkpoint, else defaults. Several
    folds of an experiment take the experiment's (tuned on all their OOF) before a fold's own
    (tuned on that fold's alone); a lone fold takes its own first."""
    from collections import Counter

    from kaggle_seg.postprocess import default_postprocess, load_postprocess

    if postprocess is not None:
        if warning := blend_mismatch(members, postprocess):
            log.warning(warning)
        return load_postprocess(postprocess), str(postprocess)
    if warning := single_member_settings(members):
        log.warning(warning)
    folds = Counter(p.parent for p in dict.fromkeys(m.source.parent for m in members))
    for member in members:
        fold_dir, experiment = member.source.parent, member.source.parent.parent
        order = (experiment, fold_dir) if folds[experiment] > 1 else (fold_dir, experiment)
        for folder in order:
            candidate = folder / POSTPROCESS_FILE
            if candidate.is_file():
                return load_postprocess(candidate), str(candidate)
    return default_postprocess(list(members[0].classes)), "defaults (threshold 0.5)"


@dataclass
class SubmitResult:
    path: Path
    competition: str
    rows: int
    images: int
    seconds: float
    notes: list[str]
    skipped: list[Skipped] = field(default_factory=list)  # --on-error skip: predicted empty
    tta: str = "none"  # the TTA predicted with (the default follows train.oof_tta)


def write_submission(
    checkpoints: Sequence[Path],
    data_dir: Path,
    out: Path | None = None,
    *,
    weights: Sequence[float] | None = None,
    test_dir: Path | None = None,
    postprocess: Path | None = None,
    tta: str | None = None,
    merge: str = "mean",
    ensemble: str = "mean",
    batch_size: int = 8,
    num_workers: int = 2,
    device: str | None = None,
    on_error: str = "fail",
    fallback_case_days: int = 2,
    batched_tta: bool = True,
    submission_format: str | None = None,
    adapt_bn: int | None = None,
) -> SubmitResult:
    """Predict the test images with the checkpoints' ensemble and write the submission in the
    competition's format (`Competition.test_set`, `Competition.write_submission`);
    `submission_format` (folder: rle or png) overrides the one the checkpoints were trained
    with."""

    from kaggle_seg.adapt_bn import adapt_members, adapt_mismatch
    from kaggle_seg.competitions import competition_for
    from kaggle_seg.predict import default_tta, load_ensemble
    from kaggle_seg.submit_shards import start_shares

    started = time.perf_counter()
    runtime, device = start_shares(device)  # under torchrun: this process's share and device
    members = load_ensemble(checkpoints, weights, device)
    tta = tta or default_tta(members)
    competition = competition_for(members[0].config.data)
    if submission_format is not None:
        competition = competition.with_submission_format(submission_format)
    for mismatch in (oof_tta_mismatch(members, tta), adapt_mismatch(members, adapt_bn)):
        if mismatch and (runtime is None or runtime.is_main):
            log.warning(mismatch)
    if out is not None and competition.submission_suffix != "":  # a file, not a mask folder
        from kaggle_seg.io import refuse_folder

        refuse_folder(Path(out))  # before predicting, not at the rename after it
    if competition.submission_columns is None:
        raise KsegError(
            f"{competition.name} has no Kaggle submission format; use `kseg predict --save` "
            "for its probabilities"
        )
    skipped: list[Skipped] | None = [] if on_error == "skip" else None
    with ExitStack() as scratch:
        folders = [Path(data_dir), *([Path(test_dir)] if test_dir else [])]
        with explain_other_competition(competition.name, *folders):
            test = competition.test_set(
                Path(data_dir),
                Path(test_dir) if test_dir else None,
                scratch=scratch,
                skipped=skipped,
                fallback_volumes=fallback_case_days,
            )
        # The whole test set on every rank, before it is shared out (the same statistics).
        if adapted := adapt_members(members, competition, test.table, tta, adapt_bn):
            test.notes.append(adapted)
        return _predict_and_write(
            members,
            competition,
            test,
            out,
            postprocess,
            skipped,
            started,
            runtime,
            tta=tta,
            merge=merge,
            ensemble=ensemble,
            batch_size=batch_size,
            num_workers=num_workers,
            on_error=on_error,
            batched_tta=batched_tta,
        )


def _predict_and_write(
    members: Sequence[Any],
    competition: Any,
    test: TestSet,
    out: Path | None,
    postprocess: Path | None,
    skipped: list[Skipped] | None,
    started: float,
    runtime: Any,
    **options: Any,
) -> SubmitResult:
    """The ensemble over `test`, post-processed, validated and written: `write_submission`'s
    second half, run while a zipped test set's extracted folder still exists. Under torchrun
    (`runtime`), each process writes its share and rank 0 joins them (submit_shards.py)."""
    from kaggle_seg.predict import predict_probabilities

    settings, source = load_settings(members, postprocess)
    if list(settings.classes) != list(members[0].classes):
        raise KsegError(
            f"post-processing {source} is for classes {settings.classes}, the checkpoints "
            f"predict {list(members[0].classes)}"
        )
    gate_on_head = settings.gate_probability is not None
    if gate_on_head and not any(m.has_class_head for m in members):
        raise KsegError(f"{source}: {NO_HEAD}")
    if gate_on_head and competition.scoring == "instances":
        raise KsegError(
            f"{source}: gate_probability is not applied to {competition.name} instances; remove it"
        )
    notes = [*test.notes, f"post-processing: {source}"]
    from kaggle_seg.progress import progress

    experiment = "+".join(dict.fromkeys(m.config.name for m in members))
    out = (
        Path(out)
        if out
        else default_submission_path(
            competition.name, experiment, suffix=competition.submission_suffix
        )
    )
    part, part_skipped, part_out = test, skipped, out
    if runtime is not None:
        from kaggle_seg import submit_shards
        from kaggle_seg.runtime import gather

        out = gather(out, runtime)[0]  # rank 0's dated name, on every rank
        part = submit_shards.shard_of(test, competition.volume_key, runtime.rank,
                                      runtime.world_size)  # fmt: skip
        part_skipped = submit_shards.skipped_of(skipped, part, test.table, runtime.rank)
        directory = competition.submission_suffix == ""
        part_out = submit_shards.part_path(out, runtime.rank, directory)
        notes.append(f"{runtime.world_size} processes under torchrun, each predicting its share")
    stream = predict_probabilities(
        members,
        competition,
        part.table,
        with_class_probabilities=gate_on_head,
        skipped=part_skipped,
        **options,
    )
    if runtime is None or runtime.is_main:
        label = "submit" if runtime is None else f"submit, rank 0 of {runtime.world_size}"
        stream = progress(stream, len(part.table), label)
    rows, images = competition.write_submission(stream, part, settings, part_out, part_skipped)
    if runtime is not None:
        rows, images, skipped = _join_shares(competition, test, out, part_out, runtime,
                                             (rows, images, part_skipped))  # fmt: skip
    seconds = time.perf_counter() - started
    return SubmitResult(
        out, competition.name, rows, images, seconds, notes, list(skipped or []), tta=options["tta"]
    )


def _join_shares(
    competition: Any,
    test: TestSet,
    out: Path,
    part_out: Path,
    runtime: Any,
    mine: tuple[int, int, list[Skipped] | None],
) -> tuple[int, int, list[Skipped] | None]:
    """Every rank's part written (the gather waits for them all); rank 0 joins the CSV parts
    into `out`. Returns the whole submission's rows, images and skips, on every rank."""
    from kaggle_seg import submit_shards

    def every_skip(shares: list[Any]) -> list[Skipped] | None:
        return None if mine[2] is None else [s for share in shares for s in share[2] or []]

    def join(shares: list[Any]) -> int | None:
        if competition.submission_suffix == "":  # a folder of mask files: nothing to join
            return None
        parts = [Path(share[3]) for share in shares]
        return submit_shards.join_parts(
            parts, out, test, every_skip(shares) or [], competition.submission_columns
        )

    shares, joined_rows = submit_shards.gather_then_join((*mine, str(part_out)), runtime, join)
    rows = joined_rows if joined_rows is not None else sum(share[0] for share in shares)
    return rows, sum(share[1] for share in shares), every_skip(shares)


def upload_submission(csv: Path, competition_name: str, message: str) -> str:
    """`kseg submit --upload`: a file competition gets the CSV; a code competition (uwmgi) takes
    a kernel version instead (`kseg submit --kernel`)."""
    from kaggle_seg import kaggle_api
    from kaggle_seg.competitions import get_competition

    competition = get_competition(competition_name)
    if competition.kaggle_slug is None:
        raise KsegError(f"{competition.name} is a dataset, not a Kaggle competition")
    if competition.code_competition:
        raise KsegError(
            f"{competition.kaggle_slug} is a code competition: Kaggle scores a kernel version, "
            "not this CSV; push the kernel (kseg kernel push) and run kseg submit --kernel "
            "kernels/<name>"
        )
    return kaggle_api.submit_file(competition.kaggle_slug, csv, message)


def submit_pushed_kernel(
    kernel: str,
    version: int | None,
    message: str,
    *,
    wait: bool = False,
    timeout_s: float = 12 * 3600.0,
    poll_s: float = 30.0,
    say: Callable[[str], None] = print,
) -> str:
    """`kseg submit --kernel`: submit a finished version of a pushed code-competition kernel (a
    kernel folder, whose record names the version pushed, or owner/slug), without predicting
    here; with `wait`, wait for the version to finish and for the score."""
    from kaggle_seg.kernel.publish import resolve_kernel, submit_kernel_version

    return submit_kernel_version(
        resolve_kernel(kernel, version),
        message=message,
        wait=wait,
        timeout_s=timeout_s,
        poll_s=poll_s,
        say=say,
    )
