"""What keeps a large backlog small: streamed listings and shared per-file records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbankd.watch import settle
from nbankd.watch.identity import Identity, iter_folder, list_folder
from nbankd.watch.scan import scan_inbox

POLICY = settle.SettlePolicy(settle_seconds=1.0, stall_after=60.0)


def fill(root: Path, n: int) -> None:
    root.mkdir()
    for i in range(n):
        (root / f"f{i:03d}.dat").write_bytes(b"x" * i)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_iter_folder_yields_what_list_folder_lists(tmp_path: Path) -> None:
    """iter_folder gives the same names and lstats as list_folder, one at a time."""
    fill(tmp_path / "in", 20)
    streamed = {name: c.stat().st_ino for name, c in iter_folder(str(tmp_path / "in"))}
    listed = {name: c.stat().st_ino for name, c in list_folder(str(tmp_path / "in"))}
    assert streamed == listed and len(streamed) == 20


def test_iter_folder_closes_its_descriptor_once_iterated(tmp_path: Path) -> None:
    """The folder's descriptor is closed when the iteration has run to its end."""
    fill(tmp_path / "in", 5)
    before = open_fds()
    children = iter_folder(str(tmp_path / "in"))
    assert len(open_fds() - before) == 1
    assert len(list(children)) == 5
    assert open_fds() - before == set()


def test_iter_folder_refuses_a_swapped_folder_at_the_call(tmp_path: Path) -> None:
    """A folder that is no longer the inode expected raises before any iteration."""
    fill(tmp_path / "in", 1)
    before = open_fds()
    with pytest.raises(FileNotFoundError):
        iter_folder(str(tmp_path / "in"), expect_ino=os.stat(tmp_path).st_ino)
    assert open_fds() - before == set()


def test_ready_files_share_one_verdict(tmp_path: Path) -> None:
    """Inputs ready with the same sentence hold one shared verdict record."""
    fill(tmp_path / "in", 30)
    first = settle.step(
        settle.TrackerState(), scan_inbox(tmp_path / "in", recursive=True), 0, POLICY
    )
    second = settle.step(first.state, scan_inbox(tmp_path / "in", recursive=True), 2.0, POLICY)
    assert len(second.ready) == 30
    assert len({id(v) for v in second.verdicts.values()}) == 1


def test_unchanged_file_keeps_its_first_identity(tmp_path: Path) -> None:
    """A watch keeps the identity object of the earlier scan while the file is unchanged."""
    fill(tmp_path / "in", 1)
    first = settle.step(
        settle.TrackerState(), scan_inbox(tmp_path / "in", recursive=True), 0, POLICY
    )
    second = settle.step(first.state, scan_inbox(tmp_path / "in", recursive=True), 2.0, POLICY)
    assert second.state.watches["f000.dat"].identity is first.state.watches["f000.dat"].identity


def test_identities_share_device_mode_and_owner_numbers(tmp_path: Path) -> None:
    """Identities of files with the same device, mode and owner share those int objects."""
    fill(tmp_path / "in", 2)
    a = Identity.of(os.lstat(tmp_path / "in" / "f000.dat"))
    b = Identity.of(os.lstat(tmp_path / "in" / "f001.dat"))
    assert (a.dev is b.dev, a.mode is b.mode, a.uid is b.uid) == (True, True, True)
    assert a == Identity.of(os.lstat(tmp_path / "in" / "f000.dat"))


def test_scan_reuses_a_known_identity_only_when_equal(tmp_path: Path) -> None:
    """scan_inbox's known lookup replaces an equal identity by the earlier object only."""
    fill(tmp_path / "in", 2)
    earlier = {e.relpath: e.identity for e in scan_inbox(tmp_path / "in", recursive=True)}
    (tmp_path / "in" / "f001.dat").write_bytes(b"changed")
    again = {
        e.relpath: e.identity
        for e in scan_inbox(tmp_path / "in", recursive=True, known=earlier.get)
    }
    assert again["f000.dat"] is earlier["f000.dat"]
    assert again["f001.dat"] != earlier["f001.dat"]
    assert again["f001.dat"].size == len(b"changed")
