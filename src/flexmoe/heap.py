"""Give freed heap memory back to the operating system between the phases of a run.

torch's CPU tensors come from glibc malloc. A training step frees its activations, but glibc
keeps most freed memory in the process (the dynamic mmap threshold moves large blocks onto the
heap after the first ones are freed, and a fragmented heap is only trimmed from its top), so the
resident size of a run rose with every client's training and tokenisation long after their
tensors were gone: one client's 8-step training on the builtin data raised it by 341 MB while its
tensors peaked at 153 MB, and `malloc_trim(0)` afterwards gave 238 MB back (docs/performance.md,
"Memory of a run"). It returns the free pages anywhere in the heap; it takes milliseconds and
changes no result. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

ENABLED = True  # benchmarks/bench_rss.py turns it off to measure the run as it was without it


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc `malloc_trim(0)`)."""
    trim = _malloc_trim() if ENABLED else None
    if trim is not None:
        trim(0)
