"""Pictures of runs: loss and metric curves from history.csv (headless, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from kaggle_seg.errors import KsegError
from kaggle_seg.io import atomic_path
from kaggle_seg.runs import read_history


def plot_history(run_dir: Path, out: Path | None = None) -> Path:
    """Write `curves.png` (losses left, metrics right, lr below) for a fold's history.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history_path = Path(run_dir) / "history.csv"
    if not history_path.is_file():
        raise KsegError(f"{run_dir}: no history.csv (is this a runs/<experiment>/fold_<k> folder?)")
    history = read_history(run_dir)
    losses = [c for c in history.columns if c.endswith("_loss") or c.startswith("train_")]
    losses = [c for c in losses if c not in ("train_seconds",)]
    metrics = [c for c in ("score", "dice", "iou", "precision", "recall", "map", "gi_dice",
                           "hausdorff") if c in history.columns]  # fmt: skip
    figure, (left, right, bottom) = plt.subplots(
        3, 1, figsize=(8, 9), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1]}
    )
    for column in losses:
        left.plot(history["epoch"], history[column], marker=".", label=column)
    left.set_ylabel("loss")
    left.legend(fontsize=8)
    for column in metrics:
        right.plot(history["epoch"], history[column], marker=".", label=column)
    right.set_ylabel("metric")
    right.legend(fontsize=8)
    bottom.plot(history["epoch"], history["lr"], color="grey")
    bottom.set_ylabel("lr")
    bottom.set_xlabel("epoch")
    figure.suptitle(str(run_dir))
    figure.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return out
