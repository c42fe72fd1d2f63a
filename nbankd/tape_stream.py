"""Reading a tar file's members once, in order, and knowing it was read to its end.

tarfile takes a header it cannot parse, past the first, for the end of the archive
(:meth:`tarfile.TarFile.next` returns None, as at the zero blocks that end a tar):
a bad block in the middle of a tape would silently hide every member after it.
So the tape commands read a tar through :class:`TarStream`: the bytes tarfile sees
(decompressed here, by :mod:`gzip`, :mod:`bz2` or :mod:`lzma`, from a file or from
standard input) pass through :class:`_Counted`, which notes where each read begins.
When tarfile reports the end, the block it stopped at and everything after it, read
once to the end of the data, must be zeros (end-of-archive blocks and the padding to
the record size): anything else raises :class:`tarfile.ReadError` naming the offset
(in the uncompressed tar) from which the tar could not be read. The block tarfile
stopped at is taken to be the one its last read returned; where that cannot be so
(not on a block boundary, before the last member's data, as documented by
:attr:`tarfile.TarInfo.offset_data`) the tar is reported unreadable too, never read
as ended.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import sys
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import IO, BinaryIO

_BLOCK = tarfile.BLOCKSIZE
_CHUNK = 1 << 20
_GZIP, _BZIP2, _XZ = b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"  # a compressed tar's first bytes
_MAGIC_SIZE = max(len(_GZIP), len(_BZIP2), len(_XZ))


class _Prefixed:
    """A stream that cannot seek, with its first bytes (already read) put back."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self.head, self.rest = head, rest

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(size)
        if size < 0:
            data, self.head = self.head + self.rest.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + self.rest.read(size - len(data)) if size > len(data) else data

    def seekable(self) -> bool:
        return False


class _Counted:
    """The tar's bytes as tarfile reads them: forward only on a stream, with the
    offset where the latest read began and what it returned."""

    def __init__(self, raw: BinaryIO | IO[bytes] | _Prefixed) -> None:
        self.raw = raw
        self.can_seek = raw.seekable()
        self.pos = 0
        self.last_at, self.last = 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.last_at, self.last = self.pos, data
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True  # forward, always; backward only on a file

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = offset if whence == os.SEEK_SET else self.pos + offset
        if whence not in (os.SEEK_SET, os.SEEK_CUR) or target < 0:
            raise OSError(f"cannot seek to {offset} ({whence}) in a tar")
        if self.can_seek:
            assert not isinstance(self.raw, _Prefixed)
            self.pos = self.raw.seek(target)
        elif target < self.pos:
            raise OSError(f"cannot go back to offset {target} in a tar read as a stream")
        while self.pos < target:
            skipped = self.raw.read(min(_CHUNK, target - self.pos))
            if not skipped:
                break
            self.pos += len(skipped)
        return self.pos


class TarStream:
    """A tar's members, read once in order: :meth:`next` and :meth:`extractfile`."""

    def __init__(self, tar: tarfile.TarFile, data: _Counted) -> None:
        self.tar, self._data = tar, data
        self._last: tarfile.TarInfo | None = None
        self._ended = False
        self._problem: str | None = None

    def next(self) -> tarfile.TarInfo | None:
        """The next member; None at the end of the tar, once only zeros follow the
        last member. Raises tarfile.ReadError if anything else does."""
        if not self._ended:
            member = self.tar.next()
            if member is not None:
                self._last = member
                return member
            self._ended = True
            self._problem = self._end_problem()
        if self._problem is not None:
            raise tarfile.ReadError(self._problem)
        return None

    def extractfile(self, member: tarfile.TarInfo) -> IO[bytes] | None:
        return self.tar.extractfile(member)

    def _end_problem(self) -> str | None:
        """Why the data where tarfile stopped is no end of the tar, or None."""
        at, head = self._data.last_at, self._data.last
        # where tarfile stopped: the header block it read last, after the last member
        if at % _BLOCK or len(head) > _BLOCK or (self._last and at < self._last.offset_data):
            return f"unreadable from offset {at}: cannot tell where the tar ends"
        if head.strip(b"\0"):
            return (
                f"unreadable from offset {at}: a damaged member header, not the blocks "
                "of zeros that end a tar (the members after it cannot be read)"
            )
        pos = self._data.pos
        while chunk := self._data.raw.read(_CHUNK):
            if rest := chunk.lstrip(b"\0"):
                return (
                    f"unreadable from offset {pos + len(chunk) - len(rest)}: data after the "
                    f"blocks of zeros that end the tar at offset {at} (a damaged header, or "
                    "tars written one after another)"
                )
            pos += len(chunk)
        return None


def _head(raw: BinaryIO) -> tuple[bytes, BinaryIO | _Prefixed]:
    """The first bytes of ``raw`` and a stream that reads it from its start."""
    if raw.seekable():
        head = raw.read(_MAGIC_SIZE)
        raw.seek(0)
        return head, raw
    head = b""
    while len(head) < _MAGIC_SIZE and (more := raw.read(_MAGIC_SIZE - len(head))):
        head += more
    return head, _Prefixed(head, raw)


@contextmanager
def open_tar_stream(path: str | os.PathLike[str]) -> Iterator[TarStream]:
    """Opens a tar file, or '-' for standard input, compressed or not (gzip, bzip2,
    xz). Raises OSError, tarfile.TarError or a decompressor's error."""
    with ExitStack() as stack:
        if str(path) == "-":
            raw: BinaryIO = sys.stdin.buffer
        else:
            raw = stack.enter_context(open(path, "rb"))
        head, source = _head(raw)
        stream: BinaryIO | IO[bytes] | _Prefixed = source
        if head.startswith(_GZIP):
            stream = stack.enter_context(gzip.GzipFile(fileobj=source, mode="rb"))  # type: ignore[arg-type]
        elif head.startswith(_BZIP2):
            stream = stack.enter_context(bz2.BZ2File(source))  # type: ignore[arg-type]
        elif head.startswith(_XZ):
            stream = stack.enter_context(lzma.LZMAFile(source))  # type: ignore[arg-type]
        data = _Counted(stream)
        tar = stack.enter_context(tarfile.open(fileobj=data, mode="r:"))
        yield TarStream(tar, data)


__all__ = ["TarStream", "open_tar_stream"]
