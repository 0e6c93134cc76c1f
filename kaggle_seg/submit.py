"""`kseg submit`: test images -> ensembled probabilities -> post-processing -> RLE -> a validated
CSV in the competition's exact format.

Predictions stream through one image at a time (uwmgi: one case-day volume, for the
z-continuity rule), so memory stays flat however large the test set. The CSV is checked with the
same validator `kseg score` uses before it is written, atomically.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.io import read_csv_checked, write_csv_atomic
from kaggle_seg.paths import POSTPROCESS_FILE

SUBMISSIONS_ROOT = Path("submissions")
# Kaggle's uwmgi sample submission; empty on the public re-run, the hidden test's rows otherwise.
UWMGI_SAMPLE = "sample_submission.csv"
# dsb2018's test folders and the sample submission listing each one's images.
DSB_TEST_SAMPLES = {
    "stage2_test_final": "stage2_sample_submission_final.csv",
    "stage1_test": "stage1_sample_submission.csv",
}


@dataclass
class TestSet:
    """The rows to predict and what the CSV must match."""

    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    sample: pd.DataFrame | None = None  # the sample submission, when it lists rows


def default_submission_path(competition: str, experiment: str, day: dt.date | None = None) -> Path:
    """submissions/<competition>_<experiment>_<YYYY-MM-DD>.csv"""
    day = day or dt.date.today()
    return SUBMISSIONS_ROOT / f"{competition}_{experiment}_{day.isoformat()}.csv"


def uwmgi_test_set(data_dir: Path, test_dir: Path | None = None, fallback_case_days: int = 2):
    """uwmgi's test slices; on the public re-run (empty `test/`) the first case-days of `train/`
    stand in, so the kernel runs end to end and the hidden run cannot surprise it."""
    from kaggle_seg.competitions.uwmgi import scan_slices

    data_dir = Path(data_dir)
    test_dir = Path(test_dir) if test_dir else data_dir / "test"
    table = scan_slices(test_dir) if test_dir.is_dir() else pd.DataFrame(columns=["id"])
    sample_path = data_dir / UWMGI_SAMPLE
    sample = None
    if sample_path.is_file():
        sample = read_csv_checked(sample_path, ["id", "class"])
        sample = sample if len(sample) else None
    notes = []
    if table.empty:
        if sample is not None:
            raise InputError(
                f"{test_dir}: no slices, but {sample_path} lists {sample['id'].nunique()} "
                f"slice(s), first {sample['id'].iloc[0]}"
            )
        train = scan_slices(data_dir / "train")
        if train.empty:
            raise InputError(f"{test_dir} and {data_dir / 'train'}: no slices to predict")
        kept = list(dict.fromkeys(train["case_day"]))[:fallback_case_days]
        table = train[train["case_day"].isin(kept)].reset_index(drop=True)
        notes.append(
            f"{test_dir} is empty (Kaggle's public re-run): predicting {len(table)} train "
            f"slices of {', '.join(kept)} instead"
        )
    elif sample is not None:
        _check_sample_ids(table["id"], sample["id"], sample_path)
    return TestSet(table, notes, sample)


def dsb_test_set(data_dir: Path, test_dir: Path | None = None) -> TestSet:
    """dsb2018's test images: `--test-dir`, else stage2_test_final/ or stage1_test/ in data_dir."""
    from kaggle_seg.competitions import get_competition

    data_dir = Path(data_dir)
    if test_dir is None:
        test_dir = _dsb_test_folder(data_dir)
    test_dir = Path(test_dir)
    table = get_competition("dsb2018").read_test_table(test_dir)
    if table.empty:
        raise InputError(f"{test_dir}: no test images (expected <id>/images/<id>.png)")
    sample_path = test_dir.parent / DSB_TEST_SAMPLES.get(test_dir.name, "-")
    if sample_path.is_file():
        sample = read_csv_checked(sample_path, ["ImageId", "EncodedPixels"])
        _check_sample_ids(table["id"], sample["ImageId"], sample_path)
    return TestSet(table)


def _dsb_test_folder(data_dir: Path) -> Path:
    """The stage-2 test folder, else stage 1's; where Kaggle mounts only `<folder>.zip`, it is
    extracted to the temporary folder (the input folder is read-only) beside its sample CSV."""
    import shutil
    import tempfile
    import zipfile

    for name in DSB_TEST_SAMPLES:
        if (data_dir / name).is_dir():
            return data_dir / name
    for name, sample in DSB_TEST_SAMPLES.items():
        archive = data_dir / f"{name}.zip"
        if archive.is_file():
            extracted = Path(tempfile.gettempdir()) / "kseg_dsb2018"
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(extracted / name)
            if (data_dir / sample).is_file():
                shutil.copy(data_dir / sample, extracted / sample)
            return extracted / name
    return data_dir


def _check_sample_ids(found: pd.Series, expected: pd.Series, sample_path: Path) -> None:
    found_set, expected_set = set(found), set(expected)
    if found_set == expected_set:
        return
    missing = sorted(expected_set - found_set)
    extra = sorted(found_set - expected_set)
    parts = []
    if missing:
        parts.append(f"{len(missing)} listed but not found (first {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} found but not listed (first {extra[0]})")
    raise InputError(f"{sample_path} does not match the test images: " + "; ".join(parts))


def _volumes(
    stream: Iterator[tuple[Any, ...]], table: pd.DataFrame
) -> Iterator[tuple[list[str], list[np.ndarray], list[np.ndarray | None]]]:
    """Group a uwmgi prediction stream (table order) into case-day volumes: ids, probabilities
    and class probabilities (None where the stream has none: its items are 3-tuples, or 4-tuples
    from `predict_probabilities(..., with_class_probabilities=True)`)."""
    case_days = table["case_day"].to_numpy()
    ids: list[str] = []
    probabilities: list[np.ndarray] = []
    class_probabilities: list[np.ndarray | None] = []
    current = None
    for position, image_id, probs, *rest in stream:
        if ids and case_days[position] != current:
            yield ids, probabilities, class_probabilities
            ids, probabilities, class_probabilities = [], [], []
        current = case_days[position]
        ids.append(image_id)
        probabilities.append(probs)
        class_probabilities.append(rest[0] if rest else None)
    if ids:
        yield ids, probabilities, class_probabilities


def uwmgi_rows(
    stream: Iterator[tuple[Any, ...]],
    table: pd.DataFrame,
    settings: Any,
    classes: Sequence[str],
) -> list[dict[str, str]]:
    """`id,class,predicted` rows (row-major RLE) for every slice and class, in table order.

    `stream`: (position, id, [K, H, W] probabilities) items, or with a fourth, the [K] class
    probabilities of a classification head, which `settings.gate_probability` needs.
    """
    from kaggle_seg.data.rle import encode_rle
    from kaggle_seg.postprocess import apply_z_continuity, postprocess_masks

    rows = []
    for ids, probabilities, class_probabilities in _volumes(stream, table):
        if settings.gate_probability is not None and any(c is None for c in class_probabilities):
            raise KsegError(_NO_HEAD)
        masks = np.stack(
            [
                postprocess_masks(p, settings, class_probabilities=c)
                for p, c in zip(probabilities, class_probabilities, strict=True)
            ]
        )
        if settings.z_continuity:
            masks = apply_z_continuity(masks)
        for image_id, slice_masks in zip(ids, masks, strict=True):
            for organ, mask in zip(classes, slice_masks, strict=True):
                rle = encode_rle(mask, "C") if mask.any() else ""
                rows.append({"id": image_id, "class": organ, "predicted": rle})
    return rows


_NO_HEAD = (
    "the post-processing sets gate_probability (an empty-slice gate on a classification head's "
    "probability) but no checkpoint has a classification head (model.params.aux_params): "
    "remove gate_probability or add a model with a head"
)


def dsb_rows(stream: Iterator[tuple[int, str, np.ndarray]], settings: Any) -> list[dict[str, str]]:
    """`ImageId,EncodedPixels` rows (column-major RLE), one per nucleus, `<id>,` for none."""
    from kaggle_seg.data.rle import encode_rle
    from kaggle_seg.postprocess import postprocess_instances

    rows = []
    for _, image_id, probabilities in stream:
        labels = postprocess_instances(probabilities, settings)
        n = int(labels.max())
        if n == 0:
            rows.append({"ImageId": image_id, "EncodedPixels": ""})
            continue
        for k in range(1, n + 1):
            nucleus = labels == k
            if nucleus.any():
                rows.append({"ImageId": image_id, "EncodedPixels": encode_rle(nucleus, "F")})
    return rows


def load_settings(members: Sequence[Any], postprocess: Path | None) -> tuple[Any, str]:
    """The post-processing to apply and where it came from: `--postprocess`, else
    postprocess.json beside the first checkpoint's experiment (from `kseg tune`), else defaults."""
    from kaggle_seg.postprocess import default_postprocess, load_postprocess

    if postprocess is not None:
        return load_postprocess(postprocess), str(postprocess)
    for member in members:
        for folder in (member.source.parent, member.source.parent.parent):
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


def write_submission(
    checkpoints: Sequence[Path],
    data_dir: Path,
    out: Path | None = None,
    *,
    weights: Sequence[float] | None = None,
    test_dir: Path | None = None,
    postprocess: Path | None = None,
    tta: str = "flip",
    merge: str = "mean",
    ensemble: str = "mean",
    batch_size: int = 8,
    num_workers: int = 2,
    device: str | None = None,
    on_error: str = "fail",
    fallback_case_days: int = 2,
    batched_tta: bool = True,
) -> SubmitResult:
    """Predict the test images with the checkpoints' ensemble and write the submission CSV."""
    import torch

    from kaggle_seg.competitions import get_competition
    from kaggle_seg.predict import load_ensemble, predict_probabilities
    from kaggle_seg.submission import validate_dsb_submission, validate_uwmgi_submission

    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    members = load_ensemble(checkpoints, weights, device)
    competition_name = members[0].config.data.competition
    competition = get_competition(competition_name)
    if competition_name == "uwmgi":
        test = uwmgi_test_set(data_dir, test_dir, fallback_case_days)
    elif competition_name == "dsb2018":
        test = dsb_test_set(data_dir, test_dir)
    else:
        raise KsegError(
            f"{competition_name} has no Kaggle submission format; use `kseg predict --save` "
            "for its probabilities"
        )
    settings, source = load_settings(members, postprocess)
    if list(settings.classes) != list(members[0].classes):
        raise KsegError(
            f"post-processing {source} is for classes {settings.classes}, the checkpoints "
            f"predict {list(members[0].classes)}"
        )
    gate_on_head = settings.gate_probability is not None
    if gate_on_head and not any(m.has_class_head for m in members):
        raise KsegError(f"{source}: {_NO_HEAD}")
    if gate_on_head and competition_name != "uwmgi":
        raise KsegError(
            f"{source}: gate_probability is not applied to {competition_name} instances; remove it"
        )
    notes = [*test.notes, f"post-processing: {source}"]
    stream = predict_probabilities(
        members,
        competition,
        test.table,
        tta=tta,
        merge=merge,
        ensemble=ensemble,  # type: ignore[arg-type]
        batch_size=batch_size,
        num_workers=num_workers,
        on_error=on_error,  # type: ignore[arg-type]
        batched_tta=batched_tta,
        with_class_probabilities=gate_on_head,
    )
    table = test.table
    experiment = "+".join(dict.fromkeys(m.config.name for m in members))
    out = Path(out) if out else default_submission_path(competition_name, experiment)
    shapes = dict(zip(table["id"], zip(table["height"], table["width"], strict=True), strict=True))
    if competition_name == "uwmgi":
        frame = pd.DataFrame(
            uwmgi_rows(stream, table, settings, competition.classes),
            columns=["id", "class", "predicted"],
        )
        if test.sample is not None:  # the hidden test: Kaggle's row order
            order = test.sample[["id", "class"]]
            frame = order.merge(frame, on=["id", "class"], how="left").fillna("")
        frame = validate_uwmgi_submission(
            frame, list(table["id"]), shapes, competition.classes, source=str(out)
        )
    else:
        frame = pd.DataFrame(dsb_rows(stream, settings), columns=["ImageId", "EncodedPixels"])
        frame = validate_dsb_submission(frame, shapes, source=str(out))
    write_csv_atomic(frame, out)
    return SubmitResult(
        out, competition_name, len(frame), len(table), time.perf_counter() - started, notes
    )


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
