"""`kseg tune`: post-processing settings chosen on out-of-fold probabilities by the competition
metric itself (uwmgi GI score, DSB 2018 mAP, LGG mean Dice), written to
`runs/<exp>/postprocess.json` for `kseg submit`. This module reads and writes; the mask search
(uwmgi, lgg) is `kaggle_seg.search`.

The OOF is read through memory maps (`open_probabilities`), one volume at a time: a whole
competition's OOF is never copied into memory. With a classification head's out-of-fold class
probabilities (oof_classes.npz in every fold) the per-class `gate_probability` is searched too.
The before / after numbers come from the public path (`postprocess_masks`,
`apply_z_continuity`, `postprocess_instances` and the metric functions), not from the search's
bookkeeping.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_seg import runs
from kaggle_seg.competitions import competition_for
from kaggle_seg.config import ExperimentConfig
from kaggle_seg.errors import KsegError
from kaggle_seg.postprocess import (
    PostprocessConfig,
    default_postprocess,
    save_postprocess,
)
from kaggle_seg.probabilities import ProbabilityFile, open_probabilities
from kaggle_seg.search import (
    SearchReport,
)
from kaggle_seg.tune_instances import tune_instance_settings
from kaggle_seg.tune_masks import Tuned, tune_image_masks, tune_volume_masks

_STORED_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16))

log = logging.getLogger(__name__)


@dataclass
class TuneResult:
    """What `kseg tune` reports: the metric with default and with chosen settings (`score` and
    its parts: uwmgi dice / hausdorff overall and per class, dsb2018 map, lgg dice)."""

    before: dict[str, float]
    after: dict[str, float]
    settings: PostprocessConfig
    n_images: int
    folds: list[int]
    path: Path | None = field(default=None)  # where the settings were written
    search: SearchReport | None = None  # uwmgi / lgg: what the search scored
    # What predicting nothing would score where the metric counts an empty match as 1 (per
    # image or per group), the floor a CV must clear to mean anything; None elsewhere.
    empty_prediction_score: float | None = None


# ----------------------------------------------------------------------------- inputs


def oof_folds(experiment_dir: Path) -> list[tuple[int, Path]]:
    """(fold, fold folder) of every `fold_<k>/` of the experiment holding an oof.npz, by fold."""
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise KsegError(f"{experiment_dir}: experiment folder not found")
    folds = runs.list_folds(experiment_dir, runs.OOF_FILE)
    if not folds:
        raise KsegError(
            f"no out-of-fold predictions in {experiment_dir}: train with kseg train first"
        )
    with_oof = {k for k, _ in folds}
    untuned = [k for k, _ in runs.list_folds(experiment_dir, runs.BEST_CHECKPOINT)]
    if untuned := [k for k in untuned if k not in with_oof]:
        # kseg submit predicts with them: the settings would be chosen without their images.
        log.warning(
            "%s: fold(s) %s have %s but no %s (still training, or stopped before the OOF "
            "pass: kseg train --resume): tuned without them",
            experiment_dir,
            ",".join(map(str, untuned)),
            runs.BEST_CHECKPOINT,
            runs.OOF_FILE,
        )
    return folds


def runs_agree(
    fold_dirs: Sequence[Path],
    fields: Sequence[str],
    advice: str,
    label: Callable[[Path], str] = lambda fold_dir: fold_dir.name,
) -> tuple[ExperimentConfig, list[str]]:
    """The first run's config and model output names, after checking that every run in
    `fold_dirs` shares the data `fields` (competition, table...) and the outputs; a mismatch
    names the run's file, the first run by `label`, and ends with `advice`."""
    configs = [(fold_dir, runs.read_run_config(fold_dir)) for fold_dir in fold_dirs]
    first_dir, first = configs[0]
    for fold_dir, config in configs[1:]:
        for what in fields:
            if getattr(config.data, what) != getattr(first.data, what):
                raise KsegError(
                    f"{fold_dir / runs.CONFIG_FILE}: data.{what} "
                    f"{getattr(config.data, what)!r} differs from {label(first_dir)}'s "
                    f"{getattr(first.data, what)!r}: {advice}"
                )
    outputs = runs.read_run_spec(first_dir, first).outputs
    for fold_dir, config in configs[1:]:
        other = runs.read_run_spec(fold_dir, config).outputs
        if other != outputs:
            raise KsegError(
                f"{fold_dir}: the model outputs {', '.join(other)}, {label(first_dir)}'s "
                f"{', '.join(outputs)}: {advice}"
            )
    return first, list(outputs)


def _experiment_config(folds: Sequence[tuple[int, Path]]) -> tuple[ExperimentConfig, list[str]]:
    """The folds' config and the names of their models' output channels (`ModelSpec.outputs`),
    which every fold must share."""
    fields = ("competition", "options", "table", "targets")
    config, outputs = runs_agree([d for _, d in folds], fields, "tune one experiment at a time")
    ttas = {k: runs.read_run_config(d).train.oof_tta for k, d in folds}
    if len(set(ttas.values())) > 1:
        # The thresholds would fit none of the ways kseg submit --tta predicts exactly.
        log.warning(
            "%s: OOF predicted with different train.oof_tta (%s): the settings are tuned on the "
            "mix",
            folds[0][1].parent,
            ", ".join(f"fold {k} {tta}" for k, tta in ttas.items()),
        )
    return config, outputs


def _table_path(config: ExperimentConfig, experiment_dir: Path) -> Path:
    if config.data.table is None:
        raise KsegError(f"{experiment_dir}: the fold config sets no data.table to score against")
    table = Path(config.data.table)
    if table.is_file() or table.is_absolute():
        return table
    # Relative to where training ran: the current directory, or the root above runs/<exp>/.
    beside = Path(experiment_dir).resolve().parent.parent / table
    return beside if beside.is_file() else table


def _select_groups(
    table: pd.DataFrame, group_column: str, max_images: int | None, seed: int
) -> pd.DataFrame:
    """Whole groups drawn at random until `max_images` rows (at least one group)."""
    if max_images is None or len(table) <= max_images:
        return table
    if max_images < 1:
        raise KsegError(f"--max-images {max_images}: need at least 1")
    sizes = table.groupby(group_column, sort=True).size()
    order = np.random.default_rng(seed).permutation(len(sizes))
    chosen, total = [], 0
    for index in order:
        if chosen and total + int(sizes.iloc[index]) > max_images:
            continue
        chosen.append(sizes.index[index])
        total += int(sizes.iloc[index])
    return table[table[group_column].isin(chosen)]


def _load_class_probabilities(
    folds: Sequence[tuple[int, Path]], table: pd.DataFrame, classes: Sequence[str]
) -> dict[str, np.ndarray] | None:
    """id -> float32 [K] head probabilities of the table's rows when every fold has an
    oof_classes.npz (a model with a classification head), else None."""
    from kaggle_seg.probabilities import load_class_oof

    if not all((fold_dir / runs.OOF_CLASSES_FILE).is_file() for _, fold_dir in folds):
        return None
    wanted = set(table["id"])
    found: dict[str, np.ndarray] = {}
    for _, fold_dir in folds:
        path = fold_dir / runs.OOF_CLASSES_FILE
        for image_id, array in load_class_oof(path).items():
            if image_id not in wanted:
                continue
            if array.shape != (len(classes),):
                raise KsegError(
                    f"{path}: {image_id} has class probabilities {array.shape}, expected "
                    f"({len(classes)},) ({', '.join(classes)})"
                )
            found[image_id] = array
    missing = wanted - set(found)
    if missing:
        raise KsegError(
            f"{len(missing)} image(s) with out-of-fold masks have no class probabilities in "
            f"{runs.OOF_CLASSES_FILE}, first {sorted(missing)[0]!r}"
        )
    return found


def _open_folds(folds: Sequence[tuple[int, Path]]) -> list[ProbabilityFile]:
    return [open_probabilities(fold_dir / runs.OOF_FILE) for _, fold_dir in folds]


def _probability_files(
    files: Sequence[ProbabilityFile], rows: pd.DataFrame, classes: Sequence[str]
) -> dict[str, ProbabilityFile]:
    """id -> the OOF file holding the row's probabilities, each checked for its shape [K, H, W]
    at the image's size and a stored dtype (uint8 or float16); nothing is read but headers of
    mapped arrays."""
    wanted = set(rows["id"])
    shapes = dict(zip(rows["id"], zip(rows["height"], rows["width"], strict=True), strict=True))
    found: dict[str, ProbabilityFile] = {}
    for file in files:
        for image_id in file:
            if image_id not in wanted:
                continue
            if image_id in found:
                raise runs.validated_twice(file.path, image_id, found[image_id].path)
            shape, dtype = file.header(image_id)
            expected = (len(classes), *(int(n) for n in shapes[image_id]))
            if shape != expected:
                raise KsegError(
                    f"{file.path}: {image_id} has probabilities {shape}, expected "
                    f"{expected} ({len(classes)} channel(s) {', '.join(classes)} at the image's "
                    "size)"
                )
            if dtype not in _STORED_DTYPES:
                raise KsegError(
                    f"{file.path}: {image_id} is stored as {dtype}; kseg writes OOF "
                    "probabilities as float16 or uint8 (train.oof_dtype)"
                )
            found[image_id] = file
    return found


def _read_rows(
    folds: Sequence[tuple[int, Path]],
    files: Sequence[ProbabilityFile],
    config: ExperimentConfig,
    experiment_dir: Path,
    group_column: str,
    max_images: int | None,
    seed: int,
) -> pd.DataFrame:
    """The table rows that have OOF probabilities (subsampled by whole groups), table order."""
    from kaggle_seg.prepare import read_table

    table_path = _table_path(config, experiment_dir)
    table = read_table(table_path)
    known = set(table["id"])
    with_oof: set[str] = set()
    for (_, fold_dir), file in zip(folds, files, strict=True):
        unknown = [i for i in file if i not in known]
        if unknown:
            raise KsegError(
                f"{fold_dir / runs.OOF_FILE}: {len(unknown)} id(s) not in the table "
                f"{table_path}, first {unknown[0]!r}"
            )
        with_oof.update(file)
    rows = table[table["id"].isin(with_oof)]
    return _select_groups(rows, group_column, max_images, seed).reset_index(drop=True)


# ----------------------------------------------------------------------------- entry point


_Tuner = Callable[..., Tuned]
# One tuner per scoring kind (competitions/base.py): volumes search masks with the z-continuity
# rule on the GI score; groups and images search masks on the group / image Dice; instances
# search the nuclei split on the mAP.
TUNERS: dict[str, _Tuner] = {
    "volumes": tune_volume_masks,
    "groups": tune_image_masks,
    "images": tune_image_masks,
    "instances": tune_instance_settings,
}


def empty_prediction_score(rows: pd.DataFrame, scoring: str, group_column: str) -> float | None:
    """The score of predicting nothing on `rows`: the share of images (scoring "images") or of
    groups ("groups": a patient's volume) with empty truth, each scoring 1 while the rest score
    0. None for the GI score and the nuclei mAP, where it is no simple share."""
    if "empty" not in rows or not len(rows):
        return None
    empty = rows["empty"].astype(str).str.lower().isin(["true", "1"])
    if scoring == "images":
        return float(empty.mean())
    if scoring == "groups":
        return float(empty.groupby(rows[group_column]).all().mean())
    return None


def get_tuner(scoring: str) -> _Tuner:
    """The tuner of a scoring kind; a KeyError lists those there are."""
    try:
        return TUNERS[scoring]
    except KeyError:
        raise KeyError(f"no tuner for {scoring!r}; choose one of {', '.join(TUNERS)}") from None


def tune_experiment(
    experiment_dir: Path,
    *,
    out: Path | None = None,
    max_images: int | None = None,
    seed: int = 0,
    rounds: int = 2,
) -> TuneResult:
    """Choose post-processing settings on the experiment's out-of-fold probabilities.

    experiment_dir: `runs/<exp>/` with `fold_<k>/{config.yaml, oof.npz}`; every fold with an
    oof.npz is used, its truth read through the config's `data.table`. When every such fold also
    has oof_classes.npz (a classification head), uwmgi / lgg also tune `gate_probability`.
    max_images: score whole groups (uwmgi case-days, lgg patients, dsb images) drawn with `seed`,
    up to this many images. rounds: passes of coordinate descent. Writes the settings to `out`
    (default `experiment_dir / "postprocess.json"`); `after["score"] >= before["score"]` always.
    """
    experiment_dir = Path(experiment_dir)
    if out is not None and Path(out).is_dir():  # found now, not after the search
        raise KsegError(
            f"--out {out}: is a folder; give the settings file, e.g. "
            f"{Path(out) / runs.POSTPROCESS_FILE}"
        )
    folds = oof_folds(experiment_dir)
    config, classes = _experiment_config(folds)
    competition = competition_for(config.data)
    tuner = get_tuner(competition.scoring)
    group_column = competition.volume_key or "group"
    files = _open_folds(folds)
    rows = _read_rows(folds, files, config, experiment_dir, group_column, max_images, seed)
    holders = _probability_files(files, rows, classes)
    class_probabilities = _load_class_probabilities(folds, rows, classes)
    tuned = tuner(
        competition, rows, holders, classes, rounds, class_probabilities=class_probabilities
    )
    settings, data, score, report = tuned.settings, tuned.data, tuned.score, tuned.report
    started = time.perf_counter()
    before = tuned.before or score(data, default_postprocess(classes), "score with defaults")
    after = score(data, settings, "score tuned")
    if report is not None:
        report.seconds["scoring"] = time.perf_counter() - started
    if after["score"] < before["score"] or math.isnan(after["score"]):
        # Cannot happen while the search's bookkeeping matches the public path (tested); if it
        # ever does, the defaults are the safe answer.
        settings, after = default_postprocess(classes), before
    path = save_postprocess(settings, Path(out) if out else experiment_dir / runs.POSTPROCESS_FILE)
    return TuneResult(
        before=before,
        after=after,
        settings=settings,
        n_images=len(rows),
        folds=[fold for fold, _ in folds],
        path=path,
        search=report,
        empty_prediction_score=empty_prediction_score(rows, competition.scoring, group_column),
    )
