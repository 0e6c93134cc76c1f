"""`kseg show`: image | truth | prediction panels and overlays as PNG, headless (Agg canvas).

Probabilities are float [K, H, W] at the image's own size, as `oof.npz` and `kseg predict --save`
store them; channels past the competition's classes (the dsb2018 border channel) are not drawn but
feed the instance split. Images, truths and probabilities are loaded one id at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kaggle_seg import paths
from kaggle_seg.competitions import get_competition
from kaggle_seg.competitions.base import Competition
from kaggle_seg.errors import KsegError
from kaggle_seg.io import atomic_path

PANEL_INCHES = 4.0  # width of one panel; its height follows the image's aspect ratio
TITLE_INCHES = 0.65  # two lines (the id, then the score) above the panel titles
DPI = 100
TRUTH_COLOUR = (0.0, 1.0, 0.0)
PREDICTION_COLOUR = (1.0, 0.0, 0.0)
BOTH_COLOUR = (1.0, 1.0, 0.0)  # truth and prediction outlines on the same pixels
# One colour per uwmgi class (large bowel, small bowel, stomach), apart from green and red.
CLASS_COLOURS = ((1.0, 0.65, 0.0), (0.15, 0.55, 1.0), (1.0, 0.2, 0.85))
FILL_ALPHA = 0.4
_MAX_LISTED = 5


# ---- choosing ids -----------------------------------------------------------------------------


def _listed(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_MAX_LISTED])
    return shown + (f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else "")


def select_ids(
    scores: pd.DataFrame | None,
    available: Sequence[str],
    *,
    ids: Sequence[str] | None = None,
    random: int | None = None,
    worst: int | None = None,
    typical: int | None = None,
    seed: int = 0,
) -> list[str]:
    """The ids to draw: exactly one of `ids` (as given, duplicates dropped), `random` (that many
    of `available`, reproducible from `seed`), `worst` (the lowest `score` of `scores`, a frame
    with columns id, score such as `image_scores` returns; unscored ids are never picked) or
    `typical` (the scores nearest the median, what most images look like).
    """
    options = (("ids", ids), ("random", random), ("worst", worst), ("typical", typical))
    chosen = [name for name, value in options if value is not None]
    if len(chosen) != 1:
        raise KsegError(
            "choose exactly one of ids, random, worst or typical "
            f"(got {', '.join(chosen) or 'none'})"
        )
    known = set(available)
    if ids is not None:
        wanted = list(dict.fromkeys(str(i) for i in ids))
        if not wanted:
            raise KsegError("ids: no id given")
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise KsegError(f"not in the predictions: {_listed(unknown)}")
        return wanted
    count = next(value for name, value in options if name == chosen[0])
    if count is None or count < 1:
        raise KsegError(f"{chosen[0]}: need a count of at least 1, got {count}")
    if random is not None:
        # Sorted first, so the draw depends on the seed and the id set, not on their order.
        pool = sorted(known)
        picks = np.random.default_rng(seed).choice(len(pool), size=min(count, len(pool)),
                                                   replace=False)  # fmt: skip
        return [pool[i] for i in picks]
    name = chosen[0]
    if scores is None or "score" not in scores.columns or "id" not in scores.columns:
        raise KsegError(f"{name}: needs per-image scores (columns id, score; lower is worse)")
    scored = scores[scores["id"].astype(str).isin(known) & scores["score"].notna()]
    if scored.empty:
        raise KsegError(f"{name}: no image has a score (do the images have truth masks?)")
    if typical is not None:
        scored = scored.assign(score=(scored["score"] - scored["score"].median()).abs())
    # Stable sort on (score, id): ties go to the smaller id, whatever the frame's order.
    scored = scored.sort_values(["score", "id"], kind="mergesort")
    return [str(i) for i in scored["id"].head(count)]


# ---- scoring ----------------------------------------------------------------------------------


def _competition(competition: str | Competition) -> Competition:
    return get_competition(competition) if isinstance(competition, str) else competition


def _has_truth(competition: Competition, row: pd.Series) -> bool:
    """Whether the table row carries labels (a test image's row does not)."""
    if competition.name == "uwmgi":
        from kaggle_seg.competitions.uwmgi import RLE_COLUMNS

        # An empty RLE is a known empty mask; only missing columns mean unknown.
        return all(column in row.index and isinstance(row[column], str) for column in RLE_COLUMNS)
    return any(
        isinstance(row.get(column), str) and bool(row.get(column))
        for column in ("mask_dir", "labels_csv", "mask_path")
    )


def _read_truth(competition: Competition, row: pd.Series) -> np.ndarray:
    """int32 [H, W] nucleus labels for dsb2018, else uint8 [K, H, W] class masks."""
    if competition.name == "dsb2018":
        return competition.read_instances(row)  # type: ignore[attr-defined]
    return np.moveaxis(competition.read_mask(row), -1, 0)


def _check_shape(image_id: str, probabilities: np.ndarray, height: int, width: int) -> None:
    if probabilities.ndim != 3 or probabilities.shape[1:] != (height, width):
        raise KsegError(
            f"{image_id}: probabilities of shape {probabilities.shape}, expected "
            f"[K, {height}, {width}] (the image's own size)"
        )


def _score(
    competition: Competition, truth: np.ndarray, probabilities: np.ndarray, threshold: float
) -> dict[str, float]:
    """{"score", "dice"} of one image: dsb2018 score = image mAP, else score = pooled Dice."""
    from kaggle_seg.metrics import dsb_image_score, pixel_metrics
    from kaggle_seg.postprocess import binarize, split_instances

    masks = binarize(probabilities[: len(competition.classes)], threshold)
    if competition.name == "dsb2018":
        dice = pixel_metrics(truth > 0, masks[0])["dice"]
        score = dsb_image_score(truth, split_instances(probabilities, threshold))
        return {"score": score, "dice": dice}
    dice = pixel_metrics(truth, masks)["dice"]
    return {"score": dice, "dice": dice}


def _rows_by_id(table: pd.DataFrame) -> dict[str, int]:
    if not table["id"].is_unique:
        duplicated = table.loc[table["id"].duplicated(), "id"].astype(str).tolist()
        raise KsegError(f"table: id(s) listed twice: {_listed(duplicated)}")
    return {str(image_id): position for position, image_id in enumerate(table["id"])}


def _table_row(table: pd.DataFrame, positions: Mapping[str, int], image_id: str) -> pd.Series:
    if image_id not in positions:
        raise KsegError(f"{image_id}: not in the table (wrong table for these predictions?)")
    return table.iloc[positions[image_id]]


def image_scores(
    competition: str | Competition,
    table: pd.DataFrame,
    probabilities: Mapping[str, np.ndarray],
    *,
    threshold: float = 0.5,
) -> pd.DataFrame:
    """Per-image scores, columns id, score, dice (one row per id of `probabilities` whose table
    row has truth, in that order). uwmgi / lgg: score = pixel Dice pooled over the classes;
    dsb2018: score = the image's mAP after `split_instances`, dice = Dice of the nuclei union.
    Lower is worse. probabilities: id -> float [K, H, W] at the image's own size.
    """
    competition = _competition(competition)
    positions = _rows_by_id(table)
    rows = []
    for image_id in probabilities:
        row = _table_row(table, positions, str(image_id))
        if not _has_truth(competition, row):
            continue
        probability = np.asarray(probabilities[image_id], dtype=np.float32)
        _check_shape(str(image_id), probability, int(row["height"]), int(row["width"]))
        truth = _read_truth(competition, row)
        rows.append({"id": str(image_id), **_score(competition, truth, probability, threshold)})
    return pd.DataFrame(rows, columns=["id", "score", "dice"])


# ---- drawing ----------------------------------------------------------------------------------


def _display_image(competition: Competition, image: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1]: dsb2018 RGB, else the middle channel (uwmgi's only slice,
    lgg's FLAIR) as gray; one contrast stretch for all channels, so colours keep their balance.
    """
    if competition.name != "dsb2018":
        image = np.repeat(image[..., image.shape[-1] // 2, None], 3, axis=-1)
    low, high = np.percentile(image, (0.5, 99.5))
    if high > low:
        image = (image - low) / (high - low)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _thickness(height: int, width: int) -> int:
    """Outline width in image pixels that stays about one screen pixel after downscaling."""
    return max(1, int(np.ceil(width / (PANEL_INCHES * DPI))), int(np.ceil(height / (6 * DPI))))


def _outline(labels: np.ndarray, thickness: int) -> np.ndarray:
    """bool [H, W]: the inner boundary of every region of a label map or mask."""
    from scipy.ndimage import binary_dilation
    from skimage.segmentation import find_boundaries

    edges = find_boundaries(labels, mode="inner")
    if thickness > 1:
        edges = binary_dilation(edges, iterations=thickness - 1) & (labels > 0)
    return edges


def _paint(canvas: np.ndarray, where: np.ndarray, colour: Sequence[float], alpha: float = 1.0):
    canvas[where] = (1 - alpha) * canvas[where] + alpha * np.asarray(colour, dtype=np.float32)


def _masks_rgb(masks: np.ndarray) -> np.ndarray:
    """float [H, W, 3]: class masks [K, H, W] on black, white for one class, else CLASS_COLOURS
    (overlapping classes add up)."""
    if masks.shape[0] == 1:
        return np.repeat(masks[0, ..., None] > 0, 3, axis=-1).astype(np.float32)
    canvas = np.zeros((*masks.shape[1:], 3), dtype=np.float32)
    for k, mask in enumerate(masks):
        canvas += (mask > 0)[..., None] * np.asarray(CLASS_COLOURS[k % len(CLASS_COLOURS)])
    return np.clip(canvas, 0.0, 1.0)


def _labels_rgb(labels: np.ndarray) -> np.ndarray:
    """float [H, W, 3]: each nucleus its own colour on black."""
    from skimage.color import label2rgb

    return label2rgb(labels, bg_label=0, bg_color=(0, 0, 0)).astype(np.float32)


def _new_figure(columns: int, height: int, width: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure on its own Agg canvas: no pyplot state, no display, no global backend switch.
    figure = Figure(
        figsize=(columns * PANEL_INCHES, PANEL_INCHES * height / width + TITLE_INCHES), dpi=DPI
    )
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path, title: str) -> Path:
    figure.suptitle(title, fontsize=7, y=1 - 0.1 * TITLE_INCHES / figure.get_figheight())
    top = 1 - TITLE_INCHES / figure.get_figheight()
    figure.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=top, wspace=0.02)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def _class_legend(axes: Any, classes: Sequence[str], note: str = "") -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=CLASS_COLOURS[k % len(CLASS_COLOURS)], label=name)
               for k, name in enumerate(classes)]  # fmt: skip
    axes.legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.6, title=note or None,
                title_fontsize=6)  # fmt: skip


def _outline_legend(axes: Any, with_truth: bool) -> None:
    from matplotlib.lines import Line2D

    entries = [("truth", TRUTH_COLOUR), ("prediction", PREDICTION_COLOUR), ("both", BOTH_COLOUR)]
    handles = [Line2D([], [], color=colour, label=name)
               for name, colour in (entries if with_truth else entries[1:2])]  # fmt: skip
    axes.legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.6)


def _file_stem(image_id: str) -> str:
    # Ids never hold a path separator in these competitions; keep a stray one from nesting.
    return image_id.replace("/", "_").replace("\\", "_")


def write_panels(
    competition: str | Competition,
    table: pd.DataFrame,
    probabilities: Mapping[str, np.ndarray],
    ids: Sequence[str],
    out_dir: Path,
    *,
    threshold: float = 0.5,
) -> list[Path]:
    """For each id, `<id>_panel.png` (image | truth | prediction; no truth column for a row without
    labels) and `<id>_overlay.png` (the image with truth outlines green, predicted outlines red,
    yellow where they agree; uwmgi: predicted classes filled translucent and truth outlined, one
    colour per class) in
    `out_dir`. Titles carry the id and, where the truth is known, the image's score. dsb2018 draws
    nuclei (truth instances, predicted instances from `split_instances`). Returns the paths, two
    per id, in order.
    """
    from kaggle_seg.postprocess import binarize, split_instances

    competition = _competition(competition)
    out_dir = Path(out_dir)
    positions = _rows_by_id(table)
    classes = competition.classes
    instances = competition.name == "dsb2018"
    score_name = "mAP" if instances else "Dice"
    written: list[Path] = []
    for image_id in ids:
        image_id = str(image_id)
        if image_id not in probabilities:
            raise KsegError(f"{image_id}: not in the predictions")
        row = _table_row(table, positions, image_id)
        height, width = int(row["height"]), int(row["width"])
        probability = np.asarray(probabilities[image_id], dtype=np.float32)
        _check_shape(image_id, probability, height, width)
        image = _display_image(competition, competition.read_image(row))
        masks = binarize(probability[: len(classes)], threshold)
        predicted = split_instances(probability, threshold) if instances else None
        truth = _read_truth(competition, row) if _has_truth(competition, row) else None
        title = image_id
        if truth is not None:
            score = _score(competition, truth, probability, threshold)["score"]
            title = f"{image_id}\n{score_name} {score:.3f}"

        pictures = [("image", image)]
        if truth is not None:
            pictures.append(("truth", _labels_rgb(truth) if instances else _masks_rgb(truth)))
        pictures.append(("prediction", _labels_rgb(predicted) if instances else _masks_rgb(masks)))
        figure = _new_figure(len(pictures), height, width)
        axes = figure.subplots(1, len(pictures), squeeze=False)[0]
        for ax, (name, picture) in zip(axes, pictures, strict=True):
            ax.imshow(picture)
            ax.set_title(name, fontsize=8)
            ax.set_axis_off()
        if len(classes) > 1:
            _class_legend(axes[-1], classes)
        written.append(_save(figure, out_dir / f"{_file_stem(image_id)}_panel.png", title))

        overlay = image.copy()
        thickness = _thickness(height, width)
        if len(classes) > 1:
            for k in range(len(classes)):
                colour = CLASS_COLOURS[k % len(CLASS_COLOURS)]
                _paint(overlay, masks[k] > 0, colour, FILL_ALPHA)
                if truth is not None:
                    _paint(overlay, _outline(truth[k], thickness), colour)
        else:
            edges = _outline(predicted if instances else masks[0], thickness)
            _paint(overlay, edges, PREDICTION_COLOUR)
            if truth is not None:
                truth_edges = _outline(truth if instances else truth[0], thickness)
                _paint(overlay, truth_edges & ~edges, TRUTH_COLOUR)
                _paint(overlay, truth_edges & edges, BOTH_COLOUR)
        figure = _new_figure(1, height, width)
        ax = figure.subplots()
        ax.imshow(overlay)
        ax.set_axis_off()
        if len(classes) > 1:
            _class_legend(ax, classes, "fill: prediction\noutline: truth")
        else:
            _outline_legend(ax, truth is not None)
        written.append(_save(figure, out_dir / f"{_file_stem(image_id)}_overlay.png", title))
    return written


# ---- the run folder -----------------------------------------------------------------------------


class NpzProbabilities(Mapping[str, np.ndarray]):
    """id -> float32 [K, H, W] probabilities over one or more npz files (oof.npz or
    `kseg predict --save`), decoded one array per lookup: uint8 means value / 255, as `load_oof`.
    Use as a context manager (the files stay open). An id in several files: the first file wins.
    """

    def __init__(self, files: Sequence[Path]):
        self._stack = contextlib.ExitStack()
        self._where: dict[str, Any] = {}
        try:
            for path in files:
                if not Path(path).is_file():
                    raise KsegError(f"{path}: predictions file not found")
                try:
                    npz = self._stack.enter_context(np.load(path, allow_pickle=False))
                except (OSError, ValueError) as exc:
                    raise KsegError(f"{path}: not a readable npz ({exc})") from exc
                if not hasattr(npz, "files"):
                    raise KsegError(f"{path}: a single array, expected an npz of id -> [K, H, W]")
                for image_id in npz.files:
                    self._where.setdefault(image_id, npz)
        except BaseException:
            self._stack.close()
            raise

    def __getitem__(self, image_id: str) -> np.ndarray:
        from kaggle_seg.probabilities import decode_probabilities

        return decode_probabilities(self._where[image_id][image_id])

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> NpzProbabilities:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fold_number(fold_dir: Path) -> int:
    suffix = fold_dir.name.removeprefix("fold_")
    return int(suffix) if suffix.isdigit() else -1


def _fold_config(fold_dir: Path) -> Any:
    import yaml
    from pydantic import ValidationError

    from kaggle_seg.config import ExperimentConfig

    path = fold_dir / paths.CONFIG_FILE
    if not path.is_file():
        raise KsegError(f"{fold_dir}: no {paths.CONFIG_FILE} (not a run folder of `kseg train`?)")
    try:
        return ExperimentConfig.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise KsegError(f"{path}: not a valid experiment config ({first})") from exc


def _read_table(path: Path, named_by: str) -> pd.DataFrame:
    from kaggle_seg.prepare import read_table

    path = Path(path)
    if not path.is_file():
        raise KsegError(f"{path}: table not found (named by {named_by}; run `kseg prepare`)")
    return read_table(path)


def show_experiment(
    experiment_dir: Path | None,
    out_dir: Path,
    *,
    ids: Sequence[str] | None = None,
    random: int | None = None,
    worst: int | None = None,
    typical: int | None = None,
    seed: int = 0,
    predictions: Path | None = None,
    table: Path | None = None,
    competition: str | None = None,
    threshold: float = 0.5,
) -> list[Path]:
    """Panels and overlays (see `write_panels`) in `out_dir` for the chosen images of a run.

    Default source: every `fold_<k>/oof.npz` of `experiment_dir` with the table named by that
    fold's config.yaml (data.table, relative to the cwd). `predictions` (an npz of id ->
    [K, H, W]) replaces the OOF files, `table` the configured table; `competition` is needed only
    when `experiment_dir` holds no fold config. Exactly one of ids / random / worst / typical
    chooses the images; worst and typical score every predicted image with truth
    (`image_scores`) first. Without
    `experiment_dir`, `predictions`, `table` and `competition` say everything.
    """
    if experiment_dir is None:
        missing = [name for name, value in (("--predictions", predictions), ("--table", table),
                   ("--competition", competition)) if value is None]  # fmt: skip
        if missing:
            raise KsegError(
                f"without --experiment, pass {', '.join(missing)} (the probabilities, the table "
                "of their images and the competition)"
            )
    experiment_dir = Path(experiment_dir) if experiment_dir is not None else None
    fold_dirs = (
        sorted(
            (p for p in experiment_dir.glob("fold_*") if p.is_dir() and _fold_number(p) >= 0),
            key=_fold_number,
        )
        if experiment_dir is not None
        else []
    )
    oof_dirs = [p for p in fold_dirs if (p / paths.OOF_FILE).is_file()]
    config_dirs = [p for p in fold_dirs if (p / paths.CONFIG_FILE).is_file()]
    if predictions is None and not oof_dirs:
        raise KsegError(
            f"{experiment_dir}: no fold_<k>/{paths.OOF_FILE} found "
            "(train first: `kseg train --fold k`, or pass --predictions)"
        )
    configs = [(p, _fold_config(p)) for p in (oof_dirs if predictions is None else config_dirs)]
    if competition is None:
        if not configs:
            raise KsegError(
                f"{experiment_dir}: no fold_<k>/{paths.CONFIG_FILE} to name the competition; "
                "pass it (--competition)"
            )
        competition = configs[0][1].data.competition
    competition_plugin = get_competition(competition)

    if table is not None:
        frame = _read_table(Path(table), "--table")
    else:
        named = {}
        for fold_dir, config in configs:
            if config.data.table is None:
                raise KsegError(f"{fold_dir / paths.CONFIG_FILE}: data.table is not set")
            named.setdefault(Path(config.data.table), fold_dir / paths.CONFIG_FILE)
        if not named:
            raise KsegError("--predictions: pass --table too (no fold config names a table)")
        frames = [_read_table(path, f"{source} data.table") for path, source in named.items()]
        frame = pd.concat(frames, ignore_index=True).drop_duplicates("id", ignore_index=True)

    files = (
        [Path(predictions)] if predictions is not None else [p / paths.OOF_FILE for p in oof_dirs]
    )
    with NpzProbabilities(files) as probabilities:
        known = set(frame["id"].astype(str))
        stray = [i for i in probabilities if i not in known]
        if stray:
            source = files[0] if len(files) == 1 else experiment_dir
            raise KsegError(
                f"{source}: {len(stray)} predicted id(s) not in the table, e.g. "
                f"{_listed(stray)} (wrong table?)"
            )
        scores = None
        if worst is not None or typical is not None:
            scores = image_scores(competition_plugin, frame, probabilities, threshold=threshold)
        chosen = select_ids(
            scores, list(probabilities), ids=ids, random=random, worst=worst, typical=typical,
            seed=seed,
        )  # fmt: skip
        return write_panels(
            competition_plugin, frame, probabilities, chosen, Path(out_dir), threshold=threshold
        )
