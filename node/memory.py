"""Keep the node's freed memory in the process, for the next study.

A study's working set is a few large arrays: the 300 x 512² CT as float32 is
315 MB, and label maps, masks and model outputs add as much again.  glibc
serves a large allocation (above its mmap threshold: 128 kB at first, rising
with use to at most 32 MB) with its own ``mmap`` and gives it back to the
kernel on ``free``.  The next study then faults every page in afresh.

On bare metal a first touch costs about 0.1 s/GB (the kernel zeroes the
page).  On a virtual machine whose guest reports free pages back to the host
(virtio-balloon free-page reporting, as Firecracker and many clouds do) the
host must back the page again: on our 2-core VM, filling a fresh 315 MB
array took 3.6-4.0 s each time, and 0.03 s with this module's setting
(``python bench/bench_memory.py``; ``docs/node.md``, "Memory").

:func:`retain_freed_memory` asks glibc to keep what the process frees: no
``mmap`` per allocation, no trimming of the heap's top, one arena (so a
model thread's arrays land in the same reusable heap; the price is one
allocator lock for all threads; the node makes few, large allocations).  The resident set then
stays at the high-water mark of the largest study so far, which is what a
dedicated node wants; ``node.retain_memory: false`` turns it off for a
machine shared with other services.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
#: The largest trim threshold mallopt takes (an int): the heap's top is never given back in practice.
_NEVER_TRIM = 2**31 - 1

_applied = False


def resident_mb() -> float:
    """The process's resident set now, in MB (``VmRSS``; 0 where ``/proc`` has none)."""
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:")), 0.0)
    except OSError:
        return 0.0


def retain_freed_memory() -> bool:
    """Tell glibc's allocator to keep freed memory in the process (process-wide, idempotent).

    Call it before the first study; arrays allocated earlier keep their
    ``mmap`` and are returned on ``free`` as before.

    Returns
    -------
    bool
        ``True`` when glibc took all three settings; ``False`` on another C
        library (musl, macOS), where the node runs with the allocator's defaults.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        log.info("retain_memory: not Linux; the allocator's defaults stay")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("retain_memory: this C library has no mallopt (not glibc); the allocator's defaults stay")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    taken = all(mallopt(parameter, value) == 1 for parameter, value in settings)
    if taken:
        _applied = True
        log.info("retain_memory: freed memory stays in the process for the next study (node.retain_memory)")
    else:
        log.warning("retain_memory: glibc refused a mallopt setting; the allocator's defaults partly stay")
    return taken
