"""glibc malloc settings that stop a process from faulting the same memory in over and over.

With glibc's defaults, blocks above the mmap threshold (128 KiB, rising to at most 32 MiB) are
fresh mmaps, and the heap is trimmed when its free top passes twice that: a loop that allocates
and frees the same large arrays each step pays a page fault (and zeroing) per 4 KiB each time.
DataLoader workers do that per sample, CPU training per step (activation buffers of tens to
hundreds of MiB). Nothing here changes results; the cost is that freed memory stays with the
process for reuse instead of going back to the system.
"""

from __future__ import annotations

import ctypes

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4


def keep_freed_memory(*, heap_only: bool = False) -> bool:
    """Keep freed memory for reuse: trim threshold 1 GiB, mmap threshold 32 MiB (glibc's
    maximum); with `heap_only`, no mmapped blocks at all (M_MMAP_MAX 0), for buffers above
    32 MiB. True if set; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        done = done and libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        if heap_only:
            done = done and libc.mallopt(_M_MMAP_MAX, 0)
        return bool(done)
    except (OSError, AttributeError):
        return False
