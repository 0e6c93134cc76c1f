"""`kseg pseudo-label`: test images labelled by a submission join the training table, train in
every fold and validate in none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kaggle_seg.competitions import get_competition
from kaggle_seg.config import load_experiment
from kaggle_seg.data.folds import read_folds
from kaggle_seg.data.rle import decode_rles_to_labels
from kaggle_seg.errors import KsegError
from kaggle_seg.prepare import folds_for_table, prepare_table, read_table
from kaggle_seg.pseudo_labels import add_pseudo_labels, labels_copy_path
from kaggle_seg.train_data import load_fold_tables


@pytest.fixture(scope="module")
def dsb_small(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real stage1_train images (linked) and four stage1_test images with their solution
    rows as the "submission" (truth standing in for a model's predictions)."""
    source = shared_data / "dsb2018"
    root = tmp_path_factory.mktemp("pseudo")
    for part, count in (("stage1_train", 6), ("stage1_test", 4)):
        (root / part).mkdir()
        for folder in sorted((source / part).iterdir())[:count]:
            (root / part / folder.name).symlink_to(folder)
    prepare_table("dsb2018", root, root / "table.csv")
    test_ids = sorted(p.name for p in (root / "stage1_test").iterdir())
    solution = pd.read_csv(source / "stage1_solution.csv", dtype=str, keep_default_na=False)
    solution = solution[solution["ImageId"].isin(test_ids)][["ImageId", "EncodedPixels"]]
    solution.to_csv(root / "submission.csv", index=False)
    return root


def test_pseudo_labelled_rows_read_back_the_submission_and_never_validate(
    dsb_small: Path, tmp_path: Path
):
    out = tmp_path / "pl" / "table.csv"
    summary = add_pseudo_labels("dsb2018", dsb_small / "table.csv", dsb_small / "submission.csv",
                                dsb_small / "stage1_test", out)  # fmt: skip
    assert (summary["labelled"], summary["pseudo"]) == (6, 4)
    table = read_table(out)
    pseudo = table["pseudo"].astype(str) == "True"
    assert pseudo.sum() == 4 and not pseudo.iloc[:6].any()
    # Each pseudo-labelled image's nuclei are the submission's rows, one label each.
    submission = pd.read_csv(dsb_small / "submission.csv", dtype=str, keep_default_na=False)
    competition = get_competition("dsb2018")
    for row in table[pseudo].to_dict("records"):
        rles = submission.loc[submission["ImageId"] == row["id"], "EncodedPixels"].tolist()
        shape = (int(row["height"]), int(row["width"]))
        expected = decode_rles_to_labels(rles, shape, competition.rle_order)
        np.testing.assert_array_equal(competition.read_instances(row), expected)
        assert int(row["n_nuclei"]) == len(rles)
        assert Path(row["labels_csv"]) == labels_copy_path(out)
    # The labels are a copy: a later submission written over the original changes nothing.
    assert labels_copy_path(out).read_bytes() == (dsb_small / "submission.csv").read_bytes()
    # Folds: the labelled rows split as without the pseudo rows; those get fold -1.
    base, _ = folds_for_table("dsb2018", dsb_small / "table.csv", tmp_path / "base.csv", 2, 7,
                              False)  # fmt: skip
    folds, _ = folds_for_table("dsb2018", out, tmp_path / "pl" / "folds.csv", 2, 7, False)
    assert set(folds.loc[folds["fold"] == -1, "id"]) == set(table.loc[pseudo, "id"])
    merged = base.merge(folds, on="id", suffixes=("_base", ""))
    assert len(merged) == 6 and (merged["fold"] == merged["fold_base"]).all()
    # Reusing the written folds passes the reuse checks (-1 is not counted as a fold).
    _, reused = folds_for_table("dsb2018", out, tmp_path / "pl" / "folds.csv", 2, 7, False)
    assert reused and len(read_folds(tmp_path / "pl" / "folds.csv")) == 10
    from typer.testing import CliRunner

    from kaggle_seg.cli import app

    said = CliRunner().invoke(app, ["folds", "-c", "dsb2018", "--table", str(out), "--out",
                                    str(tmp_path / "cli_folds.csv"), "--n-folds", "2"])  # fmt: skip
    assert said.exit_code == 0, said.output
    assert "pseudo-labelled, trained in every fold: 4, fold 0: " in said.output
    config = load_experiment(
        Path(__file__).resolve().parents[1] / "configs" / "dsb2018_cpu.yaml",
        [f"data.table={out}", f"data.folds={tmp_path / 'pl' / 'folds.csv'}"],
    )
    for fold in (0, 1):
        train, valid = load_fold_tables(config, fold)
        assert set(table.loc[pseudo, "id"]) <= set(train["id"])
        assert not set(table.loc[pseudo, "id"]) & set(valid["id"])


def test_pseudo_label_refusals_name_the_fault_and_leave_nothing(dsb_small: Path, tmp_path: Path):
    table, submission = dsb_small / "table.csv", dsb_small / "submission.csv"
    test_dir = dsb_small / "stage1_test"
    out = tmp_path / "table.csv"
    frame = pd.read_csv(submission, dtype=str, keep_default_na=False)
    first = frame["ImageId"].iloc[0]
    extra = pd.DataFrame({"ImageId": ["elsewhere"], "EncodedPixels": ["1 2"]})
    cases = {
        "missing": (frame[frame["ImageId"] != first], rf"no rows for 1 image\(s\).*{first}"),
        "extra": (pd.concat([frame, extra]), r"1 ImageId\(s\) not in .*elsewhere"),
        "bad rle": (
            frame.assign(EncodedPixels=["1 x", *frame["EncodedPixels"][1:]]),
            rf"bad rle.csv: line 2 \(ImageId {first}\)",
        ),
        "no column": (frame[["ImageId"]], "EncodedPixels"),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.csv"
        bad.to_csv(path, index=False)
        with pytest.raises(KsegError, match=message):
            add_pseudo_labels("dsb2018", table, path, test_dir, out)
        assert not out.exists() and not labels_copy_path(out).exists(), name
    with pytest.raises(KsegError, match="pseudo-labels are not supported"):
        add_pseudo_labels("lgg", table, submission, test_dir, out)
    with pytest.raises(KsegError, match="would overwrite --table"):
        add_pseudo_labels("dsb2018", table, submission, test_dir, table)
    add_pseudo_labels("dsb2018", table, submission, test_dir, out)
    with pytest.raises(KsegError, match="already holds pseudo-labelled rows"):
        add_pseudo_labels("dsb2018", out, submission, test_dir, tmp_path / "twice.csv")


def test_train_refuses_fold_minus_one(tmp_path: Path):
    from typer.testing import CliRunner

    from kaggle_seg.cli import app

    config = Path(__file__).resolve().parents[1] / "configs" / "dsb2018_cpu.yaml"
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--fold", "-1",
                                      "--runs-dir", str(tmp_path)])  # fmt: skip
    assert isinstance(result.exception, KsegError)
    assert "--fold '-1': fold numbers start at 0" in str(result.exception)
    assert not any(tmp_path.iterdir())
