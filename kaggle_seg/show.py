"""`kseg show`: which images to draw (ids, random, worst, typical), their scores, and a run's
predictions read from its folder; the pictures themselves are panels.py's.

Probabilities are float [K, H, W] at the image's own size, as `oof.npz` and `kseg predict --save`
store them, their channels named by the run's `ModelSpec`; channels past the competition's
classes (the dsb2018 border channel) are not drawn but feed the instance split. Images, truths
and probabilities are loaded one id at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kaggle_seg import runs
from kaggle_seg.competitions import competition_for, get_competition
from kaggle_seg.errors import KsegError
from kaggle_seg.show_scores import Masking, image_scores, listed, select_ids

# ---- the run folder -----------------------------------------------------------------------------


def _read_table(path: Path, named_by: str) -> pd.DataFrame:
    from kaggle_seg.prepare import read_table

    path = Path(path)
    if not path.is_file():
        raise KsegError(f"{path}: table not found (named by {named_by}; run `kseg prepare`)")
    return read_table(path)


def show_masking(experiment_dir: Path | None, threshold: float | None) -> Masking:
    """What `kseg show` makes masks with: the `threshold` given, else the experiment's tuned
    settings (postprocess.json, as `kseg report` and `kseg submit` use them), else 0.5."""
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:  # NaN fails too
            raise KsegError(f"--threshold {threshold}: need a probability in [0, 1]")
        return threshold
    settings = Path(experiment_dir) / runs.POSTPROCESS_FILE if experiment_dir else None
    if settings is not None and settings.is_file():
        from kaggle_seg.postprocess import load_postprocess

        return load_postprocess(settings)
    return 0.5


def describe_masking(masking: Masking) -> str:
    return f"threshold {masking}" if isinstance(masking, float | int) else "tuned postprocess.json"


def show_experiment(
    experiment_dir: Path | None,
    out_dir: Path,
    *,
    ids: Sequence[str] | None = None,
    random: int | None = None,
    worst: int | None = None,
    typical: int | None = None,
    seed: int = 0,
    predictions: Path | None = None,
    table: Path | None = None,
    competition: str | None = None,
    masking: Masking | None = None,
) -> list[Path]:
    """Panels and overlays (see `write_panels`) in `out_dir` for the chosen images of a run.

    Default source: every `fold_<k>/oof.npz` of `experiment_dir` with the table named by that
    fold's config.yaml (data.table, relative to the cwd). `predictions` (an npz of id ->
    [K, H, W]) replaces the OOF files, `table` the configured table; `competition` is needed only
    when `experiment_dir` holds no fold config. Exactly one of ids / random / worst / typical
    chooses the images; worst and typical score every predicted image with truth
    (`image_scores`) first. Without
    `experiment_dir`, `predictions`, `table` and `competition` say everything. Masks come
    from `masking` (a threshold or settings), by default `show_masking(experiment_dir, None)`:
    the experiment's tuned postprocess.json, else 0.5.
    """
    if experiment_dir is None:
        missing = [name for name, value in (("--predictions", predictions), ("--table", table),
                   ("--competition", competition)) if value is None]  # fmt: skip
        if missing:
            raise KsegError(
                f"without --experiment, pass {', '.join(missing)} (the probabilities, the table "
                "of their images and the competition)"
            )
    experiment_dir = Path(experiment_dir) if experiment_dir is not None else None
    fold_dirs = (
        [folder for _, folder in runs.list_folds(experiment_dir)]
        if experiment_dir is not None
        else []
    )
    oof_dirs = [p for p in fold_dirs if (p / runs.OOF_FILE).is_file()]
    config_dirs = [p for p in fold_dirs if (p / runs.CONFIG_FILE).is_file()]
    if predictions is None and not oof_dirs:
        raise KsegError(
            f"{experiment_dir}: no fold_<k>/{runs.OOF_FILE} found "
            "(train first: `kseg train --fold k`, or pass --predictions)"
        )
    configs = [
        (p, runs.read_run_config(p)) for p in (oof_dirs if predictions is None else config_dirs)
    ]
    if competition is None and not configs:
        raise KsegError(
            f"{experiment_dir}: no fold_<k>/{runs.CONFIG_FILE} to name the competition; "
            "pass it (--competition)"
        )
    outputs = None  # the channel names of the run's models, when there is a run
    if configs and competition in (None, configs[0][1].data.competition):
        competition_plugin = competition_for(configs[0][1].data)  # with its data.options
        outputs = runs.read_run_spec(*configs[0]).outputs
    else:
        competition_plugin = get_competition(str(competition))
        if not competition_plugin.classes:  # the folder competition, set up by a config
            raise KsegError(
                f"-c {competition}: its classes come from a run's config; pass --experiment "
                "runs/<experiment> (the run that made the predictions) with --predictions"
            )

    if table is not None:
        frame = _read_table(Path(table), "--table")
    else:
        named = {}
        for fold_dir, config in configs:
            if config.data.table is None:
                raise KsegError(f"{fold_dir / runs.CONFIG_FILE}: data.table is not set")
            # Relative to the cwd, else to the root above the run, as kseg tune and report.
            table_path = runs.run_file(config.data.table, fold_dir)
            named.setdefault(table_path, fold_dir / runs.CONFIG_FILE)
        if not named:
            raise KsegError("--predictions: pass --table too (no fold config names a table)")
        frames = [_read_table(path, f"{source} data.table") for path, source in named.items()]
        frame = pd.concat(frames, ignore_index=True).drop_duplicates("id", ignore_index=True)

    files = (
        [Path(predictions)] if predictions is not None else [p / runs.OOF_FILE for p in oof_dirs]
    )
    if masking is None:
        masking = show_masking(experiment_dir, None)
    if outputs is not None and not isinstance(masking, float | int):
        from kaggle_seg.postprocess import check_settings_fit

        # Tuned settings are the experiment's postprocess.json (show_masking).
        source = experiment_dir / runs.POSTPROCESS_FILE if experiment_dir else "settings"
        check_settings_fit(masking, outputs, source)
    from kaggle_seg.panels import write_panels
    from kaggle_seg.probabilities import NpzProbabilities, load_class_oofs

    # The OOF's classification-head probabilities: tuned settings' gate_probability reads them.
    heads = None if predictions is not None else load_class_oofs(
        [p / runs.OOF_CLASSES_FILE for p in oof_dirs]
    )  # fmt: skip

    with NpzProbabilities(files) as probabilities:
        known = set(frame["id"].astype(str))
        stray = [i for i in probabilities if i not in known]
        if stray:
            source = files[0] if len(files) == 1 else experiment_dir
            raise KsegError(
                f"{source}: {len(stray)} predicted id(s) not in the table, e.g. "
                f"{listed(stray)} (wrong table?)"
            )
        scores = None
        if worst is not None or typical is not None:
            scores = image_scores(
                competition_plugin, frame, probabilities, masking=masking, outputs=outputs,
                heads=heads,
            )  # fmt: skip
        chosen = select_ids(
            scores, list(probabilities), ids=ids, random=random, worst=worst, typical=typical,
            seed=seed,
        )  # fmt: skip
        return write_panels(
            competition_plugin,
            frame,
            probabilities,
            chosen,
            Path(out_dir),
            masking=masking,
            outputs=outputs,
            heads=heads,
        )
