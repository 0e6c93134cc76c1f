"""Blend several experiments' out-of-fold probabilities into one experiment folder, so that
`kseg tune` chooses the post-processing of the ensemble `kseg submit --checkpoints A
--checkpoints B` predicts, not of one member (on DSB fold 0, four members' own settings score
their blend's OOF 0.568-0.569 mAP, settings tuned on the blend 0.571).

The blend is the weighted mean of the members' probabilities, image by image, as
`predict_probabilities(ensemble="mean")` merges them at test time; one image is in memory at a
time. The folder it writes holds, per fold, the first member's config.yaml and the blended
oof.npz (and oof_classes.npz when every member has a classification head), plus blend.json
naming the members and weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kaggle_seg import runs
from kaggle_seg.config import save_config
from kaggle_seg.ensemble_weights import check_weights
from kaggle_seg.errors import KsegError
from kaggle_seg.io import atomic_path
from kaggle_seg.probabilities import (
    ProbabilityFile,
    decode_probabilities,
    encode_probabilities,
    load_class_oof,
    open_probabilities,
    save_class_oof,
    write_mappable_npz,
)

BLEND_FILE = "blend.json"
# What a blend writes in each fold folder.
_FOLD_FILES = (runs.CONFIG_FILE, runs.OOF_FILE, runs.OOF_CLASSES_FILE)

log = logging.getLogger(__name__)


def read_blend_members(folder: Path) -> list[tuple[str, float]] | None:
    """The (experiment, weight) pairs of the blend written into `folder`, as blend.json records
    them; None when `folder` holds no blend.json. An unreadable record is a KsegError naming it."""
    record = Path(folder) / BLEND_FILE
    if not record.is_file():
        return None
    try:
        blend = json.loads(record.read_text())
        pairs = zip(blend["experiments"], blend["weights"], strict=True)
        return [(str(experiment), float(weight)) for experiment, weight in pairs]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KsegError(f"{record}: not a blend record ({type(exc).__name__}: {exc})") from exc


def default_blend_dir(experiments: Sequence[Path]) -> Path:
    """runs/blend_<a>_<b>...: beside the first experiment, named for the members."""
    names = "_".join(Path(e).resolve().name for e in experiments)
    return Path(experiments[0]).resolve().parent / f"blend_{names}"


def _member_folds(experiments: Sequence[Path]) -> list[dict[int, Path]]:
    """fold -> fold folder of every member, checked to cover the same folds and to share the
    competition, targets and model outputs."""
    from kaggle_seg.tune import oof_folds, runs_agree

    members = [dict(oof_folds(e)) for e in experiments]
    first, first_folds = experiments[0], members[0]
    for experiment, folds in zip(experiments[1:], members[1:], strict=True):
        if set(folds) != set(first_folds):
            raise KsegError(
                f"{experiment}: out-of-fold predictions of folds {sorted(folds)}, {first}'s of "
                f"{sorted(first_folds)}: blend experiments trained on the same folds"
            )
    # One fold per member speaks for it: tune_experiment checks the folds within each.
    fold_dirs = [next(iter(folds.values())) for folds in members]
    config, _ = runs_agree(
        fold_dirs,
        ("competition", "targets", "options"),
        "blend experiments of one competition and model outputs",
        label=lambda fold_dir: str(fold_dir.parent),
    )
    for experiment, fold_dir in zip(experiments[1:], fold_dirs[1:], strict=True):
        other = runs.read_run_config(fold_dir).train.oof_tta
        if other != config.train.oof_tta:
            # Thresholds tuned on a mix fit neither way of predicting the test exactly.
            log.warning(
                "%s: OOF predicted with train.oof_tta %s, %s's with %s: the blend mixes them",
                experiment,
                other,
                first,
                config.train.oof_tta,
            )
    return members


def _blended_arrays(
    files: Sequence[ProbabilityFile], weights: Sequence[float], dtype: str
) -> Iterator[tuple[str, np.ndarray]]:
    """(id, stored blended [K, H, W]) one image at a time, in the first file's order."""
    first = files[0]
    for file in files[1:]:
        missing = [i for i in first if i not in file]
        extra = [i for i in file if i not in first]
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which"
            raise KsegError(
                f"{file.path}: {what} {first.path} does not: blend experiments whose folds hold "
                f"the same images ({len(missing)} missing, {len(extra)} extra)"
            )
    for image_id in first:
        total: np.ndarray | None = None
        for file, weight in zip(files, weights, strict=True):
            probabilities = decode_probabilities(file[image_id])
            if total is not None and probabilities.shape != total.shape:
                raise KsegError(
                    f"{file.path}: {image_id} has probabilities {probabilities.shape}, "
                    f"{first.path} {total.shape}"
                )
            total = weight * probabilities if total is None else total + weight * probabilities
        assert total is not None
        yield image_id, encode_probabilities(total, dtype)


def blend_oof(
    experiments: Sequence[Path], out: Path, weights: Sequence[float] | None = None
) -> Path:
    """Write the members' weighted-mean OOF as an experiment folder `out` for `tune_experiment`.

    Members must cover the same folds with the same images (the same folds.csv) and share the
    competition, targets and model outputs; weights (default equal) are normalised to sum 1.
    """
    experiments, out = [Path(e) for e in experiments], Path(out)
    if len(experiments) < 2:
        raise KsegError("blending needs two experiments or more")
    if out.resolve() in {e.resolve() for e in experiments}:
        raise KsegError(f"{out}: the blend would overwrite one of its members; choose another")
    _check_blend_dir(out)
    values = check_weights(weights, len(experiments), "experiment")
    total = sum(values)
    shares = [w / total for w in values]
    members = _member_folds(experiments)
    # Written first: an interrupted blend is still a blend, which the next run may rewrite.
    record = {"experiments": [str(e.resolve()) for e in experiments], "weights": shares}
    with atomic_path(out / BLEND_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    _remove_stale_folds(out, set(members[0]))
    for fold in sorted(members[0]):
        fold_dirs = [m[fold] for m in members]
        config = runs.read_run_config(fold_dirs[0])
        files = [open_probabilities(d / runs.OOF_FILE) for d in fold_dirs]
        target = out / f"fold_{fold}"
        target.mkdir(parents=True, exist_ok=True)
        save_config(_with_found_paths(config, fold_dirs[0]), target / runs.CONFIG_FILE)
        write_mappable_npz(
            _blended_arrays(files, shares, config.train.oof_dtype), target / runs.OOF_FILE
        )
        heads = [d / runs.OOF_CLASSES_FILE for d in fold_dirs]
        if all(p.is_file() for p in heads):
            loaded = [load_class_oof(p) for p in heads]
            save_class_oof(
                {
                    i: sum(w * c[i] for w, c in zip(shares, loaded, strict=True))
                    for i in loaded[0]
                    if all(i in c for c in loaded)
                },
                target / runs.OOF_CLASSES_FILE,
            )
        else:
            (target / runs.OOF_CLASSES_FILE).unlink(missing_ok=True)
    return out


def _with_found_paths(config: Any, fold_dir: Path) -> Any:
    """The member's config with data.table and data.folds as the absolute paths found from its
    run folder: the blend may sit elsewhere (--blend-dir), and tune, report and show find a
    relative table from the run's folder."""
    found = {}
    for key in ("table", "folds"):
        value = getattr(config.data, key)
        if value is not None and (path := runs.run_file(value, fold_dir)).is_file():
            found[key] = path.resolve()
    return config.model_copy(update={"data": config.data.model_copy(update=found)})


def _check_blend_dir(out: Path) -> None:
    """A blend writes config.yaml and oof.npz into `out`'s fold folders: `out` must be new,
    empty or an earlier blend (it holds blend.json), never a trained experiment or any other
    folder whose files it would replace."""
    if out.exists() and not out.is_dir():
        raise KsegError(f"{out}: not a folder; choose another --blend-dir")
    if out.is_dir() and not (out / BLEND_FILE).is_file() and any(out.iterdir()):
        raise KsegError(
            f"{out}: not empty and not an earlier blend (no {BLEND_FILE}): the blend would "
            "overwrite its files; choose another --blend-dir"
        )


def _remove_stale_folds(out: Path, folds: set[int]) -> None:
    """An earlier blend's fold folders that this one does not write (its members then held
    other folds): their files would be tuned with the new ones."""
    for fold, fold_dir in runs.list_folds(out):
        if fold in folds:
            continue
        for name in _FOLD_FILES:
            (fold_dir / name).unlink(missing_ok=True)
        if not any(fold_dir.iterdir()):
            fold_dir.rmdir()


def blend_for_tuning(
    experiments: Sequence[Path], weights: Sequence[float] | None, blend_dir: Path | None
) -> Path:
    """`kseg tune` with several --experiment: the blended experiment folder to tune."""
    if len(experiments) < 2:
        raise KsegError("--weights and --blend-dir need two --experiment folders or more")
    target = blend_dir or default_blend_dir(experiments)
    blend_oof(experiments, target, weights)
    log.info("blended the OOF of %d experiments into %s", len(experiments), target)
    return target
