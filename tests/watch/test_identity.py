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


def _summary_by_path(top: Path) -> str:
    """The digest of a tree as nbankd up to 2026-12-06 took it (each folder listed by
    its path, last found first listed): the reference the descriptor walk must match."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(top, rel) if rel else top) as it:
            for child in it:
                crel = f"{rel}/{child.name}" if rel else child.name
                st = child.stat(follow_symlinks=False)
                digest.update(
                    b"%s\0%d %d %d %d %d\n"
                    % (
                        os.fsencode(crel),
                        st.st_ino,
                        st.st_size,
                        st.st_mtime_ns,
                        st.st_ctime_ns,
                        st.st_mode,
                    )
                )
                if stat.S_ISDIR(st.st_mode):
                    stack.append(crel)
    return digest.hexdigest()


def test_tree_summary_digest_is_the_one_journaled_before_the_descriptor_walk(
    inbox: Path,
) -> None:
    """A tree summarised folder by folder from descriptors has the digest the walk by
    paths gave, so a folder input journaled before an upgrade is still claimed."""
    rec = inbox / "rec"
    for sub in ("a/b/c", "a/d", "e"):
        (rec / sub).mkdir(parents=True)
    for name in ("a/b/c/1", "a/b/2", "a/d/3", "e/4", "5"):
        (rec / name).write_bytes(name.encode())
    assert tree_summary(rec).identity.digest == _summary_by_path(rec)


def test_tree_summary_of_a_link_to_a_folder_lists_nothing_behind_it(inbox: Path) -> None:
    """A folder input replaced by a link to another folder is reported gone, never
    summarised from the folder the link points to."""
    other = inbox / "other"
    other.mkdir()
    (other / "secret").write_bytes(b"x")
    (inbox / "rec").symlink_to(other)
    with pytest.raises(FileNotFoundError):
        tree_summary(inbox / "rec")


def test_tree_summary_in_an_open_folder(inbox: Path) -> None:
    """``dir_fd`` names the folder from an open parent: the same summary as by path."""
    (inbox / "rec" / "a").mkdir(parents=True)
    (inbox / "rec" / "a" / "f").write_bytes(b"x")
    fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert tree_summary("rec", dir_fd=fd) == tree_summary(inbox / "rec")
    finally:
        os.close(fd)


def test_tree_summary_stops_below_its_depth_and_names_the_first_folder_it_left(
    inbox: Path,
) -> None:
    """A tree deeper than SUMMARY_DEPTH levels is not entered below it (one descriptor
    per level at most): the first folder left out is named in ``too_deep`` and problem."""
    from nbankd.watch.identity import SUMMARY_DEPTH

    rec = inbox / "rec"
    rec.mkdir()
    fd = os.open(rec, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(SUMMARY_DEPTH + 5):  # by descriptors: deeper than PATH_MAX allows
            os.mkdir("d" * 40, dir_fd=fd)
            nxt = os.open("d" * 40, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    summary = tree_summary(rec)
    assert summary.too_deep == ("/".join(["d" * 40] * (SUMMARY_DEPTH + 1)),)
    assert summary.problem is not None and f"more than {SUMMARY_DEPTH} levels" in summary.problem


def test_tree_summary_of_a_wide_tree_holds_few_descriptors(inbox: Path) -> None:
    """A folder with many sub-folders is summarised under a small open-files limit:
    a sub-folder waiting its turn holds no descriptor."""
    import resource

    rec = inbox / "rec"
    for i in range(300):
        (rec / f"s{i:03d}").mkdir(parents=True)
        (rec / f"s{i:03d}" / "f").write_bytes(b"x")
    in_use = len(os.listdir("/proc/self/fd"))
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 16, saved[1]))
    try:
        summary = tree_summary(rec)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
    assert summary.files == 300 and summary.unreadable == ()
