"""What a kernel targets: the competition's limits and test size (its plug-in's `kernel`,
competitions/base.py), the accelerators Kaggle offers, and the names of the files a built
kernel folder holds."""

from __future__ import annotations

from dataclasses import dataclass

from kaggle_seg.competitions.base import KernelTarget

PROJECT = "kaggle-seg"
KERNEL_METADATA = "kernel-metadata.json"
DATASET_METADATA = "dataset-metadata.json"
BUILD_RECORD = "kseg-kernel.json"
WEIGHTS_MANIFEST = "kseg-weights.json"
# An ensemble's tuned settings, at the top of the weights folder (kernel build --postprocess).
ENSEMBLE_POSTPROCESS = "postprocess.json"
WHEELS_DIR = "wheels"
WEIGHTS_DIR = "weights"
REHEARSAL_DIR = "rehearsal"
IMAGE_FILE = "kaggle_image.txt"  # in kernels/: the Kaggle image's package pins
ROOT_ENV = "KSEG_KAGGLE_ROOT"  # the kernel script reads /kaggle from here when set
MODEL_FRAMEWORK = "pyTorch"  # in a Kaggle Model handle; Kaggle mounts it as pytorch/


def get_target(competition: str) -> KernelTarget:
    """The kernel target of `competition` (its plug-in's `kernel`); a KeyError lists those
    with a kernel."""
    from kaggle_seg.competitions import COMPETITIONS

    plugin = COMPETITIONS.get(competition)
    if plugin is None or plugin.kernel is None:
        with_kernel = [name for name, c in COMPETITIONS.items() if c.kernel is not None]
        raise KeyError(
            f"no Kaggle kernel for {competition!r}; choose one of {', '.join(with_kernel)}"
        )
    return plugin.kernel


@dataclass(frozen=True)
class Accelerator:
    """A Kaggle session type: the metadata flags and the client's machine shape for it."""

    name: str
    machine_shape: str | None  # kernels push --accelerator; None: no accelerator
    enable_gpu: bool
    enable_tpu: bool
    refused: str | None = None  # why kseg will not push to it
    note: str | None = None  # said at build time


ACCELERATORS: dict[str, Accelerator] = {
    "t4x2": Accelerator("t4x2", "NvidiaTeslaT4", enable_gpu=True, enable_tpu=False),
    "l4": Accelerator("l4", "NvidiaL4", enable_gpu=True, enable_tpu=False),
    "p100": Accelerator(
        "p100",
        "NvidiaTeslaP100",
        enable_gpu=True,
        enable_tpu=False,
        refused=(
            "--accelerator p100: Kaggle's image ships torch built for CUDA 12.8, which has no "
            "kernels for the P100 (sm_60), so the kernel would fail at its first CUDA call, and "
            "Kaggle has retired the P100; use t4x2 or l4"
        ),
    ),
    "cpu": Accelerator("cpu", None, enable_gpu=False, enable_tpu=False),
    "tpu": Accelerator(
        "tpu",
        "TpuV5E8",
        enable_gpu=False,
        enable_tpu=True,
        note="kseg predicts with torch, not torch_xla: on a TPU session it runs on the host CPU",
    ),
}


def get_accelerator(name: str) -> Accelerator:
    """The accelerator `name`; KsegError for one kseg refuses, a KeyError lists the valid names."""
    from kaggle_seg.errors import KsegError

    try:
        accelerator = ACCELERATORS[name]
    except KeyError:
        raise KeyError(
            f"unknown accelerator {name!r}; choose one of {', '.join(ACCELERATORS)}"
        ) from None
    if accelerator.refused:
        raise KsegError(accelerator.refused)
    return accelerator
