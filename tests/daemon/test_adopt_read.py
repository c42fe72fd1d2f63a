"""How adoption reads a stored resource (nbankd.daemon.adopt_read): only as it stands
still, never through a link. Real files; the change comes from the hash's own
throttle callback, so it lands mid-read, deterministically."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from nbankd.archive.verify import ChangedWhileRead
from nbankd.daemon.adopt_read import stored_sha1
from nbankd.hashing import directory_hash


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def aged(path: Path) -> Path:
    """Sets ``path``'s times an hour back, so a write now changes its mtime whatever
    the filesystem's timestamp granularity."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns - 3600 * 10**9, st.st_mtime_ns - 3600 * 10**9))
    return path


def once(act: Callable[[], None]) -> Callable[[int], None]:
    """A throttle that does ``act`` the first time it is called (after the first block)."""
    done: list[bool] = []

    def tick(_n: int) -> None:
        if not done:
            done.append(True)
            act()

    return tick


def rewrite(path: Path, data: bytes) -> None:
    """Writes ``data`` over the start of ``path``, in place (same inode, same size)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def test_a_file_rewritten_during_its_read_is_read_again(tmp_path: Path) -> None:
    """A file rewritten in place while it is hashed gets the SHA-1 of what it holds
    after, never of the mix read."""
    path = tmp_path / "aa01.wav"
    path.write_bytes(b"A" * 64)
    aged(path)
    got = stored_sha1(path, once(lambda: rewrite(path, b"B" * 8)))
    assert got == sha1(path.read_bytes()) == sha1(b"B" * 8 + b"A" * 56)


def test_a_file_that_keeps_changing_is_given_up(tmp_path: Path) -> None:
    """A file changed during every read raises ChangedWhileRead: no SHA-1 at all."""
    path = tmp_path / "aa01.wav"
    path.write_bytes(b"A" * 64)

    times = iter(range(10**9, 2 * 10**9, 10**6))

    def touch(_n: int) -> None:  # a new mtime each time: a write as the read goes
        when = next(times)
        os.utime(path, ns=(when, when))

    with pytest.raises(ChangedWhileRead):
        stored_sha1(path, touch)


def test_a_file_replaced_by_rename_during_its_read_is_read_again(tmp_path: Path) -> None:
    """A file renamed over (a restore's temporary file) while the old one is hashed:
    the SHA-1 is the new file's, the one the path names."""
    path = tmp_path / "aa01.wav"
    path.write_bytes(b"old bytes")
    new = tmp_path / "restored.tmp"
    new.write_bytes(b"restored bytes")
    assert stored_sha1(path, once(lambda: new.rename(path))) == sha1(b"restored bytes")


def test_a_folder_member_rewritten_during_the_read_is_read_again(tmp_path: Path) -> None:
    """A file of a folder resource rewritten in place while the folder is hashed: the
    folder's hash is that of what it holds after."""
    folder = tmp_path / "aa02"
    folder.mkdir()
    (folder / "a.dat").write_bytes(b"A" * 32)
    member = folder / "b.dat"
    member.write_bytes(b"B" * 32)
    aged(member)
    got = stored_sha1(folder, once(lambda: rewrite(member, b"C")))
    assert got == directory_hash(folder)
    assert member.read_bytes().startswith(b"C")


def test_a_file_added_to_a_folder_during_the_read_is_counted(tmp_path: Path) -> None:
    """A file created in a folder resource while it is hashed: the hash covers it."""
    folder = tmp_path / "aa02"
    folder.mkdir()
    (folder / "a.dat").write_bytes(b"A")
    got = stored_sha1(folder, once(lambda: (folder / "z.dat").write_bytes(b"late")))
    assert got == directory_hash(folder)
    assert (folder / "z.dat").exists()


def test_a_link_inside_a_folder_resource_is_never_read_through(tmp_path: Path) -> None:
    """A folder resource holding a link to a file outside: ELOOP, no hash of the
    file it points to."""
    outside = tmp_path / "private.txt"
    outside.write_bytes(b"someone's file")
    folder = tmp_path / "aa02"
    folder.mkdir()
    (folder / "a.dat").write_bytes(b"A")
    (folder / "link.dat").symlink_to(outside)
    with pytest.raises(OSError) as raised:
        stored_sha1(folder)
    assert raised.value.errno == errno.ELOOP
