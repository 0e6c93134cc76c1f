"""`kseg predict`: the ensemble's probabilities for a test folder, streamed into one .npz, by
one process or shared between torchrun processes (submit_shards.shard_of) and joined."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from kaggle_seg.adapt_bn import adapt_members, adapt_mismatch
from kaggle_seg.competitions.base import Skipped, TestSet
from kaggle_seg.competitions.detect import explain_other_competition
from kaggle_seg.errors import InputError, KsegError
from kaggle_seg.predict import Member, default_tta, load_ensemble, predict_probabilities
from kaggle_seg.probabilities import ProbabilityWriter

log = logging.getLogger(__name__)


def predict_folder(
    checkpoints: Sequence[str | Path],
    test_dir: str | Path | None,
    save: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    weights: Sequence[float] | None = None,
    dtype: Literal["float16", "uint8"] = "float16",
    device: str | None = None,
    adapt_bn: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`kseg predict`: the ensemble over every image of `test_dir` (or of the competition's
    usual test folder under `data_dir`, as `kseg submit` finds it); probabilities are written
    to `save` (streamed, one array per image) only when it is given. `options` go to
    `predict_probabilities` (tta, merge, ensemble, batch_size, num_workers, on_error);
    `adapt_bn`: batches of test crops for the BN statistics (adapt_bn.py; None: the members')."""
    from contextlib import ExitStack

    from kaggle_seg.competitions import competition_for

    if (test_dir is None) == (data_dir is None):
        raise KsegError("pass one of --test-dir (a folder of test images) or --data-dir")
    from kaggle_seg.submit_shards import start_shares

    runtime, device = start_shares(device)  # under torchrun: this process's share and device
    members = load_ensemble(checkpoints, weights, device)
    if options.get("tta") is None:
        options["tta"] = default_tta(members)
    if mismatch := adapt_mismatch(members, adapt_bn):
        log.warning(mismatch)
    competition = competition_for(members[0].config.data)
    skipped: list[Skipped] | None = [] if options.get("on_error") == "skip" else None
    # `scratch`: a zipped DSB test folder is extracted for the run, then removed.
    with ExitStack() as scratch:
        if data_dir is not None:
            if competition.submission_columns is None:
                raise KsegError(
                    f"--data-dir: {competition.name} has no usual test folder; pass --test-dir"
                )
            with explain_other_competition(competition.name, Path(data_dir)):
                test = competition.test_set(Path(data_dir), None, scratch=scratch, skipped=skipped)
            table, notes = test.table, list(test.notes)
        else:
            notes = []
            with explain_other_competition(competition.name, Path(test_dir)):
                table = competition.read_test_table(Path(test_dir), skipped)
                if table.empty and not skipped:
                    raise InputError(
                        f"{test_dir}: no test images to predict (a competition folder goes to "
                        "--data-dir)"
                    )
        adapted = adapt_members(members, competition, table, options["tta"], adapt_bn)
        notes += [adapted] if adapted else []
        predict = functools.partial(
            _predict_table, members, competition, dtype=dtype, options=options
        )
        if runtime is None:
            result = predict(table, save, skipped)
        else:
            result = _predict_share(predict, competition.volume_key, table, save, skipped, runtime)
            notes.append(
                f"{runtime.world_size} processes under torchrun, each predicting its share"
            )
    return {**result, "notes": notes}


def _predict_share(
    predict: Callable[..., dict[str, Any]],
    volume_key: str | None,
    table: pd.DataFrame,
    save: str | Path | None,
    skipped: list[Skipped] | None,
    runtime: Any,
) -> dict[str, Any]:
    """Under torchrun: this rank predicts (`predict`, a bound `_predict_table`) its share
    (submit_shards.shard_of, whole `volume_key` groups) into a part file beside `save`; rank 0
    joins the parts into `save` in table order. Every rank returns the whole run's counts."""
    from kaggle_seg import submit_shards
    from kaggle_seg.probabilities import join_probability_files

    share = submit_shards.shard_of(TestSet(table), volume_key, runtime.rank, runtime.world_size)
    mine = submit_shards.skipped_of(skipped, share, table, runtime.rank)
    part = None if save is None else submit_shards.part_path(Path(save), runtime.rank, False)
    label = f"predict, rank 0 of {runtime.world_size}" if runtime.is_main else None
    result = predict(share.table, part, mine, progress_label=label)

    def join(shares: list[dict[str, Any]]) -> None:
        if save is not None:
            order = [*table["id"].astype(str), *(s.id for s in skipped or [])]
            join_probability_files([Path(r["saved"]) for r in shares], Path(save), order)

    shares, _ = submit_shards.gather_then_join(result, runtime, join)
    seconds = max(r["seconds"] for r in shares)
    images = sum(r["images"] for r in shares)
    return {
        **result,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds if seconds else float("inf"),
        "saved": str(save) if save else None,
        "skipped": [s for r in shares for s in r["skipped"]] if skipped is not None else [],
    }


def _predict_table(
    members: list[Member],
    competition: Any,
    table: pd.DataFrame,
    save: str | Path | None,
    skipped: list[Skipped] | None,
    *,
    dtype: str,
    options: dict[str, Any],
    progress_label: str | None = "predict",
) -> dict[str, Any]:
    """`table`'s images predicted, streamed into `save` when given; `progress_label` None
    shows no progress (a torchrun rank other than 0)."""
    import time

    from kaggle_seg.progress import progress

    started = time.perf_counter()
    stream = predict_probabilities(members, competition, table, skipped=skipped, **options)
    if progress_label is not None:
        stream = progress(stream, len(table), progress_label)
    n_images = 0
    if save is None:
        for _ in stream:
            n_images += 1
    else:
        with ProbabilityWriter(save, dtype) as writer:
            for _, image_id, probabilities in stream:
                writer.add(image_id, probabilities)
                n_images += 1
    seconds = time.perf_counter() - started
    return {
        "images": n_images,
        "models": len(members),
        "seconds": seconds,
        "images_per_s": n_images / seconds if seconds else float("inf"),
        "saved": str(save) if save else None,
        "tta": options["tta"],
        "skipped": skipped or [],
    }
