"""`kseg tune` at competition scale: the search against the previous implementation.

Run from the repository root:

    python benchmarks/bench_tune.py                    # 38,880 slices: the full uwmgi size
    python benchmarks/bench_tune.py --slices 2016      # 14 case-days, a smoke test

A synthetic uwmgi experiment shaped like the phantom (`kaggle_seg.competitions.uwmgi_phantom`):
case-days of 144 slices 266x266, 3 organ classes, truth as row-major RLE in a prepared table, and
5 folds of float16 out-of-fold probabilities (the truth blurred, noised, and two confident 3x4
false blobs a slice), written once under --workdir and reused. Each implementation then tunes
the experiment in a child process of its own (wall time, peak RSS of that process), with the
same grid:

- kseg tune (this checkout) on the whole OOF;
- the previous implementation, `kaggle_seg/tune.py` at commit PREVIOUS (the whole package at
  that commit, from `git archive`, unchanged), on --old-slices slices (whole case-days drawn
  by `--max-images`, as both implementations draw them), and this checkout on the same slices,
  to compare the settings.
  The previous one holds the OOF, its threshold levels and the truth in memory (~0.6 MB a slice
  with float16 OOF), so the whole OOF needs ~25 GB: `--old-slices 38880` on a machine with that.

`--cpus N` pins both to the first N CPUs (the goal is stated for 2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# The previous implementation's child (`--run old`) imports its own package, not this one.
if "--run" not in sys.argv or sys.argv[sys.argv.index("--run") + 1 :][:1] != ["old"]:
    sys.path.insert(0, str(REPO))

PREVIOUS = "d9294f8"  # main before issue 16: the exhaustive search with every slice in memory
SLICES_PER_CASE_DAY = 144
SIZE = 266
N_FOLDS = 5


def scan_path(case_day: str, slice_index: int) -> str:
    """The slice's file in Kaggle's layout: train/<case>/<case>_<day>/scans/slice_..."""
    case = case_day.split("_")[0]
    return f"train/{case}/{case_day}/scans/slice_{slice_index:04d}_{SIZE}_{SIZE}_1.50_1.50.png"


def noisy_probabilities(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float16 [K, H, W] from uint8 truth [H, W, K]: blurred, noised, two false 3x4 blobs."""
    import cv2

    targets = np.moveaxis(masks, -1, 0).astype(np.float32)
    blurred = np.stack([cv2.GaussianBlur(t, (0, 0), 2.0) for t in targets])
    noise = rng.standard_normal(blurred.shape, dtype=np.float32) * np.float32(0.05)
    probabilities = np.float32(0.05) + np.float32(0.9) * blurred + noise
    for _ in range(2):
        k = int(rng.integers(len(targets)))
        y, x = int(rng.integers(0, SIZE - 3)), int(rng.integers(0, SIZE - 4))
        probabilities[k, y : y + 3, x : x + 4] = 0.95
    return np.clip(probabilities, 0.0, 1.0).astype(np.float16)


def make_experiment(root: Path, n_slices: int, seed: int = 0) -> Path:
    """Write table.csv and runs/bench/fold_<k>/{config.yaml, oof.npz} under `root` (reused
    when complete)."""
    import pandas as pd

    from kaggle_seg.competitions.uwmgi_files import CLASSES, RLE_COLUMNS, slice_id
    from kaggle_seg.competitions.uwmgi_phantom import phantom_volume
    from kaggle_seg.data.rle import encode_rle
    from kaggle_seg.probabilities import write_mappable_npz

    experiment = root / "runs" / "bench"
    done = root / "complete.json"
    wanted = {"slices": n_slices, "seed": seed, "size": SIZE}
    if done.is_file() and json.loads(done.read_text()) == wanted:
        write_fold_configs(experiment, root)
        return experiment
    n_case_days = -(-n_slices // SLICES_PER_CASE_DAY)
    case_days = [f"case{c // 3 + 1}_day{c % 3}" for c in range(n_case_days)]
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    started = time.perf_counter()

    def fold_arrays(fold: int):
        for c, case_day in enumerate(case_days):
            if (c // 3) % N_FOLDS != fold:
                continue
            depth = min(SLICES_PER_CASE_DAY, n_slices - c * SLICES_PER_CASE_DAY)
            _, masks = phantom_volume(depth, SIZE, SIZE, np.random.default_rng([seed, c]))
            for z in range(depth):
                image_id = slice_id(case_day, z + 1)
                rows.append(
                    {
                        "id": image_id,
                        "group": case_day.split("_")[0],
                        "case_id": case_day.split("_")[0],
                        "case_day": case_day,
                        "slice_index": z + 1,
                        # Where Kaggle's layout puts the scan; never read (tune reads no image)
                        "image_path": scan_path(case_day, z + 1),
                        "height": SIZE,
                        "width": SIZE,
                        **{
                            column: encode_rle(masks[z, :, :, k], "C")
                            for k, column in enumerate(RLE_COLUMNS)
                        },
                    }
                )
                rows[-1]["empty"] = not masks[z].any()
                yield image_id, noisy_probabilities(masks[z], rng)
            print(f"  {case_day}: {len(rows)} slices, {time.perf_counter() - started:.0f} s")

    for fold in range(N_FOLDS):
        folder = experiment / f"fold_{fold}"
        write_mappable_npz(fold_arrays(fold), folder / "oof.npz")
    table = pd.DataFrame(rows).sort_values(["case_day", "slice_index"])
    table.to_csv(root / "table.csv", index=False)
    write_fold_configs(experiment, root)
    assert len(CLASSES) == 3
    done.write_text(json.dumps(wanted))
    return experiment


def write_fold_configs(experiment: Path, root: Path) -> None:
    """Each fold's config.yaml with only the keys the benchmark sets (name, competition, table):
    the previous package refuses keys added since, and fills the rest with its defaults."""
    import yaml

    config = {"name": "bench", "data": {"competition": "uwmgi", "table": str(root / "table.csv")}}
    for fold in range(N_FOLDS):
        (experiment / f"fold_{fold}" / "config.yaml").write_text(yaml.safe_dump(config))


def previous_package(root: Path) -> Path:
    """The whole `kaggle_seg` package at PREVIOUS (`git archive`), under root/previous: its
    tune.py imports modules that the package has renamed since."""
    folder = root / "previous"
    if not (folder / "kaggle_seg" / "tune.py").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", PREVIOUS, "kaggle_seg"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


class MemorySampler(threading.Thread):
    """The process's peak anonymous memory (RssAnon, sampled every 0.2 s): its own arrays,
    without the pages of the memory-mapped OOF that the OS keeps in its page cache (RSS counts
    those mapped file pages too, however freely the OS may drop them)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_anon_mb = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_anon_mb = max(self.peak_anon_mb, int(line.split()[1]) / 1024)

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_child(args: argparse.Namespace) -> None:
    """One implementation in this process: print a JSON line of what it did."""
    if args.cpus:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpus])
    from kaggle_seg.tune import tune_experiment  # the previous package's, for "old" (PYTHONPATH)

    if args.run == "old":
        import kaggle_seg

        assert "previous" in Path(kaggle_seg.__file__).parts, kaggle_seg.__file__
    memory = MemorySampler()
    memory.start()
    started, cpu = time.perf_counter(), time.process_time()
    result = tune_experiment(
        Path(args.experiment), out=Path(args.out), max_images=args.max_images, seed=0
    )
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    memory.stop()
    report = getattr(result, "search", None)
    print(
        json.dumps(
            {
                "run": args.run,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_anon_mb": memory.peak_anon_mb,
                "images": result.n_images,
                "before": result.before["score"],
                "after": result.after["score"],
                "settings": result.settings.model_dump(mode="json"),
                "search": None if report is None else vars(report),
                "cpus": len(os.sched_getaffinity(0)),
            }
        )
    )


def child(kind: str, experiment: Path, out: Path, max_images: int | None, cpus: int) -> dict:
    command = [sys.executable, __file__, "--run", kind, "--experiment", str(experiment)]
    command += ["--out", str(out), "--cpus", str(cpus)]
    if max_images:
        command += ["--max-images", str(max_images)]
    package = previous_package(Path(out).parent) if kind == "old" else REPO
    env = {**os.environ, "PYTHONPATH": str(package), "KSEG_PROGRESS": "plain"}
    print(f"$ {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=270 * SLICES_PER_CASE_DAY)
    parser.add_argument("--old-slices", type=int, default=20 * SLICES_PER_CASE_DAY)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kseg_bench_tune"))
    parser.add_argument("--cpus", type=int, default=2, help="CPUs each run may use (0: all)")
    parser.add_argument("--run", choices=["new", "old"], help=argparse.SUPPRESS)
    parser.add_argument("--experiment", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--max-images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_child(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"date: {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, ")
    print(f"command: python benchmarks/bench_tune.py {' '.join(sys.argv[1:])}".rstrip())
    started = time.perf_counter()
    experiment = make_experiment(args.workdir, args.slices)
    size = sum(f.stat().st_size for f in experiment.glob("fold_*/oof.npz")) / 2**30
    print(f"experiment: {args.slices} slices, OOF {size:.1f} GiB on disk "
          f"(made or reused in {time.perf_counter() - started:.0f} s)")  # fmt: skip
    runs = {"new, all slices": child("new", experiment, args.workdir / "new.json", None, args.cpus)}
    subset = min(args.old_slices, args.slices)
    if subset:
        max_images = None if subset >= args.slices else subset
        runs["previous, subset"] = child(
            "old", experiment, args.workdir / "old.json", max_images, args.cpus
        )
        if max_images:
            runs["new, same subset"] = child(
                "new", experiment, args.workdir / "new_subset.json", max_images, args.cpus
            )
    print()
    print(
        "| run | slices | CPUs | seconds | CPU seconds | peak RSS MiB | peak anonymous MiB "
        "| CV defaults | CV tuned |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        print(
            f"| {name} | {run['images']} | {run['cpus']} | {run['seconds']:.1f} | "
            f"{run['cpu_seconds']:.1f} | {run['peak_rss_mb']:.0f} | {run['peak_anon_mb']:.0f} | "
            f"{run['before']:.6f} | {run['after']:.6f} |"
        )
    for name, run in runs.items():
        print(f"{name}: {json.dumps(run['settings'])}")
        if run["search"]:
            print(f"  search: {run['search']}")
    if "previous, subset" in runs:
        compare = runs.get("new, same subset", runs["new, all slices"])
        same = compare["settings"] == runs["previous, subset"]["settings"]
        print(f"same postprocess.json as the previous implementation on its slices: {same}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
