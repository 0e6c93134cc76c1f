"""What every submission format shares: checks with errors naming the CSV line, and the
post-processed masks of a prediction stream, volume by volume.

The competitions' own frames and validators (competitions/<name>_kaggle.py) are built from these;
the same validators serve `kseg score` (someone else's CSV) and `kseg submit` (our own, before it
is written). Line numbers count the header as line 1, as an editor shows them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from kaggle_seg.errors import InputError, KsegError, one_line

NO_HEAD = (
    "the post-processing sets gate_probability (an empty-slice gate on a classification head's "
    "probability) but no checkpoint has a classification head (model.params.aux_params): "
    "remove gate_probability or add a model with a head"
)


def csv_line(position: int) -> int:
    """The CSV line of the frame row at `position` (the header is line 1)."""
    return position + 2


def check_columns(frame: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = ", ".join(one_line(repr(c)) for c in frame.columns) or "none"
        raise InputError(f"{source}: missing column(s) {', '.join(missing)}; found {found}")


def check_one_row_per_key(frame: pd.DataFrame, keys: Sequence[str], source: str) -> None:
    """At most one row per (id, class)...: the second one found is named by its line."""
    duplicated = frame.duplicated(list(keys))
    if duplicated.any():
        i = int(np.flatnonzero(duplicated)[0])
        key = ", ".join(str(frame.loc[i, k]) for k in keys)
        raise InputError(f"{source}: line {csv_line(i)}: second row for ({key})")


def check_rles(
    frame: pd.DataFrame,
    id_column: str,
    rle_column: str,
    shapes: Mapping[str, tuple[int, int]],
    source: str,
    class_column: str | None = None,
) -> None:
    """Every non-empty RLE of `frame` valid for its image's (H, W); the first that is not is
    named by its line and id (and class, where rows are per class). `frame`: cells as str
    (empty = no mask)."""
    from kaggle_seg.data.rle import validate_rle
    from kaggle_seg.errors import RLEError

    for i, (image_id, rle) in enumerate(zip(frame[id_column], frame[rle_column], strict=True)):
        if rle:
            height, width = shapes[image_id]
            try:
                validate_rle(rle, (height, width))
            except RLEError as exc:
                row = image_id if class_column is None else f"{image_id}, {frame[class_column][i]}"
                raise InputError(f"{source}: line {csv_line(i)} ({row}): {exc}") from None


def non_empty_rles(rles: pd.Series) -> np.ndarray:
    """bool [N]: the rows holding an RLE (not NaN / None and not blank)."""
    return (rles.notna() & (rles.fillna("").astype(str).str.strip() != "")).to_numpy()


def stream_volumes(
    stream: Iterator[tuple[Any, ...]], table: pd.DataFrame, volume_key: str | None
) -> Iterator[tuple[list[str], list[np.ndarray], list[np.ndarray | None]]]:
    """Group a prediction stream (table order) into volumes of `volume_key` (single images
    when None): ids, probabilities and class probabilities (None where the stream has none: its
    items are 3-tuples, or 4-tuples from `predict_probabilities(...,
    with_class_probabilities=True)`)."""
    keys = table[volume_key].to_numpy() if volume_key else None
    ids: list[str] = []
    probabilities: list[np.ndarray] = []
    class_probabilities: list[np.ndarray | None] = []
    current = None
    for position, image_id, probs, *rest in stream:
        key = keys[position] if keys is not None else position
        if ids and key != current:
            yield ids, probabilities, class_probabilities
            ids, probabilities, class_probabilities = [], [], []
        current = key
        ids.append(image_id)
        probabilities.append(probs)
        class_probabilities.append(rest[0] if rest else None)
    if ids:
        yield ids, probabilities, class_probabilities


def postprocessed_images(
    stream: Iterator[tuple[Any, ...]], table: pd.DataFrame, settings: Any
) -> Iterator[tuple[str, np.ndarray]]:
    """(id, uint8 masks [K, H, W]) per image after `postprocess_masks`, for competitions whose
    images stand alone (no volume rule)."""
    for ids, masks in postprocessed_volumes(stream, table, settings, None):
        yield from zip(ids, masks, strict=True)


def postprocessed_volumes(
    stream: Iterator[tuple[Any, ...]], table: pd.DataFrame, settings: Any, volume_key: str | None
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(ids, uint8 masks [D, K, H, W]) per volume (or image) after `postprocess_masks`, and the
    z-continuity rule across a volume's slices when the settings ask for it.

    `stream`: (position, id, [K, H, W] probabilities) items, or with a fourth, the [K] class
    probabilities of a classification head, which `settings.gate_probability` needs.
    """
    from kaggle_seg.postprocess import apply_z_continuity, postprocess_masks

    for ids, probabilities, class_probabilities in stream_volumes(stream, table, volume_key):
        if settings.gate_probability is not None and any(c is None for c in class_probabilities):
            raise KsegError(NO_HEAD)
        masks = np.stack(
            [
                postprocess_masks(p, settings, class_probabilities=c)
                for p, c in zip(probabilities, class_probabilities, strict=True)
            ]
        )
        if settings.z_continuity and volume_key:  # a rule across slices: volumes only
            masks = apply_z_continuity(masks)
        yield ids, masks
