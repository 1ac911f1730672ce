"""glibc malloc tuning for the API process: give large buffers back to the system when freed.

An upload passes through several multi-megabyte buffers (the body, the data URL, the decoded bytes,
the pixels). glibc serves them with ``mmap`` at first, but its *dynamic* mmap threshold then rises
to the largest size freed (up to 32 MB), so later ones come from the heap arenas, which keep the
freed memory: after a burst of uploads the API's RSS stayed near the burst's peak (docs/performance.md).
A fixed threshold (``mallopt(M_MMAP_THRESHOLD, ...)``, the same as ``MALLOC_MMAP_THRESHOLD_``)
keeps every buffer above it on ``mmap``: freed at once, RSS back to idle after the burst, a lower
peak during it. Small objects (Python's own allocator, below 512 bytes) are unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from typing import Any

logger = logging.getLogger("editfarm.api")

M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@functools.cache
def _glibc_mallopt() -> Any:
    """glibc's ``mallopt``, or None on another C library (looked up once: ``find_library`` runs ldconfig)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only
        return None
    return libc.mallopt


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Set glibc's mmap threshold to ``threshold_bytes`` (0: leave it). True if it was set.

    Does nothing when ``MALLOC_MMAP_THRESHOLD_`` is in the environment (the operator chose) or the
    C library is not glibc.
    """
    if threshold_bytes <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    if not done:
        logger.warning("mallopt(M_MMAP_THRESHOLD, %d) was refused", threshold_bytes)
    return done
