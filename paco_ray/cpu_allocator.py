"""glibc's malloc told to keep freed memory, for training on the CPU."""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Let glibc's malloc keep freed blocks (up to 32 MiB each, up to ``trim_threshold`` bytes at
    the heap top) for reuse instead of unmapping them: PyTorch's CPU allocator frees each step's
    activations, and mapping them again costs page faults every step (PyTorch's CPU tuning guide
    recommends a caching malloc for the same reason). False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, 64 << 20)))
