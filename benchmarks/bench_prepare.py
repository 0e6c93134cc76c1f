"""What `kseg prepare --check` costs on the real data: none, headers and full, on the DSB 2018
stage-1 training set (570 images, 25,529 mask PNGs) and the LGG subset (205 slices).

    python benchmarks/bench_prepare.py --repeats 3

Each level runs `prepare_table` end to end (the table is written to a temporary folder) after
one warm-up pass, so the page cache holds the files as it does for a second `prepare`; the
figure is the median of the repeats, in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import shared_data_dir  # noqa: E402

from kaggle_seg.prepare import prepare_table  # noqa: E402
from kaggle_seg.table_checks import CHECKS  # noqa: E402

DATASETS = {"dsb2018": "dsb2018", "lgg": "lgg"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for competition, folder in DATASETS.items():
            data_dir = shared_data_dir() / folder
            out = Path(scratch) / f"{competition}.csv"
            prepare_table(competition, data_dir, out, check="none")  # warm the page cache
            for check in reversed(CHECKS):
                seconds = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    summary = prepare_table(competition, data_dir, out, check=check)
                    seconds.append(time.perf_counter() - started)
                results.append(
                    {
                        "competition": competition,
                        "check": check,
                        "images": summary["images"],
                        "median_s": round(statistics.median(seconds), 2),
                        "runs_s": [round(s, 2) for s in seconds],
                    }
                )
                print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
