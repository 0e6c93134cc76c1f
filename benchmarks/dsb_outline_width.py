"""How wide are the truth outlines? DSB fold-0 OOF against stage1_test, one trained experiment.

Run from the repository root, after `bench_recipes.py` (or `kseg train` + `kseg tune` +
`kseg submit`) has left an experiment and its stage-1 submission:

    python benchmarks/dsb_outline_width.py \
        --experiment runs/bench_bf16_e70/dsb2018/runs/dsb2018_cpu \
        --submission runs/bench_bf16_e70/dsb2018/stage1_submission.csv --data ../shared/data

For each image it scores the predicted nuclei as they are and grown by 1 and 2 pixels
(`skimage.segmentation.expand_labels`), and takes the median predicted / true area over the
nuclei matched at IoU > 0.5. Fold-0 OOF nuclei come from the experiment's `oof.npz` and tuned
`postprocess.json`; stage-1 ones from the submission CSV. If the model outlines nuclei the way
the truth does, growing them loses and the area ratio is near 1; the per-image best of the
three growths (an oracle that knows each image's outline style) bounds what outline width alone
could win. Measures annotation style; it does not tune anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.segmentation import expand_labels

from kaggle_seg.competitions.dsb2018_kaggle import dsb_labels, image_shapes
from kaggle_seg.metrics import dsb_image_score, instance_ious
from kaggle_seg.postprocess import load_postprocess, postprocess_instances
from kaggle_seg.probabilities import decode_probabilities, open_probabilities

GROWTHS = (0, 1, 2)


def matched_area_ratio(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Median predicted / true area over the pairs with IoU > 0.5 (NaN when none match)."""
    truth_area, predicted_area, t, p, iou = instance_ious(truth, prediction)
    matched = iou > 0.5
    if not matched.any():
        return float("nan")
    return float(np.median(predicted_area[p[matched]] / truth_area[t[matched]]))


def image_row(image_id: str, truth: np.ndarray, prediction: np.ndarray) -> dict:
    row = {"ImageId": image_id, "area_ratio": matched_area_ratio(truth, prediction)}
    for grow in GROWTHS:
        grown = expand_labels(prediction, grow) if grow else prediction
        row[f"grow{grow}"] = dsb_image_score(truth, grown)
    return row


def oof_rows(experiment: Path, data: Path) -> list[dict]:
    settings = load_postprocess(experiment / "postprocess.json")
    truth = pd.read_csv(data / "dsb2018" / "stage1_train_labels.csv")
    groups = dict(list(truth.groupby("ImageId")))
    rows = []
    for fold in sorted(experiment.glob("fold_*")):
        probabilities = open_probabilities(fold / "oof.npz")
        for image_id in probabilities:
            p = decode_probabilities(probabilities[image_id])
            shape = p.shape[1:]
            rows.append(
                image_row(
                    image_id,
                    dsb_labels(groups[image_id]["EncodedPixels"], shape),
                    postprocess_instances(p, settings),
                )
            )
    return rows


def stage1_rows(submission: Path, data: Path) -> list[dict]:
    truth = pd.read_csv(data / "dsb2018" / "stage1_solution.csv")
    predicted = pd.read_csv(submission)
    shapes = image_shapes(truth, None, data / "dsb2018" / "stage1_solution.csv")
    by_id = dict(list(predicted.groupby("ImageId")))
    rows = []
    for image_id, group in truth.groupby("ImageId", sort=False):
        shape = tuple(int(n) for n in shapes[image_id])
        mine = by_id.get(image_id)
        prediction = (
            dsb_labels(mine["EncodedPixels"], shape)
            if mine is not None
            else np.zeros(shape, np.int32)
        )
        rows.append(image_row(image_id, dsb_labels(group["EncodedPixels"], shape), prediction))
    return rows


def summary(name: str, rows: list[dict]) -> dict:
    table = pd.DataFrame(rows)
    scores = table[[f"grow{g}" for g in GROWTHS]]
    best = scores.idxmax(axis=1)
    out = {"set": name, "images": len(table)}
    out.update({f"mAP grown {g} px": round(float(scores[f"grow{g}"].mean()), 4) for g in GROWTHS})
    out["per-image best (oracle)"] = round(float(scores.max(axis=1).mean()), 4)
    out["images best ungrown"] = int((best == "grow0").sum())
    out["median area ratio"] = round(float(table["area_ratio"].median()), 3)
    return out


def outline_table(experiment: Path, submission: Path, data: Path) -> list[dict]:
    """The summary rows of the fold-0 OOF and of the stage-1 submission."""
    return [
        summary("fold-0 OOF", oof_rows(experiment, data)),
        summary("stage1_test", stage1_rows(submission, data)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", type=Path, required=True, help="runs/.../dsb2018_cpu")
    parser.add_argument("--submission", type=Path, required=True, help="stage1_test submission")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    args = parser.parse_args()
    rows = outline_table(args.experiment, args.submission, args.data)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
