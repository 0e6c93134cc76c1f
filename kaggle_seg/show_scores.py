"""Which images `kseg show` draws (ids, random, worst) and their scores: one image at a time,
its truth read through the competition plug-in, its probability channels named by the run's
`ModelSpec`. Shared by show.py (choosing), panels.py (titles) and explain.py (truth)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Union

import numpy as np
import pandas as pd

from kaggle_seg.competitions import get_competition
from kaggle_seg.competitions.base import Competition
from kaggle_seg.errors import KsegError

if TYPE_CHECKING:
    from kaggle_seg.postprocess import PostprocessConfig

_MAX_LISTED = 5


# ---- choosing ids -----------------------------------------------------------------------------


def listed(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_MAX_LISTED])
    return shown + (f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else "")


def parse_ids(text: str | None) -> list[str] | None:
    """`--ids "a, b,"` as typed -> ["a", "b"]: spaces around a comma and empty entries are not
    ids, and a list with none left is refused rather than matched against nothing."""
    if text is None:
        return None
    ids = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not ids:
        raise KsegError(f"--ids {text!r}: no id given (expected comma-separated ids such as a,b)")
    return ids


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
            raise KsegError(f"not in the predictions: {listed(unknown)}")
        return wanted
    name = chosen[0]
    count = next(value for option, value in options if option == name)
    if count is None or count < 1:
        raise KsegError(f"{name}: need a count of at least 1, got {count}")
    if random is not None:
        # Sorted first, so the draw depends on the seed and the id set, not on their order.
        pool = sorted(known)
        picks = np.random.default_rng(seed).choice(len(pool), size=min(count, len(pool)),
                                                   replace=False)  # fmt: skip
        return [pool[i] for i in picks]
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


def as_competition(competition: str | Competition) -> Competition:
    return get_competition(competition) if isinstance(competition, str) else competition


def has_truth(competition: Competition, row: pd.Series) -> bool:
    """Whether the table row carries labels (a test image's row does not)."""
    return competition.has_truth(row)


def read_truth_masks(competition: Competition, row: pd.Series) -> np.ndarray:
    """int32 [H, W] instance labels ("instances" scoring), else uint8 [K, H, W] class masks."""
    truth = competition.read_truth(row)
    return truth if competition.scoring == "instances" else np.moveaxis(truth, -1, 0)


def check_shape(image_id: str, probabilities: np.ndarray, height: int, width: int) -> None:
    if probabilities.ndim != 3 or probabilities.shape[1:] != (height, width):
        raise KsegError(
            f"{image_id}: probabilities of shape {probabilities.shape}, expected "
            f"[K, {height}, {width}] (the image's own size)"
        )


def output_channels(
    competition: Competition, probabilities: np.ndarray, outputs: Sequence[str] | None
) -> list[str]:
    """The names of the channels of `probabilities`: the model's outputs (its `ModelSpec`)
    when known. A bare probability file (`kseg predict --save` without its run) carries no
    names: its channels are taken as the competition's classes, then the border channel of
    mask + border targets, the one layout kseg writes."""
    if outputs is not None:
        return list(outputs)
    from kaggle_seg.spec import BORDER

    classes = list(competition.classes)
    extra = probabilities.shape[0] - len(classes)
    return [*classes, BORDER] if extra == 1 and competition.instance_masks else classes


# How `kseg show` turns probabilities into masks: a plain threshold, or an experiment's tuned
# post-processing settings (postprocess.json), so its pictures and scores match `kseg report`.
Masking = Union[float, "PostprocessConfig"]


def class_masks(
    competition: Competition,
    probabilities: np.ndarray,
    channels: Sequence[str],
    masking: Masking,
    head: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 [K, H, W] masks of the competition's classes, taken from the channels by name;
    `head`: the image's classification-head probabilities, which tuned settings' gate_probability
    reads (as kseg submit and kseg report apply it)."""
    from kaggle_seg.postprocess import PostprocessConfig, binarize, postprocess_masks
    from kaggle_seg.spec import channel_indices

    if not isinstance(masking, PostprocessConfig):
        return binarize(probabilities[channel_indices(channels, competition.classes)], masking)
    tuned = postprocess_masks(
        probabilities[channel_indices(channels, masking.classes)], masking, class_probabilities=head
    )
    return tuned[channel_indices(masking.classes, competition.classes)]


def instance_map(
    probabilities: np.ndarray, channels: Sequence[str], masking: Masking
) -> np.ndarray:
    """dsb2018: int32 [H, W] nuclei labels by the threshold's split or the tuned settings."""
    from kaggle_seg.postprocess import PostprocessConfig, postprocess_instances, split_instances
    from kaggle_seg.spec import channel_indices

    if not isinstance(masking, PostprocessConfig):
        return split_instances(probabilities, masking, channels=channels)
    return postprocess_instances(probabilities[channel_indices(channels, masking.classes)], masking)


def score_image(
    competition: Competition,
    truth: np.ndarray,
    probabilities: np.ndarray,
    masking: Masking,
    channels: Sequence[str],
    head: np.ndarray | None = None,
) -> dict[str, float]:
    """{"score", "dice"} of one image: instances (dsb2018) score = image mAP, else score =
    pooled Dice."""
    from kaggle_seg.metrics import dsb_image_score, pixel_metrics

    masks = class_masks(competition, probabilities, channels, masking, head)
    if competition.scoring == "instances":
        dice = pixel_metrics(truth > 0, masks[0])["dice"]
        score = dsb_image_score(truth, instance_map(probabilities, channels, masking))
        return {"score": score, "dice": dice}
    dice = pixel_metrics(truth, masks)["dice"]
    return {"score": dice, "dice": dice}


def rows_by_id(table: pd.DataFrame) -> dict[str, int]:
    if not table["id"].is_unique:
        duplicated = table.loc[table["id"].duplicated(), "id"].astype(str).tolist()
        raise KsegError(f"table: id(s) listed twice: {listed(duplicated)}")
    return {str(image_id): position for position, image_id in enumerate(table["id"])}


def table_row(table: pd.DataFrame, positions: Mapping[str, int], image_id: str) -> pd.Series:
    if image_id not in positions:
        raise KsegError(f"{image_id}: not in the table (wrong table for these predictions?)")
    return table.iloc[positions[image_id]]


def image_scores(
    competition: str | Competition,
    table: pd.DataFrame,
    probabilities: Mapping[str, np.ndarray],
    *,
    masking: Masking = 0.5,
    outputs: Sequence[str] | None = None,
    heads: Mapping[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Per-image scores, columns id, score, dice (one row per id of `probabilities` whose table
    row has truth, in that order). uwmgi / lgg: score = pixel Dice pooled over the classes;
    dsb2018: score = the image's mAP after `split_instances`, dice = Dice of the nuclei union.
    Lower is worse. probabilities: id -> float [K, H, W] at the image's own size, channels
    named by `outputs` (the model's, see `output_channels`).
    """
    competition = as_competition(competition)
    positions = rows_by_id(table)
    rows = []
    for image_id in probabilities:
        row = table_row(table, positions, str(image_id))
        if not has_truth(competition, row):
            continue
        probability = np.asarray(probabilities[image_id], dtype=np.float32)
        check_shape(str(image_id), probability, int(row["height"]), int(row["width"]))
        truth = read_truth_masks(competition, row)
        channels = output_channels(competition, probability, outputs)
        head = heads.get(str(image_id)) if heads else None
        scores = score_image(competition, truth, probability, masking, channels, head)
        rows.append({"id": str(image_id), **scores})
    return pd.DataFrame(rows, columns=["id", "score", "dice"])
