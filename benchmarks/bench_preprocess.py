"""Cost of the preprocessing steps (kaggle_seg/preprocess.py): N4 per LGG slice and per uwmgi
case-day, and clahe / zscore per slice for scale.

Run from the repository root:

    python benchmarks/bench_preprocess.py            # 20 LGG slices, two 144-slice case-days
    python benchmarks/bench_preprocess.py --quick    # 4 slices, 16-slice case-days, scaled

LGG: real 256x256x3 slices from $KSEG_SHARED_DATA/lgg (pre-contrast, FLAIR, post-contrast; N4
runs per channel). uwmgi: phantom case-days (kaggle_seg/competitions/uwmgi_phantom.py) of 266x266
and 360x310 16-bit slices, one channel; Kaggle's case-days have 144 (or 80) slices. N4 uses the
default step, {name: n4, shrink: 4, iterations: [50, 50, 30, 20]}, with ITK's own threads; the
image store fills with a thread pool, so on more cores a run's N4 pass takes less wall time than
the per-image numbers times the image count. Reported: wall time and process CPU time (all
threads) per image, the median over images.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kaggle_seg.preprocess import apply_steps, resolve_steps  # noqa: E402

STEPS = {
    "n4": resolve_steps(["n4"]),
    "clahe": resolve_steps(["clahe"]),
    "zscore": resolve_steps(["zscore"]),
}


def timed(image: np.ndarray, steps: list[dict]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    apply_steps(image, steps)
    return time.perf_counter() - wall, time.process_time() - cpu


def lgg_images(count: int) -> list[np.ndarray]:
    from kaggle_seg.competitions import get_competition
    from kaggle_seg.config import build_data_config

    data = Path(os.environ.get("KSEG_SHARED_DATA", REPO.parent / "shared" / "data")) / "lgg"
    competition = get_competition("lgg")
    table = competition.read_table(data, build_data_config("lgg"))
    # Spread over patients and slice positions, lesion or not.
    rows = table.iloc[np.linspace(0, len(table) - 1, count).astype(int)].to_dict("records")
    return [competition.read_image(row) for row in rows]


def uwmgi_case_days(slices: int) -> dict[str, list[np.ndarray]]:
    from kaggle_seg.competitions import get_competition
    from kaggle_seg.competitions.uwmgi_phantom import make_uwmgi_phantom
    from kaggle_seg.config import build_data_config

    competition = get_competition("uwmgi")
    with tempfile.TemporaryDirectory() as folder:
        make_uwmgi_phantom(folder, case_days=("case1_day0", "case2_day0"), n_slices=slices)
        table = competition.read_table(Path(folder), build_data_config("uwmgi"))
        days = {}
        for day, part in table.groupby("case_day", sort=True):
            rows = part.to_dict("records")
            size = f"{day} ({rows[0]['width']}x{rows[0]['height']})"
            days[size] = [competition.read_image(row) for row in rows]
    return days


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--slices", type=int, default=None, help="LGG slices (default 20)")
    args = parser.parse_args()
    n_lgg = args.slices or (4 if args.quick else 20)
    per_day = 16 if args.quick else 144

    print(f"# bench_preprocess: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {'quick' if args.quick else 'full'}")  # fmt: skip
    print(
        "\n| workload | step | wall / image (median) | CPU / image | case-day of 144: wall, CPU |"
    )
    print("|---|---|---|---|---|")
    images = lgg_images(n_lgg)
    for name, steps in STEPS.items():
        times = np.array([timed(image, steps) for image in images])
        wall, cpu = np.median(times, axis=0)
        print(f"| LGG 256x256x3 slice ({n_lgg}) | {name} | {wall * 1e3:.0f} ms | "
              f"{cpu * 1e3:.0f} ms | |")  # fmt: skip
    for day, slices in uwmgi_case_days(per_day).items():
        times = np.array([timed(image, STEPS["n4"]) for image in slices])
        wall, cpu = np.median(times, axis=0)
        total_wall, total_cpu = times.sum(axis=0) * 144 / len(slices)
        scaled = "" if len(slices) == 144 else f" (scaled from {len(slices)})"
        print(f"| uwmgi {day} | n4 | {wall * 1e3:.0f} ms | {cpu * 1e3:.0f} ms | "
              f"{total_wall:.1f} s, {total_cpu:.1f} s{scaled} |")  # fmt: skip


if __name__ == "__main__":
    main()
