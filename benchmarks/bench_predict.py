"""Inference throughput and memory: kseg's streamed, batched predictor against a naive loop.

    python benchmarks/bench_predict.py [--repeats 3] [--batch-size 16]
    python benchmarks/bench_predict.py --memory-only

Throughput: the 65 real DSB 2018 stage-1 test images (../shared/data), with 5 checkpoints of the
dsb2018 U-Net at 128x128 (configs/dsb2018_unet128.yaml's model, one random init per fold: the
speed does not depend on the weights). Three cases, each timed for kseg and for the naive loop a
notebook would write, in the same run, alternating:
- one model, no TTA; one model, flip TTA (3 views); 5-fold ensemble + flip TTA.
The naive loop reads and pre-processes one image at a time in the main process and runs one
forward per image, model and view (under torch.no_grad, no inference_mode, no batching), then
undoes the view, averages and resizes back: the same arithmetic as kseg.

Memory: peak RSS of a fresh process predicting 200 and 2,000 images (the 570 training images,
cycled; one model, no TTA, probabilities streamed to an npz), each in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

N_FOLDS = 5


def make_checkpoints(folder: Path) -> Path:
    """runs/bench_predict/fold_<k>/best.pt: the unet128 model, a random init per fold."""
    from kaggle_seg.config import load_experiment
    from kaggle_seg.models import build_model

    config = load_experiment(ROOT / "configs" / "dsb2018_unet128.yaml")
    config = config.model_copy(update={"name": "bench_predict"})
    for fold in range(N_FOLDS):
        torch.manual_seed(fold)
        model = build_model(config.model, 3, 1)
        path = folder / "bench_predict" / f"fold_{fold}" / "best.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": model.state_dict(),
            "config": config.model_dump(mode="json"),
            "fold": fold,
            "competition": "dsb2018",
            "classes": ["nuclei"],
            "in_channels": 3,
        }
        torch.save(state, path)
    return folder / "bench_predict"


def naive_predict(members, competition, table: pd.DataFrame, tta: bool) -> float:
    """The notebook loop; returns images/s."""
    import cv2

    from kaggle_seg.data.transforms import build_transforms

    transform = build_transforms(members[0].config.augment, train=False)
    views = [
        (lambda x: x, lambda y: y),
        (lambda x: x.flip(-1), lambda y: y.flip(-1)),
        (lambda x: x.flip(-2), lambda y: y.flip(-2)),
    ]
    views = views if tta else views[:1]
    start = time.perf_counter()
    for row in table.to_dict("records"):
        image = transform(image=competition.read_image(row))["image"]
        x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
        total = 0.0
        with torch.no_grad():
            for member in members:
                for augment, undo in views:
                    total = total + torch.sigmoid(undo(member.model(augment(x))))
        probabilities = (total / (len(members) * len(views)))[0].numpy()
        cv2.resize(probabilities[0], (row["width"], row["height"]))
    return len(table) / (time.perf_counter() - start)


def kseg_predict(members, competition, table, tta: bool, batch_size: int, workers: int) -> float:
    from kaggle_seg.predict import predict_probabilities

    start = time.perf_counter()
    n = 0
    for _ in predict_probabilities(
        members,
        competition,
        table,
        tta="flip" if tta else "none",
        batch_size=batch_size,
        num_workers=workers,
    ):
        n += 1
    return n / (time.perf_counter() - start)


def throughput(args: argparse.Namespace) -> dict:
    from conftest import shared_data_dir

    from kaggle_seg.competitions import get_competition
    from kaggle_seg.predict import load_ensemble

    competition = get_competition("dsb2018")
    table = competition.read_test_table(shared_data_dir() / "dsb2018" / "stage1_test")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        experiment = make_checkpoints(Path(tmp))
        everything = load_ensemble([experiment])
        one = load_ensemble([experiment / "fold_0"])
        cases = {
            "1 model": (one, False),
            "1 model + flip TTA": (one, True),
            "5 folds + flip TTA": (everything, True),
        }
        for name, (members, tta) in cases.items():
            ours, naive = [], []
            for _ in range(args.repeats):
                ours.append(
                    kseg_predict(members, competition, table, tta, args.batch_size, args.workers)
                )
                naive.append(naive_predict(members, competition, table, tta))
            results[name] = {
                "kseg_images_per_s": statistics.median(ours),
                "naive_images_per_s": statistics.median(naive),
                "ratio": statistics.median(ours) / statistics.median(naive),
            }
            r = results[name]
            print(
                f"{name:22s} kseg {r['kseg_images_per_s']:7.1f} img/s   naive "
                f"{r['naive_images_per_s']:7.1f} img/s   ratio {r['ratio']:.2f}x",
                flush=True,
            )
    return results


def memory_child(n_images: int, experiment: Path, batch_size: int, workers: int) -> None:
    """In a fresh process: predict n_images, streaming to an npz; print the peak RSS (MiB)."""
    from conftest import shared_data_dir

    from kaggle_seg.competitions import get_competition
    from kaggle_seg.predict import ProbabilityWriter, load_ensemble, predict_probabilities

    competition = get_competition("dsb2018")
    base = competition.read_test_table(shared_data_dir() / "dsb2018" / "stage1_train")
    repeats = -(-n_images // len(base))
    table = pd.concat([base] * repeats, ignore_index=True).iloc[:n_images].copy()
    table["id"] = [f"{image_id}_{k}" for k, image_id in enumerate(table["id"])]
    members = load_ensemble([experiment / "fold_0"])
    with tempfile.TemporaryDirectory() as tmp, ProbabilityWriter(Path(tmp) / "p.npz") as writer:
        for _, image_id, probabilities in predict_probabilities(
            members, competition, table, batch_size=batch_size, num_workers=workers
        ):
            writer.add(image_id, probabilities)
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"self_mib": self_peak, "workers_mib": children_peak}))


def memory(args: argparse.Namespace) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        experiment = make_checkpoints(Path(tmp))
        for n in (200, 2000):
            command = [sys.executable, __file__, "--memory-child", str(n), "--experiment",
                       str(experiment), "--batch-size", str(args.batch_size), "--workers",
                       str(args.workers)]  # fmt: skip
            started = time.perf_counter()
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[n] = json.loads(output.strip().splitlines()[-1])
            results[n]["seconds"] = time.perf_counter() - started
            print(
                f"{n:5d} images: peak RSS {results[n]['self_mib']:.0f} MiB (main), "
                f"{results[n]['workers_mib']:.0f} MiB (largest worker), "
                f"{results[n]['seconds']:.0f} s",
                flush=True,
            )
    growth = results[2000]["self_mib"] / results[200]["self_mib"] - 1
    print(f"peak memory 2,000 vs 200 images: {growth:+.1%} (goal: within 10%)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--experiment", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.experiment, args.batch_size, args.workers)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU", flush=True)
    if not args.memory_only:
        throughput(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
