"""Freed message buffers go back to the operating system (glibc's malloc, Linux).

glibc serves an allocation above its mmap threshold with a mapping of its own, which it
unmaps when freed; smaller ones come from the heap, whose freed memory mostly stays with
the process. The threshold starts at 128 KiB but is dynamic: freeing a mapped block raises
it to that block's size (up to 32 MiB), so after the first big message is freed, 10 MB
buffers come from the heap and the relay's RSS stays at the most big messages it ever had
in flight. Setting the threshold explicitly turns that adjustment off.

2 MiB rather than lower: below it every 256 KiB socket read would get fresh pages to fault
in (measured: 256 KiB cost 275 ms of CPU per 10 MB message against 208 ms at 2 MiB, for
214 against 224 MiB peak RSS with 5 in flight; bench/README.md).
"""

from __future__ import annotations

import ctypes
import platform
import sys

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD = 2 * 1024 * 1024


def return_big_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have allocations of `threshold` octets and more mapped and unmapped on their own;
    False where this is not glibc on Linux (nothing is changed there)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
