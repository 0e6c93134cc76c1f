"""What a kernel targets: each competition's limits and test size, the accelerators Kaggle
offers, and the names of the files a built kernel folder holds."""

from __future__ import annotations

from dataclasses import dataclass

PROJECT = "kaggle-seg"
KERNEL_METADATA = "kernel-metadata.json"
DATASET_METADATA = "dataset-metadata.json"
BUILD_RECORD = "kseg-kernel.json"
WEIGHTS_MANIFEST = "kseg-weights.json"
WHEELS_DIR = "wheels"
WEIGHTS_DIR = "weights"
REHEARSAL_DIR = "rehearsal"
IMAGE_FILE = "kaggle_image.txt"  # in kernels/: the Kaggle image's package pins
ROOT_ENV = "KSEG_KAGGLE_ROOT"  # the kernel script reads /kaggle from here when set
MODEL_FRAMEWORK = "pyTorch"  # in a Kaggle Model handle; Kaggle mounts it as pytorch/


@dataclass(frozen=True)
class KernelTarget:
    """What a competition's kernel needs beyond the competition plug-in: limits, test size."""

    competition: str
    time_limit_hours: float | None
    unit: str  # what the hidden test is counted in
    hidden_test_items: int
    hidden_test_note: str
    default_holdout: int  # held-back train cases (uwmgi) / images (dsb2018) for rehearse

    @property
    def source(self) -> str:
        """The competition's slug, mounted at /kaggle/input/<source>."""
        from kaggle_seg.competitions import get_competition

        return str(get_competition(self.competition).kaggle_slug)

    @property
    def code_competition(self) -> bool:
        """Internet off, the hidden test swapped in when Kaggle reruns the kernel."""
        from kaggle_seg.competitions import get_competition

        return bool(get_competition(self.competition).code_competition)


TARGETS: dict[str, KernelTarget] = {
    "uwmgi": KernelTarget(
        "uwmgi",
        time_limit_hours=9.0,
        unit="slices",
        # Train: 38,496 slices in 85 cases (about 453 per case); the hidden test has about 50.
        hidden_test_items=50 * 453,
        hidden_test_note="about 50 cases of ~453 slices",
        default_holdout=2,
    ),
    "dsb2018": KernelTarget(
        "dsb2018",
        time_limit_hours=12.0,  # not a code competition: a Kaggle session's limit
        unit="images",
        hidden_test_items=3019,
        hidden_test_note="the stage 2 test set",
        default_holdout=8,
    ),
}


def get_target(competition: str) -> KernelTarget:
    """The kernel target of `competition`; a KeyError lists those with a kernel template."""
    try:
        return TARGETS[competition]
    except KeyError:
        raise KeyError(
            f"no Kaggle kernel for {competition!r}; choose one of {', '.join(TARGETS)}"
        ) from None


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
