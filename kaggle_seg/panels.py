"""`kseg show`'s pictures: image | truth | prediction panels and overlays as PNG, headless (an
Agg canvas of its own: no pyplot state, no display)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kaggle_seg.competitions.base import Competition
from kaggle_seg.errors import KsegError
from kaggle_seg.io import atomic_path
from kaggle_seg.show_scores import (
    Masking,
    as_competition,
    check_shape,
    class_masks,
    has_truth,
    instance_map,
    output_channels,
    read_truth_masks,
    rows_by_id,
    score_image,
    table_row,
)

PANEL_INCHES = 4.0  # width of one panel; its height follows the image's aspect ratio
TITLE_INCHES = 0.65  # two lines (the id, then the score) above the panel titles
DPI = 100
TRUTH_COLOUR = (0.0, 1.0, 0.0)
PREDICTION_COLOUR = (1.0, 0.0, 0.0)
BOTH_COLOUR = (1.0, 1.0, 0.0)  # truth and prediction outlines on the same pixels
# One colour per uwmgi class (large bowel, small bowel, stomach), apart from green and red.
CLASS_COLOURS = ((1.0, 0.65, 0.0), (0.15, 0.55, 1.0), (1.0, 0.2, 0.85))
FILL_ALPHA = 0.4


def _display_image(competition: Competition, image: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1]: RGB for a competition of colour images (`rgb`), else the
    middle channel (uwmgi's only slice, lgg's FLAIR) as gray; one contrast stretch for all
    channels, so colours keep their balance.
    """
    if not competition.rgb:
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
    masking: Masking = 0.5,
    outputs: Sequence[str] | None = None,
    heads: Mapping[str, np.ndarray] | None = None,
) -> list[Path]:
    """For each id, `<id>_panel.png` (image | truth | prediction; no truth column for a row without
    labels) and `<id>_overlay.png` (the image with truth outlines green, predicted outlines red,
    yellow where they agree; uwmgi: predicted classes filled translucent and truth outlined, one
    colour per class) in
    `out_dir`. Titles carry the id and, where the truth is known, the image's score. dsb2018 draws
    nuclei (truth instances, predicted instances from `split_instances`). Returns the paths, two
    per id, in order. `outputs` names the probability channels (see `output_channels`); `heads`
    the images' classification-head probabilities, for tuned settings' gate_probability.
    """
    competition = as_competition(competition)
    out_dir = Path(out_dir)
    positions = rows_by_id(table)
    classes = competition.classes
    instances = competition.scoring == "instances"
    score_name = "mAP" if instances else "Dice"
    written: list[Path] = []
    for image_id in ids:
        image_id = str(image_id)
        if image_id not in probabilities:
            raise KsegError(f"{image_id}: not in the predictions")
        row = table_row(table, positions, image_id)
        height, width = int(row["height"]), int(row["width"])
        probability = np.asarray(probabilities[image_id], dtype=np.float32)
        check_shape(image_id, probability, height, width)
        image = _display_image(competition, competition.read_image(row))
        channels = output_channels(competition, probability, outputs)
        head = heads.get(image_id) if heads else None
        masks = class_masks(competition, probability, channels, masking, head)
        predicted = instance_map(probability, channels, masking) if instances else None
        truth = read_truth_masks(competition, row) if has_truth(competition, row) else None
        title = image_id
        if truth is not None:
            score = score_image(competition, truth, probability, masking, channels, head)["score"]
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
