"""Overlapped copy and read-back (nbankd.streaming) on real files."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest

from nbankd.hashing import DestinationWriteError, SourceReadError, read_into, write_all
from nbankd.streaming import copy_hashing_overlapped, hash_read_ahead, start_writeback

BLOCK = 1 << 20


def _source(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "src"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, 9 * BLOCK + 12345])
def test_copy_is_exact_and_hashed(tmp_path: Path, size: int) -> None:
    """The copy holds the same bytes, and the hash and count are those of the source."""
    src, data = _source(tmp_path, size)
    with open(src, "rb") as fin, open(tmp_path / "dst", "wb") as fout:
        sha1, total = copy_hashing_overlapped(
            lambda v: read_into(fin.fileno(), v), fout.fileno(), write_all, block=BLOCK
        )
    assert (tmp_path / "dst").read_bytes() == data
    assert (sha1, total) == (hashlib.sha1(data).hexdigest(), size)


def test_progress_counts_every_byte_in_order(tmp_path: Path) -> None:
    """progress() sees the running total after each block, ending at the size."""
    src, _ = _source(tmp_path, 3 * BLOCK + 7)
    seen: list[int] = []
    with open(src, "rb") as fin, open(tmp_path / "dst", "wb") as fout:
        copy_hashing_overlapped(
            lambda v: read_into(fin.fileno(), v),
            fout.fileno(),
            write_all,
            progress=seen.append,
            block=BLOCK,
        )
    assert seen == [BLOCK, 2 * BLOCK, 3 * BLOCK, 3 * BLOCK + 7]


def test_read_error_reaches_the_caller(tmp_path: Path) -> None:
    """A read failing after two blocks is raised to the caller as the source's error."""
    src, _ = _source(tmp_path, 5 * BLOCK)
    calls = 0
    with open(src, "rb") as fin, open(tmp_path / "dst", "wb") as fout:

        def read(view: memoryview) -> int:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise SourceReadError(errno.EIO, "Input/output error while reading the source")
            return read_into(fin.fileno(), view)

        with pytest.raises(SourceReadError):
            copy_hashing_overlapped(read, fout.fileno(), write_all, block=BLOCK)


def test_write_error_reaches_the_caller(tmp_path: Path) -> None:
    """A full destination is raised to the caller as the destination's error."""
    src, _ = _source(tmp_path, 6 * BLOCK)
    writes = 0

    def write(fd: int, view: memoryview) -> None:
        nonlocal writes
        writes += 1
        if writes == 2:
            raise DestinationWriteError(errno.ENOSPC, "No space left on device")
        write_all(fd, view)

    with (
        open(src, "rb") as fin,
        open(tmp_path / "dst", "wb") as fout,
        pytest.raises(DestinationWriteError),
    ):
        copy_hashing_overlapped(
            lambda v: read_into(fin.fileno(), v), fout.fileno(), write, block=BLOCK
        )
    assert writes == 2  # nothing written after the failure


def test_read_ahead_hash(tmp_path: Path) -> None:
    """Reading ahead gives the SHA-1 and size of the whole file."""
    src, data = _source(tmp_path, 4 * BLOCK + 3)
    with open(src, "rb") as fin:
        assert hash_read_ahead(lambda v: read_into(fin.fileno(), v), block=BLOCK) == (
            hashlib.sha1(data).hexdigest(),
            len(data),
        )


def test_writeback_of_a_regular_file(tmp_path: Path) -> None:
    """Starting and awaiting writeback of written bytes succeeds on a local filesystem."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        assert start_writeback(fd, 0, 8192) is True
        assert start_writeback(fd, 0, 8192, wait=True) is True
    finally:
        os.close(fd)


def test_writeback_refused_on_a_pipe() -> None:
    """A descriptor that cannot be written back (a pipe) is reported as unsupported."""
    r, w = os.pipe()
    try:
        assert start_writeback(w, 0, 1) is False
    finally:
        os.close(r)
        os.close(w)


def test_a_writeback_error_is_the_copys_error(tmp_path: Path) -> None:
    """An error the writeback reports (here EBADF: no such descriptor) fails the copy:
    the kernel reports such errors once, so the caller's fsync would never see it."""
    src, _ = _source(tmp_path, 6 * BLOCK)
    bogus = 1_000_000  # no such descriptor: the writeback is asked about it
    with open(src, "rb") as fin, open(tmp_path / "dst", "wb") as fout:

        def write(_fd: int, view: memoryview) -> None:
            write_all(fout.fileno(), view)

        with pytest.raises(OSError) as caught:
            copy_hashing_overlapped(lambda v: read_into(fin.fileno(), v), bogus, write, block=BLOCK)
    assert caught.value.errno == errno.EBADF


def test_read_ahead_throttles_on_the_calling_thread(tmp_path: Path) -> None:
    """throttle() runs on the thread that asked for the hash (where the daemon keeps its
    liveness heartbeat), never on the reader thread."""
    src, _ = _source(tmp_path, 4 * BLOCK + 1)
    threads: set[int] = set()
    with open(src, "rb") as fin:
        hash_read_ahead(
            lambda v: read_into(fin.fileno(), v),
            throttle=lambda n: threads.add(threading.get_ident()),
            block=BLOCK,
        )
    assert threads == {threading.get_ident()}
