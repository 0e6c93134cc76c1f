"""`kseg explain` and `kseg report`: looking into trained models and runs (wiring only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kaggle_seg.errors import KsegError


def explain(
    checkpoint: Annotated[
        Path, typer.Argument(help="A fold folder (runs/<exp>/fold_<k>) or a .pt checkpoint.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for the PNG grids.")] = Path("runs/explain"),
    ids: Annotated[str | None, typer.Option(help="Comma-separated image ids.")] = None,
    random: Annotated[
        int | None, typer.Option(help="This many random images of the fold's validation part.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of --random.")] = 0,
    table: Annotated[
        Path | None, typer.Option(help="The images' table (default: the run's data.table).")
    ] = None,
    stage: Annotated[
        str | None,
        typer.Option(
            help="Grad-CAM stage, e.g. encoder.3 or decoder.0 (default: the last decoder stage)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Per image, one PNG grid: the mean activation of every encoder and decoder stage as heat
    maps, and a per-class Grad-CAM map of the logits (pytorch-grad-cam) for one stage."""
    from kaggle_seg.explain import explain_checkpoint
    from kaggle_seg.show_scores import parse_ids

    if (ids is None) == (random is None):
        raise KsegError("pass exactly one of --ids a,b,c or --random N")
    written = explain_checkpoint(
        checkpoint,
        out,
        ids=parse_ids(ids),
        random=random,
        seed=seed,
        table=table,
        stage=stage,
        device=device,
    )
    typer.echo(f"wrote {len(written)} PNG(s) to {out}")


def report(
    runs: Annotated[
        list[Path], typer.Argument(help="Experiment folders (runs/<exp>) or fold folders.")
    ],
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
    panels: Annotated[
        bool, typer.Option(help="Best / median / worst validation image panels.")
    ] = True,
) -> None:
    """One self-contained HTML page (images inlined, opens offline) per run or comparing
    several: config, curves, CV before / after tuning, score distributions, panels, speed."""
    from kaggle_seg.report import write_report

    typer.echo(f"wrote {write_report(runs, out, panels=panels)}")
