"""Loader images/s for uwmgi 2.5D at 320x384: kseg's ImageStore cache vs decoding PNGs every time.

Run from the repository root:

    python benchmarks/bench_loader.py            # full run, results as Markdown tables
    python benchmarks/bench_loader.py --quick    # small data, one repeat: a smoke test
    python benchmarks/bench_loader.py --presets heavy --loaders compact,pooled  # issue's rows

Data: phantom UW-Madison scans in the Kaggle layout (`make_uwmgi_phantom`), by default 8
case-days x 80 slices, half 266x266 and half 360x310 (two cases, one size each). Every sample is
a 2.5D stack of depth 3, stride 2 (slices i-2, i, i+2: three PNGs), padded to 320x384
(resize_mode "pad"), augmented with a kseg preset, through a torch DataLoader (batch 16, 2
workers, shuffled, workers restarted each epoch as by default). Loaders:

- notebook: the usual Kaggle notebook Dataset: `df.iloc[i]`, `cv2.imread` of each of the three
  PNGs, divide by the max, decode the three RLEs with the common numpy slice-fill decoder, the
  same albumentations pipeline as kseg, `torch.tensor` of the transposed arrays;
- kseg memory / kseg memmap: `SegmentationDataset` over `build_stores(..., "memory" | "memmap")`;
- kseg memory, compact batch: the same with `compact=True`: float16 image and uint8 mask tensors
  from the worker (cast to float32 on the device), half / a quarter of the float32 bytes between
  processes, through a plain DataLoader with persistent workers: the training loader before
  `kaggle_seg/data/loader.py`;
- kseg memory, compact + worker malloc: `make_train_loader(..., pooled=False)`, the same with
  `WorkerInit` (glibc keeps freed memory in the workers instead of faulting it in again);
- kseg memory, pooled, glibc malloc defaults: the pooled loader without `keep_freed_memory` in
  its workers;
- kseg memory, pooled batch: `make_train_loader(...)`, what training uses: the workers write
  each sample into a batch slot of preallocated shared memory (`kaggle_seg/data/loader.py`).

Each configuration runs `--epochs` epochs per repeat; repeats are interleaved across
configurations. Reported: the best repeat's images/s (the machine is shared, so slower repeats
are noise) and the median CPU time per image over all processes (main + workers), which other
jobs on the machine disturb less. "floor" rows send zero tensors of the same shapes through
the same DataLoader (or the pooled loader): the collate + inter-process cost no dataset can go
below.
Cache fill time is measured separately (memmap: a cold build, then a reuse of the index) and
amortised over `--amortise` epochs in a second column. A last table gives the per-sample cost of
each stage in one process (one torch thread, as in a worker), which shows the decoding share.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from kaggle_seg.competitions import get_competition  # noqa: E402
from kaggle_seg.competitions.uwmgi_files import RLE_COLUMNS  # noqa: E402
from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom  # noqa: E402
from kaggle_seg.config import AugmentConfig, build_data_config  # noqa: E402
from kaggle_seg.data import loader as loader_module  # noqa: E402
from kaggle_seg.data.cache import ImageStore  # noqa: E402
from kaggle_seg.data.dataset import SegmentationDataset, build_stores  # noqa: E402
from kaggle_seg.data.loader import make_train_loader  # noqa: E402
from kaggle_seg.data.rle import warmup  # noqa: E402
from kaggle_seg.data.stacks import stack_positions  # noqa: E402
from kaggle_seg.data.transforms import build_transforms  # noqa: E402

HEIGHT, WIDTH = 320, 384
DEPTH, STRIDE = 3, 2


# --- the usual notebook loader (verbatim style) ---------------------------------------------------


# The common Kaggle slice-fill decoder, shared with the RLE benchmark.
from bench_rle import numpy_decode as rle_decode  # noqa: E402


def load_img(path):
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED).astype("float32")
    mx = np.max(img)
    if mx:
        img /= mx
    return img


class NotebookDataset(Dataset):
    def __init__(self, df, transforms=None):
        self.df = df
        # Neighbour paths precomputed once, as notebooks do with a groupby.
        positions = stack_positions(df, DEPTH, STRIDE, "case_day")
        paths = df["image_path"].to_numpy()
        self.df = df.assign(image_paths=[list(paths[p]) for p in positions])
        self.transforms = transforms

    def __len__(self):
        return len(self.df)

    def __getitem__(self, index):
        row = self.df.iloc[index]
        img = np.stack([load_img(p) for p in row.image_paths], axis=-1)
        shape = (row.height, row.width)
        msk = np.stack([rle_decode(row[c], shape) for c in RLE_COLUMNS], axis=-1)
        if self.transforms:
            data = self.transforms(image=img, mask=msk)
            img, msk = data["image"], data["mask"]
        img = np.transpose(img, (2, 0, 1))
        msk = np.transpose(msk, (2, 0, 1)).astype("float32")
        return torch.tensor(img), torch.tensor(msk)


# --- measurement --------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


class Zeros(Dataset):
    """The floor: samples of the right shapes from no work at all (float32 image and mask, or
    float16 image and uint8 mask when `compact`)."""

    def __init__(self, n: int, compact: bool = False):
        self.n = n
        self.dtypes = (np.float16, np.uint8) if compact else (np.float32, np.float32)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        shape = (DEPTH, HEIGHT, WIDTH)
        return {
            "image": torch.from_numpy(np.zeros(shape, self.dtypes[0])),
            "mask": torch.from_numpy(np.zeros(shape, self.dtypes[1])),
        }

    # What the pooled loader asks of a dataset.
    transform = None

    def sample_arrays(self, i):
        shape = (HEIGHT, WIDTH, DEPTH)
        return np.zeros(shape, np.float32), np.zeros(shape, np.uint8)

    def sample_id(self, i):
        return str(i)


def cpu_seconds() -> float:
    """User + system time of this process and its reaped children (the DataLoader workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def ablation(loader: str) -> Iterator[None]:
    """The pooled loader without its worker malloc setting, for the row that says so."""
    saved = loader_module.keep_freed_memory
    if "malloc defaults" in loader:
        loader_module.keep_freed_memory = lambda: False
    try:
        yield
    finally:
        loader_module.keep_freed_memory = saved


def make_loader(dataset: Dataset, kind: str, batch_size: int, workers: int):
    """ "plain": the DataLoader as notebooks make it (workers restarted every epoch);
    "persistent": the same with persistent workers; "training" / "pooled": kseg's training loader
    (`make_train_loader`) with the batch pool off / on."""
    if kind in ("plain", "persistent"):
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True,
                          drop_last=False, persistent_workers=kind == "persistent")  # fmt: skip
    return make_train_loader(
        dataset, batch_size=batch_size, sampler=None, num_workers=workers, pooled=kind == "pooled"
    )


def measure(
    dataset: Dataset, epochs: int, batch_size: int, workers: int, kind: str = "plain"
) -> tuple[float, float]:
    """(images/s, CPU ms/image) over `epochs` full passes, worker start-up (and the pool's
    allocation) included; the CPU time counts the main process and the workers, reaped at the
    end (after each epoch for "plain")."""
    started, cpu = time.perf_counter(), cpu_seconds()
    loader = make_loader(dataset, kind, batch_size, workers)
    seen = 0
    for _ in range(epochs):
        for batch in loader:
            seen += len(batch[0] if isinstance(batch, list) else batch["image"])
    del loader  # persistent workers stop (and are reaped) with their loader
    gc.collect()
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return seen / wall, cpu / seen * 1e3


def best_ms(fn: Callable[[int], object], n: int, repeats: int) -> float:
    """Best over `repeats` passes of the mean ms per call of fn(i), i = 0..n-1."""
    fn(0)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - started) / n * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 case-days x 24 slices, 1 repeat")
    parser.add_argument("--case-days", type=int, default=8)
    parser.add_argument("--slices", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amortise", type=int, default=10, help="epochs a fill is spread over")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--presets", default="heavy,light,none")
    parser.add_argument(
        "--loaders",
        default="",
        help="comma-separated words: run only the kseg loaders whose name holds one (e.g. "
        "'compact'); the notebook loader and the floors always run",
    )
    parser.add_argument("--data-dir", type=Path, help="reuse / keep the phantom data here")
    args = parser.parse_args()
    if args.quick:
        args.case_days, args.slices, args.repeats, args.epochs = 2, 24, 1, 1
    presets = args.presets.split(",")

    print(f"date: {datetime.date.today()}  machine: {machine()}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, albumentations "
        f"{A.__version__}, opencv {cv2.__version__}, numpy {np.__version__}"
    )
    print(f"command: python benchmarks/bench_loader.py {' '.join(sys.argv[1:])}".rstrip())

    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir or Path(scratch) / "uwmgi"
        half = (args.case_days + 1) // 2
        case_days = tuple(
            f"case{1 if k < half else 2}_day{k}" for k in range(args.case_days)
        )  # case1 -> 266x266, case2 -> 360x310 (the phantom's sizes cycle by case)
        if not (data_dir / "train.csv").is_file():
            make_uwmgi_phantom(data_dir, case_days=case_days, n_slices=args.slices, seed=0)
        competition = get_competition("uwmgi")
        table = competition.read_table(data_dir, build_data_config("uwmgi"))
        sizes = table.groupby(["width", "height"]).size()
        print(
            f"data: {len(table)} slices in {table['case_day'].nunique()} case-days, sizes "
            + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sizes.items())
            + f"; 2.5D depth {DEPTH} stride {STRIDE}, pad to {HEIGHT}x{WIDTH}, batch "
            f"{args.batch_size}, {args.workers} workers, {args.epochs} epoch(s) x best of "
            f"{args.repeats}"
        )

        warmup()  # numba's kernels load (or compile) once per process: not part of a fill
        fills: dict[str, tuple[float, int]] = {}
        started = time.perf_counter()
        memory = build_stores(competition, table, "memory")
        fills["kseg memory"] = (time.perf_counter() - started, sum(s.nbytes for s in memory))
        cache_dir = Path(scratch) / "cache"
        started = time.perf_counter()
        memmap = build_stores(competition, table, "memmap", folder=cache_dir)
        fills["kseg memmap"] = (time.perf_counter() - started, sum(s.nbytes for s in memmap))
        started = time.perf_counter()
        reused = build_stores(competition, table, "memmap", folder=cache_dir)
        reuse_seconds = time.perf_counter() - started
        assert all(s.reused for s in reused)
        memmap = reused

        stores: dict[str, tuple[ImageStore, ImageStore] | None] = {
            "kseg memory, float32 batch": memory,
            "kseg memmap, float32 batch": memmap,
            "kseg memory, compact batch": memory,
            "kseg memory, compact + worker malloc": memory,
            "kseg memory, pooled batch": memory,
            "kseg memory, pooled, glibc malloc defaults": memory,
        }
        if args.loaders:
            words = args.loaders.split(",")
            stores = {k: v for k, v in stores.items() if any(w in k for w in words)}

        def make(loader: str, preset: str) -> Dataset:
            config = AugmentConfig(preset=preset, height=HEIGHT, width=WIDTH, resize_mode="pad")
            transform = build_transforms(config, train=True)
            if loader == "notebook":
                return NotebookDataset(table, transform)
            pair = stores[loader]
            dataset = SegmentationDataset(
                competition,
                table,
                transform,
                stack_depth=DEPTH,
                stack_stride=STRIDE,
                image_store=pair[0] if pair else None,
                mask_store=pair[1] if pair else None,
                compact="float32" not in loader,
            )
            return dataset

        def kind(loader: str) -> str:
            if "pooled" in loader:
                return "pooled"
            if "malloc" in loader:
                return "training"
            return "persistent" if "compact" in loader else "plain"

        loaders = ["notebook", *stores]
        rates: dict[tuple[str, str], list[float]] = {}
        cpus: dict[tuple[str, str], list[float]] = {}
        floors = {
            "floor: zero tensors, no work": (Zeros(len(table)), "plain"),
            "floor, compact batch": (Zeros(len(table), compact=True), "persistent"),
            "floor, pooled batch": (Zeros(len(table), compact=True), "pooled"),
        }
        for _ in range(args.repeats):
            for name, (zeros, how) in floors.items():
                rate, cpu = measure(zeros, args.epochs, args.batch_size, args.workers, how)
                rates.setdefault((name, "-"), []).append(rate)
                cpus.setdefault((name, "-"), []).append(cpu)
            for preset in presets:
                for loader in loaders:
                    with ablation(loader):
                        rate, cpu = measure(
                            make(loader, preset), args.epochs, args.batch_size, args.workers,
                            kind(loader),
                        )  # fmt: skip
                    rates.setdefault((loader, preset), []).append(rate)
                    cpus.setdefault((loader, preset), []).append(cpu)

        n = len(table)
        print()
        print(
            "| preset | loader | images/s (best) | vs notebook | CPU ms/image (median) | "
            f"vs notebook | fill s | images/s incl. fill over {args.amortise} epochs | "
            "vs notebook |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for name in floors:
            print(
                f"| - | {name} | {max(rates[name, '-']):.0f} | - | "
                f"{np.median(cpus[name, '-']):.2f} | - | - | - | - |"
            )
        for preset in presets:
            base, base_cpu = max(rates["notebook", preset]), np.median(cpus["notebook", preset])
            for loader in loaders:
                rate, cpu = max(rates[loader, preset]), float(np.median(cpus[loader, preset]))
                fill = fills.get(loader.split(",")[0], (0.0, 0))[0]
                amortised = args.amortise * n / (fill + args.amortise * n / rate)
                fill_text = f"{fill:.1f}" if fill else "-"
                print(
                    f"| {preset} | {loader} | {rate:.0f} | {rate / base:.2f}x | {cpu:.2f} | "
                    f"{base_cpu / cpu:.2f}x | {fill_text} | {amortised:.0f} | "
                    f"{amortised / base:.2f}x |"
                )
        print()
        print("| store | images + masks held | fill s | reuse of an existing memmap s |")
        print("|---|---:|---:|---:|")
        for loader, (fill, nbytes) in fills.items():
            reuse = f"{reuse_seconds:.2f}" if loader == "kseg memmap" else "-"
            print(f"| {loader} | {nbytes / 2**20:.0f} MiB | {fill:.2f} | {reuse} |")

        # Per-sample stage costs in one process: where the time goes. One torch thread, as in
        # a DataLoader worker (with two, torch.tensor's copy alone took ~5 ms here).
        torch.set_num_threads(1)
        notebook = NotebookDataset(table)
        cached = SegmentationDataset(
            competition, table, None, stack_depth=DEPTH, stack_stride=STRIDE,
            image_store=memory[0], mask_store=memory[1],
        )  # fmt: skip
        direct = SegmentationDataset(
            competition, table, None, stack_depth=DEPTH, stack_stride=STRIDE
        )
        m = min(n, 160)
        order = np.random.default_rng(0).permutation(n)[:m]
        stages = {
            "notebook: 3 PNG imread + /max + 3 numpy RLE decodes + tensors": lambda i: notebook[
                int(order[i])
            ],
            "kseg none: 3 PNG reads + 3 numba RLE decodes + tensors": lambda i: direct[
                int(order[i])
            ],
            "kseg store: 3 uint16 slices + mask + tensors": lambda i: cached[int(order[i])],
        }
        samples = [cached._stack_uint16(int(order[i])) for i in range(m)]  # as training reads
        masks = [cached.read_target(int(order[i])) for i in range(m)]
        for preset in presets:
            config = AugmentConfig(preset=preset, height=HEIGHT, width=WIDTH, resize_mode="pad")
            transform = build_transforms(config, train=True)
            stages[f"transform {preset} (pad to {HEIGHT}x{WIDTH} + preset)"] = (
                lambda i, t=transform: t(image=samples[i], mask=masks[i])
            )
        print()
        print("| stage, one process | ms/sample |")
        print("|---|---:|")
        for name, fn in stages.items():
            print(f"| {name} | {best_ms(fn, m, max(args.repeats, 2)):.2f} |")


if __name__ == "__main__":
    main()
