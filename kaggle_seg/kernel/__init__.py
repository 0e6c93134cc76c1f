"""Offline Kaggle kernels: build a kernel and what it needs, rehearse it the way Kaggle runs
it, and publish it.

A built kernel, `kernels/<name>/`::

    kernel-metadata.json   read by `kaggle kernels push`: internet off, accelerator, sources
    <name>.py              the kernel: `pip install --no-index` from the wheels dataset, then
                           `kseg submit` -> /kaggle/working/submission.csv
    kseg-kernel.json       the build record that rehearse, push and submit read and extend
    wheels/                dataset: kaggle_seg's wheel + the dependencies the Kaggle image lacks
    weights/               dataset or Kaggle Model instance: <exp>/fold_<k>/{best.pt,config.yaml},
                           <exp>/postprocess.json

Modules, one concern each:

    targets      the competition's kernel target, accelerators, file names
    names        titles and slugs, safe folder names, the Kaggle user
    credentials  the scan for Kaggle keys and tokens
    wheels       the wheels dataset (requirements against kernels/kaggle_image.txt)
    weights      the checkpoints a kernel ships
    metadata     kernel-metadata.json, dataset-metadata.json, the script's SETTINGS
    build        `kseg kernel build`
    sandbox      virtualenv, network cut, read-only inputs
    image        Kaggle's package versions for a rehearsal, and the table of differences
    rehearse     `kseg kernel rehearse`
    publish      push in order, wait for Kaggle, submit a finished version
"""

from kaggle_seg.kernel.build import (
    KernelBuild,
    build_kernel,
    read_build_record,
    update_build_record,
)
from kaggle_seg.kernel.credentials import check_no_credentials, find_credentials, known_secrets
from kaggle_seg.kernel.metadata import SubmitOptions, check_kernel_metadata
from kaggle_seg.kernel.names import check_title, kaggle_username, slugify
from kaggle_seg.kernel.rehearse import (
    Rehearsal,
    RehearsalRun,
    diagnose,
    estimate_run_time,
    rehearse_kernel,
    summarize_rehearsal,
)
from kaggle_seg.kernel.targets import (
    ACCELERATORS,
    DATASET_METADATA,
    KERNEL_METADATA,
    get_accelerator,
    get_target,
)
from kaggle_seg.runs import parse_folds

__all__ = [
    "ACCELERATORS",
    "DATASET_METADATA",
    "KERNEL_METADATA",
    "KernelBuild",
    "Rehearsal",
    "RehearsalRun",
    "SubmitOptions",
    "build_kernel",
    "check_kernel_metadata",
    "check_no_credentials",
    "check_title",
    "diagnose",
    "estimate_run_time",
    "find_credentials",
    "get_accelerator",
    "get_target",
    "kaggle_username",
    "known_secrets",
    "parse_folds",
    "read_build_record",
    "rehearse_kernel",
    "slugify",
    "summarize_rehearsal",
    "update_build_record",
]
