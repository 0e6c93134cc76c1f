"""Command-line options that several commands share, declared once: the checkpoints option, and
the ensemble / TTA / loader options of `kseg predict` and `kseg submit` (`prediction_options`).

Wiring only, like cli.py: nothing heavy is imported here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from kaggle_seg.ensemble_weights import parse_weights
from kaggle_seg.errors import KsegError

# Written out, not read from competitions.COMPETITIONS, so `kseg --help` does not import pandas;
# tests/test_cli.py checks it names every registered competition.
COMPETITION_NAMES = "uwmgi, dsb2018, lgg or folder"
Competition = Annotated[
    str,
    typer.Option("--competition", "-c", help=f"{COMPETITION_NAMES}.", show_default=False),
]
Checkpoints = Annotated[
    list[Path],
    typer.Option(
        "--checkpoints",
        help="An experiment folder (all its folds), a fold folder or a .pt file; repeat to "
        "ensemble experiments.",
    ),
]
Device = Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when visible).")]


@dataclass
class PredictionOptions:
    """How a checkpoint ensemble predicts: the options `kseg predict` and `kseg submit` share."""

    weights: list[float] | None
    tta: str | None
    merge: str
    ensemble: str
    batch_size: int
    num_workers: int
    device: str | None
    on_error: str
    batched_tta: bool
    adapt_bn: int | None

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `predict_folder.predict_folder` and `submit.write_submission`."""
        return asdict(self)


# name -> (annotation, default): the shared options, in their --help order.
_SHARED: dict[str, tuple[Any, Any]] = {
    "weights": (
        Annotated[
            str | None,
            typer.Option(help="One weight per --checkpoints, e.g. 1,0.5 (default equal)."),
        ],
        None,
    ),
    "tta": (
        Annotated[
            str | None,
            typer.Option(
                help="Test-time augmentation: none, hflip, flip or d4 (default: the TTA the "
                "checkpoints' OOF was predicted with, train.oof_tta, which their tuned "
                "post-processing fits; else flip)."
            ),
        ],
        None,
    ),
    "merge": (
        Annotated[str, typer.Option(help="How TTA views merge: mean, gmean, max, tsharpen.")],
        "mean",
    ),
    "ensemble": (
        Annotated[
            str, typer.Option(help="mean: weighted mean of probabilities; logit: of logits.")
        ],
        "mean",
    ),
    "batch_size": (Annotated[int, typer.Option(help="Images per forward pass.")], 8),
    "num_workers": (Annotated[int, typer.Option(help="DataLoader workers reading images.")], 2),
    "device": (Device, None),
    "on_error": (
        Annotated[
            str,
            typer.Option(help="An image that fails to decode: fail, or skip (predicted empty)."),
        ],
        "fail",
    ),
    "batched_tta": (
        Annotated[
            bool,
            typer.Option(
                help="Run all TTA views in one forward pass (--no-batched-tta: one per view)."
            ),
        ],
        True,
    ),
    "adapt_bn": (
        Annotated[
            int | None,
            typer.Option(
                min=0,
                help="Recompute BatchNorm statistics on N batches of test-image crops before "
                "predicting (AdaBN; default: the checkpoints' train.adapt_bn_batches, which "
                "their OOF was predicted with; 0: the trained statistics).",
            ),
        ],
        None,
    ),
}


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise KsegError(f"{option} {value!r}: choose one of {', '.join(choices)}")


def prediction_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give `command` the shared prediction options: its signature, as Typer reads it, gains
    them after its own parameters, and the command receives them as one
    `options: PredictionOptions` (weights parsed, --on-error checked)."""
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, p in inspect.signature(command, eval_str=True).parameters.items()
        if name != "options"
    ]
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint)
        for name, (hint, default) in _SHARED.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in _SHARED}
        check_choice("--on-error", values["on_error"], ("fail", "skip"))
        # Checked before any model loads or image is read, so a typo fails first and alone.
        from kaggle_seg.tta import MERGE_MODES, TTA_MODES

        if values["tta"] is not None:
            check_choice("--tta", values["tta"], tuple(TTA_MODES))
        check_choice("--merge", values["merge"], MERGE_MODES)
        check_choice("--ensemble", values["ensemble"], ("mean", "logit"))
        values["weights"] = parse_weights(values["weights"])
        return command(options=PredictionOptions(**values), **kwargs)

    parameters = [*own, *shared]
    wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper
