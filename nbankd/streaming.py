"""Large files at the disk's speed: reading, hashing and writing overlap.

A plain copy-while-hashing loop takes turns: read a block, hash it, write it,
then read the next. ``os.readv``, ``os.write`` and ``hashlib``'s ``update`` (on
more than 2 KiB) all release the GIL, so three threads can each do one of them
at once on a small ring of large buffers:

- a *reader* thread fills free buffers in order (:class:`ReadAhead`);
- the calling thread hashes each filled buffer;
- a *writer* thread writes it and starts the kernel's writeback of what it
  wrote (``sync_file_range``), waiting for the writeback of blocks a few behind,
  so dirty memory stays bounded and the closing ``fsync`` has little left to do.

A buffer returns to the reader once it is both hashed and written. The copy is
still read exactly once, bytes are hashed in order, and nothing is published
here: the caller fsyncs and publishes as before. ``sync_file_range`` only starts
or waits for writeback (it makes nothing durable, so the caller's fsync stays);
where the filesystem refuses it (FUSE, NFS on some kernels) the writer stops
calling it and the copy goes on.

Reading back for verification uses :class:`ReadAhead` too, with page-aligned
buffers for ``O_DIRECT``: the disk reads the next blocks while this thread
hashes the last.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from types import TracebackType

#: bytes per block of an overlapped copy or read-back
BLOCK = 8 << 20
#: buffers in the ring: one being read, one hashed, one written, one spare
DEPTH = 4
#: writeback of a block is awaited once this many newer blocks are written
WRITEBACK_LAG = 2

_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4


def totals_to_deltas(advance: Callable[[int], None]) -> Callable[[int], None]:
    """``progress(total so far)``, as copies report it, turned into ``advance(bytes
    since the last call)``, as progress bars take it."""
    done = [0]

    def progress(total: int) -> None:
        advance(total - done[0])
        done[0] = total

    return progress


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int, *, wait: bool = False) -> bool:
    """Asks the kernel to start writing ``length`` bytes at ``offset`` back to storage
    (with ``wait``: and waits until they are written). Returns False where the
    filesystem or the C library does not offer it; durability still needs fsync."""
    if _sync_file_range is None:
        return False
    flags = _SYNC_FILE_RANGE_WRITE
    if wait:
        flags |= _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WAIT_AFTER
    if _sync_file_range(fd, offset, length, flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err))


def aligned_buffers(count: int, size: int) -> list[mmap.mmap]:
    """``count`` page-aligned buffers of ``size`` bytes (anonymous mappings), as
    ``O_DIRECT`` needs."""
    return [mmap.mmap(-1, size) for _ in range(count)]


class ReadAhead:
    """A reader thread filling a ring of buffers in order while the caller consumes them.

    ``read(view)`` fills ``view`` and returns the byte count (0 at the end); it runs
    on the reader thread. Iterating yields ``(slot, view)`` for each filled buffer
    in order; the caller hands each slot back with :meth:`release` once nothing
    uses its bytes any more (possibly from another thread). An exception raised
    by ``read`` is raised to the caller at that point of the stream. Use as a
    context manager: leaving stops and joins the reader.
    """

    def __init__(self, read: Callable[[memoryview], int], buffers: list[mmap.mmap]) -> None:
        self._read = read
        self._views = [memoryview(b) for b in buffers]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._filled: queue.SimpleQueue[tuple[int, int] | BaseException] = queue.SimpleQueue()
        for slot in range(len(buffers)):
            self._free.put(slot)
        self._thread = threading.Thread(target=self._run, name="nbankd-read-ahead", daemon=True)
        self._stopping = False

    def __enter__(self) -> ReadAhead:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping = True
        self._free.put(-1)  # wakes a reader waiting for a buffer
        self._thread.join()
        for view in self._views:
            view.release()

    def _run(self) -> None:
        try:
            while True:
                slot = self._free.get()
                if slot < 0 or self._stopping:
                    return
                n = self._read(self._views[slot])
                self._filled.put((slot, n))
                if n == 0:
                    return
        except BaseException as err:  # handed to the consumer, raised there
            self._filled.put(err)

    def __iter__(self) -> Iterator[tuple[int, memoryview]]:
        while True:
            got = self._filled.get()
            if isinstance(got, BaseException):
                raise got
            slot, n = got
            if n == 0:
                return
            yield slot, self._views[slot][:n]

    def release(self, slot: int) -> None:
        """Gives ``slot``'s buffer back to the reader."""
        self._free.put(slot)


class _Writer:
    """The writer thread of an overlapped copy: writes blocks in order, starts their
    writeback, and hands each buffer back once it is written and hashed."""

    def __init__(self, fd: int, write: Callable[[int, memoryview], None], ahead: ReadAhead):
        self._fd = fd
        self._write = write
        self._ahead = ahead
        self._todo: queue.SimpleQueue[tuple[int, memoryview, int] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[int, int] = {}  # slot -> uses left (hash, write)
        self.error: BaseException | None = None
        self._writeback = True
        self._thread = threading.Thread(target=self._run, name="nbankd-writer", daemon=True)
        self._thread.start()

    def submit(self, slot: int, chunk: memoryview, offset: int) -> None:
        with self._lock:
            self._pending[slot] = 2
        self._todo.put((slot, chunk, offset))

    def done(self, slot: int) -> None:
        """One use of ``slot`` ended; the second one hands it back to the reader."""
        with self._lock:
            self._pending[slot] -= 1
            last = self._pending[slot] == 0
        if last:
            self._ahead.release(slot)

    def _run(self) -> None:
        written: list[tuple[int, int]] = []  # (offset, length) whose writeback was started
        while True:
            job = self._todo.get()
            if job is None:
                return
            slot, chunk, offset = job
            try:
                if self.error is None:
                    self._write(self._fd, chunk)
                    self._start_writeback(written, offset, len(chunk))
            except BaseException as err:  # raised by the caller's finish()
                self.error = err
            finally:
                chunk.release()
                self.done(slot)

    def _start_writeback(self, written: list[tuple[int, int]], offset: int, length: int) -> None:
        """Starts the writeback of the block just written and waits for the one
        WRITEBACK_LAG blocks behind. An error the wait reports (EIO, ENOSPC at
        writeback) is the copy's error: the kernel reports it once per open file, so a
        later fsync on this descriptor would not see it again."""
        if not self._writeback:
            return
        if not start_writeback(self._fd, offset, length):  # unsupported: fsync decides
            self._writeback = False
            return
        written.append((offset, length))
        if len(written) > WRITEBACK_LAG:
            old_offset, old_length = written.pop(0)
            start_writeback(self._fd, old_offset, old_length, wait=True)

    def finish(self) -> None:
        """Waits for every submitted block; raises the first write error."""
        self._todo.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        self._todo.put(None)
        self._thread.join()


def copy_hashing_overlapped(
    read: Callable[[memoryview], int],
    fd: int,
    write: Callable[[int, memoryview], None],
    *,
    progress: Callable[[int], None] | None = None,
    throttle: Callable[[int], None] | None = None,
    block: int = BLOCK,
) -> tuple[str, int]:
    """Copies everything ``read`` gives into ``fd`` (through ``write(fd, view)``) while
    hashing it, the three overlapping; returns the hex SHA-1 and the byte count.

    ``read`` and ``write`` raise the caller's own errors (they run on the reader
    and writer threads; their exceptions are raised here). The destination is
    neither fsynced nor closed here.
    """
    digest = hashlib.sha1()
    total = 0
    with ReadAhead(read, aligned_buffers(DEPTH, block)) as ahead:
        writer = _Writer(fd, write, ahead)
        try:
            for slot, chunk in ahead:
                writer.submit(slot, chunk[:], total)  # its own view: released there
                digest.update(chunk)
                writer.done(slot)
                total += len(chunk)
                if writer.error is not None:
                    break
                if progress is not None:
                    progress(total)
                if throttle is not None:
                    throttle(len(chunk))
        except BaseException:
            writer.abandon()
            raise
        writer.finish()
    return digest.hexdigest(), total


def hash_read_ahead(
    read: Callable[[memoryview], int],
    *,
    throttle: Callable[[int], None] | None = None,
    block: int = BLOCK,
) -> tuple[str, int]:
    """The SHA-1 and size of everything ``read`` gives, reading ahead on a second thread
    into page-aligned buffers (``read`` may use ``O_DIRECT``). ``throttle(n)`` runs on
    the calling thread after each block (it may sleep, or beat a liveness heartbeat
    kept per thread)."""
    digest = hashlib.sha1()
    total = 0
    with ReadAhead(read, aligned_buffers(DEPTH, block)) as ahead:
        for slot, chunk in ahead:
            digest.update(chunk)
            total += len(chunk)
            n = len(chunk)
            chunk.release()
            ahead.release(slot)
            if throttle is not None:
                throttle(n)
    return digest.hexdigest(), total
