"""glibc calls that help memory and I/O on Linux, or ``None`` where the C library lacks them."""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def function(name: str, argtypes: list | None = None) -> Callable | None:
    """The C library's function ``name`` (with ``argtypes`` when given), or ``None``."""
    try:
        found = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):  # no such function, or no C library to load by name
        return None
    if argtypes is not None:
        found.argtypes = argtypes
    return found


MALLOC_TRIM = function("malloc_trim", [ctypes.c_size_t])
SYNC_FILE_RANGE = function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
SYNC_FILE_RANGE_WRITE = 2  # start writing the range back to disk, without waiting
