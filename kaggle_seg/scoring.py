"""`kseg score`: read a competition's truth and a submission, validate, and score.

What the truth files are and how they are scored is the competition's (`score_submission` of its
plug-in, competitions/<name>_kaggle.py): uwmgi's `train.csv` with the case folders for sizes,
dsb2018's `stage1_solution.csv` or `stage1_train_labels.csv` with the image folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def score_submission(
    competition: str,
    truth_csv: Path,
    submission_csv: Path,
    images_dir: Path | None = None,
    *,
    merged_classes: bool = False,
    dice: str | None = None,
    hausdorff: str | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate `submission_csv` against `truth_csv` and score it with the competition metric.

    uwmgi: `dice` / `hausdorff` "per-class" (the competition) or "merged" (the union of the
    organs); `merged_classes` merges both. MLE-bench's grader: dice per-class, hausdorff merged.
    `options`: the competition's `data.options` (the folder competition's classes...).
    """
    from kaggle_seg.competitions import COMPETITIONS, get_competition
    from kaggle_seg.errors import KsegError

    plugin = get_competition(competition).configure(options or {})
    if plugin.submission_columns is None:
        scored = [c.name for c in COMPETITIONS.values() if c.submission_columns is not None]
        raise KsegError(
            f"{competition!r} has no Kaggle submission format to score; choose one of "
            f"{', '.join(scored)}"
        )
    return plugin.score_submission(
        Path(truth_csv),
        Path(submission_csv),
        Path(images_dir) if images_dir is not None else None,
        merged_classes=merged_classes,
        dice=dice,
        hausdorff=hausdorff,
    )
