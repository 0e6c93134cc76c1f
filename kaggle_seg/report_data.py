"""What `kseg report` shows, read from run folders: configs, histories, and the out-of-fold
predictions scored with the competition metric, with default and with tuned post-processing.

Scores are recomputed from `fold_<k>/oof.npz` through the public post-processing and metric
functions (`postprocess_masks`, `apply_z_continuity`, `postprocess_instances`,
`uwmgi_score_volumes`, `volume_dice`, `dsb_image_score`), the path `kseg tune` reports its
before / after numbers from, so the page states the same CV per fold and overall:

- uwmgi: per (case-day, class) Dice and 3D Hausdorff; the score from all of them;
- lgg: per image Dice and per patient volume Dice; the score is the patients' mean;
- dsb2018: per image mAP, with its nuclei count and size; the score is the images' mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kaggle_seg import runs
from kaggle_seg.errors import KsegError

# One scorer per competition: (competition, rows of one fold in table order, id -> [K, H, W]
# probabilities, id -> [K] head probabilities or None, settings) -> (images, volumes) per setting.
Frames = tuple[pd.DataFrame, pd.DataFrame | None]


@dataclass
class FoldRun:
    fold: int
    path: Path
    config: Any  # ExperimentConfig
    history: pd.DataFrame | None


@dataclass
class ExperimentRun:
    """One experiment (or a single fold folder) as the report reads it."""

    name: str
    path: Path
    folds: list[FoldRun]
    config_text: str
    settings: Any = None  # PostprocessConfig from postprocess.json, None when not tuned
    settings_path: Path | None = None  # that postprocess.json
    cv: pd.DataFrame | None = None  # index fold k ... and "all"; columns before, after
    images: pd.DataFrame | None = None  # per image, with its fold: scores under the tuned settings
    volumes: pd.DataFrame | None = None  # uwmgi per (case_day, class); lgg per patient
    notes: list[str] = field(default_factory=list)

    @property
    def competition(self) -> str:
        return self.folds[0].config.data.competition

    @property
    def plugin(self) -> Any:
        """The competition plug-in, set up by the run's data.options."""
        from kaggle_seg.competitions import competition_for

        return competition_for(self.folds[0].config.data)


def read_run(path: str | Path) -> ExperimentRun:
    """An experiment folder (runs/<exp>, every fold_<k>) or one fold folder."""
    path = Path(path)
    folds = runs.list_folds(path, runs.CONFIG_FILE)
    if not folds:
        raise KsegError(
            f"{path}: no fold_<k>/{runs.CONFIG_FILE} (an experiment folder runs/<exp> or a fold "
            "folder of `kseg train`)"
        )
    fold_runs = []
    for fold, folder in folds:
        history = runs.read_history(folder)
        fold_runs.append(FoldRun(fold, folder, runs.read_run_config(folder), history))
    single = runs.is_fold_dir(path)
    experiment_dir = path.parent if single else path
    name = f"{experiment_dir.name}/{path.name}" if single else path.name
    run = ExperimentRun(
        name=name,
        path=path,
        folds=fold_runs,
        config_text=(folds[0][1] / runs.CONFIG_FILE).read_text(),
    )
    blend_note = _blend_note(experiment_dir)
    if blend_note:
        # A blend's config.yaml is its first member's (blend.py): say so, not show it as the model.
        run.notes.append(blend_note)
        run.config_text = f"# {blend_note}\n{run.config_text}"
    settings_path = experiment_dir / runs.POSTPROCESS_FILE
    if settings_path.is_file():
        from kaggle_seg.postprocess import load_postprocess

        run.settings, run.settings_path = load_postprocess(settings_path), settings_path
    return run


def _blend_note(experiment_dir: Path) -> str | None:
    """One line naming a blend's members and weights (`kseg tune --experiment A --experiment
    B`), or None when `experiment_dir` is not a blend."""
    from kaggle_seg.blend import read_blend_members

    pairs = read_blend_members(experiment_dir)
    if pairs is None:
        return None
    members = [f"{Path(e).name} ({w:.2f})" for e, w in pairs]
    return (
        f"a blend of {len(members)} experiments: {', '.join(members)}; "
        "the config below is its first member's"
    )


def score_run(run: ExperimentRun) -> None:
    """Fill run.cv / images / volumes from the folds' oof.npz (folds without one are noted)."""
    from kaggle_seg.competitions import competition_for
    from kaggle_seg.explain import table_of
    from kaggle_seg.postprocess import check_settings_fit, default_postprocess
    from kaggle_seg.probabilities import NpzProbabilities, load_class_oof

    scored = [f for f in run.folds if (f.path / runs.OOF_FILE).is_file()]
    for fold in run.folds:
        if fold not in scored:
            run.notes.append(f"fold {fold.fold}: no {runs.OOF_FILE}, not scored")
    if not scored:
        return
    config = scored[0].config
    competition = competition_for(config.data)
    table = table_of(config, scored[0].path)
    scorer = get_scorer(competition.scoring)
    outputs = runs.read_run_spec(scored[0].path, config).outputs
    settings = [default_postprocess(list(outputs))]
    if run.settings is not None:
        check_settings_fit(run.settings, outputs, run.settings_path)
        settings.append(run.settings)
    per_setting: list[list[Frames]] = [[] for _ in settings]
    seen: dict[str, Path] = {}  # id -> the OOF file that validated it
    for fold in scored:
        with NpzProbabilities([fold.path / runs.OOF_FILE]) as probabilities:
            _check_distinct(seen, fold.path / runs.OOF_FILE, probabilities)
            rows = table[table["id"].astype(str).isin(set(probabilities))]
            if len(rows) != len(probabilities):
                raise KsegError(
                    f"{fold.path / runs.OOF_FILE}: {len(probabilities) - len(rows)} id(s) not "
                    f"in the table {config.data.table}"
                )
            classes_path = fold.path / runs.OOF_CLASSES_FILE
            heads = load_class_oof(classes_path) if classes_path.is_file() else None
            for k, (images, volumes) in enumerate(
                scorer.score(competition, rows, probabilities, heads, settings)
            ):
                images.insert(0, "fold", fold.fold)
                if volumes is not None:
                    volumes.insert(0, "fold", fold.fold)
                per_setting[k].append((images, volumes))
    cv = {}
    for k, name in enumerate(("before", "after")[: len(settings)]):
        frames = per_setting[k]
        column = {str(f.fold): scorer.summary(*frames[i]) for i, f in enumerate(scored)}
        images = pd.concat([f[0] for f in frames], ignore_index=True)
        volumes = [f[1] for f in frames if f[1] is not None]
        volume_frame = pd.concat(volumes, ignore_index=True) if volumes else None
        column["all"] = scorer.summary(images, volume_frame)
        cv[name] = column
        run.images, run.volumes = images, volume_frame  # the last: tuned when tuned
    run.cv = pd.DataFrame(cv)
    if "after" not in run.cv:
        run.cv["after"] = math.nan


def _check_distinct(seen: dict[str, Path], path: Path, ids: Any) -> None:
    """Each image in one fold's OOF only: a fold trained on another split would be counted
    twice in the CV (and `kseg tune` refuses it the same way)."""
    for image_id in ids:
        if image_id in seen:
            raise runs.validated_twice(path, image_id, seen[image_id])
        seen[image_id] = path


# --- scorers -----------------------------------------------------------------------------------


def _pooled_dice(truth: np.ndarray, masks: np.ndarray) -> float:
    """Dice of all classes pooled; NaN where truth and prediction are both empty."""
    both = int(truth.sum()) + int(masks.sum())
    return 2.0 * float(np.logical_and(truth, masks).sum()) / both if both else math.nan


def _score_masks(
    competition: Any,
    rows: pd.DataFrame,
    probabilities: Mapping[str, np.ndarray],
    heads: Mapping[str, np.ndarray] | None,
    settings: Sequence[Any],
) -> list[Frames]:
    """Masks per image by each setting; scored by volume (uwmgi: per case-day), by group (lgg:
    per patient) or by image."""
    from kaggle_seg.metrics import pixel_counts, uwmgi_score_volumes, volume_dice
    from kaggle_seg.postprocess import apply_z_continuity, postprocess_masks

    n_classes = len(competition.classes)
    uwmgi = competition.scoring == "volumes"
    group = competition.volume_key if uwmgi else "group"
    image_rows: list[list[dict]] = [[] for _ in settings]
    volume_rows: list[list[pd.DataFrame]] = [[] for _ in settings]
    for day, part in rows.groupby(group, sort=False):
        truths = [competition.read_mask(row) for row in part.to_dict("records")]
        for k, setting in enumerate(settings):
            masks = np.stack(
                [
                    postprocess_masks(
                        probabilities[str(i)][:n_classes],
                        setting,
                        class_probabilities=None if heads is None else heads.get(str(i)),
                    )
                    for i in part["id"]
                ]
            )  # [D, K, H, W]
            if uwmgi and setting.z_continuity:
                masks = apply_z_continuity(masks)
            predicted = np.moveaxis(masks, 1, -1)  # [D, H, W, K]
            for i, (image_id, truth) in enumerate(zip(part["id"], truths, strict=True)):
                row = {"id": str(image_id), group: day, "score": _pooled_dice(truth, predicted[i])}
                if not uwmgi:
                    row.update(pixel_counts(truth, predicted[i]))
                image_rows[k].append(row)
            if uwmgi:
                result = uwmgi_score_volumes(
                    [(day, np.stack(truths), predicted)], competition.classes
                )
                volume_rows[k].append(result["per_volume"])
    frames: list[Frames] = []
    for k in range(len(settings)):
        images = pd.DataFrame(image_rows[k])
        if uwmgi:
            volumes = pd.concat(volume_rows[k], ignore_index=True)
        elif competition.scoring == "images":
            volumes = None
        else:
            dice = volume_dice(images, group)
            volumes = pd.DataFrame({"patient": dice.index, "dice": dice.to_numpy()})
        frames.append((images, volumes))
    return frames


def _score_instances(
    competition: Any,
    rows: pd.DataFrame,
    probabilities: Mapping[str, np.ndarray],
    heads: Mapping[str, np.ndarray] | None,
    settings: Sequence[Any],
) -> list[Frames]:
    """dsb2018: per image mAP of the instances each setting makes, with nuclei count and size."""
    from kaggle_seg.metrics import dsb_image_score
    from kaggle_seg.postprocess import postprocess_instances

    image_rows: list[list[dict]] = [[] for _ in settings]
    for row in rows.to_dict("records"):
        truth = competition.read_instances(row)
        probability = probabilities[str(row["id"])]
        nuclei = len(np.unique(truth)) - int((truth == 0).any())
        for k, setting in enumerate(settings):
            score = dsb_image_score(truth, postprocess_instances(probability, setting))
            image_rows[k].append(
                {
                    "id": str(row["id"]),
                    "score": score,
                    "nuclei": nuclei,
                    "height": int(row["height"]),
                    "width": int(row["width"]),
                }
            )
    return [(pd.DataFrame(image_rows[k]), None) for k in range(len(settings))]


def _summary_uwmgi(images: pd.DataFrame, volumes: pd.DataFrame | None) -> float:
    from kaggle_seg.evaluation import uwmgi_score_from_volume_rows

    return (
        float(uwmgi_score_from_volume_rows(volumes)["score"]) if volumes is not None else math.nan
    )


def _summary_lgg(images: pd.DataFrame, volumes: pd.DataFrame | None) -> float:
    return float(volumes["dice"].mean()) if volumes is not None and len(volumes) else math.nan


def _summary_images(images: pd.DataFrame, volumes: pd.DataFrame | None) -> float:
    return float(images["score"].mean()) if len(images) else math.nan


def _summary_image_dice(images: pd.DataFrame, volumes: pd.DataFrame | None) -> float:
    """The mean per-image Dice as training scores it (empty in truth and prediction: 1)."""
    from kaggle_seg.metrics import volume_dice

    return float(volume_dice(images, "id").mean()) if len(images) else math.nan


@dataclass(frozen=True)
class Scorer:
    score: Callable[..., list[Frames]]
    summary: Callable[[pd.DataFrame, pd.DataFrame | None], float]
    unit: str  # what one point of the distribution is


# One scorer per scoring kind (competitions/base.py).
SCORERS: dict[str, Scorer] = {
    "volumes": Scorer(_score_masks, _summary_uwmgi, "case-day x class"),
    "groups": Scorer(_score_masks, _summary_lgg, "patient"),
    "images": Scorer(_score_masks, _summary_image_dice, "image"),
    "instances": Scorer(_score_instances, _summary_images, "image"),
}


def get_scorer(scoring: str) -> Scorer:
    """The report scorer of a scoring kind; a KeyError lists those there are."""
    try:
        return SCORERS[scoring]
    except KeyError:
        raise KeyError(
            f"no report scorer for {scoring!r}; choose one of {', '.join(SCORERS)}"
        ) from None


def speed(run: ExperimentRun) -> pd.DataFrame:
    """Per fold: epochs, best epoch and value of the monitored column, training time, images/s."""
    rows = []
    for fold in run.folds:
        history = fold.history
        if history is None or history.empty:
            continue
        monitor = fold.config.train.monitor
        best = None
        values = pd.to_numeric(history.get(monitor, pd.Series(dtype=float)), errors="coerce")
        if values.notna().any():
            best_index = (
                values.idxmax() if fold.config.train.monitor_mode == "max" else values.idxmin()
            )
            epoch = history["epoch"][best_index] if "epoch" in history.columns else best_index + 1
            best = (int(epoch), float(values[best_index]))
        seconds, rate = (
            pd.to_numeric(history[c], errors="coerce") if c in history.columns else None
            for c in ("train_seconds", "images_per_s")
        )
        rows.append(
            {
                "fold": fold.fold,
                "epochs": len(history),
                "best epoch": best[0] if best else None,
                f"best {monitor}": best[1] if best else None,
                "train minutes": float(seconds.sum()) / 60 if seconds is not None else None,
                "images/s (median)": float(rate.median()) if rate is not None else None,
            }
        )
    return pd.DataFrame(rows)
