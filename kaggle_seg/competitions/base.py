"""What every competition offers: the plug-in contract (`Competition`) and its shared defaults.

Everything that differs between competitions lives behind this contract, so the rest of kseg
asks the plug-in instead of comparing names: how the raw layout becomes one table, how images,
masks and truths are read, which column groups slices into volumes, how folds and tuning score
(`scoring`), the test set and the submission frame with its validator, the scorer of `kseg
score`, the RLE order, the Kaggle kernel's limits and its held-back test, and the demo data.

The table has one row per image with at least these columns:
`id`, `group` (what folds group by: case, patient or image), `image_path`, `height`, `width`,
`empty` (no foreground at all). Each competition adds its own (RLE or mask paths, slice index...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from kaggle_seg.competitions.images import Skipped, check_file_headers
from kaggle_seg.config import DataConfig
from kaggle_seg.errors import InputError, KsegError

TABLE_COLUMNS = ("id", "group", "image_path", "height", "width", "empty")
# How validation folds, `kseg tune` and `kseg report` score predictions (evaluation.py):
# - "volumes": the GI score (Dice per slice + 3D Hausdorff) per volume of `volume_key`;
# - "groups": the mean over groups (the table's `group`, e.g. a patient) of each group's Dice,
#   its pixels pooled;
# - "images": the mean per-image Dice, classes pooled;
# - "instances": the mean per-image mAP of instance labels (`read_instances`).
ScoringKind = Literal["volumes", "groups", "images", "instances"]
SCORING_KINDS: tuple[str, ...] = ("volumes", "groups", "images", "instances")
# A prediction stream item: (table position, id, float32 [K, H, W] probabilities[, [K] class
# probabilities of a classification head or None]), as `predict.predict_probabilities` yields.
Stream = Iterator[tuple[Any, ...]]


@dataclass
class TestSet:
    """The rows to predict and what the submission must match."""

    table: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    sample: pd.DataFrame | None = None  # the sample submission, when it lists rows


@dataclass
class StagedTest:
    """A competition folder staged for a kernel rehearsal, and how to check what it writes."""

    items: int  # test slices / images
    truth_csv: Path | None  # the held-back truth, None for an empty test
    test_images: Path | None
    train_images: Path


@dataclass(frozen=True)
class KernelTarget:
    """What a competition's Kaggle kernel must fit: its time limit and the hidden test's size."""

    competition: str
    time_limit_hours: float | None
    unit: str  # what the hidden test is counted in
    hidden_test_items: int
    hidden_test_note: str
    default_holdout: int  # held-back train cases / images for `kseg kernel rehearse`
    holdout_unit: str  # what a held-back train item is: "cases", "images"
    # Filled in by the plug-in's `kernel` property from its kaggle_slug and code_competition:
    source: str = ""  # the competition's slug, mounted at /kaggle/input/<source>
    code_competition: bool = False  # internet off, the hidden test swapped in on Kaggle's re-run


@dataclass(frozen=True)
class DemoExample:
    """The files `kseg demo` runs on, in the competition's layout."""

    root: Path  # the competition folder (`--data-dir`)
    truth_csv: Path  # the test set's truth, for `kseg score`
    score_images: Path | None  # `kseg score --images` (for sizes), None when the truth has them


@dataclass(frozen=True)
class DemoRecipe:
    """`kseg demo`'s small experiment for a competition: the config sections that differ, the
    epochs and TTA, how the example data is written and how its score is described."""

    data: dict[str, Any]
    augment: dict[str, Any]
    epochs: int
    tta: str
    write_example: Callable[[Path], DemoExample]
    describe_score: Callable[[dict[str, Any]], str]
    # The U-Net decoder's widths, deepest block first (the last block runs at full resolution).
    decoder_channels: tuple[int, ...] = (128, 64, 32, 32, 16)


class Competition(Protocol):
    """The plug-in contract; `BaseCompetition` gives the shared defaults."""

    name: str
    classes: tuple[str, ...]
    channels: int  # image channels of one slice / image
    # RLE pixel order of the competition's CSVs; None where there is no RLE format.
    rle_order: Literal["C", "F"] | None
    kaggle_slug: str | None  # the competition's name in kaggle.com URLs; None for a dataset
    code_competition: bool  # submitted by a kernel (internet off), not by uploading a CSV
    # The column naming the volume (3D scan) each row is a slice of and the column ordering its
    # slices (uwmgi: case_day, slice_index); None where images stand alone. 2.5D stacks, the
    # z-continuity rule, DDP validation shards and volume scoring follow it.
    volume_key: str | None
    slice_key: str | None
    scoring: ScoringKind
    rgb: bool  # images are colour pictures (shown as RGB); else one channel is shown grey
    instance_masks: bool  # `read_instances` works: truth is instances (mask_border targets)
    pseudo_labels: bool  # `pseudo_label_rows` works: its submissions read back as labels
    # Columns of the submission CSV; None: no submission format (`kseg predict --save` only);
    # () with submission_suffix "": a folder of mask files (lgg).
    submission_columns: tuple[str, ...] | None
    submission_suffix: str  # the default submission file's suffix (".csv")
    # Columns `read_table` writes beyond the common ones, which `kseg folds` and training need:
    # a table of another competition is told apart by them. () takes any table (folder).
    table_columns: tuple[str, ...]
    kernel: KernelTarget | None  # None: no Kaggle kernel for it
    demo: DemoRecipe | None  # None: `kseg demo` has no example for it

    def configure(self, options: Mapping[str, Any]) -> Competition:
        """The competition set up by `data.options` (the folder competition's classes...);
        competitions without options refuse any."""
        ...

    def read_table(self, data_dir: Path, config: DataConfig) -> pd.DataFrame:
        """The raw Kaggle layout under `data_dir` as one table, one row per image."""
        ...

    def read_test_table(self, test_dir: Path, skipped: list[Skipped] | None = None) -> pd.DataFrame:
        """The unlabelled images under `test_dir` (as Kaggle mounts a test folder), one row each,
        with `id`, `group`, `image_path`, `height`, `width`; empty when the folder holds none.

        An image whose header cannot be read raises InputError; with a `skipped` list
        (`--on-error skip`) it is left out of the table and recorded there instead."""
        ...

    def pseudo_label_rows(self, test: pd.DataFrame, labels: Path) -> pd.DataFrame:
        """Training rows for the images of `test` (`read_test_table`) labelled by `labels`, a
        submission in this competition's format listing every one of them
        (`kseg pseudo-label`)."""
        ...

    def read_image(self, row: Any) -> np.ndarray:
        """float32 [H, W, C] in [0, 1] for one table row."""
        ...

    def read_mask(self, row: Any) -> np.ndarray:
        """uint8 0/1 [H, W, K], K = len(classes), for one table row."""
        ...

    def read_instances(self, row: Any) -> np.ndarray:
        """int32 [H, W] instance labels (0 background); only where `instance_masks`."""
        ...

    def read_truth(self, row: Any) -> np.ndarray:
        """What the metric compares with: `read_instances` for "instances" scoring, else
        `read_mask`."""
        ...

    def read_mask_volume(self, rows: Sequence[Any]) -> np.ndarray:
        """uint8 0/1 [K, D, H, W]: the masks of D rows of one size (a volume)."""
        ...

    def has_truth(self, row: Any) -> bool:
        """Whether the table row carries labels (a test image's row does not)."""
        ...

    def check_headers(self, row: Any) -> None:
        """`prepare --check headers`: the row's files have the image's size, its label RLEs
        decode; InputError naming the file (or CSV line) otherwise."""
        ...

    def stratify_labels(self, table: pd.DataFrame) -> pd.Series:
        """One label per row that folds keep balanced (empty vs not, organ combination...)."""
        ...

    def test_set(
        self,
        data_dir: Path,
        test_dir: Path | None,
        *,
        scratch: ExitStack,
        skipped: list[Skipped] | None,
        fallback_volumes: int = 2,
    ) -> TestSet:
        """The test rows `kseg submit` predicts (Kaggle's test folder under `data_dir`, or
        `test_dir`); KsegError where there is no submission format."""
        ...

    def write_submission(
        self,
        stream: Stream,
        test: TestSet,
        settings: Any,
        out: Path,
        skipped: list[Skipped] | None,
    ) -> tuple[int, int]:
        """Post-process the stream, validate the submission and write it to `out`; returns
        (rows, images)."""
        ...

    def score_submission(
        self, truth: Path, submission: Path, images_dir: Path | None, **modes: Any
    ) -> dict[str, Any]:
        """`kseg score`: validate `submission` against `truth` and score it ({"score", ...})."""
        ...

    def with_submission_format(self, submission_format: str) -> Competition:
        """This competition writing `submission_format` (`kseg submit --format`; folder)."""
        ...

    def stage_test(self, source: Path, dest: Path, holdout: int, scratch: Path) -> StagedTest:
        """Stage `source` at `dest` as Kaggle mounts it, `holdout` train items as the test."""
        ...

    def check_rerun_submission(self, submission: Path, staged: StagedTest) -> tuple[int, int]:
        """(rows, items) of a kernel's submission on an empty test (the public re-run)."""
        ...

    def rehearsal_data(self, folder: Path) -> Path | None:
        """Data to rehearse a kernel on when none is given (written under `folder`), or None."""
        ...


class BaseCompetition:
    """Defaults for the parts of `Competition` that most competitions share."""

    name: str
    classes: tuple[str, ...]
    scoring: ScoringKind
    rle_order: Literal["C", "F"] | None = None
    kaggle_slug: str | None = None
    code_competition: bool = False
    volume_key: str | None = None
    slice_key: str | None = None
    rgb: bool = False
    instance_masks: bool = False
    pseudo_labels: bool = False
    submission_columns: tuple[str, ...] | None = None
    submission_suffix: str = ".csv"
    table_columns: tuple[str, ...] = ()
    kernel: KernelTarget | None = None
    demo: DemoRecipe | None = None

    def configure(self, options: Mapping[str, Any]) -> BaseCompetition:
        if options:
            raise KsegError(
                f"data.options {sorted(options)}: {self.name} takes no options (they set up "
                "the folder competition)"
            )
        return self

    def kernel_target(self, target: KernelTarget) -> KernelTarget:
        """`target` with this competition's slug and code-competition flag filled in."""
        return replace(target, source=str(self.kaggle_slug), code_competition=self.code_competition)

    def read_instances(self, row: Any) -> np.ndarray:
        raise KsegError(f"{self.name} has no instance masks (use targets 'mask')")

    def read_truth(self, row: Any) -> np.ndarray:
        return self.read_instances(row) if self.scoring == "instances" else self.read_mask(row)

    def read_mask_volume(self, rows: Sequence[Any]) -> np.ndarray:
        masks = [self.read_mask(row) for row in rows]
        # [D, H, W, K] -> [K, D, H, W]: one class's volume is contiguous.
        return np.ascontiguousarray(np.moveaxis(np.stack(masks), -1, 0))

    def has_truth(self, row: Any) -> bool:
        return any(
            isinstance(row.get(column), str) and bool(row.get(column))
            for column in ("mask_dir", "labels_csv", "mask_path")
        )

    def check_headers(self, row: Any) -> None:
        check_file_headers(row)

    def test_set(
        self,
        data_dir: Path,
        test_dir: Path | None,
        *,
        scratch: ExitStack,
        skipped: list[Skipped] | None,
        fallback_volumes: int = 2,
    ) -> TestSet:
        raise KsegError(self._no_submission())

    def write_submission(
        self,
        stream: Stream,
        test: TestSet,
        settings: Any,
        out: Path,
        skipped: list[Skipped] | None,
    ) -> tuple[int, int]:
        raise KsegError(self._no_submission())

    def score_submission(
        self, truth: Path, submission: Path, images_dir: Path | None, **modes: Any
    ) -> dict[str, Any]:
        raise KsegError(f"{self.name!r} has no Kaggle submission format to score")

    def with_submission_format(self, submission_format: str) -> BaseCompetition:
        """This competition writing `submission_format` (`kseg submit --format`)."""
        raise KsegError(f"--format: {self.name} has one submission format, its Kaggle one")

    def stage_test(self, source: Path, dest: Path, holdout: int, scratch: Path) -> StagedTest:
        raise KsegError(f"no Kaggle kernel for {self.name}")

    def check_rerun_submission(self, submission: Path, staged: StagedTest) -> tuple[int, int]:
        raise KsegError(f"{self.name} is not a code competition: it has no public re-run")

    def rehearsal_data(self, folder: Path) -> Path | None:
        return None

    def pseudo_label_rows(self, test: pd.DataFrame, labels: Path) -> pd.DataFrame:
        raise KsegError(f"{self.name}: pseudo-labels are not supported")

    def _no_submission(self) -> str:
        return (
            f"{self.name} has no Kaggle submission format; use `kseg predict --save` for its "
            "probabilities"
        )


def summarize_table(table: pd.DataFrame) -> dict[str, Any]:
    """Counts, sizes and the empty fraction, as `kseg prepare` prints them."""
    sizes = (
        table.groupby(["width", "height"]).size().sort_values(ascending=False)
        if len(table)
        else pd.Series(dtype=int)
    )
    return {
        "images": len(table),
        "groups": int(table["group"].nunique()) if len(table) else 0,
        "empty_fraction": float(table["empty"].mean()) if len(table) else 0.0,
        "sizes": {f"{w}x{h}": int(n) for (w, h), n in sizes.items()},
    }


def check_sample_ids(found: pd.Series, expected: pd.Series, sample_path: Path) -> None:
    """The test images found are exactly those a sample submission lists."""
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
