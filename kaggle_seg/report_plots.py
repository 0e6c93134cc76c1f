"""The report's figures, drawn with matplotlib on Agg canvases and returned as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

DPI = 100
# history.csv columns drawn as losses / metrics, where present.
LOSS_COLUMNS = ("train_loss", "valid_loss")
METRIC_COLUMNS = ("score", "dice")
_STYLES = {"train_loss": "-", "valid_loss": "--", "score": "-", "dice": ":"}


def _figure(width: float, height: float, rows: int = 1, columns: int = 1, **options: Any):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, squeeze=False, **options)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _numeric(history: pd.DataFrame, column: str) -> pd.Series | None:
    if column not in history.columns:
        return None
    values = pd.to_numeric(history[column], errors="coerce")  # `weights` is a string column
    return values if values.notna().any() else None


def curves(series: Sequence[tuple[str, pd.DataFrame]], colour_by: Sequence[str]) -> bytes:
    """Losses, metrics and learning rate against the epoch, one line per (label, history) and
    column; lines sharing a `colour_by` key share a colour (a fold, or an experiment)."""
    figure, axes = _figure(9, 8, 3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.4]})
    keys = list(dict.fromkeys(colour_by))
    colours = {key: f"C{k % 10}" for k, key in enumerate(keys)}
    for (label, history), key in zip(series, colour_by, strict=True):
        epoch = history["epoch"] if "epoch" in history.columns else np.arange(1, len(history) + 1)
        for ax, columns in ((axes[0][0], LOSS_COLUMNS), (axes[1][0], METRIC_COLUMNS)):
            for column in columns:
                values = _numeric(history, column)
                if values is not None:
                    ax.plot(
                        epoch,
                        values,
                        _STYLES[column],
                        color=colours[key],
                        marker=".",
                        label=f"{label} {column}",
                    )
        lr = _numeric(history, "lr")
        if lr is not None:
            axes[2][0].plot(epoch, lr, color=colours[key], label=label)
    axes[0][0].set_ylabel("loss")
    axes[1][0].set_ylabel("metric")
    axes[2][0].set_ylabel("lr")
    axes[2][0].set_xlabel("epoch")
    if axes[2][0].lines and all(line.get_ydata().min() > 0 for line in axes[2][0].lines):
        axes[2][0].set_yscale("log")
    for row in axes[:2]:
        if row[0].lines:
            row[0].legend(fontsize=7, ncol=2)
        row[0].grid(alpha=0.3)
    return _png(figure)


def cv_bars(cv: pd.DataFrame, title: str) -> bytes:
    """CV per fold and overall, default vs tuned post-processing, as grouped bars."""
    figure, axes = _figure(7, 3.2)
    ax = axes[0][0]
    positions = np.arange(len(cv.index))
    for k, column in enumerate(("before", "after")):
        values = cv[column].to_numpy(dtype=float)
        if np.isnan(values).all():
            continue
        ax.bar(
            positions + (k - 0.5) * 0.38,
            values,
            width=0.38,
            label="defaults" if column == "before" else "tuned",
        )
    ax.set_xticks(positions, [f"fold {i}" if i != "all" else "all" for i in cv.index])
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _png(figure)


def distribution(scoring: str, images: pd.DataFrame, volumes: pd.DataFrame | None) -> bytes:
    """The spread of the scores by the competition's scoring kind: volumes (uwmgi) Dice and 3D
    Hausdorff per (case-day, class); instances (dsb2018) mAP per image against its nuclei count
    and its size; groups (lgg) Dice per patient, and per image."""
    if scoring == "volumes" and volumes is not None:
        figure, axes = _figure(10, 3.6, 1, 2)
        classes = list(dict.fromkeys(volumes["class"]))
        for ax, column in zip(axes[0], ("dice", "hausdorff"), strict=True):
            data = [volumes.loc[volumes["class"] == c, column].dropna().to_numpy() for c in classes]
            _strip(ax, data, classes)
            ax.set_title(f"{column} per case-day and class", fontsize=9)
        return _png(figure)
    if scoring == "instances":
        figure, axes = _figure(12, 3.6, 1, 3)
        axes[0][0].scatter(images["nuclei"], images["score"], s=10, alpha=0.7)
        axes[0][0].set_xscale("symlog")
        axes[0][0].set_xlabel("nuclei in the image")
        sizes = images["height"].astype(str) + "x" + images["width"].astype(str)
        order = sorted(set(sizes), key=lambda s: [int(n) for n in s.split("x")])
        _strip(axes[0][1], [images.loc[sizes == s, "score"].to_numpy() for s in order], order)
        axes[0][1].set_xlabel("image size (H x W)")
        axes[0][1].tick_params(axis="x", labelrotation=45, labelsize=7)
        axes[0][2].hist(images["score"].dropna(), bins=20)
        axes[0][2].set_xlabel("mAP")
        axes[0][0].set_ylabel("image mAP")
        return _png(figure)
    per_group = volumes is not None and len(volumes) > 0
    # The folder competition scores images alone: one panel, no empty patient axes beside it.
    figure, axes = _figure(10, 3.6, 1, 2) if per_group else _figure(5.5, 3.6)
    if per_group:
        axes[0][0].bar(np.arange(len(volumes)), volumes["dice"])
        axes[0][0].set_xticks(
            np.arange(len(volumes)),
            volumes["patient"].astype(str),
            rotation=45,
            ha="right",
            fontsize=6,
        )
        axes[0][0].set_title("volume Dice per patient", fontsize=9)
    both_empty = int(images["score"].isna().sum())
    axes[0][-1].hist(images["score"].dropna(), bins=20)
    axes[0][-1].set_title(
        f"Dice per image with truth or prediction ({both_empty} both empty, not drawn)", fontsize=9
    )
    return _png(figure)


def _strip(ax: Any, data: list[np.ndarray], labels: Sequence[str]) -> None:
    """Box plots with every point jittered over them."""
    rng = np.random.default_rng(0)
    kept = [d if len(d) else np.array([np.nan]) for d in data]
    ax.boxplot(kept, showfliers=False)
    for k, values in enumerate(data, start=1):
        ax.scatter(k + rng.uniform(-0.15, 0.15, len(values)), values, s=8, alpha=0.6)
    ax.set_xticks(np.arange(1, len(labels) + 1), labels)
    ax.grid(axis="y", alpha=0.3)
