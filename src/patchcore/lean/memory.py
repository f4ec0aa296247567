"""The process's allocator policy for the image pipeline: keep freed memory for reuse.

Every batch allocates the same large arrays again (decoded images, activations, distance
blocks). glibc's malloc hands blocks above its mmap threshold back to the kernel when they are
freed and trims the heap's top, so each new batch pays a page fault per 4 KiB page it touches,
which is costly on virtual machines. :func:`keep_freed_memory` raises both limits once per
process (``mallopt``): freed blocks of up to :data:`MMAP_BYTES` come from the heap and up to
:data:`KEEP_BYTES` of free heap is kept, so later batches reuse them. The process's resident
memory then stays near its high-water mark instead of shrinking between batches (the peak is
unchanged). It is called by :func:`patchcore.lean.inputs.iter_batches` (fitting, scoring and
the runtime all read images through it); ``PATCHCORE_KEEP_FREED_MEMORY=0`` turns it off, and
it does nothing where the C library has no ``mallopt`` (not glibc).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

__all__ = ["ENV", "KEEP_BYTES", "MMAP_BYTES", "keep_freed_memory"]

#: Free heap memory kept for reuse (glibc's ``M_TRIM_THRESHOLD``).
KEEP_BYTES = 1 << 30
#: Blocks up to this size come from the heap, not from their own mapping (``M_MMAP_THRESHOLD``).
MMAP_BYTES = 256 << 20
#: Set to ``0`` to leave the allocator as it is.
ENV = "PATCHCORE_KEEP_FREED_MEMORY"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Set the policy (once per process); whether it is in place."""
    if os.environ.get(ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES) == 1
    return mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1 and ok
