"""Writing large byte ranges into a file around the page cache (``O_DIRECT``), where it can.

A buffered write copies every byte into a page-cache page that the kernel first has to
find and zero; on a machine where memory touched for the first time is slow that costs as
much as the disk itself, and the pages then stay in the cache. With ``O_DIRECT`` the disk
reads the bytes from the process's own memory. The kernel requires the file offset, the
length and the memory address to be multiples of the block size, so :class:`RangeWriter`
writes each range's aligned middle directly, from a reused, page-aligned staging buffer (or
from the data itself when it is aligned already), and the unaligned ends through the page
cache, which the final ``fsync`` flushes. The two never write the same block. Where the file
system refuses ``O_DIRECT`` (tmpfs, some network file systems) every byte goes through the
page cache.
"""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np

from jaxmerge import _libc

BLOCK = 4096  # the largest logical block size of common disks: a multiple of every smaller one
STAGING_BYTES = 16 << 20
DIRECT_MIN_BYTES = 1 << 20  # smaller ranges go through the page cache: one direct write waits for the disk


class RangeWriter:
    """Writes byte ranges at given offsets of an existing file; :meth:`close` makes them durable.

    Args:
      path: the file, which must exist (at its final size, or it grows as ranges are written).
    """

    def __init__(self, path: str | os.PathLike):
        self._buffered = os.open(path, os.O_WRONLY)
        self._direct = _open_direct(path)
        self._staging: mmap.mmap | None = None

    def write(self, data: memoryview, offset: int) -> None:
        """Write ``data`` (bytes-like, C-contiguous) at ``offset``.

        Raises:
          OSError: the write failed (a full disk, an I/O error).
        """
        data = memoryview(data).cast("B")
        end = offset + len(data)
        start, stop = _round_up(offset), end - end % BLOCK
        if self._direct is None or stop - start < DIRECT_MIN_BYTES:
            self._write_buffered(data, offset)
            return
        self._write_buffered(data[:start - offset], offset)
        middle = data[start - offset:stop - offset]
        try:
            self._write_direct(middle, start)
        except OSError as error:  # a file system that opens files for direct I/O but refuses these writes
            if error.errno != errno.EINVAL:
                raise
            os.close(self._direct)
            self._direct = None
            self._write_buffered(middle, start)
        self._write_buffered(data[stop - offset:], stop)

    def _write_buffered(self, data: memoryview, offset: int) -> None:
        _pwrite_all(self._buffered, data, offset)
        if _libc.SYNC_FILE_RANGE is not None and len(data) >= BLOCK:  # the disk writes start now, not at close
            _libc.SYNC_FILE_RANGE(self._buffered, offset, len(data), _libc.SYNC_FILE_RANGE_WRITE)

    def _write_direct(self, data: memoryview, offset: int) -> None:
        """``data``'s length and ``offset`` are multiples of :data:`BLOCK`."""
        if _address(data) % BLOCK == 0:
            _pwrite_all(self._direct, data, offset)
            return
        if self._staging is None:
            self._staging = mmap.mmap(-1, STAGING_BYTES)  # page-aligned, and touched once, on first use
        staging = memoryview(self._staging)
        for begin in range(0, len(data), STAGING_BYTES):
            chunk = data[begin:begin + STAGING_BYTES]
            staging[:len(chunk)] = chunk
            _pwrite_all(self._direct, staging[:len(chunk)], offset + begin)

    def close(self) -> None:
        """``fsync`` and close the file."""
        try:
            os.fsync(self._buffered)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file without waiting for the disk."""
        for fd in (self._buffered, self._direct):
            if fd is not None:
                os.close(fd)
        self._buffered = self._direct = self._staging = None  # the staging buffer is unmapped when collected


def _open_direct(path) -> int | None:
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:  # a file system without direct I/O (the file itself opened for writing)
        return None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _round_up(offset: int) -> int:
    return -(-offset // BLOCK) * BLOCK


def _address(data: memoryview) -> int:
    return np.frombuffer(data, np.uint8).ctypes.data
