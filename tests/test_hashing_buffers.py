"""copy_hashing's default buffer sized to a descriptor's file
(nbankd.hashing._buffer_size): descriptors whose size says little about what will be
read (pipes, files growing while read) are still read whole, and progress and
throttle still see every byte."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from nbankd.hashing import BLOCK_SIZE, SMALL_BUFFER, copy_hashing


def test_a_pipe_is_read_whole_through_the_small_buffer() -> None:
    """A pipe (its size 0) carrying 3 MiB is hashed and copied whole."""
    data = os.urandom(3 << 20)
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    out: list[bytes] = []

    class Sink:
        def write(self, view: memoryview) -> int:
            out.append(bytes(view))
            return len(view)

    try:
        result = copy_hashing(r, Sink())
    finally:
        writer.join()
        os.close(r)
    assert (result.sha1, result.size) == (hashlib.sha1(data).hexdigest(), len(data))
    assert b"".join(out) == data


def test_a_file_growing_while_read_is_read_to_its_end_with_every_byte_reported(
    tmp_path: Path,
) -> None:
    """A file empty when opened, appended to (1 MiB each time) from the progress
    callback until 8 MiB: every byte is hashed, progress totals rise to the size, and
    throttle's sizes add up to it."""
    path = tmp_path / "growing"
    path.write_bytes(b"")
    chunks = [os.urandom(1 << 20) for _ in range(8)]
    appended = [0]
    totals: list[int] = []
    throttled: list[int] = []

    def progress(total: int) -> None:
        totals.append(total)

    def throttle(n: int) -> None:
        throttled.append(n)
        if appended[0] < len(chunks) and sum(throttled) >= sum(map(len, chunks[: appended[0]])):
            with open(path, "ab") as f:
                f.write(chunks[appended[0]])
            appended[0] += 1

    with open(path, "ab") as f:  # the first chunk before the first read
        f.write(chunks[0])
    appended[0] = 1
    fd = os.open(path, os.O_RDONLY)
    try:
        result = copy_hashing(fd, None, progress=progress, throttle=throttle)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    assert (result.sha1, result.size) == (hashlib.sha1(data).hexdigest(), len(data))
    assert totals == sorted(totals) and totals[-1] == len(data) and sum(throttled) == len(data)


def test_many_concurrent_copies_allocate_no_more_than_a_block_each(tmp_path: Path) -> None:
    """The default buffer is never above a block nor below SMALL_BUFFER, for files of
    every size class (memory for many workers is bounded as before)."""
    from nbankd.hashing import _buffer_size

    sizes = [0, 1, SMALL_BUFFER, BLOCK_SIZE - 1, BLOCK_SIZE, 10 * BLOCK_SIZE]
    for size in sizes:
        path = tmp_path / f"f{size}"
        with open(path, "wb") as f:
            f.truncate(size)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = _buffer_size(fd, BLOCK_SIZE)
        finally:
            os.close(fd)
        assert SMALL_BUFFER <= got <= BLOCK_SIZE
        assert got == min(BLOCK_SIZE, max(SMALL_BUFFER, size + 1))
