"""The host allocator of the input pipeline's processes: freed patch-sized buffers kept for the next read.

glibc's malloc maps every block above its mmap threshold with a fresh `mmap` and unmaps it when it is freed.
The threshold starts at 128 KiB and rises only when a mapped block is freed, so in a fresh process, and as
measured in grain's worker processes for the whole run, the arrays of a patch (1.7 MB for 13-band S2 at
256 x 256, a 4 MB ArrayRecord record and the reader's buffers for it) are mapped, faulted in, zeroed by the
kernel and unmapped again at every read. Memory it frees at the top of the heap beyond its trim threshold
goes back to the system too, to be faulted in again next time. Measured on this project's CPU machines
(BENCHMARKS.md, Data pipeline): the riegeli reader took 16-17 ms for a 4 MB record in a fresh process and
2.7 ms once its buffers were reused.

`keep_large_buffers()` sets the two thresholds once per process (`mallopt`), so that blocks up to
`MMAP_THRESHOLD` come from the heap and up to `TRIM_THRESHOLD` of freed memory stays with the process. The
price is resident memory: a reading process keeps up to that much freed memory for reuse instead of
returning it. The pipeline calls it in the process that reads (its own, with no workers) and in every grain
worker.

It does nothing (and says so by returning False) where it cannot or should not act:
- not glibc (macOS, musl): no such thresholds;
- a user's own settings: the `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or `GLIBC_TUNABLES`
  environment variables, which glibc reads at start-up, win;
- an allocator preloaded in glibc's place (tcmalloc, jemalloc) ignores glibc's settings anyway.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (half its arena heap size)
TRIM_THRESHOLD = 256 << 20

# mallopt parameters, glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

# This process's result; None until the first call. A forked child inherits the settings with the module.
_applied: bool | None = None


def keep_large_buffers() -> bool:
    """Sets this process's malloc to reuse freed blocks up to `MMAP_THRESHOLD` (see the module docstring);
    True when the settings are in effect, False where it leaves the allocator as it is. Idempotent."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    user = [name for name in _USER_SETTINGS if name in os.environ]
    if user:
        logger.debug("malloc left to the user's settings (%s)", ", ".join(user))
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: its mallopt, not another C library's
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; setting either threshold also turns off glibc's dynamic adjustment.
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        logger.warning("mallopt refused the pipeline's thresholds; patch buffers are mapped afresh per read")
    return done
