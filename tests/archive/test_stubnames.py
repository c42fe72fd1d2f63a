"""A stub folder's names kept by inotify answer as a listing made at that moment would
(nbankd.archive.stubnames), and a publish never files an identifier twice with them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from stubnames_helpers import ask, elsewhere, listed, record_listings, watches

from fixtures.sshfs import Sshfs
from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.layout import Archive
from nbankd.archive.opening import create_archive
from nbankd.archive.stubnames import StubNames


@pytest.mark.parametrize(
    ("script", "id"),
    [
        ("import sys; open(sys.argv[1] + '/abc.txt', 'x').close()", "abc"),
        ("import os, sys; os.unlink(sys.argv[1] + '/abc.wav')", "abc"),
        ("import os, sys; os.link(sys.argv[1] + '/abd', sys.argv[1] + '/abc')", "abc"),
        ("import os, sys; os.mkdir(sys.argv[1] + '/abe.d')", "abe"),
        ("import os, sys; os.symlink('/etc', sys.argv[1] + '/abe')", "abe"),
        ("import os, sys; os.rename(sys.argv[1] + '/abc.wav', sys.argv[1] + '/abe.wav')", "abe"),
        ("import os, sys; os.rename(sys.argv[1] + '/abc.wav', sys.argv[1] + '/abe.wav')", "abc"),
        ("import os, sys; os.unlink(sys.argv[1] + '/abd'); open(sys.argv[1] + '/abd', 'x')", "abd"),
    ],
    ids=["create", "unlink", "link", "mkdir", "symlink", "rename-to", "rename-from", "again"],
)
def test_a_change_by_another_process_is_in_the_next_answer(
    names: StubNames, stub: Path, script: str, id: str
) -> None:
    """Once another process's change to a kept folder has returned, the next answer is
    what a listing made then says."""
    assert ask(names, stub, id) == listed(stub, id)
    elsewhere(script, stub)
    assert ask(names, stub, id) == listed(stub, id)


def test_a_kept_folder_is_listed_once_for_many_answers(
    names: StubNames, stub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many answers about a kept folder, with changes between them, list it once."""
    listings = record_listings(monkeypatch)
    for n in range(20):
        (stub / f"abc.{n}").write_bytes(b"")
        assert len(ask(names, stub, "abc") or []) == n + 2
    assert len(listings) == 1


def test_a_folder_replaced_at_the_same_path_is_listed_anew(
    names: StubNames, stub: Path, tmp_path: Path
) -> None:
    """A stub folder moved away and made again at its path answers for the new folder."""
    assert ask(names, stub, "abc") == ["abc.wav"]
    elsewhere(
        "import os, sys; os.rename(sys.argv[1], sys.argv[2]); os.mkdir(sys.argv[1]); "
        "open(sys.argv[1] + '/abc.txt', 'x').close()",
        stub,
        tmp_path / "old-ab",
    )
    assert ask(names, stub, "abc") == ["abc.txt"]


def test_a_parent_replaced_at_the_same_path_is_listed_anew(
    names: StubNames, stub: Path, tmp_path: Path
) -> None:
    """``resources/`` moved away and made again (the stub folder raises no event of its
    own) answers for the new folder, matched by device and inode."""
    assert ask(names, stub, "abc") == ["abc.wav"]
    resources = stub.parent
    os.rename(resources, tmp_path / "old-resources")
    stub.mkdir(parents=True)
    (stub / "abc.flac").write_bytes(b"")
    assert ask(names, stub, "abc") == ["abc.flac"]


def test_a_link_where_the_stub_folder_belongs_is_left_to_the_listing(
    names: StubNames, stub: Path, tmp_path: Path
) -> None:
    """A symbolic link at a stub folder's path gets no answer (the caller lists)."""
    link = stub.parent / "ac"
    link.symlink_to(stub)
    assert names.names_of(link, "abc") is None


def test_no_such_folder_raises_as_listing_does(names: StubNames, stub: Path) -> None:
    """A stub folder that does not exist raises FileNotFoundError, as a listing would."""
    with pytest.raises(FileNotFoundError):
        names.names_of(stub.parent / "zz", "zzz")


def test_a_folder_bigger_than_the_limit_is_not_kept(stub: Path) -> None:
    """A folder holding more names than may be kept gets no answer and no watch."""
    small = StubNames(max_names=2)
    try:
        assert small.names_of(stub, "abc") is None
        assert watches(stub) == 0
    finally:
        small.close()


def test_at_most_max_folders_are_watched_and_the_others_still_answer(tmp_path: Path) -> None:
    """Asking about more folders than may be kept watches only that many, the least
    recently asked dropped, and every answer is still right."""
    few = StubNames(max_folders=2)
    try:
        stubs = []
        for n in range(4):
            stub = tmp_path / f"s{n}"
            stub.mkdir()
            (stub / f"s{n}x.dat").write_bytes(b"")
            stubs.append(stub)
            assert few.names_of(stub, f"s{n}x") == [f"s{n}x.dat"]
        assert watches(*stubs) == 2
        (stubs[0] / "s0x").write_bytes(b"")
        assert sorted(few.names_of(stubs[0], "s0x") or []) == ["s0x", "s0x.dat"]
    finally:
        few.close()


def test_lost_events_drop_everything_and_answers_stay_right(names: StubNames, stub: Path) -> None:
    """More changes than inotify's queue holds between two questions (events lost): the
    next answers are still what a listing says."""
    assert ask(names, stub, "abc") == ["abc.wav"]
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    elsewhere(
        "import os, sys\n"
        "for i in range(int(sys.argv[2])):\n"
        "    open(f'{sys.argv[1]}/abz{i}', 'x').close()\n"
        "open(sys.argv[1] + '/abc.late', 'x').close()",
        stub,
        limit + 10,
    )
    for _ in range(2):
        answer = ask(names, stub, "abc")
        assert answer is None or answer == listed(stub, "abc")
    assert ask(names, stub, "abc") == ["abc.late", "abc.wav"]


def test_a_filesystem_others_change_is_never_kept(names: StubNames, sshfs: Sshfs) -> None:
    """A stub folder on SSHFS (another host changes it unseen) gets no answer."""
    mount = sshfs.mount("stubnames")
    stub = mount.mountpoint / "ab"
    stub.mkdir()
    assert names.names_of(stub, "abc") is None
    assert watches(stub) == 0


# -- publishing with the names kept ------------------------------------------------------


def test_a_name_filed_by_another_process_after_a_publish_refuses_the_next(
    archive: Archive, tmp_path: Path
) -> None:
    """After a publish has had its stub folder's names kept, a name another process
    files for an identifier (as ``nbank deposit`` would) refuses publishing that
    identifier under another name, and nothing is filed twice."""
    first, second = tmp_path / "one.wav", tmp_path / "two.wav"
    first.write_bytes(b"one")
    second.write_bytes(b"two")
    staged = durable.stage_copy(archive, first, ".nbankd-one")
    durable.publish(archive, staged.path, archive.stored_file("qq1", "qq1.wav"), id="qq1")
    stub = archive.resources_dir / "qq"
    elsewhere("import sys; open(sys.argv[1] + '/qq2.txt', 'x').close()", stub)
    staged = durable.stage_copy(archive, second, ".nbankd-two")
    with pytest.raises(errors.StoredUnderOtherName) as caught:
        durable.publish(archive, staged.path, archive.stored_file("qq2", "qq2.wav"), id="qq2")
    assert caught.value.stored == str(stub / "qq2.txt")
    assert sorted(os.listdir(stub)) == ["qq1.wav", "qq2.txt"]


def test_a_name_filed_on_the_server_of_an_sshfs_archive_refuses_the_next_publish(
    sshfs: Sshfs, tmp_path: Path
) -> None:
    """On SSHFS, after a publish into a stub folder, a name another host files there for
    an identifier refuses publishing that identifier under another name."""
    mount = sshfs.mount("stubnames-publish")
    archive = create_archive(mount.mountpoint / "arch", "http://127.0.0.1:1/neurobank/")
    first, second = tmp_path / "one.wav", tmp_path / "two.wav"
    first.write_bytes(b"one")
    second.write_bytes(b"two")
    staged = durable.stage_copy(archive, first, ".nbankd-one")
    durable.publish(archive, staged.path, archive.stored_file("qq1", "qq1.wav"), id="qq1")
    (mount.remote / "arch" / "resources" / "qq" / "qq2.txt").write_bytes(b"theirs")
    staged = durable.stage_copy(archive, second, ".nbankd-two")
    with pytest.raises(errors.StoredUnderOtherName):
        durable.publish(archive, staged.path, archive.stored_file("qq2", "qq2.wav"), id="qq2")
    assert sorted(os.listdir(archive.resources_dir / "qq")) == ["qq1.wav", "qq2.txt"]
