"""`kseg weights`: pretrained encoder weights as files for `model.encoder_weights`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

weights_app = typer.Typer(
    help="Turn pretrained encoder weights into files for model.encoder_weights.",
    no_args_is_help=True,
)


@weights_app.command("import")
def import_weights(
    source: Annotated[
        Path,
        typer.Argument(
            help="A weights file: timm, torchvision, smp or efficientnet-pytorch naming."
        ),
    ],
    encoder: Annotated[str, typer.Option(help="The smp / tu- encoder it is for.")],
    out: Annotated[
        Path, typer.Option(help="The encoder state dict to write (.pth, .safetensors).")
    ],
    license_text: Annotated[
        str | None, typer.Option("--license", help="Licence of the weights, for the sidecar.")
    ] = None,
) -> None:
    """Map SOURCE onto ENCODER (by name, else by order and shape; a misfit is refused with a
    report) and write it in the encoder's own naming, with OUT.json (source, sha256, licence)."""
    from kaggle_seg.models.encoder_files import import_encoder_weights

    result = import_encoder_weights(source, encoder, out, license_text)
    ignored = f" ({result['ignored']} head tensors left out)" if result["ignored"] else ""
    typer.echo(f"wrote {result['out']} and {result['out']}.json{ignored}")


@weights_app.command("fetch")
def fetch_weights(
    encoder: Annotated[str, typer.Argument(help="An smp / tu- encoder, e.g. tu-efficientnet_b1.")],
    out: Annotated[
        Path, typer.Option(help="The encoder state dict to write (.pth, .safetensors).")
    ],
    weights: Annotated[str, typer.Option(help="The smp / timm weight name.")] = "imagenet",
) -> None:
    """Download ENCODER's weights through smp / timm (a machine with internet) and save them
    for model.encoder_weights, e.g. to upload as a Kaggle dataset for offline training."""
    from kaggle_seg.models.encoder_files import fetch_encoder_weights

    result = fetch_encoder_weights(encoder, out, weights)
    typer.echo(f"wrote {result['out']} and {result['out']}.json")
