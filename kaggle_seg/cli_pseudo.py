"""`kseg pseudo-label`: a training table plus test images labelled by a submission."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kaggle_seg.cli_options import Competition


def pseudo_label(
    competition: Competition,
    table: Annotated[Path, typer.Option(help="The training table `kseg prepare` wrote.")],
    submission: Annotated[
        Path, typer.Option(help="A submission on the test images (kseg submit), the labels.")
    ],
    test_dir: Annotated[Path, typer.Option(help="The test images the submission was made on.")],
    out: Annotated[Path, typer.Option(help="Where to write the new table (CSV).")],
) -> None:
    """Add the test images, labelled by a submission, to a training table as pseudo-labelled
    rows; `kseg folds` puts them in every fold's training rows and in no fold's validation."""
    from kaggle_seg.pseudo_labels import add_pseudo_labels

    summary = add_pseudo_labels(competition, table, submission, test_dir, out)
    typer.echo(
        f"wrote {out}: {summary['labelled']} labelled + {summary['pseudo']} pseudo-labelled "
        f"images (labels copied to {summary['labels']})"
    )
    typer.echo(
        f"next: kseg folds -c {competition} --table {out} --out {out.with_name('folds.csv')} "
        "(pseudo-labelled rows get fold -1: trained on in every fold, never validated)"
    )
