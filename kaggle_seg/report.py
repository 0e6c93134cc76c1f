"""`kseg report`: one self-contained HTML page about one or several experiments.

Every image is inlined (PNG as base64 data URIs), the style sheet is inline and there is no
script, so the file opens offline, from an e-mail or a Kaggle dataset, and nothing is fetched.

Per experiment: the resolved config; losses, metrics and learning rate per fold (history.csv);
the CV per fold and overall with default and with tuned post-processing (postprocess.json) and
the tuned settings; the distribution of the per-case / per-image scores; the best, median and
worst validation images (kseg show's panels); training time and images/s. With several
experiments the page opens with one CV table and their curves overlaid.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kaggle_seg.errors import KsegError
from kaggle_seg.report_data import ExperimentRun, read_run, score_run, speed

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; padding: 0 1em; max-width: 1200px;
       color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 2px solid #ccc; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: 0.8em; font-size: 0.8em; overflow: auto; max-height: 28em; }
img { max-width: 100%; } .panels img { max-width: 32%; margin-right: 1%; vertical-align: top; }
.note { color: #a60; } nav a { margin-right: 1em; }
"""
# Images picked from each end of the per-image scores, and from the middle.
PANEL_PICKS = ("best", "median", "worst")


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(frame: pd.DataFrame, index: bool = True) -> str:
    return frame.to_html(index=index, float_format=lambda v: f"{v:.4f}", na_rep="-", border=0)


def _anchor(run: ExperimentRun) -> str:
    return "exp-" + "".join(c if c.isalnum() else "-" for c in run.name)


def _cv_summary(runs: Sequence[ExperimentRun]) -> pd.DataFrame:
    rows = []
    for run in runs:
        row: dict[str, object] = {"experiment": run.name, "competition": run.competition}
        if run.cv is not None:
            for fold in run.cv.index:
                if fold != "all":
                    row[f"fold {fold}"] = run.cv.loc[fold, "before"]
            row["CV defaults"] = run.cv.loc["all", "before"]
            row["CV tuned"] = run.cv.loc["all", "after"]
        timing = speed(run)
        if not timing.empty:
            row["train minutes"] = timing["train minutes"].sum()
            row["images/s"] = timing["images/s (median)"].median()
        rows.append(row)
    return pd.DataFrame(rows).set_index("experiment")


def _panel_ids(run: ExperimentRun) -> list[tuple[str, str]]:
    """(pick, image id) for the best, median and worst scored validation image."""
    if run.images is None:
        return []
    scored = run.images.dropna(subset=["score"]).sort_values(["score", "id"], kind="mergesort")
    if scored.empty:
        return []
    ids = scored["id"].astype(str).tolist()
    return [("worst", ids[0]), ("median", ids[len(ids) // 2]), ("best", ids[-1])][::-1]


def _panels(run: ExperimentRun) -> str:
    from kaggle_seg import runs
    from kaggle_seg.explain import table_of
    from kaggle_seg.panels import write_panels
    from kaggle_seg.probabilities import NpzProbabilities, load_class_oofs

    picks = _panel_ids(run)
    if not picks:
        return ""
    folds = [f for f in run.folds if (f.path / runs.OOF_FILE).is_file()]
    table = table_of(folds[0].config, folds[0].path)
    outputs = runs.read_run_spec(folds[0].path, folds[0].config).outputs
    heads = load_class_oofs([f.path / runs.OOF_CLASSES_FILE for f in folds])  # as the tables
    parts = []
    with (
        tempfile.TemporaryDirectory(prefix="kseg-report-") as folder,
        NpzProbabilities([f.path / runs.OOF_FILE for f in folds]) as probabilities,
    ):
        for pick, image_id in picks:
            written = write_panels(
                run.plugin,
                table,
                probabilities,
                [image_id],
                Path(folder),
                masking=0.5 if run.settings is None else run.settings,  # as the tables score
                outputs=outputs,
                heads=heads,
            )
            panel = next(p for p in written if p.name.endswith("_panel.png"))
            parts.append(
                f"<figure>{_image(panel.read_bytes(), f'{pick}: {image_id}')}"
                f"<figcaption>{pick}: {html.escape(image_id)}</figcaption></figure>"
            )
    return '<div class="panels">' + "".join(parts) + "</div>"


def _settings_table(settings: object) -> str:
    """Per-class settings as rows of a table, the rules for all classes below it."""
    values = settings.model_dump(mode="json")  # type: ignore[attr-defined]
    classes = values.pop("classes")
    per_class = {k: v for k, v in values.items() if isinstance(v, list)}
    frame = pd.DataFrame(per_class, index=pd.Index(classes, name="class"))
    rest = {k: v for k, v in values.items() if k not in per_class}
    return (
        _table(frame) + "<p>" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in rest.items()) + "</p>"
    )


def _experiment_section(run: ExperimentRun, panels: bool) -> str:
    from kaggle_seg import report_plots
    from kaggle_seg.report_data import get_scorer

    out = [
        f'<h2 id="{_anchor(run)}">{html.escape(run.name)}</h2>',
        f"<p>{html.escape(str(run.path))} &middot; {run.competition} &middot; "
        f"folds {', '.join(str(f.fold) for f in run.folds)}</p>",
    ]
    out += [f'<p class="note">{html.escape(note)}</p>' for note in run.notes]
    if run.cv is not None:
        cv = run.cv.rename(columns={"before": "defaults (0.5)", "after": "tuned"})
        out += ["<h3>CV per fold and overall</h3>", _table(cv)]
        out.append(_image(report_plots.cv_bars(run.cv, run.name), "CV per fold"))
    if run.settings is not None:
        out += ["<h3>Tuned post-processing (postprocess.json)</h3>", _settings_table(run.settings)]
    histories = [(f"fold {f.fold}", f.history) for f in run.folds if f.history is not None]
    if histories:
        out += [
            "<h3>Curves</h3>",
            _image(report_plots.curves(histories, [h[0] for h in histories]), "curves"),
        ]
    if run.images is not None:
        unit = get_scorer(run.plugin.scoring).unit
        label = "tuned" if run.settings is not None else "default"
        out += [
            f"<h3>Score distribution ({label} post-processing; one point per {unit})</h3>",
            _image(
                report_plots.distribution(run.plugin.scoring, run.images, run.volumes),
                "score distribution",
            ),
        ]
    if panels:
        section = _panels(run)
        if section:
            out += ["<h3>Validation images: best, median, worst</h3>", section]
    timing = speed(run)
    if not timing.empty:
        out += ["<h3>Time and speed</h3>", _table(timing, index=False)]
    out += ["<h3>Resolved config</h3>", f"<pre>{html.escape(run.config_text)}</pre>"]
    return "\n".join(out)


def render_report(runs: Sequence[ExperimentRun], panels: bool = True) -> str:
    """The page's HTML for runs already read and scored."""
    from kaggle_seg import __version__, report_plots

    title = "kseg report: " + ", ".join(run.name for run in runs)
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>kaggle_seg {__version__}. Scores are recomputed from each fold's oof.npz with "
        "the competition metric.</p>",
    ]
    if len(runs) > 1:
        body.append(
            "<nav>"
            + "".join(f'<a href="#{_anchor(r)}">{html.escape(r.name)}</a>' for r in runs)
            + "</nav>"
        )
        body += ["<h2>Comparison</h2>", _table(_cv_summary(runs))]
        series = [
            (f"{r.name} f{f.fold}", f.history)
            for r in runs
            for f in r.folds
            if f.history is not None
        ]
        colour_by = [r.name for r in runs for f in r.folds if f.history is not None]
        if series:
            body.append(_image(report_plots.curves(series, colour_by), "overlaid curves"))
    else:
        body.append(_table(_cv_summary(runs)))
    body += [_experiment_section(run, panels) for run in runs]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_report(sources: Sequence[str | Path], out: str | Path, *, panels: bool = True) -> Path:
    """Read, score and render the runs (experiment or fold folders) into the HTML file `out`."""
    from kaggle_seg.io import atomic_path

    if not sources:
        raise KsegError("name at least one experiment or fold folder")
    runs = [read_run(source) for source in sources]
    for run in runs:
        score_run(run)
    page = render_report(runs, panels=panels)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
