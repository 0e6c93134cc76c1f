"""An offline Kaggle submission made with kaggle_seg (`kseg`).

Written by `kseg kernel build` from kernels/templates/kernel.py (the competition's metadata comes
from kernels/templates/<competition>/). Kaggle runs it with the internet off, so kaggle_seg and
the packages the Kaggle image lacks are installed from the attached wheels dataset
(`pip install --no-index`); the checkpoints come from the weights dataset or Kaggle Model
(mounted at input/<model>/<framework>/<variation>/<version>). `kseg submit` writes
/kaggle/working/submission.csv: on uwmgi's public re-run the test folder is empty and it predicts
a few train slices instead, so the notebook still runs end to end; for dsb2018 it reads
`stage2_test_final/` or `stage1_test/`, extracting their zip where Kaggle mounts only that.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS: dict = {}  # written by `kseg kernel build`

# `kseg kernel rehearse` points this at a temporary Kaggle-like folder; on Kaggle it is /kaggle.
KAGGLE_ROOT = Path(os.environ.get("KSEG_KAGGLE_ROOT", "/kaggle"))
INPUT = KAGGLE_ROOT / "input"
WORKING = KAGGLE_ROOT / "working"


def find_source(slug: str) -> Path:
    """The folder an attached competition or dataset is mounted at: input/<slug> (or deeper)."""
    for pattern in (slug, f"*/{slug}", f"*/*/{slug}"):
        hits = sorted(path for path in INPUT.glob(pattern) if path.is_dir())
        if hits:
            return hits[0]
    raise SystemExit(f"error: {slug!r} is not attached to this kernel (nothing in {INPUT})")


def find_model(handle: str) -> Path:
    """The folder of an attached Kaggle Model instance `owner/model/framework/variation`:
    input/<model>/<framework>/<variation>/<version>, the one holding kseg's weights manifest."""
    _, model, framework, variation = handle.split("/")
    for base in (INPUT / model, *sorted(INPUT.glob(f"*/{model}"))):
        hits = [
            manifest.parent
            for manifest in base.glob("*/*/*/kseg-weights.json")
            if manifest.parts[-4].lower() == framework.lower() and manifest.parts[-3] == variation
        ]
        if hits:  # the newest version when several are mounted
            return max(hits, key=lambda path: int(path.name) if path.name.isdigit() else -1)
    raise SystemExit(f"error: model {handle!r} is not attached to this kernel (nothing in {INPUT})")


def run(command: list[str], check: bool = True, label: str = "") -> bool:
    print("+", " ".join(command), flush=True)
    result = subprocess.run(command, check=False)
    if check and result.returncode != 0:
        name = label or " ".join(command[2:4])
        raise SystemExit(f"error: {name} exited with {result.returncode}")
    return result.returncode == 0


def submit_processes() -> int:
    """One `kseg submit` process per GPU (Kaggle's T4 x2 gives two): KSEG_PROCESSES when set,
    else the GPUs torch sees, counted in a child so this script never imports torch."""
    forced = os.environ.get("KSEG_PROCESSES", "").strip()
    if forced:
        if not forced.isdigit():
            raise SystemExit(f"error: KSEG_PROCESSES={forced!r}: give a number of processes")
        return max(1, int(forced))
    count = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, check=False)  # fmt: skip
    lines = count.stdout.split()
    return max(1, int(lines[-1])) if count.returncode == 0 and lines[-1:] != [] else 1


def submit_command(arguments: list[str], processes: int) -> list[str]:
    """`kseg submit ARGUMENTS`, as `processes` torchrun processes sharing the test set when
    more than one (each predicts its share on its own GPU; rank 0 writes submission.csv)."""
    if processes > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        return [sys.executable, *launcher, "-m", "kaggle_seg", "submit", *arguments]
    return [sys.executable, "-m", "kaggle_seg", "submit", *arguments]


def install(wheels: Path) -> None:
    """kaggle_seg and what the image lacks, from the wheels dataset: no index, no network."""
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
           "--disable-pip-version-check", "--no-warn-script-location", "--quiet"]  # fmt: skip
    if run([*pip, SETTINGS["requirement"]], check=False):
        return
    # The resolver also checks the image's own packages against one another and gives up on
    # any old conflict there; `kseg kernel build` checked kaggle_seg's requirements against
    # the image's versions, so install the dataset's wheels as they are.
    print("KSEG_WARNING pip could not resolve the requirements: installing the wheels with "
          "--no-deps", flush=True)  # fmt: skip
    run([*pip, "--no-deps", *sorted(str(path) for path in wheels.glob("*.whl"))])


def main() -> None:
    start = time.time()
    wheels = find_source(SETTINGS["wheels_source"])
    model = SETTINGS.get("weights_model")
    weights = find_model(model) if model else find_source(SETTINGS["weights_source"])
    data = find_source(SETTINGS["competition_source"])
    install(wheels)
    installed = time.time()
    print(f"KSEG_TIMING install {installed - start:.2f}", flush=True)

    # kseg submit's arguments, with the folders Kaggle mounted filled in.
    folders = {"data": str(data), "weights": str(weights), "working": str(WORKING)}
    arguments = [argument.format(**folders) for argument in SETTINGS["submit_args"]]
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # offline: no version check
    processes = submit_processes()
    print(f"KSEG_PROCESSES {processes}", flush=True)
    run(submit_command(arguments, processes), label="kaggle_seg submit")
    print(f"KSEG_TIMING predict {time.time() - installed:.2f}", flush=True)


if __name__ == "__main__":
    main()
