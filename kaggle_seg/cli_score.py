"""`kseg score`: validate a submission and score it with the competition's own metric; the
per-image (and per-volume) tables as CSV with --tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from kaggle_seg.cli_options import Competition


def score(
    competition: Competition,
    truth: Annotated[
        Path,
        typer.Argument(help="Truth CSV (train.csv, stage1_solution.csv...); lgg: the dataset."),
    ],
    submission: Annotated[
        Path, typer.Argument(help="Submission CSV to score (lgg, folder png: a mask folder).")
    ],
    images: Annotated[
        Path | None, typer.Option(help="Image folder, for sizes when the truth lacks them.")
    ] = None,
    merged_classes: Annotated[
        bool,
        typer.Option(help="uwmgi: score the union of the organs as one class (both terms)."),
    ] = False,
    dice: Annotated[
        str | None,
        typer.Option(
            help="uwmgi Dice term: per-class (the competition's) or merged (organs as one).",
            show_default=False,
        ),
    ] = None,
    hausdorff: Annotated[
        str | None,
        typer.Option(
            help="uwmgi Hausdorff term: per-class or merged. MLE-bench grades with --dice "
            "per-class --hausdorff merged (README, 'Metric modes').",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    tables: Annotated[
        Path | None,
        typer.Option(
            help="Write the per-image (uwmgi: per-volume) tables here as CSV: Dice, IoU, "
            "precision, recall, accuracy per image (folder), mAP and Dice per image (dsb2018)."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="A config whose data.options set the competition up (folder)."),
    ] = None,
) -> None:
    """Validate a submission and score it with the competition's own metric."""
    from kaggle_seg.scoring import score_submission

    options = None
    if config is not None:
        from kaggle_seg.config import build_data_config

        options = build_data_config(competition, config).options
    result = score_submission(
        competition,
        truth,
        submission,
        images,
        merged_classes=merged_classes,
        dice=dice,
        hausdorff=hausdorff,
        options=options,
    )
    # Per-image / per-volume tables stay out of the printed summary; --tables writes them.
    printable = {k: v for k, v in result.items() if not hasattr(v, "to_csv")}
    written = _write_tables(result, tables) if tables is not None else []
    if as_json:
        typer.echo(json.dumps(printable, default=float))
        return
    for line in _format_result(printable):
        typer.echo(line)
    for path in written:
        typer.echo(f"wrote {path}")


def _write_tables(result: dict, folder: Path) -> list[Path]:
    """Each table of a score result as `folder/<name>.csv` (per_image.csv, per_volume.csv)."""
    from kaggle_seg.io import write_csv_atomic

    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_csv_atomic(value, folder / f"{key}.csv")
        for key, value in result.items()
        if hasattr(value, "to_csv")
    ]


def _format_result(result: dict, indent: str = "") -> list[str]:
    """Nested score dicts as indented `key: value` lines, floats to 6 places."""
    lines = []
    for key, value in result.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.extend(_format_result(value, indent + "  "))
        else:
            shown = f"{value:.6f}" if isinstance(value, float) else value
            lines.append(f"{indent}{key}: {shown}")
    return lines
