"""Speed of kaggle_seg's numba RLE against the common Kaggle numpy encoder / decoder.

Run from the repository root:

    python benchmarks/bench_rle.py            # full run, results as a Markdown table
    python benchmarks/bench_rle.py --quick    # fewer masks and repeats, for a smoke test

Workloads (synthetic, seeded): 266x266 organ-like masks (smooth blobs like UW-Madison GI organ
masks, order "C"), read from memory by every pass, and the same masks made just before each
encode (thresholded from a probability map, as a submission loop does), so in cache; 1024x1024
fragmented masks (30 % random pixels, order "C"); 266x266 organ cross-sections of the
phantom UW-Madison volumes (smooth blobs with fewer runs); plus, when the shared data is
present, real DSB 2018 nucleus masks in their own order "F". Both implementations run in the
same process, interleaved, on the same masks; the best of --repeats passes is reported per
mask, and every string and mask is checked to be identical.

Decode is measured three ways: "decode" one mask at a time, each result dropped at once (the
output memory is reused, warm in cache; kseg: `decode_rle`); "decode, all rows" every mask of
the workload per pass, kept until the pass ends (numpy: a list of masks; kseg: `decode_rles`,
one stack); "decode, all rows kept" the same with every pass's masks kept to the end of the
workload, so each pass decodes into fresh memory that the OS must fault in and zero.
The speedup is by the wall clock; a second one by the thread's CPU time leaves out the time
the process was preempted, which on a shared machine inflates the slow numpy passes most.
--jit also measures numba's compile cost (empty cache) and the cost of loading the kernels
from the cache, each in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kaggle_seg.data.rle import decode_rle, decode_rles, encode_rle, warmup  # noqa: E402


def numpy_encode(img):  # the common Kaggle encoder (row-major on img.flatten())
    pixels = img.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def numpy_decode(mask_rle, shape):  # the common Kaggle slice-fill decoder
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends):  # noqa: B905 (verbatim Kaggle code)
        img[lo:hi] = 1
    return img.reshape(shape)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """[H, W] white noise low-passed with a Gaussian of `scale` pixels (via FFT)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    spectrum = np.fft.rfft2(rng.standard_normal(shape))
    spectrum *= np.exp(-2 * (np.pi * scale) ** 2 * (fy**2 + fx**2))
    return np.fft.irfft2(spectrum, s=shape)


def organ_masks(n: int, seed: int = 0, size: int = 266) -> list[np.ndarray]:
    """n [size, size] uint8 0/1 masks: half 1-3 rotated ellipses (stomach-like), half
    thresholded smooth noise covering 2-15 % of the slice (bowel-like loops)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    masks = []
    while len(masks) < n:
        if len(masks) % 2 == 0:
            mask = np.zeros((size, size), dtype=bool)
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(0.2, 0.8, 2) * size
                ay, ax = rng.uniform(8, 55, 2)
                theta = rng.uniform(0, np.pi)
                dy, dx = yy - cy, xx - cx
                u = dy * np.cos(theta) + dx * np.sin(theta)
                v = -dy * np.sin(theta) + dx * np.cos(theta)
                mask |= (u / ay) ** 2 + (v / ax) ** 2 < 1
        else:
            field = smooth_noise(rng, (size, size), scale=rng.uniform(4, 10))
            mask = field > np.quantile(field, 1 - rng.uniform(0.02, 0.15))
        if mask.any():
            masks.append(mask.astype(np.uint8))
    return masks


def phantom_masks(n: int, seed: int = 0) -> list[np.ndarray]:
    """n non-empty [266, 266] organ masks cut from phantom UW-Madison volumes
    (`kaggle_seg.competitions.uwmgi_phantom`): smooth ellipsoid cross-sections with ~45 runs a
    mask, fewer than `organ_masks`' ~300."""
    from kaggle_seg.competitions.uwmgi_phantom import phantom_volume

    rng = np.random.default_rng(seed)
    masks: list[np.ndarray] = []
    while len(masks) < n:
        _, volume = phantom_volume(48, 266, 266, rng)
        for z in range(volume.shape[0]):
            for k in range(volume.shape[-1]):
                if volume[z, :, :, k].any() and len(masks) < n:
                    masks.append(np.ascontiguousarray(volume[z, :, :, k]))
    return masks


def fragmented_masks(n: int, seed: int = 1, size: int = 1024) -> list[np.ndarray]:
    """n [size, size] uint8 masks with 30 % random foreground pixels."""
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size)) < 0.3).astype(np.uint8) for _ in range(n)]


def dsb_masks(limit: int) -> list[np.ndarray]:
    """Up to `limit` real DSB 2018 nucleus masks [H, W] uint8 0/1 (first images by id)."""
    from PIL import Image

    root = Path(os.environ.get("KSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
    train = root / "dsb2018" / "stage1_train"
    masks: list[np.ndarray] = []
    if not train.is_dir():
        return masks
    for image_dir in sorted(train.iterdir()):
        for path in sorted((image_dir / "masks").glob("*.png")):
            masks.append((np.asarray(Image.open(path)) > 0).astype(np.uint8))
            if len(masks) >= limit:
                return masks
    return masks


def timed_pass(fn: Callable[[], object], n_items: int) -> tuple[float, float]:
    """Microseconds per item of one pass: (wall clock, this thread's CPU time)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    return wall / n_items * 1e6, cpu / n_items * 1e6


Row = tuple[str, str, float, float, float, float, int, float]


def bench_workload(name: str, masks: list[np.ndarray], order: str, repeats: int) -> list[Row]:
    """Rows (workload, operation, numpy us, kseg us, numpy CPU us, kseg CPU us, n masks, mean
    runs per mask) after checking that both implementations agree on every mask. Each time
    is the best of `repeats` passes."""
    if order == "C":
        np_encode, np_decode = numpy_encode, numpy_decode
    else:  # the same recipe on the transpose, as DSB kernels did for column-major

        def np_encode(img):
            return numpy_encode(img.T)

        def np_decode(rle, shape):
            return numpy_decode(rle, shape[::-1]).T

    rles = [np_encode(m) for m in masks]
    shapes = [m.shape for m in masks]
    for mask, rle, shape in zip(masks, rles, shapes, strict=True):
        assert encode_rle(mask, order) == rle, f"{name}: encodings differ"
        assert np.array_equal(decode_rle(rle, shape, order), np_decode(rle, shape)), name
        assert np.array_equal(decode_rle(rle, shape, order), mask), name

    def run_np_encode():
        for m in masks:
            np_encode(m)

    def run_kseg_encode():
        for m in masks:
            encode_rle(m, order)

    def run_np_decode():
        for r, s in zip(rles, shapes, strict=True):
            np_decode(r, s)

    def run_kseg_decode():
        for r, s in zip(rles, shapes, strict=True):
            decode_rle(r, s, order)

    # One shape: decode_rles returns an [N, H, W] stack; several: views into one buffer.
    stack_shapes = shapes[0] if len(set(shapes)) == 1 else shapes
    kept: list[object] = []  # outputs of the "kept" passes, alive to the end of the workload

    def run_np_stack():
        return [np_decode(r, s) for r, s in zip(rles, shapes, strict=True)]

    def run_kseg_stack():
        return decode_rles(rles, stack_shapes, order)

    def run_np_kept():
        kept.append(run_np_stack())

    def run_kseg_kept():
        kept.append(run_kseg_stack())

    for got, want in zip(run_kseg_stack(), masks, strict=True):
        assert np.array_equal(got, want), name
    rows = []
    for operation, baseline, ours in [
        ("encode", run_np_encode, run_kseg_encode),
        ("decode", run_np_decode, run_kseg_decode),
        ("decode, all rows", run_np_stack, run_kseg_stack),
        ("decode, all rows kept", run_np_kept, run_kseg_kept),
    ]:
        numpy_times, kseg_times = [], []
        for _ in range(repeats):  # interleaved so that machine noise hits both alike
            numpy_times.append(timed_pass(baseline, len(masks)))
            kseg_times.append(timed_pass(ours, len(masks)))
        numpy_wall, numpy_cpu = np.min(numpy_times, axis=0)  # each the best of its passes
        kseg_wall, kseg_cpu = np.min(kseg_times, axis=0)
        runs = sum(r.count(" ") + 1 for r in rles if r) / 2 / len(masks)
        rows.append((name, operation, numpy_wall, kseg_wall, numpy_cpu, kseg_cpu, len(masks), runs))
    kept.clear()
    return rows


def bench_fresh_encode(name: str, masks: list[np.ndarray], repeats: int) -> list[Row]:
    """Encode rows where each mask is made just before it is encoded, as in a submission loop
    (`probability > threshold`, then encode): the mask is in cache, not in memory. Only the
    encode call is timed, by perf_counter around each call (the same for both; its ~0.1 us
    counts against kseg). No CPU-time figure: the thread clock is a system call, ~1 us each."""
    # Probability maps that threshold back to the masks exactly.
    maps = [m.astype(np.float32) * np.float32(0.9) + np.float32(0.05) for m in masks]

    def run(encode: Callable[[np.ndarray], str]) -> tuple[float, float]:
        wall = 0.0
        for probabilities in maps:
            mask = (probabilities > 0.5).view(np.uint8)
            started = time.perf_counter()
            encode(mask)
            wall += time.perf_counter() - started
        return wall / len(maps) * 1e6, float("nan")

    for probabilities, mask in zip(maps, masks, strict=True):
        fresh = (probabilities > 0.5).view(np.uint8)
        assert encode_rle(fresh, "C") == numpy_encode(fresh) == numpy_encode(mask), name
    numpy_times, kseg_times = [], []
    for _ in range(repeats):
        numpy_times.append(run(numpy_encode))
        kseg_times.append(run(lambda m: encode_rle(m, "C")))
    numpy_wall, numpy_cpu = np.min(numpy_times, axis=0)
    kseg_wall, kseg_cpu = np.min(kseg_times, axis=0)
    runs = sum(numpy_encode(m).count(" ") + 1 for m in masks) / 2 / len(masks)
    return [(name, "encode", numpy_wall, kseg_wall, numpy_cpu, kseg_cpu, len(masks), runs)]


JIT_PROBE = """
import time
t0 = time.perf_counter()
import numba
t1 = time.perf_counter()
from kaggle_seg.data import rle
t2 = time.perf_counter()
rle.warmup()
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def bench_jit(runs: int) -> dict[str, list[float]]:
    """Seconds for `import numba`, `import rle`, warmup(): cold (empty NUMBA_CACHE_DIR) and
    cached (the same dir again), each in a fresh interpreter, `runs` times."""
    results: dict[str, list[float]] = {"cold": [], "cached": []}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache_dir:
            env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONPATH": str(REPO)}
            for kind in ("cold", "cached"):
                out = subprocess.run(
                    [sys.executable, "-c", JIT_PROBE], env=env, capture_output=True, text=True
                )
                out.check_returncode()
                results[kind].append([float(x) for x in out.stdout.split()])
    return results


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per measurement")
    parser.add_argument("--quick", action="store_true", help="fewer masks and repeats")
    parser.add_argument("--jit", action="store_true", help="also time numba compile / cache load")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    n_organ, n_phantom, n_fragmented, n_dsb = (
        (30, 40, 1, 100) if args.quick else (300, 400, 4, 1000)
    )

    import numba

    warmup()
    print(f"date: {datetime.date.today()}  machine: {machine()}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}")
    print(f"command: python benchmarks/bench_rle.py {' '.join(sys.argv[1:])}".rstrip())
    organs = organ_masks(n_organ)
    rows = bench_workload("organ-like 266x266 (all), C", organs, "C", repeats)
    rows += bench_workload("  of which ellipses (stomach-like)", organs[0::2], "C", repeats)
    rows += bench_workload("  of which noise blobs (bowel-like)", organs[1::2], "C", repeats)
    rows += bench_workload(
        "phantom organs 266x266 (smooth blobs, fewer runs), C",
        phantom_masks(n_phantom),
        "C",
        repeats,
    )
    rows += bench_fresh_encode(
        "organ-like 266x266, each made just before (in cache), C", organs, repeats
    )
    rows += bench_workload(
        "fragmented 1024x1024 30 %, C", fragmented_masks(n_fragmented), "C", repeats
    )
    dsb = dsb_masks(n_dsb)
    if dsb:
        rows += bench_workload("DSB 2018 nuclei (real), F", dsb, "F", repeats)
    print()
    print(
        "| workload | op | masks | runs/mask | numpy us/mask | kseg us/mask | speedup "
        "| speedup, CPU time |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, operation, numpy_us, kseg_us, numpy_cpu, kseg_cpu, n, runs in rows:
        print(
            f"| {name} | {operation} | {n} | {runs:.0f} | {numpy_us:.1f} | {kseg_us:.1f} | "
            f"{numpy_us / kseg_us:.1f}x | "
            + ("- |" if np.isnan(kseg_cpu) else f"{numpy_cpu / kseg_cpu:.1f}x |")
        )
    if args.jit:
        jit = bench_jit(1 if args.quick else 3)
        print()
        print("| numba cache | import numba s | import rle s | warmup() s |")
        print("|---|---:|---:|---:|")
        for kind, runs in jit.items():
            best = np.min(np.array(runs), axis=0)
            print(f"| {kind} | {best[0]:.2f} | {best[1]:.3f} | {best[2]:.3f} |")


if __name__ == "__main__":
    main()
