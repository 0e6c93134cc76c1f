"""Does `torch.compile` speed up a CPU training step of the DSB recipe's model? (No, here.)

    python benchmarks/bench_cpu_compile.py [--config configs/dsb2018_cpu.yaml] [--float32]

One process, the malloc setting of CPU training, the config's model (random weights) in
channels_last with bf16 autocast (what `train.amp: auto` does on a CPU with native bf16; add
--float32 for float32): the median of 6 eager steps, then compile (inductor) and its first two
steps timed together, then 6 compiled steps, 6 eager and 6 compiled again. The model keeps one
memory format and mode throughout: changing either makes dynamo recompile.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def median_seconds(step: Callable[[], None], repeats: int = 6) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from kaggle_seg.config import load_experiment
    from kaggle_seg.malloc import keep_freed_memory
    from kaggle_seg.models import build_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "dsb2018_cpu.yaml")
    parser.add_argument("--float32", action="store_true")
    args = parser.parse_args()

    keep_freed_memory(heap_only=True)
    config = load_experiment(args.config, ["model.encoder_weights=null"])
    torch.manual_seed(0)
    model = build_model(config.model, 3, 2).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    size, batch = config.augment.height, config.train.batch_size
    x = torch.randn(batch, 3, size, config.augment.width).contiguous(
        memory_format=torch.channels_last
    )
    targets = (torch.rand(batch, 2, size, config.augment.width) > 0.5).float()
    bf16 = not args.float32

    def step(net: torch.nn.Module) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(model)  # oneDNN picks its kernels on the first call
    eager = [median_seconds(lambda: step(model))]
    started = time.perf_counter()
    compiled = torch.compile(model)
    step(compiled)
    step(compiled)
    compile_seconds = time.perf_counter() - started
    fast = [median_seconds(lambda: step(compiled))]
    eager.append(median_seconds(lambda: step(model)))
    fast.append(median_seconds(lambda: step(compiled)))
    ratio = sum(eager) / sum(fast)
    print(
        f"{config.name}: {config.model.encoder}, batch {batch} x {size}x{config.augment.width}, "
        f"{'bf16' if bf16 else 'float32'} channels_last, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"compile + first 2 steps: {compile_seconds:.0f} s")
    print(f"eager step s: {eager[0]:.3f}, {eager[1]:.3f}; compiled: {fast[0]:.3f}, {fast[1]:.3f}")
    print(f"speed-up of compile: {ratio:.2f}x")


if __name__ == "__main__":
    main()
