"""Tree removal and its check beforehand against mounts, file attributes and wide trees
(:mod:`nbankd.archive.treeremoval`)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures.mountns import MountNamespace
from nbankd import errors
from nbankd.archive.treeremoval import remove_tree_at, unremovable_below


def _tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.dat").write_bytes(b"a")
    return tree


@pytest.mark.parametrize("how", ["tmpfs", "bind"])
def test_removing_a_tree_never_enters_a_mount_point_inside_it(
    tmp_path: Path, mount_ns: MountNamespace, how: str
) -> None:
    """The removal of a tree stops at a mount point inside it (another filesystem, or a
    bind mount of a folder on the same one): nothing on the mount is removed."""
    tree = _tree(tmp_path)
    if how == "tmpfs":
        mount_ns.mount_tmpfs(tree / "sub", "1m")
    else:
        elsewhere = tmp_path / "home"
        elsewhere.mkdir()
        mount_ns.run("mount", "--bind", elsewhere, tree / "sub")
    view = mount_ns.view(tmp_path)  # the namespace's tree, mounts included
    (view / "tree" / "sub" / "keep.txt").write_bytes(b"keep")
    fd = os.open(view, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(errors.MountInside):
            remove_tree_at(fd, "tree")
    finally:
        os.close(fd)
    assert (view / "tree" / "sub" / "keep.txt").read_bytes() == b"keep"


def test_the_check_finds_a_wide_tree_removable_under_a_small_open_files_limit(
    tmp_path: Path,
) -> None:
    """A folder with more sub-folders than the open-files limit leaves room for is found
    removable: sub-folders are opened one at a time, not all at once."""
    tree = _tree(tmp_path)
    for i in range(300):
        (tree / f"s{i:03d}").mkdir()
        (tree / f"s{i:03d}" / "f").write_bytes(b"x")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    in_use = len(os.listdir("/proc/self/fd"))
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 16, saved[1]))
    try:
        found = unremovable_below(fd, "tree", max_depth=64)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)
        os.close(fd)
    assert found is None


@pytest.mark.parametrize(("flag", "said"), [("+i", "immutable"), ("+a", "append-only")])
def test_the_check_names_a_file_no_one_may_remove(tmp_path: Path, flag: str, said: str) -> None:
    """A file with the immutable or append-only attribute makes its tree unremovable,
    named with the attribute."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr")
    tree = _tree(tmp_path)
    (tree / "sub" / "log").write_bytes(b"rig log")
    done = subprocess.run(["chattr", flag, str(tree / "sub" / "log")], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr {flag} refused here: {done.stderr.decode().strip()}")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = unremovable_below(fd, "tree", max_depth=64)
    finally:
        os.close(fd)
        subprocess.run(["chattr", "-i", "-a", str(tree / "sub" / "log")], capture_output=True)
    assert found is not None
    assert (found.rel, found.why, found.flag) == ("sub/log", f"it is {said}", said)
