import errno
import mmap
import os
import threading

import numpy as np
import pytest

from jaxmerge.checkpoints import _direct
from jaxmerge.checkpoints._direct import BLOCK, RangeWriter


@pytest.fixture
def small_blocks(monkeypatch):
    """Direct writes from two blocks up, staged two blocks at a time: every path on small data."""
    monkeypatch.setattr(_direct, "DIRECT_MIN_BYTES", 2 * BLOCK)
    monkeypatch.setattr(_direct, "STAGING_BYTES", 2 * BLOCK)


def _has_direct_io(path) -> bool:
    fd = _direct._open_direct(path)
    if fd is not None:
        os.close(fd)
    return fd is not None


def _direct_writes(monkeypatch, writer) -> list:
    """The ``(offset, length)`` of every write on ``writer``'s direct file descriptor."""
    calls, pwrite = [], os.pwrite

    def spy(fd, data, offset):
        if fd == writer._direct:
            calls.append((offset, len(data)))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    return calls


@pytest.mark.parametrize("offset", [0, 1, BLOCK - 3, BLOCK, 5 * BLOCK + 100])
@pytest.mark.parametrize("length", [17, 3 * BLOCK, 7 * BLOCK + 5])
def test_a_range_lands_exactly_and_the_bytes_around_it_are_kept(tmp_path, small_blocks, monkeypatch, offset, length):
    rng = np.random.default_rng(offset * 31 + length)
    before = rng.integers(0, 256, 16 * BLOCK, dtype=np.uint8)
    path = tmp_path / "file"
    path.write_bytes(before.tobytes())
    data = rng.integers(0, 256, length + 1, dtype=np.uint8)[1:]  # at an unaligned address
    writer = RangeWriter(path)
    calls = _direct_writes(monkeypatch, writer)
    writer.write(memoryview(data), offset)
    writer.close()
    expected = before.copy()
    expected[offset:offset + length] = data
    np.testing.assert_array_equal(np.fromfile(path, np.uint8), expected)
    middle = (offset + length) // BLOCK * BLOCK - -(-offset // BLOCK) * BLOCK  # the whole blocks inside the range
    if _has_direct_io(path) and middle >= 2 * BLOCK:
        assert sum(n for _, n in calls) == middle
        assert all(o % BLOCK == 0 and n % BLOCK == 0 and n <= 2 * BLOCK for o, n in calls)  # staged
    else:
        assert calls == []


def test_aligned_data_is_written_without_staging(tmp_path, small_blocks, monkeypatch):
    path = tmp_path / "file"
    path.write_bytes(bytes(8 * BLOCK))
    if not _has_direct_io(path):
        pytest.skip(f"{tmp_path} has no direct I/O")
    buffer = mmap.mmap(-1, 8 * BLOCK)  # page-aligned
    data = np.frombuffer(buffer, np.uint8)
    data[:] = np.arange(data.size) % 251
    writer = RangeWriter(path)
    calls = _direct_writes(monkeypatch, writer)
    writer.write(memoryview(buffer)[:6 * BLOCK], BLOCK)
    writer.close()
    assert calls == [(BLOCK, 6 * BLOCK)]  # one write straight from the data
    np.testing.assert_array_equal(np.fromfile(path, np.uint8)[BLOCK:7 * BLOCK], data[:6 * BLOCK])


def _direct_writer(tmp_path, blocks: int) -> RangeWriter:
    """A writer of a new file of ``blocks`` zero blocks; the test is skipped without direct I/O."""
    path = tmp_path / "file"
    path.write_bytes(bytes(blocks * BLOCK))
    writer = RangeWriter(path)
    if writer._direct is None:
        pytest.skip(f"{tmp_path} has no direct I/O")
    return writer


def _failing_direct_writes(monkeypatch, writer, code: int, at: int | None = None) -> None:
    """Direct writes on ``writer`` (only the one at offset ``at``, if given) fail with ``code``."""
    pwrite, direct = os.pwrite, writer._direct

    def fail(fd, data, offset):
        if fd == direct and at in (None, offset):
            raise OSError(code, os.strerror(code))
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fail)


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path, small_blocks, monkeypatch):
    writer = _direct_writer(tmp_path, 8)
    _failing_direct_writes(monkeypatch, writer, errno.EINVAL)
    data = np.arange(5 * BLOCK, dtype=np.uint8)
    writer.write(memoryview(data[:3 * BLOCK - 10]), 10)
    writer.write(memoryview(data), 3 * BLOCK)
    writer.close()
    assert writer._direct is None
    written = np.fromfile(tmp_path / "file", np.uint8)
    np.testing.assert_array_equal(written[3 * BLOCK:8 * BLOCK], data)
    np.testing.assert_array_equal(written[10:3 * BLOCK], data[:3 * BLOCK - 10])


def test_other_write_errors_are_raised(tmp_path, small_blocks, monkeypatch):
    path = tmp_path / "file"
    path.write_bytes(bytes(8 * BLOCK))
    writer = RangeWriter(path)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space"):
        writer.write(memoryview(np.zeros(5 * BLOCK, np.uint8)), 0)
    writer.abort()


def _held_direct_writes(monkeypatch, writer):
    """Direct writes on ``writer`` wait for ``release`` (set by the test); ``started`` is set
    when the first one is under way."""
    started, release, pwrite, direct = threading.Event(), threading.Event(), os.pwrite, writer._direct

    def held(fd, data, offset):
        if fd == direct:
            started.set()
            assert release.wait(60), "the test never released the disk"
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", held)
    return started, release


def test_a_staged_write_returns_while_the_disk_writes_it(tmp_path, small_blocks, monkeypatch):
    writer = _direct_writer(tmp_path, 8)
    started, release = _held_direct_writes(monkeypatch, writer)
    data = np.arange(4 * BLOCK + 1, dtype=np.uint8)[1:]  # unaligned: two staged chunks, one per staging buffer
    writer.write(memoryview(data), 2 * BLOCK)
    assert started.wait(60) and not release.is_set()  # returned with the disk's write under way
    data[:] = 0  # the caller's bytes were copied: it may reuse them
    release.set()
    writer.close()
    np.testing.assert_array_equal(np.fromfile(tmp_path / "file", np.uint8)[2 * BLOCK:6 * BLOCK],
                                  np.arange(1, 4 * BLOCK + 1) % 256)


def test_a_failed_staged_write_is_raised_later_with_its_offset(tmp_path, small_blocks, monkeypatch):
    writer = _direct_writer(tmp_path, 16)
    _failing_direct_writes(monkeypatch, writer, errno.ENOSPC, at=0)
    data = np.arange(2 * BLOCK + 1, dtype=np.uint8)[1:]
    with pytest.raises(_direct.RangeWriteError, match="No space") as raised:  # raised by whichever call finds it
        writer.write(memoryview(data), 0)  # staged; fails on the disk's thread
        writer.write(memoryview(data), 4 * BLOCK)
        writer.write(memoryview(data), 8 * BLOCK)  # waits for the first staging buffer again
        writer.close()
    assert raised.value.offset == 0 and raised.value.errno == errno.ENOSPC
    writer.abort()


def test_queued_page_cache_writes_wait_past_a_staging_buffers_worth(tmp_path, small_blocks, monkeypatch):
    """With the disk held, small writes queue as copies up to one staging buffer's size
    (two blocks here), then wait: five of 3000 bytes cannot all be queued."""
    writer = _direct_writer(tmp_path, 16)
    started, release = _held_direct_writes(monkeypatch, writer)
    staged = np.arange(2 * BLOCK + 1, dtype=np.uint8)[1:]
    writer.write(memoryview(staged), 0)  # the disk's thread starts, held on this write
    assert started.wait(60)
    small = np.full(3000, 7, np.uint8)
    writing = threading.Thread(target=lambda: [writer.write(memoryview(small), 4 * BLOCK + 3000 * i) for i in range(5)])
    writing.start()
    writing.join(1)  # however long it is given, it cannot finish while the disk is held
    assert writing.is_alive() and writer._copied <= 2 * BLOCK
    release.set()
    writing.join(60)
    writer.close()
    written = np.fromfile(tmp_path / "file", np.uint8)
    np.testing.assert_array_equal(written[:2 * BLOCK], staged)
    assert (written[4 * BLOCK:4 * BLOCK + 15000] == 7).all()
