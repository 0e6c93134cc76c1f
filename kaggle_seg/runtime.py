"""Where training runs: one process, or one of several under `torchrun` (DDP), its device,
mixed precision and seeds."""

from __future__ import annotations

import atexit
import datetime as dt
import functools
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kaggle_seg.errors import KsegError

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Where this process runs: rank and world size (1 without torchrun) and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def parse_device(device: str | torch.device) -> torch.device:
    """`--device` as a torch device; a name torch does not know is one line naming the option."""
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except RuntimeError:
        raise KsegError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None


def start_runtime(device: str | None = None, timeout: dt.timedelta | None = None) -> Runtime:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU).
    `timeout`: how long a collective waits for a slower rank (torch's default otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KsegError("--device cuda: no CUDA device is visible")
        visible = torch.cuda.device_count()
        if local_rank >= visible:  # torch's "invalid device ordinal" would not say why
            raise KsegError(
                f"torchrun process {local_rank} on this machine has no GPU of its own: "
                f"{visible} visible; use --nproc_per_node {visible}"
            )
        torch.cuda.set_device(local_rank)
        resolved = torch.device("cuda", local_rank)
    else:
        resolved = parse_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout else {}))
        # Torn down before the interpreter: a group left to die with the process aborted one
        # rank in CI ("terminate called without an active exception", SIGABRT at exit).
        atexit.register(_close_process_group)
    return Runtime(rank=rank, world_size=world_size, device=resolved)


def _close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather(obj: Any, runtime: Runtime) -> list[Any]:
    """Every rank's `obj`, on every rank (a one-item list without DDP)."""
    if not runtime.distributed:
        return [obj]
    gathered: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def merge_epoch_totals(
    totals: dict[str, float], n_images: int, seconds: float, runtime: Runtime
) -> tuple[dict[str, float], int, float]:
    """All ranks' per-image sums and image counts, and the slowest rank's seconds: every rank
    then records and judges the same epoch (a train_* monitor picks best.pt, early stopping
    and a plateau schedule on each rank; ranks that part ways wait on each other for ever)."""
    if not runtime.distributed:
        return totals, n_images, seconds
    parts = gather((totals, n_images, seconds), runtime)
    keys = list(dict.fromkeys(key for part, _, _ in parts for key in part))  # history's order
    merged = {key: sum(part.get(key, 0.0) for part, _, _ in parts) for key in keys}
    return merged, sum(n for _, n, _ in parts), max(s for _, _, s in parts)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@functools.cache  # asked per prediction batch; the CPU does not change
def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively here (AVX512-BF16 or AMX): on such a CPU
    a bf16 training step is ~1.6x a float32 one (2x with channels_last,
    benchmarks/bench_cpu_precision.py); elsewhere bf16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware (Ampere, compute capability 8.0, and later).
    `torch.cuda.is_bf16_supported()` also says yes on a T4 or P100 (Kaggle's GPUs), where
    bf16 is emulated: slow, and some cuDNN convolutions have no bf16 kernel there."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def autocast_settings(amp: str, device: torch.device) -> tuple[bool, torch.dtype]:
    """(enabled, dtype) for `train.amp` on `device`.

    CUDA: "auto" is bf16 where the GPU computes it natively (Ampere on), else fp16 (with a
    grad scaler: a T4's or P100's "auto" is fp16). CPU: "auto" is
    bf16 where the CPU computes it natively, "bf16" forces it, and "fp16" is off (CPU fp16 is
    emulated, and slower than float32).
    """
    if amp == "off":
        return False, torch.float32
    if device.type == "cuda":
        if amp == "bf16" or (amp == "auto" and cuda_has_native_bf16(device)):
            return True, torch.bfloat16
        return True, torch.float16
    if device.type == "cpu" and (amp == "bf16" or (amp == "auto" and cpu_has_fast_bf16())):
        return True, torch.bfloat16
    if device.type == "cpu" and amp == "fp16":
        _warn_cpu_fp16()
    return False, torch.float32


@functools.cache
def _warn_cpu_fp16() -> None:
    # Said once: prediction asks again for every ensemble member.
    log.warning(
        "train.amp: fp16 runs in float32 on CPU (fp16 is emulated there, slower than float32); "
        "bf16 or auto use bfloat16 where the CPU computes it"
    )
