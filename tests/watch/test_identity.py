"""Identities of inputs (nbankd.watch.identity): a file's lstat, a folder tree's summary."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from nbankd.watch.identity import Identity, identity_of_path, tree_identity, tree_summary


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    root = tmp_path / "inbox"
    root.mkdir()
    return root


def _grow(p: Path) -> None:
    with open(p, "ab") as f:
        f.write(b"more")


def _rename(p: Path) -> None:
    p.rename(p.with_name("renamed.bin"))


def _add_empty_folder(p: Path) -> None:
    (p.parent / "newdir").mkdir()


def _chmod(p: Path) -> None:
    p.chmod(0o600)


def _rewrite_same_size_and_mtime(p: Path) -> None:
    st = os.lstat(p)
    p.write_bytes(b"XYZ")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(
    "change", [_grow, _rename, _add_empty_folder, _chmod, _rewrite_same_size_and_mtime]
)
def test_tree_identity_notices_changes_deep_inside(
    inbox: Path, change: Callable[[Path], None]
) -> None:
    """Any change to a nested file or folder changes the directory resource's identity."""
    nested = inbox / "rec" / "a" / "b" / "data.bin"
    nested.parent.mkdir(parents=True)
    nested.write_bytes(b"abc")
    before = tree_identity(inbox / "rec")
    change(nested)
    assert tree_identity(inbox / "rec") != before


def test_tree_identity_is_stable_when_nothing_changes(inbox: Path) -> None:
    """Two summaries of an untouched tree are equal (so it can settle)."""
    (inbox / "rec" / "a").mkdir(parents=True)
    (inbox / "rec" / "a" / "f").write_bytes(b"x")
    assert tree_identity(inbox / "rec") == tree_identity(inbox / "rec")


def test_tree_summary_lists_unsafe_members(inbox: Path) -> None:
    """Symlinks, FIFOs and hard links inside a directory resource are named in problem."""
    rec = inbox / "rec"
    (rec / "sub").mkdir(parents=True)
    (rec / "sub" / "f").write_bytes(b"x")
    (rec / "link").symlink_to("/etc")
    os.mkfifo(rec / "sub" / "pipe")
    summary = tree_summary(rec)
    assert summary.unsafe == ("link", "sub/pipe")
    assert summary.files == 1
    assert summary.problem is not None and "2 member(s)" in summary.problem


def test_identity_of_path_does_not_follow_symlinks(inbox: Path) -> None:
    """identity_of_path describes the link itself, not its target."""
    (inbox / "t").write_bytes(b"target")
    (inbox / "l").symlink_to(inbox / "t")
    ident = identity_of_path(inbox / "l")
    assert stat.S_ISLNK(ident.mode)
    assert ident.ino != identity_of_path(inbox / "t").ino


def test_same_file_ignores_mode_and_owner(inbox: Path) -> None:
    """same_file compares device, inode, size, mtime and ctime only."""
    (inbox / "f").write_bytes(b"x")
    a = identity_of_path(inbox / "f")
    b = Identity(a.dev, a.ino, a.size, a.mtime_ns, a.ctime_ns, 2, 0, 1)
    assert a.same_file(b)
    assert not a.same_file(Identity(a.dev, a.ino, a.size + 1, a.mtime_ns, a.ctime_ns, 1, 0, 0))
