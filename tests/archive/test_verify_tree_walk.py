"""Reading a stored folder back from storage walks it from directory descriptors: a
sub-folder swapped for a link while the walk goes on (a writer who kept a descriptor
inside a folder published in place can do it) never leads it to a file outside."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.layout import Archive


def _stored_folder(archive: Archive, tmp_path: Path) -> tuple[Path, str]:
    """A folder ``rec1`` stored in the archive (sub-folders ``a`` and ``z``, one file
    each), and its SHA-1."""
    src = tmp_path / "rec1"
    for sub, data in (("a", b"first"), ("z", b"second")):
        (src / sub).mkdir(parents=True)
        (src / sub / "data.bin").write_bytes(data * 1000)
    staged = durable.stage_copy_tree(archive, src, ".nbankd-rec1")
    target = archive.new_resource_path("rec1", "rec1")
    durable.publish(archive, staged.path, target, sha1=staged.sha1, id="rec1")
    return target, staged.sha1


def _folder_of(path: object, dir_fd: int | None) -> str | None:
    """The folder an ``os.open`` of ``path`` looks in (descriptor paths resolved)."""
    if isinstance(path, int) or dir_fd is not None:
        return None
    text = os.fsdecode(path)  # type: ignore[arg-type]
    head = os.path.dirname(text)
    if head.startswith("/proc/self/fd/"):
        return os.readlink(head)
    return head


def test_a_sub_folder_swapped_for_a_link_mid_walk_leads_nowhere_outside(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the walk is about to open the file of sub-folder ``z`` (listed already),
    ``z`` is swapped for a link to a folder outside: nothing outside is opened, and
    the answer is never a match made of outside bytes."""
    target, sha1 = _stored_folder(archive, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"second" * 1000)  # the same bytes, elsewhere
    secret = (outside / "data.bin").stat()
    z = target / "z"
    os.chmod(target, 0o755)  # the writer may change the folder
    swapped: list[bool] = []
    opened: set[tuple[int, int]] = set()
    real_open = os.open

    def spy(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if not swapped and _folder_of(path, dir_fd) == str(z):
            os.rename(z, target / "moved-away")
            os.symlink(outside, z)
            swapped.append(True)
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        st = os.fstat(fd)
        opened.add((st.st_dev, st.st_ino))
        return fd

    monkeypatch.setattr(os, "open", spy)
    with contextlib.suppress(errors.NbankdError):  # refusing the changed folder is fine
        durable.verify_from_storage(target, sha1)
    monkeypatch.undo()
    assert swapped, "the walk never opened the file of z"
    assert (secret.st_dev, secret.st_ino) not in opened, "a file outside the folder was read"


def test_a_link_in_a_stored_folder_is_an_error_not_a_file(archive: Archive, tmp_path: Path) -> None:
    """A link inside a stored folder (never stored by nbankd) makes the read-back fail
    with ArchiveUnavailable, and is never read through."""
    target, sha1 = _stored_folder(archive, tmp_path)
    os.chmod(target / "a", 0o755)
    os.symlink("/etc/hostname", target / "a" / "link")
    with pytest.raises(errors.ArchiveUnavailable, match="symbolic link"):
        durable.verify_from_storage(target, sha1)


def test_a_stored_folder_reads_back_as_its_hash(archive: Archive, tmp_path: Path) -> None:
    """An untouched stored folder verifies against the SHA-1 its staged copy had."""
    target, sha1 = _stored_folder(archive, tmp_path)
    assert durable.verify_from_storage(target, sha1)
