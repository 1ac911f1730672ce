"""glibc malloc tuning for a worker that renders on the CPU: keep freed memory for the next step.

A CPU render allocates and frees the same large activation buffers (tens to hundreds of MB at
512²) at every step. glibc serves buffers above its mmap threshold (at most 32 MB) with ``mmap``,
and a non-main thread (the render lane) from its own arena, whose heaps it shrinks when memory is
freed: every step then page-faults the same memory back in, the kernel zeroing every page again
(a measurable share of a CPU render's wall time: docs/performance.md). With one arena (the main
heap), no ``mmap`` and no trimming, the buffers are reused. The cost: the process keeps the peak
of what it ever allocated (its RSS does not shrink after a large job).

On a GPU the activations live in device memory (PyTorch's caching allocator already reuses
them), so this is for CPU rendering only. Two calls, in order: :func:`one_arena` before any
thread is started (arenas are chosen when a thread first allocates), :func:`keep_freed_memory`
once the model is loaded (so the transient buffers of loading are still given back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from typing import Any

log = logging.getLogger("editfarm.worker")

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# heap memory above this much free at the top is given back; ~never while rendering
_NEVER_TRIM_BYTES = 2**31 - 1
# the operator's own malloc settings win (environment variables glibc reads at start)
_OPERATOR_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


@functools.cache
def _mallopt() -> Any:
    """glibc's ``mallopt``, or None on another C library or when the operator set malloc variables."""
    if any(name in os.environ for name in _OPERATOR_VARIABLES):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def _set(option: int, value: int) -> bool:
    mallopt = _mallopt()
    if mallopt is None:
        return False
    done = bool(mallopt(option, value))
    if not done:
        log.warning("mallopt(%d, %d) was refused", option, value)
    return done


def one_arena() -> bool:
    """Make every thread allocate from the main heap. Call before the process starts any thread.
    True if glibc took it (False: not glibc, or the operator's variables are set)."""
    return _set(M_ARENA_MAX, 1)


def keep_freed_memory() -> bool:
    """From now on serve large buffers from the heap (no ``mmap``) and never shrink it, so freed
    buffers are reused instead of page-faulted back in. True if glibc took both."""
    return _set(M_MMAP_MAX, 0) and _set(M_TRIM_THRESHOLD, _NEVER_TRIM_BYTES)
