"""Host memory for CPU training: keep freed memory in the process instead of returning it.

A training step allocates and frees the same large tensors (activations, logits, gradients)
every step. glibc's malloc serves big requests with fresh mmap()s and hands freed heap back to
the kernel, so each step faults in and zeroes those pages again: measured on the 2-core CI
machine with the small benchmark model, 2,000-5,000 page faults and 10-20 ms of kernel time a
step (~15% of it). Raising the mmap and trim thresholds makes later steps reuse the memory of
earlier ones; the process keeps its peak working set, which a training run reaches every step
anyway. GPU runs allocate device memory through torch's caching allocator, which already works
this way, so this is applied on CPU only.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLDS = (1 << 30, 32 << 20)
"""mmap thresholds to try, largest first: older glibc refuses more than 32 MiB."""

_kept = None


def keep_freed_memory() -> int:
    """Set glibc's malloc to keep freed memory (once per process); returns the mmap threshold
    set, 0 where this is not glibc (other C libraries keep their own policy)."""
    global _kept
    if _kept is None:
        _kept = 0
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return _kept
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        for threshold in THRESHOLDS:
            if mallopt(M_MMAP_THRESHOLD, threshold) == 1:
                _kept = threshold
                break
        if _kept:
            mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    return _kept
