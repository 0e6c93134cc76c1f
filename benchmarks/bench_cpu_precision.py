"""CPU step time of a recipe's model: float32 / bf16 autocast, contiguous / channels_last.

    python benchmarks/bench_cpu_precision.py [--config configs/dsb2018_cpu.yaml] [--rounds 3]

The model is built from the config as `kseg train` builds it (random weights: the time does not
depend on them). Timed, interleaved round by round in one process with the malloc setting
`train_fold` applies on CPU:
- a training step (forward, float32 loss, backward, AdamW) on a batch of crops of the config's
  size and batch size;
- a prediction forward pass (no grad) on one whole 520 x 696 DSB-sized image padded to 544 x 704.
Each variant is reported as the median over rounds and as a speed-up ratio to float32 contiguous
(what kseg did on CPU before `train.amp: auto` and `train.channels_last` applied there). `auto`
picks bf16 only where `cpu_has_fast_bf16()`; the bf16 rows are measured either way.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [(False, False), (False, True), (True, False), (True, True)]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels for the shape on the first call
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    from kaggle_seg.config import load_experiment
    from kaggle_seg.malloc import keep_freed_memory
    from kaggle_seg.models import build_model
    from kaggle_seg.runtime import cpu_has_fast_bf16

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "dsb2018_cpu.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    keep_freed_memory(heap_only=True)
    config = load_experiment(args.config, ["model.encoder_weights=null"])
    torch.manual_seed(0)
    model = build_model(config.model, 3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    size, batch = config.augment.height, config.train.batch_size
    crops = torch.randn(batch, 3, size, config.augment.width)
    targets = (torch.rand(batch, 2, size, config.augment.width) > 0.5).float()
    whole = torch.randn(1, 3, 544, 704)

    def train_step(x: torch.Tensor, bf16: bool) -> None:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    @torch.inference_mode()
    def predict(image: torch.Tensor, bf16: bool) -> None:
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(image)

    times: dict[tuple[bool, bool], dict[str, list[float]]] = {
        v: {"train": [], "predict": []} for v in VARIANTS
    }
    for _ in range(args.rounds):
        for bf16, channels_last in VARIANTS:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model.to(memory_format=fmt)
            x, image = crops.contiguous(memory_format=fmt), whole.contiguous(memory_format=fmt)
            step = functools.partial(train_step, x, bf16)
            forward = functools.partial(predict, image, bf16)
            times[(bf16, channels_last)]["train"].append(timed(step, args.repeats))
            times[(bf16, channels_last)]["predict"].append(timed(forward, args.repeats))

    base = {k: statistics.median(v) for k, v in times[(False, False)].items()}
    print(
        f"{config.name}: {config.model.architecture} {config.model.encoder}, train batch "
        f"{batch} x {size}x{config.augment.width}, predict 1 x 544x704; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, "
        f"cpu_has_fast_bf16={cpu_has_fast_bf16()}"
    )
    print("| precision | layout | train step s | ratio | predict s | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for bf16, channels_last in VARIANTS:
        train = statistics.median(times[(bf16, channels_last)]["train"])
        predict_s = statistics.median(times[(bf16, channels_last)]["predict"])
        precision = "bf16" if bf16 else "float32"
        layout = "channels_last" if channels_last else "contiguous"
        print(
            f"| {precision} | {layout} | {train:.3f} | {base['train'] / train:.2f}x "
            f"| {predict_s:.3f} | {base['predict'] / predict_s:.2f}x |"
        )


if __name__ == "__main__":
    main()
