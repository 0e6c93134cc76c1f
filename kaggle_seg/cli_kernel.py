"""`kseg kernel ...` and `kseg dataset ...`: Kaggle kernels and datasets (sub-apps of cli.py).

Wiring only, like cli.py: heavy modules and the `kaggle` client are imported inside commands.
"""

from __future__ import annotations

import typer

kernel_app = typer.Typer(help="Build, rehearse and push Kaggle kernels.", no_args_is_help=True)
dataset_app = typer.Typer(help="Create or version Kaggle datasets.", no_args_is_help=True)
