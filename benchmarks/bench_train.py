"""Training-step throughput: kseg's loop against a minimal hand-written PyTorch loop.

    python benchmarks/bench_train.py [--epochs 3] [--images 96] [--size 128] [--glibc-defaults]

Both loops train the same model type on the same DataLoader (real DSB 2018 images from
../shared/data through kseg's dataset and "light" preset) with the same optimizer and loss, in one
process, interleaved epoch by epoch; each gets a fresh model with the same seed. The ratio of
images/s is kseg's overhead: the NaN check, per-term loss logging, gradient-accumulation
bookkeeping, the scheduler, frozen-BatchNorm handling. Validation is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CONFIG = """
name: bench
data: {{competition: dsb2018, table: {table}, folds: {folds}}}
augment: {{preset: light, height: {size}, width: {size}}}
model: {{architecture: seed_unet, params: {{base_channels: 16, depth: 4}}}}
train:
  epochs: 100
  batch_size: 8
  num_workers: 0
  optimizer: {{name: adam, lr: 1.0e-3}}
  scheduler: {{name: cosine}}
  loss: [{{name: bce, weight: 0.6}}, {{name: dice, weight: 0.4}}]
"""


def minimal_epoch(model, loader, optimizer, criterion) -> float:
    """The loop a notebook would write: forward, loss, backward, step. Returns images/s."""
    model.train()
    n, start = 0, time.perf_counter()
    for batch in loader:
        optimizer.zero_grad()
        loss = criterion(model(batch["image"].float()), batch["mask"].float())
        loss.backward()
        optimizer.step()
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    from conftest import shared_data_dir

    from kaggle_seg.competitions import get_competition
    from kaggle_seg.config import build_data_config, load_experiment
    from kaggle_seg.malloc import keep_freed_memory
    from kaggle_seg.models import build_model
    from kaggle_seg.train import Trainer, start_runtime

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="leave malloc as it is (train_fold keeps freed memory on CPU: kaggle_seg/malloc.py)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    table = get_competition("dsb2018").read_table(
        shared_data_dir() / "dsb2018", build_data_config("dsb2018")
    )
    table = table[(table["width"] == 256) & (table["height"] == 256)].head(args.images + 8)
    table.to_csv(work / "table.csv", index=False)
    folds = [0] * 8 + [1] * args.images
    pd.DataFrame({"id": table["id"], "fold": folds}).to_csv(work / "folds.csv", index=False)
    (work / "bench.yaml").write_text(
        CONFIG.format(table=work / "table.csv", folds=work / "folds.csv", size=args.size)
    )
    config = load_experiment(work / "bench.yaml")
    if not args.glibc_defaults:  # as train_fold does on CPU; process-wide, so both loops get it
        keep_freed_memory(heap_only=True)
    trainer = Trainer(config, 0, work / "runs", start_runtime("cpu"))
    trainer._apply_freezing()

    torch.manual_seed(0)
    model = build_model(config.model, 3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = trainer.criterion

    kseg_rates, minimal_rates = [], []
    minimal_epoch(model, trainer.train_loader, optimizer, criterion)  # warm-up both paths
    trainer.train_one_epoch()
    for _ in range(args.epochs):
        minimal_rates.append(minimal_epoch(model, trainer.train_loader, optimizer, criterion))
        kseg_rates.append(trainer.train_one_epoch()["images_per_s"])
    kseg, minimal = statistics.median(kseg_rates), statistics.median(minimal_rates)
    print(f"| loop | images/s (median of {args.epochs} epochs) |")
    print("|---|---:|")
    print(f"| minimal PyTorch loop | {minimal:.2f} |")
    print(f"| kseg Trainer.train_one_epoch | {kseg:.2f} |")
    print(f"\nkseg overhead: {100 * (1 - kseg / minimal):+.1f}% "
          f"({args.images} images of {args.size}x{args.size}, batch 8, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads)")  # fmt: skip


if __name__ == "__main__":
    main()
