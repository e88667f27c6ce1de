"""Handing freed heap back to the system after a phase that allocated much and freed most of it."""

from __future__ import annotations

import ctypes
import gc


def release_freed_memory() -> None:
    """Return the memory freed so far to the system: glibc keeps freed blocks resident otherwise (and
    keeps them counted in the process's resident set), so a transient of loading or cache filling would
    stay in it for the rest of the process. Nothing happens where the C library is not glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
